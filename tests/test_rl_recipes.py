"""RL recipes on the one machinery (issue #13): rejection-sampling fine-tuning (`--algo rft`), the
simplified-GRPO preset (`grpo-simple`) with its advantage and averaging options checked by hand,
and the curriculum sampler (`--curriculum`) on a synthetic success table and through resume."""

import json

import numpy as np
import pytest
import torch

from chatsmith.errors import UserError
from chatsmith.train.advantages import average, group_advantages
from chatsmith.train.curriculum import Curriculum, level_of
from chatsmith.train.rewards import ExactReward, FunctionReward
from chatsmith.train.rlhf import PRESETS, RLConfig, apply_preset, success_threshold
from chatsmith.checkpoint import load_model
from chatsmith.tokenizer import Tokenizer
from conftest import cli


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- by hand

def test_mean_advantage_is_reward_minus_group_mean():
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    # groups of 3: means 1/3 and 2/3
    assert group_advantages(s, 3, "mean").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    z = group_advantages(s, 3, "zscore")  # the same centred values divided by the group std sqrt(2)/3
    assert z.tolist() == pytest.approx([v / (2 ** 0.5 / 3 + 1e-4) for v in
                                        [2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]], rel=1e-6)
    with pytest.raises(ValueError):
        group_advantages(s, 3, "median")


def test_token_and_sequence_averages_by_hand():
    # reply 0 has 1 token (loss 3), reply 1 has 3 tokens (losses 1, 1, 1)
    v = torch.tensor([[3.0, 9.0, 9.0], [1.0, 1.0, 1.0]])
    m = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert average(v, m, "token").item() == pytest.approx((3 + 1 + 1 + 1) / 4)  # 1.5
    assert average(v, m, "sequence").item() == pytest.approx((3 / 1 + 3 / 3) / 2)  # 2.0


def test_grpo_simple_preset_sets_what_it_says():
    rl = apply_preset(RLConfig(algo="grpo-simple", kl_coef=0.3, ppo_epochs=4, minibatches=3, temperature=0.7,
                               rollout_prompts=5))
    assert (rl.algo, rl.kl_coef, rl.kl_target, rl.ppo_epochs, rl.minibatches, rl.advantage, rl.loss_average,
            rl.temperature) == ("grpo", 0.0, 0.0, 1, 1, "mean", "token", 1.0)
    assert rl.rollout_prompts == 5  # what the preset does not name is left as given
    assert apply_preset(RLConfig(algo="grpo")) == RLConfig(algo="grpo")
    assert set(PRESETS["grpo-simple"]) <= set(RLConfig.__dataclass_fields__)


def test_success_threshold_defaults_to_the_sources_maximum():
    assert success_threshold(RLConfig(algo="rft"), [ExactReward()]) == 1.0
    assert success_threshold(RLConfig(algo="rft", success_threshold=0.4), [ExactReward()]) == 0.4
    assert success_threshold(RLConfig(algo="grpo"), [ExactReward()]) is None  # nothing needs one
    with pytest.raises(UserError, match="--success-threshold"):
        success_threshold(RLConfig(algo="rft"), [FunctionReward("reward_fns:says_the")])


# --------------------------------------------------------------------------- the curriculum sampler

def synthetic(rates: dict[str, float], per_level: int = 50) -> Curriculum:
    """A curriculum over per_level prompts per level whose tables already hold `rates`."""
    metas = [{"family": "arithmetic", "difficulty": lvl} for lvl in rates for _ in range(per_level)]
    c = Curriculum(metas)
    c.update(range(len(metas)), [rates[str(m["difficulty"])] for m in metas])
    return c


def test_levels_come_from_the_record_or_the_answers_digits():
    assert level_of({"family": "arithmetic", "answers": ["85"]}) == "arithmetic:2"
    assert level_of({"family": "arithmetic", "answers": ["-120"]}) == "arithmetic:3"
    assert level_of({"family": "word_problem", "difficulty": 1, "answers": ["1234"]}) == "word_problem:1"
    assert level_of({"family": "quiz", "answers": ["Paris"]}) == "quiz:text"
    assert level_of({}) == "all:-"


