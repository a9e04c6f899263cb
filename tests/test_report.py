"""`chatsmith report`: a run directory of micro stages -> report.md + valid PNGs; robust to missing
stages, unknown metric keys, a single training output directory and broken lines."""

import json
import shutil

import pytest

from chatsmith.report import fmt, write_report
from conftest import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def assert_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()  # a complete, uncorrupted PNG stream
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.fixture(scope="module")
def run_dir(base_model, tmp_path_factory):
    """base/ (the micro model), sft/ (a real micro SFT run with held-out metrics and a `chatsmith
    eval`), rl/ (logged rows in the RL layout, with a key nobody knows) and a speedrun.json."""
    run = tmp_path_factory.mktemp("run") / "run"
    run.mkdir()
    shutil.copytree(base_model, run / "base", ignore=shutil.ignore_patterns("checkpoints", "data"))
    d = tmp_path_factory.mktemp("dialogues")
    facts = [(f"What is {a} + {b}?", str(a + b)) for a in range(2, 7) for b in range(3, 6)]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {ans}."}],
             "family": "arithmetic", "answers": [ans]} for q, ans in facts]
    write_jsonl(d / "train.jsonl", rows[:-3])
    write_jsonl(d / "heldout.jsonl", rows[-3:])
    assert cli("sft", "--data", d / "train.jsonl", "--heldout", d / "heldout.jsonl", "--init", run / "base",
               "--out", run / "sft", "--max-steps", 6, "--batch-size", 4, "--log-every", 1, "--eval-every", 3,
               "--eval-batches", 1, "--eval-samples", 2, "--eval-max-new-tokens", 6, "--device", "cpu") == 0
    assert cli("eval", run / "sft", "--tasks", "arithmetic", "--heldout", d / "heldout.jsonl",
               "--max-new-tokens", 4, "--device", "cpu") == 0
    rl = run / "rl"
    rl.mkdir()
    (rl / "config.json").write_text(json.dumps({"model_type": "llama", "chatsmith": {"stage": "ppo"}}))
    write_jsonl(rl / "metrics.jsonl", [
        {"step": s, "loss": 1.0 / s, "lr": 1e-5, "tokens": 100 * s, "reward": 0.1 * s, "kl": 0.01 * s,
         "entropy": 2.0 - 0.1 * s, "clip_frac": 0.05, "value_loss": 0.5 / s, "response_len": 20 + s,
         "mystery_metric": s * s} for s in range(1, 9)] + [{"step": 8, "heldout_reward": 0.7}])
    (rl / "metrics.jsonl").open("a").write('{"step": 9, "loss": 0.1')  # a killed run's half line
    (rl / "train_summary.json").write_text(json.dumps({"steps": 8, "tokens": 800, "seconds": 12.5,
                                                       "heldout_reward": 0.7, "win_rate": {"vs_sft": 0.625}}))
    write_jsonl(rl / "rl_eval.json", [{  # one JSON object (written as a single line)
        "init": {"exact_match": {"arithmetic": 0.25}, "heldout_reward": 0.1, "heldout_prompts": 4},
        "rl": {"exact_match": {"arithmetic": 0.5}, "heldout_reward": 0.75, "heldout_prompts": 4,
               "samples": [{"prompt": "What is 2 + 2?", "reply": "RL says 4"}]},
        "discriminator_accuracy": [0.5, 0.6]}])
    rm = run / "reward"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"chatsmith": {"stage": "reward"}}))
    write_jsonl(rm / "metrics.jsonl", [{"step": s, "loss": 0.7 - 0.05 * s, "accuracy": 0.5 + 0.05 * s}
                                       for s in range(1, 5)])
    (rm / "reward_eval.json").write_text(json.dumps({"untrained_head": {"heldout_accuracy": 0.5},
                                                     "reward": {"heldout_accuracy": 0.875}}))
    (run / "speedrun.json").write_text(json.dumps({
        "minutes_budget": 15, "seconds": 100.0,
        "stages": {"data": {"seconds": 3.0}, "tokenizer": {"seconds": 4.0, "vocab_size": 512},
                   "pretrain": {"seconds": 50.0, "steps": 60, "tokens": 15360},
                   "baseline": {"seconds": 2.0, "neural_val_bpb": 2.5, "ngram3_val_bpb": 3.1},
                   "sft": {"seconds": 20.0, "steps": 6, "tokens": 500}},
        "baseline": {"neural_val_bpb": 2.5, "ngram3_val_bpb": 3.1, "ngram3_same_tokens_val_bpb": 3.4,
                     "val_tokens": 10, "val_bytes": 40},
        "judge": {"prompts": 8, "rl_win_rate_vs_sft": 0.8125, "sft_mean_reward": -0.5, "rl_mean_reward": 0.25,
                  "examples": [{"prompt": "Who are you?", "sft": "a bot", "rl": "I am chatsmith"}]},
        "samples": [{"prompt": "The king", "completion": " said | to the queen"}],
        "conversation": {"sft": [{"user": "What is 2 + 2?", "assistant": "4"}],
                         "rl": [{"user": "What is 2 + 2?", "assistant": "four"}]}}))
    return run


