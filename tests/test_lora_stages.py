"""LoRA on the alignment stages: the Trainer applies it for every stage, a reward/value head `score`
is trained in full and saved with the adapters, and the frozen reference model gets no adapters."""

import json
import math

import pytest
import torch

from chatsmith.checkpoint import load_model, read_config
from chatsmith.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from conftest import cli
from test_alignment import RL, TRAIN, prefer_yes, rl_prompts, rows  # noqa: F401  (fixtures)

LORA = ["--lora-rank", 4, "--lora-alpha", 16]


def adapter_only(out):
    return (out / ADAPTER_WEIGHTS).exists() and not (out / "model.safetensors").exists()


def test_reward_model_with_lora_trains_and_saves_the_score_head(base_model, prefer_yes, tmp_path):  # noqa: F811
    from chatsmith.train.reward import load_reward_model

    out = tmp_path / "rm"
    assert cli("reward", "--data", prefer_yes / "train.jsonl", "--heldout", prefer_yes / "heldout.jsonl",
               "--init", base_model, "--out", out, "--max-steps", 30, "--lr", "1e-2", *TRAIN, *LORA) == 0
    assert adapter_only(out)
    acfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert acfg["modules_to_save"] == ["score"]
    assert read_config(out).score_head
    ev = json.loads((out / "reward_eval.json").read_text())
    assert ev["reward"]["heldout_accuracy"] == 1.0
    rm = load_reward_model(out)  # base + merged adapters + the trained head
    s = rm.score([[{"role": "user", "content": "Is it fine?"}, {"role": "assistant", "content": a}]
                  for a in ("yes", "no")])
    assert s[0] > s[1]


def test_dpo_with_lora_leaves_the_reference_alone(base_model, prefer_yes, tmp_path):  # noqa: F811
    out = tmp_path / "dpo"
    assert cli("dpo", "--data", prefer_yes / "train.jsonl", "--init", base_model, "--out", out,
               "--max-steps", 20, "--lr", "1e-2", "--beta", "0.5", *TRAIN, *LORA) == 0
    m = rows(out)
    assert abs(m[0]["loss"] - math.log(2)) < 1e-4  # B = 0: the policy starts as the reference
    assert m[-1]["loss"] < m[0]["loss"]
    assert adapter_only(out)
    tuned, base = load_model(out), load_model(base_model)
    x = torch.randint(0, base.cfg.vocab_size, (1, 8))
    assert (tuned(x) - base(x)).abs().max() > 1e-4


@pytest.mark.slow
def test_ppo_with_lora_trains_adapters_and_the_value_head(base_model, rl_prompts, tmp_path):  # noqa: F811
    out = tmp_path / "ppo"
    assert cli("rlhf", "--algo", "ppo", "--init", base_model, "--prompts", rl_prompts, "--out", out,
               "--max-steps", 3, "--lr", "3e-3", "--ppo-epochs", 1, "--minibatches", 1, *RL, *LORA) == 0
    assert adapter_only(out)
    assert all(torch.isfinite(torch.tensor(r["value_loss"])) for r in rows(out) if "value_loss" in r)
    load_model(out)
