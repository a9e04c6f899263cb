"""The main job end to end on the built-in sources, shrunk to the micro preset and a short budget."""

import json
from pathlib import Path

import pytest

from chatsmith import speedrun as S
from chatsmith.checkpoint import read_config
from chatsmith.cli import build_parser
from chatsmith.data.sources import available_sources
from conftest import REPO, cli

SOURCES = REPO / ".sources"


@pytest.mark.slow
@pytest.mark.skipif(not available_sources(str(SOURCES)), reason="built-in sources missing: run scripts/setup.sh")
def test_speedrun_runs_every_stage_and_writes_the_report(tmp_path):
    run = tmp_path / "run"
    assert cli("speedrun", "--minutes", 8, "--preset", "micro", "--vocab-size", 2048, "--out", run,
               "--sources-dir", SOURCES) == 0
    for stage, kind in (("base", None), ("sft", "sft"), ("reward", "reward"), ("rl", "rlhf"), ("dpo", "dpo")):
        d = run / stage
        assert (d / "config.json").exists() and (d / "metrics.jsonl").exists(), stage
        if kind:
            assert json.loads((d / "config.json").read_text())["chatsmith"]["stage"] == kind
    assert read_config(run / "reward").score_head
    res = json.loads((run / "speedrun.json").read_text())
    assert set(res["stages"]) >= {"data", "tokenizer", "pretrain", "baseline", "sft", "reward", "rl", "dpo", "judge"}
    check_stage_budgets(run, res, minutes=8)
    rl = res["rl_eval"]
    assert set(rl["init"]["exact_match"]) == set(rl["rl"]["exact_match"]) >= {"arithmetic", "number_sense"}
    # the same-compute SFT control, on the same held-out prompts; mid-training drew task text
    assert set(rl["control"]["exact_match"]) == set(rl["rl"]["exact_match"]) and (run / "rl" / "control").is_dir()
    assert res["stages"]["pretrain"]["mix"]["token_share"]["tasks"] > 0
    assert res["stages"]["pretrain"]["mix"]["excluded_problems"] > 0
    assert json.loads((run / "rl" / "config.json").read_text())["chatsmith"]["algo"] == "rft"
    assert 0 <= res["judge"]["dpo_win_rate_vs_sft"] <= 1
    report = (run / "report.md").read_text()
    assert "dpo" in report and "rl" in report
    assert list(Path(run).rglob("*.png"))
    # an interrupted or finished run continues with --resume instead of starting over
    assert cli("speedrun", "--minutes", 8, "--preset", "micro", "--out", run, "--sources-dir", SOURCES) == 2


def check_stage_budgets(run: Path, res: dict, minutes: float):
    """The time budget, checked on what the run recorded rather than on how long it took: every
    training stage ran under a --max-minutes budget with its schedule fitted to it and stored, and
    the budgets are a split of what the fixed costs (data, tokenizer, the reserved evaluation
    seconds) leave of the total. The exact split is checked on a fake clock below."""
    assert res["minutes_budget"] == minutes
    st = res["stages"]
    dirs = {"pretrain": "base", "sft": "sft", "reward": "reward", "rl": "rl", "dpo": "dpo"}
    budget = {}
    for stage, d in dirs.items():
        state = json.loads((run / d / "trainer_state.json").read_text())
        tc = state["train_config"]
        assert tc["max_minutes"] and tc["max_minutes"] > 0 and tc["max_steps"] is None, stage
        budget[stage] = tc["max_minutes"] * 60
        # the schedule length was fitted to the budget and stored; the stage ended inside it
        assert state["max_steps"] is not None, stage
        assert st[stage]["steps"] <= st[stage]["max_steps"] == state["max_steps"], stage
    # pretraining goes first: its share of the training time, less 15 s for tokenising the corpus
    train_s = (budget["pretrain"] + 15) / S.SHARES["pretrain"]
    setup_s = st["data"]["seconds"] + st["tokenizer"]["seconds"]
    assert 120 <= train_s <= minutes * 60 - S.FIXED_S - setup_s + 1
    # a later stage gets at least 20 s (DPO 0.33 min), and at most what the plan holds up to its end
    names = list(S.SHARES)
    for stage in names[1:]:
        planned = sum(S.SHARES[k] for k in names[:names.index(stage) + 1]) * train_s
        assert (20 if stage != "dpo" else 0.33 * 60) - 0.5 <= budget[stage] <= planned + 1, (stage, budget)


