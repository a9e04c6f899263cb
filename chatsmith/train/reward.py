"""The reward model: the chat model's trunk plus a scalar head, trained on preference pairs.

The score of a conversation is the scalar head at its last token (the assistant's end token).
Training minimises the Bradley–Terry negative log-likelihood (InstructGPT, Ouyang et al. 2022, eq. 1):

    loss = -log σ(r(x, y_chosen) - r(x, y_rejected))

so only score differences are learnt; held-out pairwise accuracy (share of pairs with
r(chosen) > r(rejected)) is the metric that matters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chatsmith import atomic, runtime
from chatsmith.batching import length_grouped_batch, pad
from chatsmith.checkpoint import load_model
from chatsmith.config import TrainConfig
from chatsmith.data.preferences import encode_pairs, read_pairs
from chatsmith.errors import UserError
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.messages import heldout_overlap
# the scorer lives in chatsmith.reward_model; its names stay importable from here
from chatsmith.reward_model import RewardModel, last_scores, load_reward_model  # noqa: F401
from chatsmith.tokenizer import Tokenizer
from chatsmith.train.trainer import Trainer, steps_for_epochs


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log σ(r_c - r_r); logsigmoid keeps it finite for large margins."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class RewardStage:
    name = "reward"
    show = ("accuracy", "margin")

    def __init__(self, examples, heldout, cfg: TrainConfig, pad_id: int, world: int = 1):
        self.examples, self.heldout, self.cfg, self.pad_id, self.world = examples, heldout, cfg, pad_id, world

    def batch(self, step: int, micro: int, rank: int):
        # epoch-wise seeded shuffle: a pure function of (seed, step) for exact resume
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, self.world)
        # grouped by the longer side's length: a pair's two sequences are padded together
        ex = [self.examples[j] for j in length_grouped_batch(
            self.cfg.seed, i, self.cfg.batch_size, len(self.examples),
            lambda j: max(len(self.examples[j][0]), len(self.examples[j][2])))]
        x, last = pad([e[0] for e in ex] + [e[2] for e in ex], self.pad_id)
        return {"x": x, "last": last}

    def loss(self, model, batch):
        r = last_scores(model, batch["x"], batch["last"])
        rc, rr = r.chunk(2)
        loss = bradley_terry_loss(rc, rr)
        d = (rc - rr).detach()
        return loss, {"accuracy": float((d > 0).float().mean()), "margin": float(d.mean())}

    def tokens(self, batch) -> int:
        return int((batch["last"] + 1).sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.heldout:
            return {}
        return pair_accuracy(model, self.heldout, self.pad_id, self.cfg.batch_size)


@torch.no_grad()
def pair_accuracy(model, examples, pad_id: int, batch_size: int = 16) -> dict:
    device = next(model.parameters()).device
    correct, margins, losses = 0, [], []
    for i in range(0, len(examples), batch_size):
        ex = examples[i:i + batch_size]
        x, last = pad([e[0] for e in ex] + [e[2] for e in ex], pad_id)
        rc, rr = last_scores(model, x.to(device), last).chunk(2)
        correct += int((rc > rr).sum())
        margins.append((rc - rr).cpu())
        losses.append(-F.logsigmoid(rc - rr).cpu())
    n = len(examples)
    return {"heldout_accuracy": correct / n, "heldout_margin": float(torch.cat(margins).mean()),
            "heldout_loss": float(torch.cat(losses).mean())}


def run(cfg: TrainConfig, data: list[str], init: str, heldout: list[str] | None = None,
        skip_bad: bool = False, epochs: float | None = None) -> dict:
    out = Path(cfg.out)
    model = load_model(init)
    tok = Tokenizer.load(init)
    max_len = min(cfg.seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    pairs, skipped = read_pairs(data, skip_bad)
    examples, dropped = encode_pairs(tok, pairs, max_len, skip_bad)
    held = []
    if heldout:
        held_pairs, _ = read_pairs(heldout, skip_bad)
        leaked = heldout_overlap([p.prompt for p in pairs], [p.prompt for p in held_pairs])
        if leaked:
            print(f"warning: {leaked} held-out prompts also appear in the training pairs", file=sys.stderr)
        held, _ = encode_pairs(tok, held_pairs, max_len, skip_bad=True)
    print(f"reward data: {len(examples)} pairs ({skipped} bad records and {dropped} too long skipped); "
          f"held-out: {len(held)}", file=sys.stderr)
    if not examples:
        raise UserError("no preference pair fits the context")
    world = runtime.world_size()
    steps_for_epochs(cfg, len(examples), epochs or 1.0)
    torch.manual_seed(cfg.seed)  # the new head's init, reproducibly
    model.add_head("score")
    stage = RewardStage(examples, held, cfg, tok.pad_id, world)
    before = stage.evaluate(model) if held else {}
    trainer = Trainer(model, stage, cfg, tokenizer_dir=init, extra_config={"stage": "reward"})
    summary = trainer.fit()
    summary["data"] = {"pairs": len(examples), "skipped_bad": skipped, "dropped_too_long": dropped,
                       "heldout": len(held)}
    if held and trainer.master:
        # the trainer evaluated the final model already (at the last step, or when the budget ran out)
        after = trainer.last_eval if "heldout_accuracy" in trainer.last_eval else stage.evaluate(trainer.unwrapped)
        res = {"untrained_head": before, "reward": after}
        atomic.write_json(out / "reward_eval.json", res)
        summary["eval"] = res
        print(f"held-out pairwise accuracy: {before['heldout_accuracy']:.1%} (untrained head) -> "
              f"{after['heldout_accuracy']:.1%}", file=sys.stderr)
        atomic.write_json(out / "train_summary.json", summary)
    return summary


# --- the verb -------------------------------------------------------------------------------------
DEFAULTS = dict(out="runs/reward", lr=1e-4, warmup_steps=10, min_lr_ratio=0.0, eval_every=100, save_every=200,
                batch_size=16)


def add_arguments(p):
    p.add_argument("--data", nargs="+", required=True,
                   help="preference JSONL in TRL's format: prompt/chosen/rejected, text or messages")
    p.add_argument("--init", required=True, help="the model to start from (usually the SFT model)")
    p.add_argument("--heldout", nargs="+", help="held-out pairs: pairwise accuracy before and after")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad or over-long pairs")
    p.add_argument("--epochs", type=float, default=None, help="passes over the pairs without --max-steps/"
                   "--max-minutes (default 1)")
    add_train_flags(p, DEFAULTS)


def main(a):
    summary = run(dataclass_from_args(TrainConfig, a), a.data, a.init, heldout=a.heldout, skip_bad=a.skip_bad,
                  epochs=a.epochs)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


VERB = Verb("reward", "train a reward model on preference pairs (Bradley-Terry)", add_arguments, main)
