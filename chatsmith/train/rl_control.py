"""The honest control of an RL run (`rlhf --control-sft`): more SFT, from the same start, for the
same compute.

RL's claim is that sampling and a reward teach more than supervised steps on the data already at
hand. The obvious alternative is to keep fine-tuning the starting model on the training prompts'
reference replies (the assistant turns the prompt files end with), so the control is SFT from
`--init` on exactly those conversations, into OUT/control, with the RL run's optimizer settings
(learning rate, schedule, warmup, weight decay, seed). Its budget, by `mode`:

- ``tokens`` (the default): as many optimizer steps as RL took, each on about as many trained
  tokens as RL's average step (RL: reply tokens in the loss, every pass counted; SFT: assistant
  tokens in the loss), so the batch holds round(RL tokens per step / mean reply tokens) examples.
  Equal optimizer work, reproducible on any machine. It leaves out what RL spends on generating
  its rollouts, so the control gets *less* wall-clock time than RL did.
- ``seconds``: the same batch, for as many seconds as the RL run trained (its schedule fitted to
  the budget, like --max-minutes). Equal wall-clock on this machine: the control then takes many
  more steps than RL, the stronger baseline when compute means time.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

from chatsmith import runtime
from chatsmith.checkpoint import load_model
from chatsmith.config import TrainConfig
from chatsmith.errors import UserError
from chatsmith.tokenizer import encode_records
from chatsmith.train.rollouts import PromptItem
from chatsmith.train.sft import SFTStage
from chatsmith.train.trainer import Trainer

MODES = ("tokens", "seconds")


def control_examples(tok, items: list[PromptItem], max_len: int) -> list:
    """(ids, mask) of each training prompt followed by its reference reply."""
    recs = [SimpleNamespace(messages=it.messages + [{"role": "assistant", "content": it.reference}], meta=it.meta)
            for it in items if it.reference]
    if not recs:
        raise UserError("--control-sft continues SFT on the prompts' reference replies, and no prompt has one: "
                        "the prompt files' conversations must end with an assistant turn")
    examples, _ = encode_records(tok, recs, max_len)
    if not examples:
        raise UserError(f"--control-sft: no prompt + reference reply fits the {max_len}-token context")
    return examples


def control_config(cfg: TrainConfig, rl_summary: dict, examples: list, mode: str, out: Path) -> TrainConfig:
    """The control's TrainConfig: the RL run's, with the batch and the budget of `mode`."""
    if mode not in MODES:
        raise UserError(f"--control-sft must be one of {', '.join(MODES)}, got {mode!r}")
    steps = max(1, int(rl_summary["steps"]))
    per_step = rl_summary["tokens"] / steps / runtime.world_size()  # trained tokens per step, per process
    reply = sum(sum(m[1:]) for _, m in examples) / len(examples)  # assistant tokens in the loss, mean
    batch = max(1, round(per_step / max(reply, 1.0)))
    budget = dict(max_steps=steps, max_minutes=None) if mode == "tokens" else \
        dict(max_steps=None, max_minutes=max(rl_summary["seconds"], 1.0) / 60)
    return dataclasses.replace(cfg, out=str(out), batch_size=batch, grad_accum=1, eval_every=10**9, **budget)


def train_control(cfg: TrainConfig, rl_summary: dict, init: str, tok, items: list[PromptItem], mode: str,
                  out: Path):
    """SFT from `init` on the items' reference replies for RL's compute; returns (model, summary)."""
    model = load_model(init)
    examples = control_examples(tok, items, model.cfg.max_seq_len)
    ccfg = control_config(cfg, rl_summary, examples, mode, out)
    print(f"control ({mode}): SFT from {init} on {len(examples)} reference replies, batch {ccfg.batch_size}, "
          + (f"{ccfg.max_steps} steps" if ccfg.max_steps else f"{ccfg.max_minutes * 60:.0f} s"), file=sys.stderr)
    stage = SFTStage(examples, [], ccfg, tok.pad_id, runtime.world_size())
    trainer = Trainer(model, stage, ccfg, tokenizer_dir=init, extra_config={"stage": "sft", "control_for": "rlhf",
                                                                              "control_mode": mode})
    summary = trainer.fit()
    reply = sum(sum(m[1:]) for _, m in examples) / len(examples)
    summary.update(mode=mode, batch_size=ccfg.batch_size, examples=len(examples),
                   rl_trained_tokens_per_step=round(rl_summary["tokens"] / max(1, rl_summary["steps"]), 1),
                   trained_tokens_per_step=round(ccfg.batch_size * reply * runtime.world_size(), 1))
    return trainer.unwrapped, summary


__all__ = ["MODES", "control_examples", "control_config", "train_control"]
