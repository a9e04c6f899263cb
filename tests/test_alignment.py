"""Alignment: the loss functions against hand-computed values, preference data and its errors, and
each algorithm (reward model, DPO, PPO, GRPO, REINFORCE, discriminator) moving the way its math
says on a tiny problem a micro model can solve, all through the CLI."""

import json
import math

import pytest
import torch

from chatsmith.checkpoint import load_model, read_config
from chatsmith.data.preferences import build_preferences, parse_pair, perturb_answer, read_pairs
from chatsmith.errors import UserError
from chatsmith.tokenizer import Tokenizer
from chatsmith.train.advantages import gae, group_advantages, k3_kl, ppo_losses, value_loss
from chatsmith.train.dpo import dpo_loss
from chatsmith.train.reward import bradley_terry_loss, load_reward_model
from chatsmith.train.rl_eval import answer_collapse
from chatsmith.train.rlhf import RLConfig, RLStage
from chatsmith.train.rollouts import Rollout
from conftest import cli

# --------------------------------------------------------------------------- loss functions


def test_bradley_terry_loss_by_hand():
    # -log σ(1 - 0) = log(1 + e^-1)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.exp(-1)), abs=1e-6)
    # a large wrong-way margin stays finite: -log σ(-100) = 100
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([100.0])).item() == pytest.approx(100, rel=1e-4)


def test_dpo_loss_by_hand():
    # implicit rewards 0.5 * (-1 - -1.5) = 0.25 and 0.5 * (-2 - -1.5) = -0.25; loss -log σ(0.5)
    loss, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                            torch.tensor([-1.5]), beta=0.5)
    assert rc.item() == pytest.approx(0.25) and rr.item() == pytest.approx(-0.25)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)


def test_gae_by_hand():
    # prompt position 0, completion positions 1 and 2; reward 1 at the end; γ = λ = 1:
    # A_2 = 1 - V_2 = 0.8, A_1 = (0 + V_2 - V_1) + A_2 = -0.3 + 0.8 = 0.5; returns = 1 everywhere
    mask = torch.tensor([[0.0, 1, 1]])
    adv, ret = gae(torch.tensor([[0.0, 0, 1]]), torch.tensor([[0.0, 0.5, 0.2]]) * mask, mask, 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([0, 0.5, 0.8])
    assert ret.tolist()[0] == pytest.approx([0, 1, 1])
    # λ = 0: one-step TD errors only
    adv0, _ = gae(torch.tensor([[0.0, 0, 1]]), torch.tensor([[0.0, 0.5, 0.2]]), mask, 1.0, 0.0)
    assert adv0.tolist()[0] == pytest.approx([0, -0.3, 0.8])


def test_group_advantages_by_hand():
    a = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), group=2)
    assert a.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-3)


def test_ppo_clipped_objective_by_hand():
    mask = torch.ones(1, 1)
    lp, old = torch.tensor([[0.5]]), torch.tensor([[0.0]])  # ratio e^0.5 = 1.6487 > 1 + ε
    loss, frac = ppo_losses(lp, old, torch.tensor([[1.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and frac.item() == 1.0  # positive advantage: clipped
    loss, _ = ppo_losses(lp, old, torch.tensor([[-1.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx(math.exp(0.5), rel=1e-5)  # negative: the pessimistic unclipped term
    # value loss: max of the plain and the clipped squared error, halved
    v = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.5]]), mask, clip=0.2)
    assert v.item() == pytest.approx(0.5 * max(0.5 ** 2, 0.3 ** 2))


def test_k3_kl_is_zero_at_equality_and_positive_otherwise():
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0
    d = 0.3  # exp(d) - d - 1
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-0.7])).item() == pytest.approx(math.exp(d) - d - 1, rel=1e-5)


# --------------------------------------------------------------------------- preference data

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_pair_formats():
    std = parse_pair({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "f:1")
    assert std.prompt == [{"role": "user", "content": "Hi"}] and std.chosen == "Hello!"
    conv = parse_pair({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                       "chosen": [{"role": "assistant", "content": "Hello!"}],
                       "rejected": [{"role": "assistant", "content": "No."}]}, "f:2")
    assert len(conv.prompt) == 2 and conv.rejected == "No."
    implicit = parse_pair({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
                           "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "B"}]},
                          "f:3")
    assert implicit.prompt == [{"role": "user", "content": "Hi"}] and (implicit.chosen, implicit.rejected) == ("A", "B")


@pytest.mark.parametrize("record, words", [
    ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "identical"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "x"}, "chosen reply is empty"),
    ({"prompt": "Hi", "chosen": "x"}, "missing \"rejected\""),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "\"prompt\"[0]"),
])
def test_bad_pairs_name_file_and_line(tmp_path, record, words):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(UserError) as e:
        read_pairs([str(f)])
    assert f"{f}:2" in str(e.value) and words in str(e.value)
    pairs, skipped = read_pairs([str(f)], skip_bad=True)
    assert (len(pairs), skipped) == (1, 1)