def test_report_on_a_micro_run(run_dir):
    assert cli("report", run_dir) == 0
    md = (run_dir / "report.md").read_text()
    # the metrics table has one column per stage, the n-gram baseline included
    header = next(ln for ln in md.splitlines() if ln.startswith("| metric"))
    for col in ("base", "sft", "reward", "reward: untrained_head", "rl", "rl: init", "3-gram"):
        assert f" {col} |" in header
    assert header.index(" base ") < header.index(" sft ") < header.index(" reward: untrained_head ") < header.index(
        " reward ") < header.index(" rl: init ") < header.index(" rl ")

    def row(name):  # {column: cell} of the table row named `name`
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
        return dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))

    assert row("held-out RL prompts: exact match: arithmetic")["rl"] == "0.5"
    assert row("held-out RL prompts: exact match: arithmetic")["rl: init"] == "0.25"
    acc = row("held-out pairs: accuracy")
    assert acc["reward"] == "0.875" and acc["reward: untrained_head"] == "0.5"
    assert "heldout prompts" not in md and "RL says 4" in md
    bpb = row("val bits-per-byte (all val documents)")
    assert (bpb["base"], bpb["3-gram"], bpb["3-gram (same tokens)"]) == ("2.5", "3.1", "3.4")
    assert row("reward-model judge: win rate vs sft")["rl"] == "0.8125"
    judge = row("reward-model judge: mean reward")
    assert judge["sft"] == "-0.5" and judge["rl"] == "0.25"
    assert "I am chatsmith" in md and "### rl, greedy" in md and "bot> four" in md
    sft_eval = json.loads((run_dir / "sft" / "sft_eval.json").read_text())
    loss = row("held-out chats: assistant-token loss")
    assert (loss["base"], loss["sft"]) == (fmt(sft_eval["base"]["assistant_loss"]), fmt(sft_eval["sft"]["assistant_loss"]))
    assert "| arithmetic: accuracy" in md and row("win rate: vs sft")["rl"] == "0.625"
    # the final eval in train_summary.json (heldout_reward 0.7) repeats rl_eval.json's own side: one row
    assert "heldout_reward" not in md and "| held-out reward |" not in md
    assert row("held-out RL prompts: reward")["rl"] == "0.75"
    # SFT's held-out loss is the assistant-token loss of sft_eval.json: one row, not two
    labels = [ln.split("|")[1].strip() for ln in md.split("## Metrics by stage")[1].split("\n\n")[1].splitlines()[2:]]
    assert [m for m in labels if "loss" in m and m != "final train loss" and row(m)["sft"] != "–"] == [
        "held-out chats: assistant-token loss"]
    # time and tokens per stage, speedrun's record merged with the stage directories
    assert "| data | 3 |" in md and "| base | 50 | 60 | 15,360 |" in md and "| rl | 12.5 | 8 | 800 |" in md
    # samples (a "|" in a sample does not break the markdown) and a note on the broken line
    assert "The king said | to the queen" in md and "you> What is 2 + 2?" in md
    assert "1 unreadable line(s)" in md
    pngs = {p.name for p in run_dir.glob("*.png")}
    assert {"loss.png", "reward_kl.png", "accuracy.png", "time.png", "metrics_rl.png", "metrics_base.png"} <= pngs
    for p in run_dir.glob("*.png"):
        assert_png(p)
        assert f"]({p.name})" in md
    # an unknown key is plotted, not dropped
    from chatsmith.report import find_stages

    rl = next(s for s in find_stages(run_dir) if s.name == "rl")
    assert rl.kind == "ppo" and any("mystery_metric" in r for r in rl.rows)


def test_report_skips_missing_stages_and_reads_one_model_dir(run_dir, tmp_path):
    part = tmp_path / "partial"
    part.mkdir()
    shutil.copytree(run_dir / "base", part / "base")
    # an older speedrun.json: one conversation as a list, no judge
    (part / "speedrun.json").write_text(json.dumps({"conversation": [{"user": "Hi", "assistant": "Hello"}]}))
    path = write_report(part)
    md = path.read_text()
    assert "bot> Hello" in md
    assert "| metric | base |" in md and "sft" not in md.split("## Plots")[0]
    assert (part / "loss.png").is_file() and not (part / "reward_kl.png").exists()
    out = tmp_path / "one"
    path = write_report(run_dir / "sft", out=out)  # a single training output directory
    md = path.read_text()
    assert "| metric | sft |" in md.replace("| base | sft |", "| sft |") or "| sft |" in md
    assert_png(out / "loss.png")


def test_report_bad_input(tmp_path):
    assert cli("report", tmp_path / "missing") == 2
    (tmp_path / "empty").mkdir()
    assert cli("report", tmp_path / "empty") == 2
