"""Supervised fine-tuning on dialogues: the chat template, loss on assistant tokens only.

Each conversation is rendered with the chat template into ids plus a mask that is 1 on the
assistant's replies and end tokens; the loss is the mean cross-entropy over those positions
(InstructGPT's SFT step). Conversations longer than the context are cut at a turn boundary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from chatsmith import atomic, runtime
from chatsmith.batching import collate, length_grouped_batch
from chatsmith.checkpoint import load_model
from chatsmith.config import TrainConfig
from chatsmith.data.chat_formats import FORMATS, read_conversations
from chatsmith.errors import UserError
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.eval.chat import assistant_loss, chat_metrics
from chatsmith.messages import heldout_overlap
from chatsmith.tokenizer import Tokenizer, encode_records
from chatsmith.train.trainer import Trainer, steps_for_epochs


class SFTStage:
    name = "sft"

    def __init__(self, examples, heldout, cfg: TrainConfig, pad_id: int, world: int = 1):
        self.examples, self.heldout, self.cfg, self.pad_id, self.world = examples, heldout, cfg, pad_id, world

    def batch(self, step: int, micro: int, rank: int):
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, self.world)
        # grouped by length: a random batch of the built-in dialogues is about half padding
        ex = [self.examples[j] for j in length_grouped_batch(self.cfg.seed, i, self.cfg.batch_size,
                                                             len(self.examples), lambda j: len(self.examples[j][0]))]
        return {**collate([ids for ids, _ in ex], self.pad_id, masks=[m for _, m in ex]),
                "n_tokens": sum(len(ids) - 1 for ids, _ in ex)}

    def loss(self, model, batch):
        _, loss = model(batch["x"], batch["y"], loss_mask=batch["mask"])
        return loss, {}

    def tokens(self, batch) -> int:
        return batch["n_tokens"]

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.heldout:
            return {}
        return {"heldout_loss": assistant_loss(model, self.heldout, self.pad_id, self.cfg.batch_size)}


def run(cfg: TrainConfig, data: list[str], init: str, heldout: list[str] | None = None, fmt: str | None = None,
        skip_bad: bool = False, epochs: float | None = None, eval_samples: int = 20,
        eval_max_new_tokens: int = 48) -> dict:
    out = Path(cfg.out)
    model = load_model(init)
    tok = Tokenizer.load(init)
    if not tok.has_chat:  # our chat tokens, or an imported model's own chat template
        raise UserError(f"the tokenizer in {init} has no chat tokens; train it with `chatsmith tokenizer train`")
    max_len = cfg.seq_len or model.cfg.max_seq_len
    if max_len > model.cfg.max_seq_len:
        raise UserError(f"--seq-len {max_len} is beyond the model's context of {model.cfg.max_seq_len}")
    records, report = read_conversations(data, format=fmt, skip_bad=skip_bad, seed=cfg.seed)
    examples, trunc = encode_records(tok, records, max_len)
    if not examples:
        raise UserError(f"no conversation in {', '.join(data)} fits the {max_len}-token context")
    held_records = []
    if heldout:
        held_records, _ = read_conversations(heldout, format=fmt, skip_bad=skip_bad, seed=cfg.seed)
        leaked = heldout_overlap([r.messages for r in records], [r.messages for r in held_records])
        if leaked:
            raise UserError(f"{leaked} held-out conversations also appear in the training data: the "
                            f"held-out figures would be meaningless; remove them from one side")
    held_examples, _ = encode_records(tok, held_records, max_len)
    print(f"sft data: {len(examples)} conversations ({report.skipped} bad records skipped, "
          f"{trunc['truncated_at_turn']} truncated at a turn boundary, {trunc['dropped_too_long']} too long "
          f"for the context dropped); held-out: {len(held_examples)}", file=sys.stderr)
    steps_for_epochs(cfg, len(examples), epochs or 1.0)
    gen_eval = lambda m: chat_metrics(m, tok, held_records, per_family=eval_samples,  # noqa: E731
                                      max_new_tokens=eval_max_new_tokens, pad_id=tok.pad_id)
    before = gen_eval(model) if held_records and not cfg.resume else None
    stage = SFTStage(examples, held_examples, cfg, tok.pad_id, runtime.world_size())
    trainer = Trainer(model, stage, cfg, tokenizer_dir=init, extra_config={"stage": "sft"})
    summary = trainer.fit()
    summary["data"] = {"records": report.records, "skipped_bad": report.skipped, **trunc,
                       "examples": len(examples), "heldout": len(held_examples)}
    if held_records and trainer.master:
        after = gen_eval(trainer.unwrapped)
        ev_f = out / "sft_eval.json"
        prev = json.loads(ev_f.read_text()) if ev_f.exists() else {}
        res = {"base": before or prev.get("base"), "sft": after}
        atomic.write_json(ev_f, res)
        summary["eval"] = res
        print_eval_table(res)
    if trainer.master:  # under torchrun rank 0 alone writes
        atomic.write_json(out / "train_summary.json", summary)
    return summary


def print_eval_table(res: dict):
    rows = [("assistant-token loss (held-out)", "assistant_loss", "{:.3f}"),
            ("replies ending with the end token", "ended_share", "{:.0%}")]
    print(f"{'held-out metric':40s} {'base':>8s} {'sft':>8s}", file=sys.stderr)
    for label, key, f in rows:
        vals = [f.format(res[s][key]) if res.get(s) else "-" for s in ("base", "sft")]
        print(f"{label:40s} {vals[0]:>8s} {vals[1]:>8s}", file=sys.stderr)
    for label, key in (("exact match: ", "exact_match"), ("ended: ", "ended_by_family")):  # per family
        for fam in sorted({k for side in res.values() if side for k in side.get(key, {})}):
            vals = [f"{res[s][key][fam]:.0%}" if res.get(s) and fam in res[s].get(key, {}) else "-"
                    for s in ("base", "sft")]
            print(f"{label + fam:40s} {vals[0]:>8s} {vals[1]:>8s}", file=sys.stderr)


# --- the verb -------------------------------------------------------------------------------------
DEFAULTS = dict(out="runs/sft", lr=5e-4, warmup_steps=20, min_lr_ratio=0.0, eval_every=100, save_every=200)


def add_arguments(p):
    p.add_argument("--data", nargs="+", required=True,
                   help="dialogue files (.jsonl/.json/.yaml), each optionally FILE:WEIGHT")
    p.add_argument("--init", required=True, help="the model directory to start from (a base model)")
    p.add_argument("--heldout", nargs="+", help="held-out dialogues for the before/after metrics")
    p.add_argument("--format", choices=list(FORMATS), help="force a format (default: detected per record)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data when neither "
                   "--max-steps nor --max-minutes is given (default 1)")
    p.add_argument("--eval-samples", type=int, default=20, help="held-out prompts generated per task family")
    p.add_argument("--eval-max-new-tokens", type=int, default=48, help="longest held-out reply generated (tokens)")
    add_train_flags(p, DEFAULTS)


def main(a):
    summary = run(dataclass_from_args(TrainConfig, a), a.data, a.init, heldout=a.heldout, fmt=a.format,
                  skip_bad=a.skip_bad, epochs=a.epochs, eval_samples=a.eval_samples,
                  eval_max_new_tokens=a.eval_max_new_tokens)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


VERB = Verb("sft", "supervised fine-tuning on dialogues (loss on assistant tokens)", add_arguments, main)