def test_curriculum_favours_the_edge_of_competence_and_still_explores():
    c = synthetic({"1": 1.0, "2": 0.5, "3": 0.0})  # mastered, learning, out of reach
    rng = np.random.default_rng(0)
    picks = np.concatenate([c.pick(rng, 16) for _ in range(200)])
    share = {lvl: np.mean([c.levels[i] == f"arithmetic:{lvl}" for i in picks]) for lvl in "123"}
    # weights 0.1 : 1 : 0.1 over equal-sized levels -> 1/12, 10/12, 1/12 in expectation
    assert share["2"] == pytest.approx(10 / 12, abs=0.04)
    assert share["1"] > 0.03 and share["3"] > 0.03  # never starved: the ends are revisited
    assert len(set(c.pick(rng, 16).tolist())) == 16  # distinct prompts within a rollout


def test_curriculum_unknown_prompts_take_their_level_then_explore():
    metas = [{"family": "f", "difficulty": d} for d in (1, 1, 2)]
    c = Curriculum(metas)
    assert c.weights().tolist() == [1, 1, 1]  # nothing seen: everything is worth a try
    c.update([0], [1.0])  # prompt 0 solved: it and its unseen sibling (level f:1) leave the band
    assert c.weights().tolist() == [0.1, 0.1, 1]
    c.update([1], [0.5])  # the sibling turns out to be at the edge: its own rate wins over the level's
    assert c.weights().tolist() == [0.1, 1, 1]
    assert c.prompt_rate[0] == 1.0 and c.level_rate["f:1"] == pytest.approx(0.75)  # EMA, momentum 0.5
    stats = c.stats([0, 1, 2, 2])
    assert stats["curriculum_share/f:1"] == 0.5 and stats["curriculum_share/f:2"] == 0.5
    assert stats["curriculum_success/f:2"] == -1.0  # not seen yet
    assert stats["curriculum_success/f:1"] == pytest.approx(0.75) and stats["curriculum_in_band"] == pytest.approx(2 / 3)
    restored = Curriculum(metas)
    restored.load_state(json.loads(json.dumps(c.state())))
    assert restored.weights().tolist() == c.weights().tolist() and restored.state() == c.state()


# --------------------------------------------------------------------------- through the CLI

@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("rftprompts")
    qs = ["Tell me a story.", "Say something.", "What do you see?", "Describe the sea.", "Talk to me.",
          "Sing a song.", "What is love?", "Who was the king?"]
    write_jsonl(d / "prompts.jsonl", [{"messages": [{"role": "user", "content": q}], "family": "chat",
                                       "difficulty": i % 2} for i, q in enumerate(qs)])
    return d / "prompts.jsonl"


RFT = ["--algo", "rft", "--rollout-prompts", 8, "--group-size", 4, "--max-new-tokens", 12, "--log-every", 1,
       "--eval-every", 1000, "--reward", "reward_fns:says_the", "--success-threshold", "0.2", "--kl-coef", 0,
       "--lr", "3e-3", "--ppo-epochs", 1, "--minibatches", 1]


def test_rft_keeps_verified_replies_and_the_reward_rises(base_model, prompts, tmp_path, one_torch_thread):
    """Expert iteration on a tiny problem: replies in which at least a fifth of the words are
    "the" are verified; supervised steps on them make such replies (and the reward) more likely."""
    out = tmp_path / "rft"
    assert cli("rlhf", "--init", base_model, "--prompts", prompts, "--out", out, "--max-steps", 30,
               "--save-every", 1000, *RFT) == 0
    m = [r for r in rows(out) if "reward" in r]
    first, last = (sum(r["reward"] for r in part) / 6 for part in (m[:6], m[-6:]))
    assert last > first + 0.1, (first, last)
    acc_first = sum(r["accept_rate"] for r in m[:6]) / 6
    acc_last = sum(r["accept_rate"] for r in m[-6:]) / 6
    assert acc_last > acc_first, (acc_first, acc_last)
    assert all(0 <= r["accept_rate"] <= 1 and r["nll"] >= 0 for r in m)


def test_rft_needs_a_threshold_for_an_unbounded_reward(base_model, prompts, tmp_path, capsys):
    assert cli("rlhf", "--algo", "rft", "--init", base_model, "--prompts", prompts, "--out", tmp_path / "o",
               "--reward", "reward_fns:says_the", "--max-steps", 1) == 2
    assert "--success-threshold" in capsys.readouterr().err


