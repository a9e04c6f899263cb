"""`TrainConfig`: every knob of the one trainer loop; CLI flags map 1:1 onto its fields.

A model's own config lives beside its module (chatsmith/model/decoder.py's `DecoderConfig` and
presets); `chatsmith.model.registry` finds them by family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from chatsmith.errors import UserError


@dataclass
class TrainConfig:
    """Every knob of the trainer loop. The CLI exposes each field as --field-name."""

    out: str = "runs/pretrain"
    preset: str = "tiny"
    seq_len: int | None = None  # None: the model's max_seq_len
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int | None = None  # None with --max-minutes: fitted to the budget; else 1000
    max_minutes: float | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 on CUDA if supported, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    resume: bool = False
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP
    # LoRA (chatsmith/model/lora.py): 0 = train every weight; r > 0 = freeze the model, train rank-r
    # adapters on --lora-targets (leaf layer names, or all-linear: every projection in the blocks)
    # plus --lora-modules-to-save in full (e.g. a reward/value head `score`); saves the adapters alone
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank
    lora_targets: str = "all-linear"  # llama shape: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    lora_dropout: float = 0.0
    lora_modules_to_save: str = "score"
    tensorboard: bool = False  # also write every metrics row as TensorBoard scalars under OUT/tensorboard/

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise UserError(f"--schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise UserError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise UserError(f"--device must be auto, cpu, cuda or mps, got {self.device!r}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be at least 1")
        if self.lora_rank < 0:
            raise UserError(f"--lora-rank must be 0 (off) or positive, got {self.lora_rank}")
        if self.lora_rank and self.lora_alpha <= 0:
            raise UserError(f"--lora-alpha must be positive, got {self.lora_alpha:g}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout:g}")


def asdict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


__all__ = ["TrainConfig", "asdict", "fields", "field"]
