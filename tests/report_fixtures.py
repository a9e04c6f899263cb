"""A realistic speedrun directory for the report tests, written without training: every file in the
layout the stages write (config.json, metrics.jsonl, train_summary.json, *_eval.json, eval/metrics.json,
speedrun.json), with numbers of a starved 15-minute CPU run: long base/SFT/reward curves, RL and DPO
with three logged steps and one final eval, DPO trained with RPO (objective ~4.2, held-out DPO loss 0.67),
the SFT model's ended share 0.78 on held-out chats and 1.0 on the RL prompts."""

import json
import math
import random
from pathlib import Path

from chatsmith.train.rl_eval import flatten


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage(run, name, kind, rows, summary, extra=None):
    d = run / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "chatsmith": {"stage": kind, **(extra or {})}}))
    _jsonl(d / "metrics.jsonl", rows)
    (d / "train_summary.json").write_text(json.dumps(summary))
    return d


def speedrun_dir(run: Path) -> Path:
    rng = random.Random(0)
    fams = ["arithmetic", "number_sense", "word_problem", "quiz"]
    # base: 900 steps, log every 10, eval every 100
    rows = []
    for s in range(10, 901, 10):
        rows.append({"step": s, "loss": 3.2 + 5.5 * math.exp(-s / 120) + rng.gauss(0, 0.05), "lr": 3e-3 * min(1, s / 50),
                     "grad_norm": 0.6 + rng.random(), "tokens": 4000 * s, "tok_per_s": 12000 + rng.gauss(0, 300),
                     "elapsed": s / 3})
        if s % 100 == 0:
            rows.append({"step": s, "heldout_loss": 3.4 + 5.3 * math.exp(-s / 120), "heldout_bpb": 1.7 + 2 * math.exp(-s / 120)})
    _stage(run, "base", "pretrain", rows, {"steps": 900, "max_steps": 900, "tokens": 3600000, "seconds": 290.0,
                                           "interrupted": False, "heldout_loss": 3.45, "heldout_bpb": 1.72})
    # sft
    rows = []
    for s in range(10, 311, 10):
        rows.append({"step": s, "loss": 1.2 + 1.5 * math.exp(-s / 60) + rng.gauss(0, 0.04), "lr": 5e-4 * min(1, s / 20) * (1 - s / 320), "grad_norm": 1.1 + 0.3 * rng.random(),
                     "tokens": 2000 * s, "tok_per_s": 9000 + rng.gauss(0, 200), "elapsed": s / 2})
        if s % 100 == 0 or s == 310:
            rows.append({"step": s, "heldout_loss": 1.3 + 1.4 * math.exp(-s / 60)})
    d = _stage(run, "sft", "sft", rows, {"steps": 310, "max_steps": 310, "tokens": 620000, "seconds": 180.0,
                                         "interrupted": False, "heldout_loss": 1.33,
                                         "data": {"records": 4000, "skipped_bad": 0}})
    side = lambda loss, ended, em: {"assistant_loss": loss, "ended_share": ended, "generated": 64,  # noqa: E731
                                    "exact_match": dict(zip(fams, em)), "max_new_tokens": 40, "samples": [
                                        {"family": "arithmetic", "prompt": "What is 7 + 5?", "reply": "7 + 5 = 12.",
                                         "reference": "12"}]}
    (d / "sft_eval.json").write_text(json.dumps({"base": side(3.9, 0.0, [0.0, 0.05, 0.0, 0.0]),
                                                 "sft": side(1.33, 0.78, [0.19, 0.31, 0.06, 0.12])}))
    # reward
    rows = []
    for s in range(10, 151, 10):
        rows.append({"step": s, "loss": 0.69 - 0.25 * (1 - math.exp(-s / 50)), "accuracy": 0.5 + 0.3 * (1 - math.exp(-s / 50)),
                     "lr": 1e-4 * (1 - s / 160), "grad_norm": 2.0 + rng.random(), "tokens": 1500 * s, "tok_per_s": 8000 + rng.gauss(0, 150), "elapsed": s / 3})
        if s % 50 == 0:
            rows.append({"step": s, "heldout_accuracy": 0.55 + 0.25 * (1 - math.exp(-s / 50)), "heldout_margin": 0.02 * s,
                         "heldout_loss": 0.69 - 0.2 * (1 - math.exp(-s / 50))})
    d = _stage(run, "reward", "reward", rows, {"steps": 150, "max_steps": 150, "tokens": 225000, "seconds": 50.0,
                                               "interrupted": False, "heldout_accuracy": 0.78, "heldout_margin": 2.9,
                                               "heldout_loss": 0.5, "data": {"pairs": 3000, "heldout": 400}})
    (d / "reward_eval.json").write_text(json.dumps({
        "untrained_head": {"heldout_accuracy": 0.5, "heldout_margin": 0.0, "heldout_loss": 0.693},
        "reward": {"heldout_accuracy": 0.78, "heldout_margin": 2.9, "heldout_loss": 0.5}}))
    # rl (GRPO), a starved run: 3 logged steps (log every 2), one eval at the end
    rows = []
    for i, s in enumerate((2, 4, 6)):
        rows.append({"step": s, "loss": -0.01 + 0.004 * i, "lr": 1e-5, "grad_norm": 0.3 + 0.1 * i, "tokens": 3000 * s,
                     "reward": 0.22 + 0.05 * i, "kl": 0.01 + 0.02 * i, "kl_coef": 0.02, "response_len": 31 - 2 * i,
                     "ended_share": 0.97 + 0.01 * i, "reward/exact": 0.22 + 0.05 * i, "kept_share": 0.6 + 0.05 * i,
                     "entropy": 1.2 - 0.05 * i, "approx_kl": 0.001 * (i + 1), "policy_loss": -0.01 + 0.004 * i,
                     "clip_frac": 0.0, "kl_k3": 0.0005 * (i + 1), "tok_per_s": 800 + 10 * i, "elapsed": 25.0 * (i + 1)})
    rl_side = lambda em, r, kl, ended, top: {"heldout_prompts": 100, "exact_match": dict(zip(fams[:3], em)),  # noqa: E731
                                             "exact_match_all": sum(em) / 3, "top_answer": "12", "top_answer_share": top,
                                             "heldout_reward": r, "ended_share": ended, "kl_to_ref": kl,
                                             "samples": [{"family": "arithmetic", "prompt": "What is 3 * 4?", "reply": "12"}]}
    before, after = rl_side([0.2, 0.3, 0.05], 0.18, 0.0, 1.0, 0.1), rl_side([0.26, 0.33, 0.07], 0.22, 0.9, 1.0, 0.12)
    rows.append({"step": 6, **{k.replace("exact_match_", "exact_match/").replace("exact_match/all", "exact_match_all"): v
                               for k, v in flatten(after).items() if isinstance(v, float)}})
    d = _stage(run, "rl", "rlhf", rows, {"steps": 6, "max_steps": 6, "tokens": 18000, "seconds": 80.0, "interrupted": False,
                                         **{k: v for k, v in flatten(after).items() if isinstance(v, float)},
                                         "eval": {"init": before, "rl": after}}, {"algo": "grpo", "rl_config": {"max_new_tokens": 48, "eval_prompts": 100}})
    (d / "rl_eval.json").write_text(json.dumps({"init": before, "rl": after}))
    # dpo with RPO (alpha 1): the train objective adds the chosen reply's NLL (~3.5 nats/token)
    rows = []
    for i, s in enumerate((10, 20, 27)):
        rows.append({"step": s, "loss": 4.25 - 0.05 * i, "lr": 5e-5, "grad_norm": 3.0 + 0.4 * i, "tokens": 5000 * s,
                     "reward_accuracy": 0.55 + 0.05 * i, "reward_margin": 0.05 * i, "reward_chosen": -0.01 * i,
                     "reward_rejected": -0.03 * i, "chosen_nll": 3.56 - 0.05 * i, "dpo_loss": 0.69 - 0.01 * i,
                     "tok_per_s": 3000 + 40 * i, "elapsed": 20.0 * (i + 1)})
    rows.append({"step": 27, "heldout_loss": 0.67, "heldout_reward_accuracy": 0.6, "heldout_reward_margin": 0.08})
    d = _stage(run, "dpo", "dpo", rows, {"steps": 27, "max_steps": 27, "tokens": 135000, "seconds": 60.0,
                                         "interrupted": False, "heldout_loss": 0.67, "heldout_reward_accuracy": 0.6,
                                         "heldout_reward_margin": 0.08, "data": {"pairs": 600, "beta": 0.1}},
               {"beta": 0.1, "rpo_alpha": 1.0})
    (d / "eval").mkdir()
    (d / "eval" / "metrics.json").write_text(json.dumps({
        "model": str(d), "mode": "zero-shot", "k": 0, "compare": str(run / "sft"), "reward_model": str(run / "reward"),
        "tasks": {"reward": {"kind": "reward", "n": 200, "too_long": 0, "mean_reward": 0.41, "reward_std": 1.2,
                             "reward_by_family": {"arithmetic": 0.3, "quiz": 0.5}, "compare": str(run / "sft"),
                             "mean_reward_b": 0.12, "win_rate": 0.58, "wins": 112, "ties": 8, "losses": 80,
                             "win_rate_ci95": 0.068, "samples": []}}}))
    (run / "speedrun.json").write_text(json.dumps({
        "minutes_budget": 15, "seconds": 949.5,
        "stages": {"data": {"seconds": 21.0}, "tokenizer": {"seconds": 9.5, "vocab_size": 8192},
                   "pretrain": {"seconds": 300.2, "steps": 900, "tokens": 3600000},
                   "baseline": {"seconds": 35.0}, "sft": {"seconds": 260.1, "steps": 310, "tokens": 620000},
                   "reward": {"seconds": 55.0}, "rl": {"seconds": 95.3}, "dpo pairs": {"seconds": 93.0},
                   "dpo": {"seconds": 60.2}, "judge": {"seconds": 18.0},
                   "samples": {"seconds": 2.0, "invalid_utf8_sequences": 1, "sample_characters": 610}},
        "baseline": {"neural_val_bpb": 1.72, "ngram3_val_bpb": 2.1, "ngram3_same_tokens_val_bpb": 2.3},
        "judge": {"prompts": 200, "dpo_win_rate_vs_sft": 0.58, "win_rate_ci95": 0.068, "wins": 112, "ties": 8,
                  "losses": 80, "dpo_mean_reward": 0.41, "sft_mean_reward": 0.12,
                  "examples": [{"prompt": "Who are you?", "sft": "I am a bot.", "dpo": "I am chatsmith."}]},
        "samples": [{"prompt": "The king", "completion": " said to the queen"}],
        "conversation": {"sft": [{"user": "What is 2 + 2?", "assistant": "4"}]}}))
    return run


