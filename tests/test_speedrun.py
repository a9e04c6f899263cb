"""The main job end to end on the built-in sources, shrunk to the micro preset and a short budget."""

import json
from pathlib import Path

import pytest

from chatsmith.checkpoint import read_config
from chatsmith.data.sources import available_sources
from conftest import REPO, cli

SOURCES = REPO / ".sources"


@pytest.mark.slow
@pytest.mark.skipif(not available_sources(str(SOURCES)), reason="built-in sources missing: run scripts/setup.sh")
def test_speedrun_runs_every_stage_and_writes_the_report(tmp_path):
    run = tmp_path / "run"
    assert cli("speedrun", "--minutes", 7, "--preset", "micro", "--vocab-size", 2048, "--out", run,
               "--sources-dir", SOURCES) == 0
    for stage, kind in (("base", None), ("sft", "sft"), ("reward", "reward"), ("rl", "rlhf"), ("dpo", "dpo")):
        d = run / stage
        assert (d / "config.json").exists() and (d / "metrics.jsonl").exists(), stage
        if kind:
            assert json.loads((d / "config.json").read_text())["chatsmith"]["stage"] == kind
    assert read_config(run / "reward").score_head
    res = json.loads((run / "speedrun.json").read_text())
    assert set(res["stages"]) >= {"data", "tokenizer", "pretrain", "baseline", "sft", "reward", "rl", "dpo", "judge"}
    assert res["seconds"] < 7 * 60 * 1.25  # the budget holds, with slack for a busy machine
    rl = res["rl_eval"]
    assert set(rl["init"]["exact_match"]) == set(rl["rl"]["exact_match"]) >= {"arithmetic", "number_sense"}
    assert 0 <= res["judge"]["dpo_win_rate_vs_sft"] <= 1
    report = (run / "report.md").read_text()
    assert "dpo" in report and "rl" in report
    assert list(Path(run).rglob("*.png"))
    # an interrupted or finished run continues with --resume instead of starting over
    assert cli("speedrun", "--minutes", 7, "--preset", "micro", "--out", run, "--sources-dir", SOURCES) == 2
