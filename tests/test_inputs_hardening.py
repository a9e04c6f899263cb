"""Careless and hostile inputs through the CLI (issue 23): huge integers in JSONL records, FIFOs and
folders where a file belongs, empty training input, a failed pretrain leaving nothing behind, and a
run killed while writing its first checkpoint resuming with matching metrics and no temporaries."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from chatsmith.atomic import remove_stale_temporaries
from conftest import PRETRAIN_FLAGS, REPO, cli

HUGE = "1" * 5000  # Python refuses to read an integer of more than 4300 digits


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the body blocks, e.g. reading a FIFO."""
    def expired(*_):
        raise AssertionError(f"blocked for {seconds}s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fails(capsys, *args, match: str):
    with deadline(120):
        code = cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and "Traceback" not in err, (code, err)
    return err


def _commands(base_model, tmp_path, data):
    """Every reader of user records, on the file `data`."""
    out = tmp_path / "out"
    return {
        "pretrain": ("pretrain", "--input", data, "--out", out, "--preset", "micro", "--max-steps", 1),
        "tokenizer": ("tokenizer", "train", "--input", data, "--vocab-size", 300, "--out", out),
        "sft": ("sft", "--data", data, "--init", base_model, "--out", out, "--max-steps", 1),
        "reward": ("reward", "--data", data, "--init", base_model, "--out", out, "--max-steps", 1),
        "dpo": ("dpo", "--data", data, "--init", base_model, "--out", out, "--max-steps", 1),
        "eval": ("eval", base_model, "--tasks", data, "--out", out),
        "eval lm": ("eval", base_model, "--tasks", f"lm:{data}", "--out", out),
        "eval reward": ("eval", base_model, "--tasks", f"reward:{data}", "--out", out),
    }


RECORDS = {  # a record each reader accepts, but for one integer of 5000 digits
    "pretrain": '{"text": "a long enough document about the sea", "n": %s}',
    "tokenizer": '{"text": "a long enough document about the sea", "n": %s}',
    "sft": '{"prompt": "hi", "completion": "hello", "n": %s}',
    "reward": '{"prompt": "hi", "chosen": "a", "rejected": "b", "n": %s}',
    "dpo": '{"prompt": "hi", "chosen": "a", "rejected": "b", "n": %s}',
    "eval": '{"prompt": "What is 2 + 2?", "answer": "4", "n": %s}',
    "eval lm": '{"text": "a long enough document about the sea", "n": %s}',
    "eval reward": '{"prompt": "Tell me about the sea.", "n": %s}',
}


@pytest.mark.parametrize("verb", list(RECORDS))
def test_huge_integers_are_exit_2_naming_file_and_line(verb, base_model, tmp_path, capsys):
    f = tmp_path / "data.jsonl"
    f.write_text(RECORDS[verb] % 1 + "\n" + RECORDS[verb] % HUGE + "\n")
    fails(capsys, *_commands(base_model, tmp_path, f)[verb], match=f"{f}:2: a number of more than 4300 digits")
    assert not (tmp_path / "out").exists()


def test_huge_integers_in_json_and_yaml_chat_files(base_model, tmp_path, capsys):
    j = tmp_path / "chat.json"
    j.write_text('[\n  {"prompt": "hi", "completion": "hello"},\n  {"prompt": "x", "n": %s}\n]\n' % HUGE)
    fails(capsys, "sft", "--data", j, "--init", base_model, "--out", tmp_path / "o", match=f"{j}:3: a number of")
    y = tmp_path / "chat.yaml"
    y.write_text("- prompt: hi\n  completion: hello\n- prompt: x\n  n: %s\n" % HUGE)
    fails(capsys, "sft", "--data", y, "--init", base_model, "--out", tmp_path / "o", match=f"{y}:3: a number of")


@pytest.mark.parametrize("verb", ["pretrain", "tokenizer", "sft", "reward", "dpo", "eval", "eval lm",
                                  "eval reward"])
def test_a_fifo_or_a_folder_is_refused_without_blocking(verb, base_model, tmp_path, capsys):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    fails(capsys, *_commands(base_model, tmp_path, fifo)[verb], match=f"{fifo}: is a FIFO (named pipe), not a regular")
    assert not (tmp_path / "out").exists()
    if verb in ("reward", "dpo", "eval", "eval reward", "sft"):  # these read files only: a folder is named as one
        folder = tmp_path / "dir.jsonl"
        folder.mkdir()
        fails(capsys, *_commands(base_model, tmp_path, folder)[verb], match=f"{folder}: is a folder")


def test_empty_training_input_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails(capsys, "tokenizer", "train", "--input", empty, "--vocab-size", 300, "--out", tmp_path / "tok",
          match="no text to train on")
    assert not (tmp_path / "tok").exists()


# --- a failed or killed pretrain --------------------------------------------------------------------

def test_failed_pretrain_leaves_no_out_behind(corpus_dir, tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text((corpus_dir / "train.jsonl").read_text())
    # fails after the corpus, the tokenizer and the token shards were built: none of them stays
    out = tmp_path / "run"
    fails(capsys, "pretrain", "--input", raw, "--out", out, "--preset", "micro", "--vocab-size", 300,
          "--seq-len", 500, "--max-steps", 1, match="beyond")
    assert not out.exists()
    # an --out that existed keeps what it held, and only that
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(capsys, "pretrain", "--input", raw, "--out", out, "--preset", "micro", "--vocab-size", 300,
          "--seq-len", 500, "--max-steps", 1, match="beyond")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_stale_temporaries_are_found_and_only_they():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        keep = [d / "metrics.jsonl", d / "corpus" / "train.jsonl", d / "checkpoints" / "step-00000010" / "x"]
        stale = [d / ".tmp-metrics.jsonl-ab12", d / "corpus" / ".train.jsonl.tmp-4242",
                 d / "checkpoints" / ".tmp-step-00000020-zz" / "model.safetensors", d / ".old-model-77" / "f"]
        for p in keep + stale:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
        remove_stale_temporaries(d)
        assert all(p.exists() for p in keep) and not any(p.exists() or p.parent.name.startswith(".")
                                                          and p.parent.exists() for p in stale)


# a pretrain that dies (os._exit: no cleanup runs, as under SIGKILL) in the middle of writing its
# first checkpoint: the temporary checkpoint directory is half full and no checkpoint exists
DIE_IN_FIRST_CHECKPOINT = """
import os, sys
import chatsmith.checkpoint as C
import chatsmith.train.trainer as T

def dying(path, model, tokenizer_dir=None, *a, **k):
    with C.atomic_dir(path) as tmp:
        C.write_model_files(tmp, model, tokenizer_dir)
        os._exit(137)

T.save_checkpoint = dying
from chatsmith.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_in_first_checkpoint_resumes_fresh_with_matching_metrics(corpus_dir, tokenizer_dir, tmp_path):
    def pretrain(out, *extra, script=None):
        args = ["pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out, "--max-steps", 20,
                "--save-every", 10, *PRETRAIN_FLAGS, *extra]
        cmd = [sys.executable, *(["-c", script] if script else ["-m", "chatsmith"]), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert pretrain(ref).returncode == 0
    r = pretrain(killed, script=DIE_IN_FIRST_CHECKPOINT)
    assert r.returncode == 137, r.stderr
    rows = [json.loads(ln) for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in rows) == 10  # the killed run logged its first 10 steps
    assert list((killed / "checkpoints").glob(".tmp-step-*"))  # and left a half-written checkpoint
    r = pretrain(killed, "--resume")
    assert r.returncode == 0, r.stderr
    assert "starting fresh" in r.stderr

    def steps(d):
        return [(m["step"], m.get("loss"), m.get("val_loss"))
                for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert steps(killed) == steps(ref)  # no row twice: the metrics match the run resumed from (none)
    assert not [p for p in killed.rglob(".tmp-*")]


def test_atomic_outputs_get_the_usual_file_mode(tmp_path):
    """Outputs renamed from a temporary file or folder have the mode a plain open/mkdir gives
    (mkstemp and mkdtemp make 0600 / 0700, which would hide them from the user's group)."""
    import os
    import stat

    from chatsmith.atomic import atomic_dir, write_text

    umask = os.umask(0)
    os.umask(umask)
    write_text(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