# --------------------------------------------------------------------------- the budget split, fast
#
# speedrun.run with every stage replaced by a stand-in that takes a known number of seconds on a
# fake clock: a training stage trains for exactly the --max-minutes it was given (or a chosen
# over/underrun), the evaluations around it take exactly the seconds the speedrun reserves for them.
# What is checked is the arithmetic of the plan, on any machine, in well under a second (to 0.2 s:
# the speedrun rounds the stage seconds it records, and plans with them, to 0.1 s).

class FakeRun:
    def __init__(self, monkeypatch, tmp_path, minutes=15.0, drift=None, preset="micro"):
        import types

        from chatsmith.train import dpo, pretrain, reward, rlhf, sft

        self.now, self.budgets, self.drift, self.presets = 1e6, {}, drift or {}, {}
        self.out, self.minutes, self.preset = tmp_path / "run", minutes, preset
        mp = monkeypatch
        mp.setattr(S, "time", types.SimpleNamespace(time=lambda: self.now))
        mp.setattr(S, "available_sources", lambda d: ["fake"])
        mp.setattr(S, "build_corpus", self.fixed(10, lambda out, **k: self.write(out / "corpus_meta.json", {})))
        mp.setattr(S, "build_dialogues", self.fixed(2, lambda out, **k: (
            self.write(out / "dialogues_meta.json", {"families": {}}), self.write(out / "heldout.jsonl", ""))))
        mp.setattr(S, "build_preferences", self.fixed(1, lambda out, **k: self.write(out / "pairs_heldout.jsonl", "")))
        mp.setattr(S, "train_command", self.fixed(
            5, lambda inp, vs, out, val=None: self.write(Path(out) / "tokenizer_stats.json", {"vocab_size": vs})))
        mp.setattr(S, "compare_with_ngram", self.fixed(S.BASELINE_S, lambda *a, **k: {
            "neural_val_bpb": 2.0, "ngram3_val_bpb": 2.5}))
        mp.setattr(pretrain, "run", self.stage("pretrain", before=S.SHARD_S))  # tokenising the corpus into shards
        mp.setattr(sft, "run", self.stage("sft", before=S.SFT_EVAL_S / 2, after=S.SFT_EVAL_S / 2))
        mp.setattr(reward, "run", self.stage("reward", after=S.REWARD_EVAL_S))
        mp.setattr(rlhf, "run", self.stage("rl", after=S.RL_EVAL_S))
        mp.setattr(dpo, "sample_pairs", self.fixed(20, lambda *a, **k: {"pairs": 1, "prompts": 1}))
        mp.setattr(dpo, "run", self.stage("dpo", after=S.DPO_EVAL_S))
        mp.setattr(S, "judge", self.fixed(S.JUDGE_S, lambda *a, **k: {"dpo_win_rate_vs_sft": 0.5, "prompts": 1}))
        fake_tok = types.SimpleNamespace(encode=lambda *a, **k: [1], render_chat=lambda *a, **k: ([1], None))
        comp = types.SimpleNamespace(text="ok")
        mp.setattr(S, "load_model", lambda d: None)
        mp.setattr(S.Tokenizer, "load", staticmethod(lambda d: fake_tok))
        mp.setattr(S, "Engine", lambda m, t: types.SimpleNamespace(tok=t, generate=lambda *a: [comp]))
        mp.setattr(S, "write_report", lambda d: Path(d) / "report.md")

    @staticmethod
    def write(path, content):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))

    def fixed(self, seconds, fn):
        def wrapped(*a, **k):
            self.now += seconds
            return fn(*a, **k)
        return wrapped

    def stage(self, name, before=0.0, after=0.0):
        """A training stage: `before` s of preparation, the trainer for its budget (+ drift), `after` s of evals."""
        def run(cfg, *a, **k):
            assert cfg.max_steps is None and cfg.max_minutes > 0  # a time budget, the schedule fitted to it
            self.budgets[name] = cfg.max_minutes * 60
            self.presets[name] = cfg.preset
            train = cfg.max_minutes * 60 + self.drift.get(name, 0.0)
            self.now += before + train + after
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            # what Trainer.fit returns: "seconds" is the trainer's own training time
            return {"steps": 10, "max_steps": 10, "tokens": 1000, "seconds": round(train, 1), "interrupted": False}
        return run

    def __call__(self):
        import types

        a = types.SimpleNamespace(minutes=self.minutes, out=str(self.out), resume=False, sources_dir="x",
                                  vocab_size=512, preset=self.preset, device="cpu", dtype="fp32", seed=0,
                                  mix=S.MIX, rl_algo="rft", curriculum=True)
        return S.run(a)

    @property
    def train_s(self):  # what is left for training after the setup (data 13 s, tokenizer 5 s) and reserves
        return self.minutes * 60 - 18 - S.FIXED_S


