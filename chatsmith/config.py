"""`TrainConfig`: every knob of the one trainer loop; CLI flags map 1:1 onto its fields.

A model's own config lives beside its module (chatsmith/model/decoder.py's `DecoderConfig` and
presets); `chatsmith.model.registry` finds them by family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from chatsmith.errors import UserError


OPTIMIZERS = ("adamw", "muon")


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
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest)
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
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be {' or '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.lora_rank:
            raise UserError("--optimizer muon with --lora-rank: LoRA's low-rank factors are trained with adamw")
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


# One line of help per TrainConfig flag (chatsmith/flags.py adds the stage's default to each).
TRAIN_HELP = {
    "out": "output directory (the finished model, checkpoints, metrics)",
    "preset": "model size",
    "seq_len": "tokens per training sequence (default: the model's context length)",
    "batch_size": "sequences per micro-batch per process",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "max_steps": "optimizer steps (default: fitted to --max-minutes, else 1000)",
    "max_minutes": "time budget; the schedule is fitted to it after timing the first steps (default: none)",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a share of --lr (cosine, wsd)",
    "warmup_steps": "linear warmup steps",
    "schedule": "learning-rate schedule after warmup",
    "decay_fraction": "wsd: share of the steps spent decaying at the end",
    "optimizer": "adamw, or muon: Muon (orthogonalised momentum; torch.optim.Muon) for the blocks' weight "
                 "matrices and AdamW for embeddings, heads and norms, at the same --lr",
    "weight_decay": "decoupled weight decay (weight matrices only, not vectors)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "scale the gradients down to this global L2 norm when above it",
    "eval_every": "evaluate every N steps",
    "eval_batches": "batches per evaluation",
    "save_every": "checkpoint every N steps",
    "keep_last": "checkpoints kept",
    "log_every": "progress line and metrics row every N steps",
    "seed": "seed of the data order, initialisation and sampling",
    "device": "where to train (auto: cuda, else mps, else cpu)",
    "dtype": "auto: bf16 autocast on a GPU that supports it, else fp32",
    "compile": "torch.compile the model",
    "resume": "continue from the newest readable checkpoint in --out",
    "fsdp": "under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP",
    "lora_rank": "train rank-R LoRA adapters on a frozen model (0 = train every weight)",
    "lora_alpha": "LoRA scale: the update is multiplied by alpha / rank",
    "lora_targets": "layers that get adapters: comma-separated names, or all-linear",
    "lora_dropout": "dropout on the LoRA input",
    "lora_modules_to_save": "layers trained in full next to the adapters (comma-separated)",
    "tensorboard": "also write the metrics as TensorBoard scalars under OUT/tensorboard/",
}
DEVICES = ("auto", "cpu", "cuda", "mps")  # every verb's --device
TRAIN_CHOICES = {"schedule": ("cosine", "wsd", "constant"), "device": DEVICES,
                 "dtype": ("auto", "fp32", "bf16"), "optimizer": OPTIMIZERS}


def asdict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


__all__ = ["DEVICES", "OPTIMIZERS", "TRAIN_CHOICES", "TRAIN_HELP", "TrainConfig", "asdict", "fields", "field"]
