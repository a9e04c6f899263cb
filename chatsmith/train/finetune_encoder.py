"""What the encoder's fine-tuning stages (classify, qa) share, on the one trainer.

A task turns its records into fixed input rows (ids, type ids) plus targets once; `EncoderStage`
draws them epoch-wise (a pure function of seed and step, so resume is exact), pads them, counts
real tokens, and evaluates by scoring a fresh `EncoderEngine` over the model being trained.
`fine_tune` runs the trainer: --epochs become steps when neither --max-steps nor --max-minutes is
given, and train_summary.json is written beside the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatsmith import atomic, runtime
from chatsmith.batching import epoch_batch
from chatsmith.config import TrainConfig
from chatsmith.encoder_engine import EncoderEngine
from chatsmith.train.trainer import Trainer, steps_for_epochs


class EncoderStage:
    name = "finetune"

    def __init__(self, engine: EncoderEngine, cfg: TrainConfig, rows: list[tuple], val=None):
        self.engine, self.cfg, self.rows, self.val = engine, cfg, rows, val

    def targets(self, rows: list[tuple]) -> dict[str, torch.Tensor]:
        """The batch's targets from its rows (each row: ids, type_ids, *targets)."""
        raise NotImplementedError

    def score(self, engine: EncoderEngine) -> dict:
        """Validation metrics of the model inside `engine` on self.val."""
        raise NotImplementedError

    def batch(self, step: int, micro: int, rank: int):
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, runtime.world_size())
        rows = [self.rows[j] for j in epoch_batch(self.cfg.seed, i, self.cfg.batch_size, len(self.rows))]
        return {**self.engine.tok.batch([(r[0], r[1]) for r in rows]), **self.targets(rows)}

    def tokens(self, b) -> int:
        return int(b["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.val:
            return {}
        return self.score(EncoderEngine(model, self.engine.tok, self.engine.max_len, self.engine.batch_size))


def fine_tune(model, stage: EncoderStage, cfg: TrainConfig, init: str, epochs: float, extra_config: dict,
              data_summary: dict) -> dict:
    steps_for_epochs(cfg, len(stage.rows), epochs)
    trainer = Trainer(model, stage, cfg, tokenizer_dir=init, extra_config=extra_config)
    summary = trainer.fit()
    summary["data"] = data_summary
    if trainer.master:
        atomic.write_json(Path(cfg.out) / "train_summary.json", summary)
    return summary


__all__ = ["EncoderStage", "fine_tune"]
