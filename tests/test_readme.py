"""The README's commands, as a user copy-pastes them.

Every `chatsmith …` line in the README's bash blocks must parse with the real command line (a
renamed flag, a dropped verb or a changed choice fails here, not in front of a user), and every
repository path the README names must exist. The cheap blocks are run for real under `-m slow`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from chatsmith.cli import build_parser, shorthand
from chatsmith.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_lines() -> list[str]:
    """The README's bash blocks as logical lines: `\\` continuations joined, comments dropped."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M):
        block = re.sub(r"<<'(\w+)'\n.*?^\1$", "", block, flags=re.S | re.M)  # here-documents are data
        for line in block.replace("\\\n", " ").splitlines():
            out.append(line.split(" # ")[0].strip())
    return [ln for ln in out if ln and not ln.startswith("#")]


def chatsmith_argv(line: str) -> list[str] | None:
    """The arguments after `chatsmith` (bare, `.venv/bin/…` or `-m chatsmith`), else None."""
    for cmd in re.split(r"&&|\||;", line):
        words = shlex.split(cmd.strip().rstrip("&").strip())
        for i, w in enumerate(words):
            if w in ("chatsmith", ".venv/bin/chatsmith"):  # also `torchrun … -m chatsmith`
                return words[i + 1:]
    return None


COMMANDS = [ln for ln in bash_lines() if chatsmith_argv(ln) is not None]
# Lines written as a synopsis ("[--flag]" optional parts, "..." for the rest) are not commands.
RUNNABLE = [ln for ln in COMMANDS if " [-" not in ln and "..." not in ln]


def test_the_readme_has_commands():
    assert len(RUNNABLE) >= 60, len(RUNNABLE)


@pytest.mark.parametrize("line", RUNNABLE)
def test_every_readme_command_parses(line, capsys):
    argv = shorthand(chatsmith_argv(line))
    try:
        build_parser().parse_args(argv)
    except UserError as e:  # a bad flag, choice or missing argument: what the user would see
        pytest.fail(f"{line}\n{e}")
    except SystemExit as e:  # --help
        assert e.code == 0 and ("--help" in argv or "-h" in argv), capsys.readouterr().err


def test_paths_the_readme_names_exist():
    named = set(re.findall(r"`((?:bench|scripts|tests|chatsmith|docs)/[\w./-]+\.(?:py|sh|png|md|json|yaml))`",
                           README))
    named |= set(re.findall(r"python ((?:bench|scripts|tests)/[\w./-]+\.py)", README))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


# Run verbatim, in this order, in a scratch directory: the README's cheap commands. The test fails
# if one of them is no longer in the README, so the list follows the README.
CHEAP = [
    "chatsmith --help",
    "chatsmith data build --what sentiment --out data",
    "chatsmith data build --what qa --out data",
    "chatsmith generate smollm2 --prompt \"The capital of France is\" --temperature 0",
    "chatsmith import minilm runs/minilm",
]


@pytest.mark.slow
def test_cheap_readme_commands_run_as_written(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for line in CHEAP:
        assert any(ln.startswith(line) for ln in bash_lines()), f"no longer in the README: {line}"
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
    assert "Paris" in subprocess.run(["bash", "-c", CHEAP[3]], cwd=tmp_path, env=env, capture_output=True,
                                     text=True, timeout=600).stdout