def test_speedrun_gives_pretraining_and_sft_their_shares(monkeypatch, tmp_path):
    run = FakeRun(monkeypatch, tmp_path)
    res = run()
    t = run.train_s
    # pretraining's share covers the corpus tokenising the speedrun allows for
    assert run.budgets["pretrain"] == pytest.approx(S.SHARES["pretrain"] * t - S.SHARD_S, abs=0.2)
    assert run.budgets["sft"] == pytest.approx(S.SHARES["sft"] * t, abs=0.2)
    assert set(run.budgets) == set(S.SHARES)
    assert res["minutes_budget"] == 15.0 and (run.out / "speedrun.json").exists()
    assert json.loads((run.out / "speedrun.json").read_text())["stages"]["pretrain"]["steps"] == 10


def test_speedrun_passes_unused_time_on_and_takes_overruns_back(monkeypatch, tmp_path):
    t = FakeRun(monkeypatch, tmp_path).train_s
    later = 1 - S.SHARES["pretrain"]  # the stages after pretraining share its slack by their shares
    run = FakeRun(monkeypatch, tmp_path / "under", drift={"pretrain": -30.0})
    run()
    assert run.budgets["sft"] == pytest.approx(S.SHARES["sft"] * (t + 30 / later), abs=0.2)  # pretraining left 30 s
    assert run.budgets["rl"] == pytest.approx(S.SHARES["rl"] * (t + 30 / later), abs=0.2)
    run = FakeRun(monkeypatch, tmp_path / "over", drift={"pretrain": 40.0})
    run()
    # a 40 s overrun: every later stage gives up its part, RL (late) is not the one that starves
    for stage in ("sft", "reward", "rl"):
        assert run.budgets[stage] == pytest.approx(S.SHARES[stage] * (t - 40 / later), abs=0.2), stage
    run = FakeRun(monkeypatch, tmp_path / "reward-over", drift={"reward": 60.0})
    run()
    after_reward = S.SHARES["rl"] + S.SHARES["dpo"]
    assert run.budgets["rl"] == pytest.approx(S.SHARES["rl"] * t - 60 * S.SHARES["rl"] / after_reward, abs=0.2)
    run = FakeRun(monkeypatch, tmp_path / "way-over", drift={"pretrain": 10_000.0})
    run()
    assert run.budgets["sft"] == pytest.approx(20, abs=0.2)  # never less than 20 s


def test_speedrun_stages_add_up_to_the_budget(monkeypatch, tmp_path):
    run = FakeRun(monkeypatch, tmp_path)
    res = run()
    t = run.train_s
    for stage in ("reward", "rl"):
        assert run.budgets[stage] == pytest.approx(S.SHARES[stage] * t, abs=0.2), stage
    assert run.budgets["dpo"] == pytest.approx(S.SHARES["dpo"] * t - 20, abs=0.2)  # less the 20 s of pair sampling
    assert S.shares_for(60) is S.SHARES_LONG and S.shares_for(15) is S.SHARES
    assert sum(S.SHARES.values()) == pytest.approx(1) and sum(S.SHARES_LONG.values()) == pytest.approx(1)
    # every stage used exactly what it was given, every fixed cost its reserve: the run ends with
    # RESERVE_S left for the samples and the report (which take no time here)
    assert res["seconds"] == pytest.approx(run.minutes * 60 - S.RESERVE_S, abs=0.2)


def test_speedrun_base_model_shape_follows_the_budget(monkeypatch, tmp_path):
    # no --preset: the shape measured best for the budget; --preset wins over it
    for minutes, given, expected in ((15.0, None, "mini"), (60.0, None, "tiny"), (15.0, "tiny", "tiny")):
        run = FakeRun(monkeypatch, tmp_path / f"{minutes}-{given}", minutes=minutes, preset=given)
        run()
        assert run.presets["pretrain"] == expected, (minutes, given)
    assert build_parser().parse_args(["speedrun"]).preset is None
    # --resume of a run that began pretraining with another shape keeps that shape
    ckpt = tmp_path / "old" / "base" / "checkpoints" / "step-00000040"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"train_config": {"preset": "tiny"}}))
    assert S.preset_for(15.0, tmp_path / "old") == "tiny" and S.preset_for(15.0, tmp_path / "new") == "mini"


def test_speedrun_every_second_belongs_to_a_stage_row(monkeypatch, tmp_path):
    run = FakeRun(monkeypatch, tmp_path)
    res = run()
    st = res["stages"]
    assert st["dpo pairs"]["seconds"] == pytest.approx(20, abs=0.1)  # pair sampling is its own row
    assert "samples" in st and st["samples"]["invalid_utf8_sequences"] == 0
    assert sum(v["seconds"] for v in st.values()) == pytest.approx(res["seconds"], abs=0.5)
