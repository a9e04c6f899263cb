"""Supervised fine-tuning on dialogues: the chat template, loss on assistant tokens only.

Each conversation is rendered with the chat template into ids plus a mask that is 1 on the
assistant's replies and end tokens; the loss is the mean cross-entropy over those positions
(InstructGPT's SFT step). Conversations longer than the context are cut at a turn boundary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from chatsmith.checkpoint import load_model
from chatsmith.config import TrainConfig
from chatsmith.errors import UserError
from chatsmith.tokenizer import Tokenizer
from chatsmith.train.trainer import Trainer, shuffled_index


def render_truncated(tok: Tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]] | None:
    """The longest prefix of the conversation that ends after an assistant turn and fits in
    max_len tokens (+1 for the shifted target); None when not even the first reply fits."""
    best = None
    for end in range(len(messages), 0, -1):
        if messages[end - 1]["role"] != "assistant":
            continue
        ids, mask = tok.render_chat(messages[:end])
        if len(ids) <= max_len + 1:
            best = (ids, mask)
            break
    return best


def encode_records(tok: Tokenizer, records, max_len: int) -> tuple[list, dict]:
    examples, truncated, dropped = [], 0, 0
    for r in records:
        full = tok.render_chat(r.messages)
        if len(full[0]) <= max_len + 1:
            examples.append(full)
            continue
        cut = render_truncated(tok, r.messages, max_len)
        if cut is None:
            dropped += 1
        else:
            truncated += 1
            examples.append(cut)
    return examples, {"truncated_at_turn": truncated, "dropped_too_long": dropped}


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad to the longest; x = ids[:-1], y = ids[1:], mask aligned with y."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    m = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        m[i, :n] = torch.tensor(mask[1:])
    return {"x": x, "y": y, "mask": m}


class SFTStage:
    name = "sft"

    def __init__(self, examples, heldout, cfg: TrainConfig, pad_id: int, world: int = 1):
        self.examples, self.heldout, self.cfg, self.pad_id, self.world = examples, heldout, cfg, pad_id, world

    def batch(self, step: int, micro: int, rank: int):
        B = self.cfg.batch_size
        first = ((step * self.cfg.grad_accum + micro) * self.world + rank) * B
        n = len(self.examples)
        return collate([self.examples[shuffled_index(self.cfg.seed, first + j, n)] for j in range(B)], self.pad_id)

    def loss(self, model, batch):
        _, loss = model(batch["x"], batch["y"], loss_mask=batch["mask"])
        return loss, {}

    def tokens(self, batch) -> int:
        return int((batch["y"] != -100).sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.heldout:
            return {}
        return {"heldout_loss": assistant_loss(model, self.heldout, self.pad_id, self.cfg.batch_size)}


@torch.no_grad()
def assistant_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats) over assistant tokens, summed over examples, not averaged per batch."""
    device = next(model.parameters()).device
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        logits = model(b["x"].to(device)).float()
        y = b["y"].masked_fill(b["mask"] == 0, -100).to(device)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                               reduction="sum")
        total += ce.item()
        count += (y != -100).sum().item()
    return total / max(count, 1)


def run(cfg: TrainConfig, data: list[str], init: str, heldout: list[str] | None = None, fmt: str | None = None,
        skip_bad: bool = False, epochs: float | None = None, eval_samples: int = 20,
        eval_max_new_tokens: int = 48) -> dict:
    from chatsmith.data.chat_formats import read_conversations
    from chatsmith.eval.chat import chat_metrics

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
        train_hashes = {json.dumps(r.messages, ensure_ascii=False) for r in records}
        leaked = sum(json.dumps(r.messages, ensure_ascii=False) in train_hashes for r in held_records)
        if leaked:
            raise UserError(f"{leaked} held-out conversations also appear in the training data: the "
                            f"held-out figures would be meaningless; remove them from one side")
    held_examples, _ = encode_records(tok, held_records, max_len)
    print(f"sft data: {len(examples)} conversations ({report.skipped} bad records skipped, "
          f"{trunc['truncated_at_turn']} truncated at a turn boundary, {trunc['dropped_too_long']} too long "
          f"for the context dropped); held-out: {len(held_examples)}", file=sys.stderr)
    if cfg.max_steps is None and cfg.max_minutes is None:
        per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
        cfg.max_steps = max(1, int((epochs or 1.0) * len(examples) / per_step))
    gen_eval = lambda m: chat_metrics(m, tok, held_records, per_family=eval_samples,  # noqa: E731
                                      max_new_tokens=eval_max_new_tokens, pad_id=tok.pad_id)
    before = gen_eval(model) if held_records and not cfg.resume else None
    stage = SFTStage(examples, held_examples, cfg, tok.pad_id, int(os.environ.get("WORLD_SIZE", 1)))
    trainer = Trainer(model, stage, cfg, tokenizer_dir=init, extra_config={"stage": "sft"})
    summary = trainer.fit()
    summary["data"] = {"records": report.records, "skipped_bad": report.skipped, **trunc,
                       "examples": len(examples), "heldout": len(held_examples)}
    if held_records and trainer.master:
        after = gen_eval(trainer.unwrapped)
        ev_f = out / "sft_eval.json"
        prev = json.loads(ev_f.read_text()) if ev_f.exists() else {}
        res = {"base": before or prev.get("base"), "sft": after}
        ev_f.write_text(json.dumps(res, indent=2) + "\n")
        summary["eval"] = res
        print_eval_table(res)
    if trainer.master:  # under torchrun rank 0 alone writes
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_eval_table(res: dict):
    rows = [("assistant-token loss (held-out)", "assistant_loss", "{:.3f}"),
            ("replies ending with the end token", "ended_share", "{:.0%}")]
    fams = sorted({k for side in res.values() if side for k in side.get("exact_match", {})})
    print(f"{'held-out metric':40s} {'base':>8s} {'sft':>8s}", file=sys.stderr)
    for label, key, f in rows:
        vals = [f.format(res[s][key]) if res.get(s) else "-" for s in ("base", "sft")]
        print(f"{label:40s} {vals[0]:>8s} {vals[1]:>8s}", file=sys.stderr)
    for fam in fams:
        vals = [f"{res[s]['exact_match'][fam]:.0%}" if res.get(s) and fam in res[s]["exact_match"] else "-"
                for s in ("base", "sft")]
        print(f"{'exact match: ' + fam:40s} {vals[0]:>8s} {vals[1]:>8s}", file=sys.stderr)
