"""`chatsmith report`: a run directory of micro stages -> report.md + valid PNGs; robust to missing
stages, unknown metric keys, a single training output directory and broken lines."""

import json
import math
import re
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


# --- a realistic speedrun directory (no training): the report card's own checks --------------------

@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    from report_fixtures import speedrun_dir

    run = speedrun_dir(tmp_path_factory.mktemp("speedrun") / "run")
    write_report(run)
    return run


def table(md: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The metrics table: its columns and {row label: {column: cell}}."""
    lines = md.split("## Metrics by stage")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[0] not in rows, f"row {cells[0]!r} twice"
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return header[1:], rows


def test_one_model_on_two_prompt_sets_is_two_labelled_rows(speedrun):
    md = (speedrun / "report.md").read_text()
    _, rows = table(md)
    # the SFT model's ended share: 0.78 on held-out chats, 1.0 on the RL prompts (the "rl: init" side)
    assert rows["held-out chats: replies ended (share)"]["sft"] == "0.78"
    assert rows["held-out RL prompts: replies ended (share)"]["rl: init"] == "1"
    assert rows["held-out chats: replies ended (share)"]["rl: init"] == "–"
    assert not any(m.startswith("held-out ended") or m == "replies ended (share)" for m in rows)
    # every row of a before/after file names its prompt set, and the note says what each set is
    assert "- **held-out chats** (`sft/sft_eval.json`, columns `base`, `sft`): 64 items; greedy replies of up to 40" in md
    assert "- **held-out RL prompts** (`rl/rl_eval.json`, columns `rl: init` (before training), `rl`): 100 items; " \
           "greedy replies of up to 48 new tokens; families arithmetic, number_sense, word_problem" in md


def test_one_row_per_metric_with_human_names(speedrun):
    md = (speedrun / "report.md").read_text()
    _, rows = table(md)  # (a label twice fails inside)
    for label in rows:
        assert "_" not in re.sub(r"`[^`]*`", "", label), label
    assert "mean_reward_b" not in md and "win_rate" not in md
    # the judge: the speedrun's record and DPO's eval/metrics.json are one evaluation, one row per figure
    judge = [m for m in rows if "win rate vs" in m]
    assert judge == ["reward-model judge: win rate vs sft"] and rows[judge[0]]["dpo"] == "0.58"
    mean = rows["reward-model judge: mean reward"]
    assert (mean["sft"], mean["dpo"]) == ("0.12", "0.41")  # the compared model's mean in its own column
    assert not any(m.endswith((" wins", " ties", " losses")) for m in rows)
    assert rows["held-out reward accuracy"]["dpo"] == "0.6" and rows["held-out bits per byte"]["base"] == "1.72"
    # what DPO's train loss is when it is not the DPO loss
    assert "`dpo`'s final train loss is its objective, the DPO loss + 1 × the chosen reply's NLL" in md


def _stages(run):
    from chatsmith.report import find_stages

    return {s.name: s for s in find_stages(run)}


def _axes_with(fig, gid):
    return [ax for ax in fig.axes if any(ln.get_gid() == gid for ln in ax.lines)]


def test_losses_of_different_meaning_get_separate_axes(speedrun, tmp_path):
    from chatsmith.report import find_stages, loss_figure

    st = _stages(speedrun)
    fig = loss_figure([st["sft"], st["dpo"]])
    dpo_axes = [ax for ax in fig.axes if ax.get_title().startswith("dpo")]
    (held,) = [ax for ax in dpo_axes if any(ln.get_gid() == "heldout_loss" for ln in ax.lines)]
    assert {ln.get_gid() for ln in held.lines} == {"dpo_loss", "heldout_loss"}  # the same quantity, ~0.67
    (obj,) = [ax for ax in dpo_axes if any(ln.get_gid() == "loss" for ln in ax.lines)]
    assert obj is not held and "NLL" in obj.get_title()
    # SFT's train and held-out losses are one quantity: one axis
    (sft,) = [ax for ax in fig.axes if ax.get_title().startswith("sft")]
    assert {ln.get_gid() for ln in sft.lines} == {"loss", "heldout_loss"}
    # an older DPO run that logged no dpo_loss: the objective (~4.2) still never shares the held-out axis
    old = tmp_path / "dpo"
    shutil.copytree(speedrun / "dpo", old)
    rows = [json.loads(ln) for ln in (old / "metrics.jsonl").read_text().splitlines()]
    write_jsonl(old / "metrics.jsonl", [{k: v for k, v in r.items() if k != "dpo_loss"} for r in rows])
    fig = loss_figure(find_stages(old))
    assert all(len(ax.lines) == 1 for ax in fig.axes) and len(fig.axes) == 2


def test_short_series_are_points_on_integer_steps(speedrun):
    from chatsmith.report import loss_figure, other_figure, rl_figure

    st = _stages(speedrun)
    figs = [loss_figure([st["rl"], st["dpo"]]), rl_figure([st["rl"]]), other_figure(st["rl"], set())[0],
            other_figure(st["dpo"], set())[0]]
    for fig in figs:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
            for ln in ax.lines:
                if len(ln.get_xdata()) < 12:
                    assert ln.get_marker() == "o", (ax.get_title(), ln.get_gid())
    # three logged RL steps are ticked at exactly those steps
    (reward,) = [ax for ax in figs[1].axes if ax.get_title() == "reward"]
    assert list(reward.get_xticks()) == [2, 4, 6]


def test_other_metrics_are_fewer_larger_panels_under_a_clear_title(speedrun):
    from chatsmith.report import other_figure

    rl = _stages(speedrun)["rl"]
    keys = {k for r in rl.rows for k in r} - {"step", "tokens", "elapsed", "loss", "policy_loss", "reward", "kl",
                                                "entropy", "clip_frac", "response_len"}
    fig, notes = other_figure(rl, {"loss", "policy_loss", "reward", "kl", "entropy", "clip_frac", "response_len"})
    assert len(keys) >= 16 and len(fig.axes) <= 8
    # constant and single-valued keys are named in the text, not drawn
    assert "learning rate 1.000e-05 (constant)" in notes and "KL coefficient 0.02 (constant)" in notes
    assert any(n.startswith("exact match: arithmetic 0.26 (one value)") for n in notes)
    # the eval row's held-out ended share is its own series, not a jump at the last train step
    (shares,) = _axes_with(fig, "ended_share")
    assert {ln.get_gid() for ln in shares.lines} >= {"ended_share", "ended_share (held-out)", "kept_share"}
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(r)
    for ax in fig.axes:
        assert not title.overlaps(ax.title.get_window_extent(r)), ax.get_title()
        assert not title.overlaps(ax.get_window_extent(r)), ax.get_title()
    w, h = fig.get_size_inches()
    assert w / 3 >= 4 and h / math.ceil(len(fig.axes) / 3) >= 3  # panels of at least 4 x 3 inches


def test_accuracy_bars_of_different_prompt_sets_are_apart(speedrun):
    from chatsmith.report import accuracy_figure, collect_metrics, find_stages

    fig = accuracy_figure(collect_metrics(find_stages(speedrun), json.loads((speedrun / "speedrun.json").read_text())))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["held-out chats", "held-out RL prompts"]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["base", "sft"], ["rl: init", "rl"]]


def test_report_on_a_realistic_run_writes_valid_plots(speedrun):
    md = (speedrun / "report.md").read_text()
    pngs = sorted(p.name for p in speedrun.glob("*.png"))
    assert pngs == ["accuracy.png", "loss.png", "metrics_base.png", "metrics_dpo.png", "metrics_reward.png",
                    "metrics_rl.png", "metrics_sft.png", "reward_kl.png", "time.png"]
    for p in speedrun.glob("*.png"):
        assert_png(p)
        assert f"]({p.name})" in md
    assert "Not plotted: clipped share 0 (constant)." in md  # GRPO clips nothing: named, not drawn


def test_rl_against_its_control_table():
    """An rl_eval.json with a control side (rlhf --control-sft, the speedrun): one row per policy,
    exact match with its interval and n, the answer prior's share; none without a control."""
    from chatsmith.report import rl_control_md
    side = lambda em, top: {"exact_match": {"arithmetic": em}, "exact_match_ci95": {"arithmetic": [em / 2, em * 2]},
                            "exact_match_counts": {"arithmetic": [round(em * 400), 400]}, "top_answer_share": top,
                            "kl_to_ref": 0.5, "ended_share": 0.9}
    md = "\n".join(rl_control_md({"init": side(0.05, 0.1), "rl": side(0.2, 0.3), "control": side(0.1, 0.1)}))
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| start (SFT) | 5% [2%, 10%] (n=400) | 10%")
    assert rows[2].startswith("| RL | 20% [10%, 40%] (n=400) | 30%")
    assert rows[3].startswith("| control (more SFT) | 10% [5%, 20%] (n=400)")
    assert rl_control_md({"init": side(0.05, 0.1), "rl": side(0.2, 0.3)}) == [] and rl_control_md(None) == []