def test_curriculum_state_survives_resume(base_model, prompts, tmp_path, one_torch_thread):
    """Two optimizer steps per rollout and a checkpoint after every step. A checkpoint inside a
    rollout stores the tables as that rollout found them (a resumed run redoes the rollout and its
    update, so it is not counted twice); one at a rollout boundary is resumed exactly: the resumed
    run logs what the uninterrupted one does, per-level shares and success included."""
    args = ["rlhf", "--init", base_model, "--prompts", prompts, *RFT[:-4], "--ppo-epochs", 1, "--minibatches", 2,
            "--rollout-prompts", 4, "--group-size", 2, "--max-new-tokens", 6, "--curriculum",
            "--save-every", 1, "--keep-last", 10]
    out = tmp_path / "r"
    assert cli(*args, "--out", out, "--max-steps", 4) == 0
    st = {int(d.name[5:]): json.loads((d / "trainer_state.json").read_text())["stage_state"]["curriculum"]
          for d in (out / "checkpoints").iterdir()}
    assert st[1] == {"prompt_rate": {}, "level_rate": {}, "visits": {}}  # inside rollout 0: as it began
    assert st[2]["visits"] and st[3] == st[2]  # rollout 0 counted; inside rollout 1: not yet
    assert sum(st[4]["visits"].values()) > sum(st[2]["visits"].values())
    assert cli(*args, "--out", out, "--max-steps", 6, "--resume") == 0
    straight = tmp_path / "s"
    assert cli(*args, "--out", straight, "--max-steps", 6) == 0
    got, want = ({r["step"]: r for r in rows(d) if "reward" in r} for d in (out, straight))
    keys = [k for k in want[6] if k.startswith("curriculum_")]
    assert "curriculum_share/chat:0" in keys and "curriculum_success/chat:1" in keys
    for step in (5, 6):
        for key in ("reward", "accept_rate", *keys):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_grpo_simple_is_on_policy_without_kl_and_raises_the_reward(base_model, prompts, tmp_path,
                                                                   one_torch_thread):
    """The preset through the CLI: one pass per rollout, so the ratio stays 1 and nothing is clipped;
    β stays 0; the checkpoint records the preset and the settings it resolved to."""
    out = tmp_path / "simple"
    assert cli("rlhf", "--algo", "grpo-simple", "--init", base_model, "--prompts", prompts, "--out", out,
               "--max-steps", 30, "--rollout-prompts", 8, "--group-size", 4, "--max-new-tokens", 12,
               "--lr", "3e-3", "--log-every", 1, "--eval-every", 1000, "--save-every", 1000,
               "--reward", "reward_fns:says_the") == 0
    m = [r for r in rows(out) if "reward" in r]
    assert sum(r["reward"] for r in m[-6:]) / 6 > sum(r["reward"] for r in m[:6]) / 6 + 0.1
    assert all(r["clip_frac"] == 0 and r["kl_coef"] == 0 and r["approx_kl"] < 1e-8 for r in m)
    meta = json.loads((out / "config.json").read_text())["chatsmith"]
    assert meta["algo_preset"] == "grpo-simple" and meta["algo"] == "grpo"
    assert {k: meta["rl_config"][k] for k in ("advantage", "loss_average", "ppo_epochs", "kl_coef")} == {
        "advantage": "mean", "loss_average": "token", "ppo_epochs": 1, "kl_coef": 0.0}


