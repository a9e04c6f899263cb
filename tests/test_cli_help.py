"""Every verb's --help: one line of help per flag, its default shown once, its choices named."""

from __future__ import annotations

import argparse
import re

import pytest

from chatsmith import cli
from chatsmith.train import rlhf


def _verbs():
    """(name, parser) for every verb and action, e.g. ("data build", parser)."""
    def walk(p, name):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sp in a.choices.items():
                    yield from walk(sp, f"{name} {sub_name}".strip())
                return
        yield name, p
    return list(walk(cli.build_parser(), ""))


VERBS = _verbs()


def _flag_help(parser, action) -> str:
    """The help block argparse prints for one flag (as a user reads it, wrapped lines joined)."""
    f = parser._get_formatter()
    f.add_argument(action)
    return " ".join(f.format_help().split())


def test_every_verb_is_found():
    names = {n for n, _ in VERBS}
    assert {"chat", "generate", "serve", "rlhf", "pretrain", "speedrun", "data build", "lora merge"} <= names
    assert len(names) == len(cli.VERBS)


@pytest.mark.parametrize("name,parser", VERBS, ids=[n for n, _ in VERBS])
def test_help_shows_each_default_once(name, parser):
    text = parser.format_help()  # the whole help renders (a stray % in a help string would raise)
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        shown = _flag_help(parser, a)
        assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest}: no help text"
        assert "\n" not in a.help, f"{name} {a.option_strings}: help is more than one line"
        n = shown.count("(default:")
        assert n <= 1, f"{name}: {shown!r} shows its default {n} times"
        assert "(default: None)" not in shown, f"{name}: {shown!r}"
        if a.option_strings and not a.required and a.default not in (None, argparse.SUPPRESS):
            assert n == 1, f"{name}: {shown!r} does not show its default {a.default!r}"
            if not isinstance(a.default, (list, bool)) and "(default: %(default)" not in a.help \
                    and "(default:" not in a.help:
                assert f"(default: {a.default})" in shown
        if a.choices:
            assert "{" + ",".join(map(str, a.choices)) + "}" in text.replace("\n", "").replace(" ", "") or \
                all(str(c) in text for c in a.choices), f"{name} {a.option_strings}: choices not shown"


def test_rlhf_help_names_the_algorithms_and_reward_sources(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["rlhf", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--algo {ppo,grpo,reinforce,rft,grpo-simple}" in out
    assert set(rlhf.ALGOS) == {"ppo", "grpo", "reinforce", "rft"} and set(rlhf.PRESETS) == {"grpo-simple"}
    for source in ("reward-model directory", "exact", "format", "module:function", "discriminator"):
        assert source in out
    assert out.count("(default: ppo)") == 1
    assert re.search(r"--schedule \{cosine,wsd,constant\}.*?\(default: constant\)", out)


def test_chat_and_generate_show_sampling_defaults(capsys):
    for verb, expect in (("chat", ["(default: 0.7)", "(default: 0.95)", "(default: 256)"]),
                         ("generate", ["(default: 128)", "(default: 0.8)"])):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([verb, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for e in expect:
            assert out.count(e) >= 1, (verb, e)
        assert "(default: 128) (default: 128)" not in out


def test_a_bad_choice_is_a_user_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "base"
    rc = cli.main(["pretrain", "--input", str(tmp_path), "--preset", "huge", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "huge" in err and "tiny" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_speedrun_checks_its_flags_before_building_anything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["speedrun", "--minutes", "1", "--out", str(out), "--sources-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--minutes 1 is too short" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_pretrain_failing_while_preparing_leaves_no_output_dir(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    out = tmp_path / "runs" / "base"
    rc = cli.main(["pretrain", "--input", str(bad), "--preset", "micro", "--vocab-size", "300", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2" in err
    assert not (tmp_path / "runs").exists()  # nor the parent it created
    rc = cli.main(["pretrain", "--input", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == 2 and "no such file" in capsys.readouterr().err and not out.exists()