def test_perturbed_answer_changes_the_result_everywhere():
    import random
    out = perturb_answer("37 + 48 = 85. The answer is 85.", random.Random(0))
    assert out != "37 + 48 = 85. The answer is 85." and out.startswith("37 + 48 = ")
    n = out.split("= ")[1].split(".")[0]
    assert out.endswith(f"The answer is {n}.") and n != "85"


def test_builtin_pairs_from_dialogues(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i} + 1 = {i + 1}. The answer is {i + 1}."}],
             "family": "arithmetic", "answers": [str(i + 1)]} for i in range(30)]
    rows += [{"messages": [{"role": "user", "content": f"Tell me about thing {i}."},
                           {"role": "assistant", "content": f"Thing {i} is a fine thing indeed."}],
              "family": "chatterbot"} for i in range(30)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "heldout.jsonl", rows[:4])
    counts = build_preferences(tmp_path)
    assert counts["train"]["pairs"] == 60
    assert set(counts["train"]["recipes"]) <= {"wrong_answer", "other_reply", "repetition"}
    pairs, _ = read_pairs([str(tmp_path / "pairs_train.jsonl")])
    assert all(p.chosen != p.rejected for p in pairs)
    wrong = [p for p in pairs if p.meta["recipe"] == "wrong_answer"]
    assert wrong and all(p.chosen.split()[-1] != p.rejected.split()[-1] for p in wrong)
    # the held-out pairs come from the file named by `heldout` (the speedrun's family-capped one)
    write_jsonl(tmp_path / "heldout_small.jsonl", rows[:1] + rows[30:31])
    counts = build_preferences(tmp_path, heldout="heldout_small.jsonl")
    assert counts["heldout"]["pairs"] == 2 and counts["train"]["pairs"] == 60


# --------------------------------------------------------------------------- training, tiny problems

YES_NO = [("Do you agree?", "yes"), ("Is it good?", "yes"), ("Shall we go?", "yes"), ("Are you sure?", "yes"),
          ("Can you help?", "yes"), ("Will it rain?", "yes"), ("Is the sky blue?", "yes"), ("Any news?", "yes")]


@pytest.fixture(scope="module")
def prefer_yes(tmp_path_factory):
    """Pairs whose chosen reply is always "yes" and rejected always "no": learnable from the reply alone."""
    d = tmp_path_factory.mktemp("prefs")
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": "no"}]} for q, a in YES_NO]
    write_jsonl(d / "train.jsonl", rows[:6])
    write_jsonl(d / "heldout.jsonl", rows[6:])
    return d


TRAIN = ["--batch-size", 4, "--log-every", 1, "--eval-every", 1000, "--save-every", 1000]