def test_single_pass_grpo_skips_the_rollouts_policy_forward_and_loses_nothing(base_model, prompts):
    """With one pass over each rollout π_old is the policy being trained, so the rollout's own forward
    of the policy is skipped: the loss, its gradient and the logged KL are the same as with it."""
    from chatsmith.config import TrainConfig
    from chatsmith.train.rewards import make_rewards
    from chatsmith.train.rlhf import RLConfig, RLStage, load_prompts
    tok, policy = Tokenizer.load(base_model), load_model(base_model)
    ref = load_model(base_model).requires_grad_(False)
    items, _ = load_prompts(tok, [str(prompts)], policy.cfg.max_seq_len, None)
    rl = RLConfig(algo="grpo", rollout_prompts=4, group_size=2, max_new_tokens=8, ppo_epochs=1, minibatches=1,
                  kl_coef=0.1, max_resample=0)
    cfg = TrainConfig(out="unused", seed=3)
    scorers = make_rewards(["reward_fns:says_the"], str(base_model), tok, items, torch.device("cpu"))
    with torch.no_grad():  # a policy that is not the reference, so the KL is not 0
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    results = []
    for single in (True, False):
        stage = RLStage(policy, ref, tok, items, scorers, rl, cfg)
        assert stage.single_pass
        stage.single_pass = single
        batch = stage.batch(0, 0, 0)
        assert ("old_logp" in batch) == (not single)
        policy.zero_grad(set_to_none=True)
        loss, stats = stage.loss(policy, batch)
        loss.backward()
        results.append((loss.item(), stats, [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
    (l1, s1, g1), (l2, s2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-5) and s1["kl"] == pytest.approx(s2["kl"], rel=1e-4, abs=1e-6)
    assert s1["kl"] != 0 and s1["approx_kl"] == 0 and s2["approx_kl"] < 1e-10
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g1, g2))
    # several passes, or an adaptive β set from the rollout's KL, keep the rollout's forward
    assert not RLStage(policy, ref, tok, items, scorers, RLConfig(algo="grpo", ppo_epochs=2), cfg).single_pass
    assert not RLStage(policy, ref, tok, items, scorers, RLConfig(algo="grpo", ppo_epochs=1, minibatches=1,
                                                                  kl_target=2.0), cfg).single_pass


# --------------------------------------------------------------------------- the same-compute control

def test_wilson_interval_by_hand():
    from chatsmith.eval.intervals import wilson
    lo, hi = wilson(0, 10)  # no successes: the interval is not empty, its upper end z²/(n + z²)
    assert lo == 0 and hi == pytest.approx(1.96 ** 2 / (10 + 1.96 ** 2))
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(400, 400)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def test_paired_difference_interval():
    from chatsmith.eval.intervals import paired_by_family, paired_difference, wilson
    old = [1] * 50 + [0] * 50
    new = [1] * 50 + [1] * 10 + [0] * 40  # 10 items gained, none lost
    d = paired_difference(old, new)
    assert (d["diff"], d["gained"], d["lost"], d["n"]) == (pytest.approx(0.10), 10, 0, 100)
    # by hand (Newcombe 1998, method 10): phi = (50*40 - 50) / sqrt(60*40*50*50) = 0.796, so the lower end
    # is 0.1 - sqrt((0.6 - l1)^2 - 2 phi (0.6 - l1)(u2 - 0.5) + (u2 - 0.5)^2) with Wilson ends l1, u2
    (l1, _), (_, u2) = wilson(60, 100), wilson(50, 100)
    phi = (50 * 40 - 50) / (60 * 40 * 50 * 50) ** 0.5
    lo = 0.1 - ((0.6 - l1) ** 2 - 2 * phi * (0.6 - l1) * (u2 - 0.5) + (u2 - 0.5) ** 2) ** 0.5
    assert d["ci95"][0] == pytest.approx(lo) and d["ci95"][0] > 0  # a consistent gain excludes 0
    # pairing is what narrows it: the same two proportions without the correlation (square-and-add of
    # the Wilson intervals, as for independent samples) reach below 0
    assert 0.1 - ((0.6 - l1) ** 2 + (u2 - 0.5) ** 2) ** 0.5 < 0
    # the same net +10 from 15 gained and 5 lost is less certain
    churn = paired_difference(old, [1] * 45 + [0] * 5 + [1] * 15 + [0] * 35)
    assert churn["diff"] == pytest.approx(0.10) and churn["ci95"][0] < d["ci95"][0]
    # swapping the sides mirrors the interval; no change at all still has an interval around 0
    back = paired_difference(new, old)
    assert back["diff"] == pytest.approx(-0.10) and back["ci95"] == pytest.approx([-d["ci95"][1], -d["ci95"][0]])
    same = paired_difference([1, 0] * 10, [1, 0] * 10)
    assert same["diff"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])
    fams = paired_by_family({"exact_match_items": {"a": old, "b": [1]}}, {"exact_match_items": {"a": new}})
    assert list(fams) == ["a"] and fams["a"] == d


def test_control_budget_matches_rls_steps_and_tokens(tmp_path):
    from chatsmith.config import TrainConfig
    from chatsmith.train.rl_control import control_config
    # 4 examples, each with 20 assistant tokens in the loss; RL: 10 steps, 1000 trained tokens
    ex = [([0] * 30, [0] * 10 + [1] * 20)] * 4
    cfg = TrainConfig(lr=1e-4, grad_accum=2, max_steps=10, seed=3)
    c = control_config(cfg, {"steps": 10, "tokens": 1000, "seconds": 90.0}, ex, "tokens", tmp_path / "c")
    assert (c.max_steps, c.max_minutes, c.batch_size, c.grad_accum, c.lr, c.seed) == (10, None, 5, 1, 1e-4, 3)
    c = control_config(cfg, {"steps": 10, "tokens": 1000, "seconds": 90.0}, ex, "seconds", tmp_path / "c")
    assert (c.max_steps, c.max_minutes, c.batch_size) == (None, 1.5, 5)
    with pytest.raises(UserError):
        control_config(cfg, {"steps": 1, "tokens": 1, "seconds": 1}, ex, "flops", tmp_path / "c")


