"""The pieces of one optimizer step, shared by the Trainer and by models a stage trains on the side
(the RL discriminator).

- `make_adamw`: AdamW with weight decay on matrices only (decaying norms' gains and biases just
  fights the data); `make_optimizer`: that, or Muon for the blocks' matrices beside it (`MuonAdamW`;
  on a CPU `Fp32Muon`, torch's Muon without its bf16 Newton-Schulz);
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
from chatsmith.errors import UserError


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


def muon_parameter(name: str, p: torch.Tensor) -> bool:
    """Muon is for the hidden weight matrices, those inside the Transformer blocks (decoder
    `model.layers.N.*`, encoder `bert.encoder.layer.N.*`); embeddings, heads and norms stay with
    AdamW, as in the Muon write-ups (Jordan et al. 2024; Liu et al. 2025)."""
    return p.dim() == 2 and bool({"layers", "layer"} & set(name.split(".")))


class MuonAdamW:
    """Two optimizers stepped as one: Muon (torch.optim.Muon) over the blocks' matrices and AdamW
    over every other parameter. Muon replaces the momentum of a matrix by its nearest semi-orthogonal
    matrix (5 Newton-Schulz iterations), so every direction of the update moves at the same rate.
    With adjust_lr_fn="match_rms_adamw" its update is scaled by 0.2 * sqrt(max(rows, cols)) to the
    RMS of an AdamW update (Liu et al. 2025, "Muon is Scalable for LLM Training"), so one --lr and
    one schedule serve both. `param_groups`, `state_dict` and `load_state_dict` present the pair as
    one optimizer whose parameter indices run AdamW's first, then Muon's (what checkpoints store)."""

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        self.parts = (adamw, muon)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    def _sizes(self) -> list[int]:
        return [sum(len(g["params"]) for g in o.param_groups) for o in self.parts]

    def step(self):
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        n0 = self._sizes()[0]
        a, m = (o.state_dict() for o in self.parts)
        groups = a["param_groups"] + [{**g, "params": [i + n0 for i in g["params"]]} for g in m["param_groups"]]
        return {"state": {**a["state"], **{i + n0: st for i, st in m["state"].items()}}, "param_groups": groups}

    def load_state_dict(self, sd: dict):
        n0 = self._sizes()[0]
        ga = len(self.parts[0].param_groups)
        self.parts[0].load_state_dict({"state": {i: st for i, st in sd["state"].items() if i < n0},
                                       "param_groups": sd["param_groups"][:ga]})
        self.parts[1].load_state_dict({"state": {i - n0: st for i, st in sd["state"].items() if i >= n0},
                                       "param_groups": [{**g, "params": [i - n0 for i in g["params"]]}
                                                        for g in sd["param_groups"][ga:]]})


class Fp32Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in the parameters' own dtype. PyTorch's
    runs it in bf16, which a GPU does at full speed but a CPU without native bf16 emulates: on a
    Zen 3 core a 1024x256 matrix took 1.0 s in bf16 and 0.03 s in fp32, so the tiny preset's step
    went from 0.3 s to 14 s. Same algorithm, state and hyper-parameters as torch's (its docstring
    has the equations): B <- mu B + (1 - mu) g; U = g + mu (B - g) (Nesterov); O = NS5(U);
    W <- (1 - lr wd) W - lr_adj O."""

    @staticmethod
    def orthogonalize(u: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                      eps: float) -> torch.Tensor:
        """The quintic Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = XX^T, on the wide side."""
        a, b, c = coefficients
        tall = u.size(0) > u.size(1)
        x = u.T if tall else u
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if tall else x

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr  # the learning-rate scaling torch's Muon uses

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, mu = float(group["lr"]), group["momentum"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - mu)
                update = g.lerp(buf, mu) if group["nesterov"] else buf
                update = self.orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fused: bool = True):
    """The trainer's optimizer: AdamW (make_adamw), or with cfg.optimizer == "muon" a MuonAdamW."""
    if cfg.optimizer != "muon":
        return make_adamw(model.parameters(), cfg, device, fused=fused)
    seen, muon, rest = set(), [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if muon_parameter(name, p) else rest).append(p)
    if not muon:
        raise UserError("--optimizer muon: this model has no weight matrices inside Transformer blocks")
    # torch's Muon orthogonalises in bf16: right on a GPU, 30x too slow on most CPUs (Fp32Muon)
    muon_cls = torch.optim.Muon if torch.device(device).type == "cuda" else Fp32Muon
    m = muon_cls(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
                         adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(make_adamw(rest, cfg, device, fused=fused), m)


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


def set_lr(opt, lr: float):
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


__all__ = ["full_tensor", "make_adamw", "make_optimizer", "MuonAdamW", "muon_parameter", "lr_at", "set_lr", "clip_gradients", "autocast", "all_reduce_gradients",
           "broadcast_parameters", "optimizer_tensors", "load_optimizer_tensors"]