def rows(out):
    """Training rows of metrics.jsonl (eval rows left out)."""
    return [r for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


def test_reward_model_learns_to_prefer_a_reply(base_model, prefer_yes, tmp_path):
    out = tmp_path / "rm"
    assert cli("reward", "--data", prefer_yes / "train.jsonl", "--heldout", prefer_yes / "heldout.jsonl",
               "--init", base_model, "--out", out, "--max-steps", 30, "--lr", "3e-3", *TRAIN) == 0
    ev = json.loads((out / "reward_eval.json").read_text())
    assert ev["reward"]["heldout_accuracy"] == 1.0
    assert ev["reward"]["heldout_margin"] > ev["untrained_head"]["heldout_margin"] + 1
    m = rows(out)
    assert m[-1]["loss"] < m[0]["loss"]
    assert read_config(out).score_head
    rm = load_reward_model(out)
    s = rm.score([[{"role": "user", "content": "Is it fine?"}, {"role": "assistant", "content": a}]
                  for a in ("yes", "no")])
    assert s[0] > s[1]
    with pytest.raises(UserError, match="no reward head"):
        load_reward_model(base_model)

    # on-policy pairs: the base model's own samples, ranked by this reward model
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": q}]} for q, _ in YES_NO])
    assert cli("data", "pairs", "--model", base_model, "--reward-model", out, "--prompts", prompts,
               "--out", tmp_path / "onpolicy.jsonl", "--samples", 3, "--max-new-tokens", 8) == 0
    pairs, _ = read_pairs([str(tmp_path / "onpolicy.jsonl")])
    assert pairs and all(p.meta["recipe"] == "rm_ranked" and p.meta["margin"] > 0 for p in pairs)
    for p in pairs[:3]:
        conv = [p.prompt + [{"role": "assistant", "content": r}] for r in (p.chosen, p.rejected)]
        sc, sr = rm.score(conv)
        assert sc > sr


def test_dpo_raises_the_chosen_replys_likelihood(base_model, prefer_yes, tmp_path):
    out = tmp_path / "dpo"
    assert cli("dpo", "--data", prefer_yes / "train.jsonl", "--heldout", prefer_yes / "heldout.jsonl",
               "--init", base_model, "--out", out, "--max-steps", 20, "--lr", "1e-3", "--beta", "0.5",
               *TRAIN) == 0
    m = rows(out)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at step 0
    assert m[-1]["loss"] < 0.3 and m[-1]["reward_accuracy"] == 1.0
    ev = json.loads((out / "train_summary.json").read_text())
    assert ev["heldout_reward_accuracy"] == 1.0 and ev["heldout_reward_margin"] > 0
    # RPO: + α · NLL of the chosen reply, logged as chosen_nll, which must fall
    assert cli("dpo", "--data", prefer_yes / "train.jsonl", "--init", base_model, "--out", tmp_path / "rpo",
               "--max-steps", 10, "--lr", "1e-3", "--rpo-alpha", "1.0", *TRAIN) == 0
    r = rows(tmp_path / "rpo")
    assert r[-1]["chosen_nll"] < r[0]["chosen_nll"]
    # the DPO part is logged apart (the report draws it against the held-out DPO loss)
    assert r[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(x["loss"] == pytest.approx(x["dpo_loss"] + x["chosen_nll"], rel=1e-4) for x in r)

    from chatsmith.batching import completion_batch, sequence_logprobs
    tok = Tokenizer.load(base_model)

    def logp(model, reply):
        msgs = [{"role": "user", "content": "Is the sky blue?"}]
        p, _ = tok.render_chat(msgs, add_generation_prompt=True)
        ids, _ = tok.render_chat(msgs + [{"role": "assistant", "content": reply}])
        return sequence_logprobs(model, completion_batch([(ids, len(p))], tok.pad_id)).item()

    with torch.no_grad():
        base, tuned = load_model(base_model), load_model(out)
        assert logp(tuned, "yes") - logp(tuned, "no") > logp(base, "yes") - logp(base, "no") + 1


def test_preference_errors_through_the_cli(base_model, tmp_path, capsys):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "yes", "rejected": "yes"}])
    assert cli("dpo", "--data", f, "--init", base_model, "--out", tmp_path / "o", "--max-steps", 1) == 2
    assert f"{f}:1" in capsys.readouterr().err
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the king " * 200, "chosen": "a", "rejected": "b"}])
    assert cli("reward", "--data", long, "--init", base_model, "--out", tmp_path / "o2", "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert f"{long}:1" in err and "context" in err
    assert not (tmp_path / "o2" / "config.json").exists()


@pytest.fixture(scope="module")
def rl_prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlprompts")
    qs = ["Tell me a story.", "Say something.", "What do you see?", "Describe the sea.", "Talk to me.",
          "Sing a song.", "What is love?", "Who was the king?"]
    write_jsonl(d / "prompts.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in qs])
    return d / "prompts.jsonl"


RL = ["--rollout-prompts", 8, "--group-size", 4, "--max-new-tokens", 12, "--log-every", 1, "--eval-every", 1000,
      "--save-every", 1000, "--reward", "reward_fns:says_the"]


@pytest.mark.parametrize("algo, steps, extra", [
    ("ppo", 40, ["--lr", "3e-3", "--ppo-epochs", 2, "--minibatches", 2, "--kl-coef", "0.01"]),
    ("grpo", 40, ["--lr", "3e-3", "--ppo-epochs", 2, "--minibatches", 2, "--kl-coef", "0.01"]),
    ("reinforce", 30, ["--lr", "3e-3", "--kl-coef", "0.01"]),
])
def test_rl_algorithms_raise_the_reward(base_model, rl_prompts, tmp_path, algo, steps, extra):
    out = tmp_path / algo
    assert cli("rlhf", "--algo", algo, "--init", base_model, "--prompts", rl_prompts, "--out", out,
               "--max-steps", steps, *RL, *extra) == 0
    m = [r for r in rows(out) if "reward" in r]
    first = sum(r["reward"] for r in m[:6]) / 6
    last = sum(r["reward"] for r in m[-6:]) / 6
    assert last > first + 0.1, (first, last)
    for key in ("kl", "entropy", "response_len", "approx_kl"):
        assert all(math.isfinite(r[key]) for r in m)
    if algo != "reinforce":
        assert any(r["clip_frac"] > 0 for r in m)
    if algo == "ppo":
        assert all(math.isfinite(r["value_loss"]) for r in m)
        assert read_config(out).score_head  # the value head is saved with the policy
    assert m[-1]["kl"] > 0  # moved away from the reference, and says by how much


def test_rl_rollouts_with_int8_decode_weights(base_model, rl_prompts, tmp_path, capsys):
    """--quantize int8 samples the rollouts from an int8 snapshot of the policy, retaken every
    rollout (the weights move): the reward still rises. With LoRA the snapshot merges the adapters in,
    so the two combine."""
    out = tmp_path / "int8"
    assert cli("rlhf", "--algo", "grpo", "--quantize", "int8", "--init", base_model, "--prompts", rl_prompts,
               "--out", out, "--max-steps", 40, *RL, "--lr", "3e-3", "--ppo-epochs", 2, "--minibatches", 2,
               "--kl-coef", "0.01") == 0
    m = [r for r in rows(out) if "reward" in r]
    assert sum(r["reward"] for r in m[-6:]) / 6 > sum(r["reward"] for r in m[:6]) / 6 + 0.1
    assert cli("rlhf", "--quantize", "int8", "--lora-rank", 4, "--init", base_model, "--prompts", rl_prompts,
               "--out", tmp_path / "lora", "--max-steps", 2, *RL) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    assert [r["step"] for r in rows(tmp_path / "lora") if "reward" in r] == [1, 2]


def test_rl_with_verifiable_reward_and_discriminator(base_model, tmp_path):
    from chatsmith.data.tasks import generate_tasks
    tasks = list({t["question"]: t for t in generate_tasks("arithmetic", 60, seed=3, difficulty=1)}.values())[:40]
    recs = [{"messages": [{"role": "user", "content": t["question"]}, {"role": "assistant", "content": t["worked"]}],
             "family": "arithmetic", "answers": t["answers"]} for t in tasks]
    write_jsonl(tmp_path / "train.jsonl", recs[:30])
    write_jsonl(tmp_path / "held.jsonl", recs[30:])
    out = tmp_path / "gan"
    assert cli("rlhf", "--algo", "grpo", "--init", base_model, "--prompts", tmp_path / "train.jsonl",
               "--heldout", tmp_path / "held.jsonl", "--reward", "exact", "discriminator", "--out", out,
               "--max-steps", 4, "--rollout-prompts", 4, "--group-size", 2, "--max-new-tokens", 8,
               "--ppo-epochs", 1, "--minibatches", 1, "--eval-every", 1000) == 0
    ev = json.loads((out / "rl_eval.json").read_text())
    assert set(ev["init"]["exact_match"]) == {"arithmetic"} and "kl_to_ref" in ev["rl"]
    assert len(ev["discriminator_accuracy"]) == 4 and all(0 <= a <= 1 for a in ev["discriminator_accuracy"])
    assert all("disc_accuracy" in r for r in rows(out) if "reward" in r)
    assert (out / "discriminator" / "config.json").exists()


@pytest.mark.parametrize("fn, words", [("raises", "raised ValueError"), ("not_a_number", "'high'"),
                                       ("nan", "nan"), ("no_such_fn", "cannot load")])
def test_broken_reward_functions_are_named(base_model, rl_prompts, tmp_path, capsys, fn, words):
    assert cli("rlhf", "--init", base_model, "--prompts", rl_prompts, "--reward", f"reward_fns:{fn}",
               "--out", tmp_path / "o", "--max-steps", 2, "--rollout-prompts", 2, "--group-size", 1,
               "--max-new-tokens", 4) == 2
    err = capsys.readouterr().err
    assert "reward_fns:" + fn in err and words in err
    assert not (tmp_path / "o" / "config.json").exists()


def test_rl_flag_errors(base_model, rl_prompts, tmp_path, capsys):
    assert cli("rlhf", "--algo", "grpo", "--group-size", 1, "--init", base_model, "--prompts", rl_prompts,
               "--reward", "format", "--out", tmp_path / "o") == 2
    assert "--group-size" in capsys.readouterr().err
    assert cli("rlhf", "--algo", "a2c", "--init", base_model, "--prompts", rl_prompts, "--reward", "format",
               "--out", tmp_path / "o") == 2
    assert "--algo" in capsys.readouterr().err
    assert cli("rlhf", "--init", base_model, "--prompts", rl_prompts, "--reward", "exact",
               "--out", tmp_path / "o") == 2
    assert "known answers" in capsys.readouterr().err


def test_dynamic_sampling_keeps_only_groups_with_signal():
    """GRPO's filter (DAPO): groups whose rewards are all equal are dropped, more prompts are drawn
    until the batch is full, and the logged reward still averages everything that was drawn."""
    draws = iter([[0, 0, 1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1, 1, 1]])
    stage = RLStage.__new__(RLStage)
    stage.rl = RLConfig(algo="grpo", rollout_prompts=2, group_size=4, max_resample=4)

    def draw(scores, tag):
        n = len(scores)
        return Rollout([f"{tag}{i}" for i in range(n)], [""] * n, [True] * n, [([1], 1)] * n,
                       torch.tensor(scores, dtype=torch.float32), {"reward": sum(scores) / n})

    stage.sample_scored = lambda rng: draw(next(draws), "b")
    ro = stage.informative_groups(None, draw(next(draws), "a"))
    assert ro.items == ["a0", "a1", "a2", "a3", "b4", "b5", "b6", "b7"]  # a's first and b's second group
    assert ro.scores.tolist() == [0, 0, 1, 0, 0, 1, 0, 1]
    assert {"sampled": ro.sampled, "kept": ro.kept} == {"sampled": 16, "kept": 8} and ro.parts["reward"] == 7 / 16
    # nothing informative in any draw: the last draw is kept whole, the reward still averaged
    draws = iter([[0] * 8] * 3)
    stage.rl.max_resample = 2
    ro = stage.informative_groups(None, draw(next(draws), "a"))
    assert len(ro.items) == 8 and {"sampled": ro.sampled, "kept": ro.kept} == {"sampled": 24, "kept": 8}
    assert ro.parts["reward"] == 0


def test_answer_collapse_names_the_most_common_answer():
    got = answer_collapse(["3 × 0 = 0. The answer is 0.", "The answer is 0", "7", "The answer is ."])
    assert got == {"top_answer": "0", "top_answer_share": 0.5}


def test_grpo_skips_groups_without_signal(base_model, rl_prompts, tmp_path):
    out = tmp_path / "sparse"
    assert cli("rlhf", "--algo", "grpo", "--init", base_model, "--prompts", rl_prompts, "--out", out,
               "--max-steps", 3, *RL[:-1], "reward_fns:only_the_king", "--rollout-prompts", 2,
               "--max-resample", 3, "--minibatches", 1, "--ppo-epochs", 1) == 0
    m = [r for r in rows(out) if "reward" in r]
    # 7 of the 8 prompts can never earn a reward: at most 1 group of the 2-prompt draws is kept
    assert m and all(0 < r["kept_share"] <= 0.5 for r in m)


def test_rl_resume_restores_what_the_stage_adapted(base_model, tmp_path):
    """The adaptive KL coefficient, REINFORCE's baseline and the discriminator (weights, moments,
    accuracy history) come back from the checkpoint, not from their starting values."""
    from chatsmith.data.tasks import generate_tasks
    tasks = list({t["question"]: t for t in generate_tasks("arithmetic", 30, seed=4, difficulty=1)}.values())[:12]
    write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": t["question"]},
                                                     {"role": "assistant", "content": t["worked"]}]} for t in tasks])
    out = tmp_path / "r"
    args = ["rlhf", "--algo", "reinforce", "--init", base_model, "--prompts", tmp_path / "p.jsonl", "--out", out,
            "--reward", "discriminator", "--rollout-prompts", 4, "--group-size", 1, "--max-new-tokens", 6,
            "--kl-target", "0.01", "--kl-horizon", 10, "--log-every", 1, "--save-every", 2, "--keep-last", 5]
    assert cli(*args, "--max-steps", 2) == 0
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    st = json.loads((ckpt / "trainer_state.json").read_text())["stage_state"]
    assert st["kl_coef"] != 0.05 and st["baseline"] is not None and len(st["disc_history"]) == 2
    assert cli(*args, "--max-steps", 4, "--resume") == 0
    assert len(json.loads((out / "rl_eval.json").read_text())["discriminator_accuracy"]) == 4
    # the same 4 steps without the interruption: the resumed run goes on exactly as it would have
    straight = tmp_path / "straight"
    assert cli(*[straight if a == out else a for a in args], "--max-steps", 4) == 0
    got, want = ({r["step"]: r for r in rows(d) if "reward" in r} for d in (out, straight))
    for step in (3, 4):
        for key in ("kl_coef", "disc_accuracy", "reward"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_discriminator_learns_real_from_fake(base_model):
    """The adversarial critic alone: dataset replies vs. a fixed "policy" that always says the same
    thing; its accuracy on fresh samples (measured before each update) climbs to 1 and the reward it
    hands the fake replies falls."""
    from chatsmith.train.rewards import Discriminator
    from chatsmith.train.rollouts import PromptItem

    tok = Tokenizer.load(base_model)
    items = [PromptItem([{"role": "user", "content": q}], [], a, {}, f"test:{i}") for i, (q, a) in enumerate(YES_NO)]
    d = Discriminator(str(base_model), tok, lr=3e-3, steps=2, device="cpu")
    first = d(items, ["the king the king"] * len(items), [True] * len(items))
    d.learn()
    for _ in range(12):
        last = d(items, ["the king the king"] * len(items), [True] * len(items))
        d.learn()
    assert d.history[-1] == 1.0 and d.history[-1] > d.history[0]
    assert sum(last) < sum(first)


def test_discriminator_updates_go_through_the_trainers_machinery(base_model):
    """The critic's optimizer steps are the trainer's: the run's schedule (here warmup) peaking at
    its own learning rate, gradients clipped to --grad-clip before the step, the update under
    bf16 autocast as --dtype says (scoring the replies stays fp32, as the rollout is)."""
    from chatsmith.config import TrainConfig
    from chatsmith.train.rewards import Discriminator
    from chatsmith.train.rollouts import PromptItem

    tok = Tokenizer.load(base_model)
    items = [PromptItem([{"role": "user", "content": q}], [], a, {}, f"test:{i}") for i, (q, a) in enumerate(YES_NO)]
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="constant", grad_clip=1e-3, dtype="bf16", weight_decay=0.0)
    d = Discriminator(str(base_model), tok, lr=1e-2, steps=1, device="cpu", cfg=cfg, max_steps=lambda: 10)
    autocast, clipped = [], []
    forward = d.model.forward
    d.model.forward = lambda *a, **k: (autocast.append(torch.is_autocast_enabled("cpu")), forward(*a, **k))[1]
    d.opt.register_step_pre_hook(lambda opt, args, kwargs: clipped.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in d.model.parameters() if p.grad is not None]))))
    d(items, ["the king the king"] * len(items), [True] * len(items))
    d.learn(1)  # the run's second step: 2/4 of the way through warmup
    assert d.last_lr == pytest.approx(5e-3) and d.opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert autocast == [False, False, True]
    assert d.last_grad_norm > 1e-3 and float(clipped[0]) == pytest.approx(1e-3, rel=1e-3)