def test_control_sft_is_reported_next_to_rl(base_model, tmp_path, capsys, one_torch_thread):
    from chatsmith.data.tasks import generate_tasks
    tasks = list({t["question"]: t for t in generate_tasks("arithmetic", 60, seed=3, difficulty=1)}.values())[:40]
    recs = [{"messages": [{"role": "user", "content": t["question"]}, {"role": "assistant", "content": t["worked"]}],
             "family": "arithmetic", "answers": t["answers"]} for t in tasks]
    write_jsonl(tmp_path / "train.jsonl", recs[:30])
    write_jsonl(tmp_path / "held.jsonl", recs[30:])
    out = tmp_path / "rl"
    assert cli("rlhf", "--algo", "rft", "--init", base_model, "--prompts", tmp_path / "train.jsonl",
               "--heldout", tmp_path / "held.jsonl", "--reward", "exact", "format", "--success-threshold", 1,
               "--out", out, "--max-steps", 3, "--rollout-prompts", 4, "--group-size", 2, "--max-new-tokens", 8,
               "--ppo-epochs", 1, "--minibatches", 1, "--eval-every", 1000, "--control-sft") == 0
    err = capsys.readouterr().err
    ev = json.loads((out / "rl_eval.json").read_text())
    assert set(ev) >= {"init", "rl", "control"}
    for side in ("init", "rl", "control"):
        lo, hi = ev[side]["exact_match_ci95"]["arithmetic"]
        assert lo <= ev[side]["exact_match"]["arithmetic"] <= hi and ev[side]["exact_match_counts"]["arithmetic"][1] == 10
        assert "top_answer_share" in ev[side]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["control"]["steps"] == summary["steps"] == 3 and summary["control"]["mode"] == "tokens"
    assert json.loads((out / "control" / "config.json").read_text())["chatsmith"]["control_for"] == "rlhf"
    header = next(line for line in err.splitlines() if line.startswith("held-out"))
    assert header.split()[1:] == ["init", "rl", "control"] and "exact match: arithmetic (n=10)" in err
    # what RL changed, paired on the same 10 items, against the start and against the control
    for key, side in (("rl_vs_init", "init"), ("rl_vs_control", "control")):
        d = ev[key]["arithmetic"]
        assert d["n"] == 10 and d["diff"] == pytest.approx(ev["rl"]["exact_match"]["arithmetic"]
                                                           - ev[side]["exact_match"]["arithmetic"])
        assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        assert d["gained"] - d["lost"] == round(10 * d["diff"])
    assert "RL - start: arithmetic" in err and "RL - control: arithmetic" in err


def test_grpo_with_the_curriculum_logs_levels_by_answer_digits(base_model, tmp_path, one_torch_thread):
    """--curriculum on GRPO with the exact reward: success is a verified answer (the default
    threshold, exact's maximum 1), and the levels come from the answers' digits."""
    from chatsmith.data.tasks import generate_tasks
    tasks = list({t["question"]: t for t in generate_tasks("arithmetic", 40, seed=5, difficulty=2)}.values())[:20]
    write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": t["question"]}],
                                        "family": "arithmetic", "answers": t["answers"]} for t in tasks])
    out = tmp_path / "cur"
    assert cli("rlhf", "--algo", "grpo", "--curriculum", "--init", base_model, "--prompts", tmp_path / "p.jsonl",
               "--reward", "exact", "--out", out, "--max-steps", 2, "--rollout-prompts", 4, "--group-size", 2,
               "--max-new-tokens", 6, "--ppo-epochs", 1, "--minibatches", 1, "--log-every", 1,
               "--eval-every", 1000) == 0
    m = [r for r in rows(out) if "reward" in r]
    levels = {k.split("/", 1)[1] for k in m[0] if k.startswith("curriculum_share/")}
    digits = {f"arithmetic:{sum(c.isdigit() for c in t['answers'][0])}" for t in tasks}
    assert levels == digits and len(levels) >= 2
    for r in m:
        assert sum(r[f"curriculum_share/{lvl}"] for lvl in levels) == pytest.approx(1.0)
        assert all(r[f"curriculum_success/{lvl}"] == -1 or 0 <= r[f"curriculum_success/{lvl}"] <= 1
                   for lvl in levels)
