"""The pieces of one optimizer step, shared by the Trainer and by models a stage trains on the side
(the RL discriminator).

- `make_adamw`: AdamW with weight decay on matrices only (decaying norms' gains and biases just
  fights the data);
- `lr_at`: linear warmup, then cosine / warmup-stable-decay / constant;
- `clip_gradients`: the global gradient norm clipped to --grad-clip;
- `autocast`: the bf16 autocast context (`runtime.autocast_dtype`), or none;
- `all_reduce_gradients` / `broadcast_parameters`: what DDP does for a wrapped module, for one that
  is trained on every rank but not wrapped;
- `optimizer_tensors` / `load_optimizer_tensors`: optimizer moments as flat named tensors for a
  checkpoint, and back.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.distributed as dist

from chatsmith.config import TrainConfig


def full_tensor(t):
    """A DTensor shard -> the whole tensor (a collective: every rank calls it); others unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def make_adamw(params, cfg: TrainConfig, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients: weight decay on matrices (dim >= 2), none
    on vectors; a parameter that appears twice (a tied embedding) is optimised once."""
    seen, decay, no_decay = set(), [], []
    for p in params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = fused and torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup, then cosine to min_lr (Loshchilov & Hutter 2017), or warmup-stable-decay
    (Hu et al. 2024: constant, then a linear decay over the last `decay_fraction` of steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, int(max_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return cfg.lr - (cfg.lr - lo) * min(frac, 1.0)
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


def set_lr(opt: torch.optim.Optimizer, lr: float):
    for g in opt.param_groups:
        g["lr"] = lr


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most max_norm; returns the norm before."""
    return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))


def autocast(amp: torch.dtype | None, device: torch.device):
    """Autocast to `amp` (bf16: matmuls in bf16, weights and reductions fp32), or a no-op for None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp)


def all_reduce_gradients(params, world: int):
    """Average the gradients over the ranks in one flat all-reduce, as DDP does for the module it
    wraps. Every rank must call it after the same backward: parameters without a gradient are
    skipped, so they must be the same ones on every rank (the same graph)."""
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: torch.nn.Module, world: int):
    """Every rank starts from rank 0's weights (and buffers), as DDP ensures when it wraps a module."""
    if world <= 1:
        return
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(t.data, 0)


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat named tensors ("PREFIX.{i}.{name}"), for safetensors."""
    return {f"{prefix}.{i}.{k}": full_tensor(v) if torch.is_tensor(v) else torch.tensor(v)
            for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, device):
    """The inverse of optimizer_tensors: moments move to `device`, the step counters stay where they are."""
    sd = opt.state_dict()
    for i in sd["state"].keys() | {int(k.split(".")[1]) for k in tensors if k.startswith(f"{prefix}.")}:
        keys = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{prefix}.{i}.")}
        sd["state"][i] = {k: v.to(device) if k != "step" else v for k, v in keys.items()}
    opt.load_state_dict(sd)


__all__ = ["full_tensor", "make_adamw", "lr_at", "set_lr", "clip_gradients", "autocast", "all_reduce_gradients",
           "broadcast_parameters", "optimizer_tensors", "load_optimizer_tensors"]
