"""LoRA: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer W0 (out x in) gets a trainable low-rank update:

    h = W0 x + (alpha / r) * B A x          A: (r x in), B: (out x r), r << min(in, out)

A starts random (Kaiming-uniform, like nn.Linear) and B at zero, so at step 0 the adapted model *is*
the base model, and only B A -- r * (in + out) numbers per layer instead of in * out -- is learned.
The optimizer then holds moments for the adapters alone, which is where the memory saving comes from.
After training, W = W0 + (alpha / r) B A folds the update back in (`merge_lora`): the merged model
is an ordinary model, as fast as the base and loadable by anything that loads the base.

Files follow PEFT's layout, so `peft.PeftModel.from_pretrained(LlamaForCausalLM(base), DIR)` reads
a chatsmith adapter directory of the Llama shape:

    adapter_config.json          r, lora_alpha, target_modules, ... base_model_name_or_path
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight
                                 (+ the full weights of modules_to_save, e.g. a reward head `score`)

The rest of a chatsmith adapter directory (config.json, tokenizer, generation config) is what a
full model directory has, so tools that read those find them; `checkpoint.load_model` on it loads
the base and returns the merged model (`checkpoint.merge_adapters` writes that as a full directory).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatsmith.errors import UserError
from chatsmith.model.heads import HEADS, head_attrs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's names: PeftModel -> LoraModel -> the wrapped model
ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update: y = x W0^T + b + (alpha/r) * dropout(x) A^T B^T.

    It keeps the wrapped layer's own `weight`/`bias` Parameters under the same names, so the model's
    state-dict keys for the base weights do not change; the adapters add `lora_A.weight` and
    `lora_B.weight` next to them (PEFT's names).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            # A as nn.Linear initialises itself (PEFT does the same); B = 0 makes B A = 0 at the start.
            # Drawn on the CPU: generators are per device, and a CPU draw is the same on every machine
            a = torch.empty(rank, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(a)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        # (alpha/r) applied to the rank-r activations A x: the same product, scaled on a tensor that
        # is r wide instead of out_features wide
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A, the (out x in) update, computed in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W = W0 + (alpha/r) B A (same bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            w = (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        lin.weight = nn.Parameter(w)
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


@dataclass
class LoraSpec:
    """What was applied; stored on the model as `model.lora_spec` and written as adapter_config.json."""

    rank: int
    alpha: float
    targets: list[str]  # leaf module names, e.g. ["q_proj", "v_proj"]
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)  # trained in full next to the adapters
    base_dir: str | None = None  # the model directory the frozen weights came from
    _fingerprint: str | None = None  # of the base weight file, computed on first save

    def fingerprint(self) -> str | None:
        if self._fingerprint is None and self.base_dir:
            self._fingerprint = weights_fingerprint(Path(self.base_dir))
        return self._fingerprint


def _split_names(names) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n and n.strip()]


def _set_module(root: nn.Module, name: str, module: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_spec(model: nn.Module) -> LoraSpec | None:
    return getattr(model, "lora_spec", None)


def source_dir(model: nn.Module) -> str | None:
    """The directory `checkpoint.load_model` read this model (or a submodule of it) from."""
    for m in model.modules():
        if getattr(m, "source_dir", None):
            return m.source_dir
    return None


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=ALL_LINEAR, dropout: float = 0.0,
               modules_to_save=("score",), seed: int = 0, base_dir: str | None = None) -> nn.Module:
    """Wrap the target nn.Linear layers of `model` in LoRALinear, in place, and freeze every parameter
    but the adapters and the modules in `modules_to_save`. Returns the model.

    targets: leaf module names ("q_proj,v_proj" or a list), or "all-linear": every nn.Linear inside the
    model's `blocks()` (q/k/v/o and gate/up/down on the Llama shape). Heads (lm_head, score: they map
    to the vocabulary or to a scalar, where a rank-r update is the layer) are never targets.
    modules_to_save: leaf names of modules trained in full (names absent from the model are ignored,
    so the default "score" only matters for models with a reward/value head).
    """
    if rank < 1:
        raise UserError(f"--lora-rank must be at least 1 (0 turns LoRA off), got {rank}")
    if has_lora(model):
        raise UserError("this model already carries LoRA adapters; merge them first (chatsmith lora merge)")
    alpha = float(rank if alpha is None else alpha)
    if alpha <= 0:
        raise UserError(f"--lora-alpha must be positive, got {alpha:g}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {dropout:g}")
    save = _split_names(modules_to_save)
    # the model says where its repeated layers are (FamilyModel.blocks) and what its heads are
    in_blocks = {id(m) for b in model.blocks() for m in b.modules()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in in_blocks}
    leaf = lambda n: n.rpartition(".")[2]  # noqa: E731
    valid = sorted({leaf(n) for n in linears})
    wanted = _split_names(targets)
    heads = [t for t in wanted if t in head_attrs(HEADS)]
    if heads:  # the fused LM loss reads lm_head.weight directly, so an adapter there would be skipped
        raise UserError(f"--lora-targets: {', '.join(heads)} is an output head, not a LoRA target; train it in "
                        f"full with --lora-modules-to-save {','.join(heads)}")
    if not wanted:
        raise UserError(f"--lora-targets is empty; name some of: {', '.join(valid)} (or {ALL_LINEAR})")
    if wanted == [ALL_LINEAR]:
        names = [n for n in linears if leaf(n) not in save]
    else:
        unknown = [t for t in wanted if t not in valid]
        if unknown:
            raise UserError(f"--lora-targets: no linear layer of this model is called "
                            f"{', '.join(map(repr, unknown))}; valid names: {', '.join(valid)} (or {ALL_LINEAR})")
        names = [n for n in linears if leaf(n) in wanted]
    clash = sorted({leaf(n) for n in names} & set(save))
    if clash:
        raise UserError(f"{', '.join(clash)} cannot be both a LoRA target and trained in full "
                        f"(--lora-modules-to-save)")
    for n in sorted(names, key=lambda n: min(linears[n].in_features, linears[n].out_features))[:1]:
        m = linears[n]  # the narrowest target bounds the rank
        if rank > min(m.in_features, m.out_features):
            raise UserError(f"--lora-rank {rank} is too large for layer {n}: it maps {m.in_features} -> "
                            f"{m.out_features} features, so its rank is at most {min(m.in_features, m.out_features)}; "
                            f"choose --lora-rank <= {min(m.in_features, m.out_features)} or leave "
                            f"{leaf(n)} out of --lora-targets")
    for p in model.parameters():
        p.requires_grad_(False)
    # A's random init from its own generator: the adapters are a function of --seed alone, and
    # applying LoRA does not shift the global RNG stream that dropout and data order rely on
    g = torch.Generator(device="cpu").manual_seed(seed)
    for n in names:
        _set_module(model, n, LoRALinear(linears[n], rank, alpha, dropout, generator=g))
    saved = sorted({leaf(n) for n, m in model.named_modules() if leaf(n) in save and n})
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(True)
        elif n and leaf(n) in save:
            for p in m.parameters():
                p.requires_grad_(True)
    model.lora_spec = LoraSpec(rank, alpha, sorted({leaf(n) for n in names}), dropout, saved,
                               base_dir if base_dir is not None else source_dir(model))
    return model


def apply_lora_from_config(model: nn.Module, cfg) -> nn.Module:
    """The Trainer's hook: LoRA from TrainConfig's lora_* fields, on a model loaded from a directory."""
    base = source_dir(model)
    if base is None:
        raise UserError("--lora-rank trains adapters on top of a saved model, but this stage's model was not "
                        "loaded from a model directory (pretraining from scratch has to train every weight); "
                        "use it with a stage that starts from --init DIR")
    apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout,
               cfg.lora_modules_to_save, seed=cfg.seed, base_dir=base)
    model.lora_spec.fingerprint()  # of the base as it is now, before training starts
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (W = W0 + (alpha/r) B A) and unfreeze: the result is the plain
    model with the fine-tuned weights, state-dict keys exactly the base model's. In place; returns it."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set_module(model, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Parameters the adapter files hold: every lora_A/lora_B plus the modules trained in full."""
    spec = lora_spec(model)
    save = set(spec.modules_to_save if spec else [])
    out = []
    for n, _ in model.named_parameters():
        parts = n.split(".")
        if (len(parts) > 1 and parts[-2] in ("lora_A", "lora_B")) or save.intersection(parts[:-1]):
            out.append(n)
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters (and modules_to_save) under PEFT's names, fp32 on the CPU."""
    params = dict(model.named_parameters())
    return {PEFT_PREFIX + n: params[n].detach().to("cpu", torch.float32).contiguous() for n in trainable_names(model)}


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "the adapter file"):
    """Copy adapter tensors (PEFT names or plain names) into a model that has had apply_lora with the
    same settings; every adapter must be present with its shape."""
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}
    params = dict(model.named_parameters())
    expected = trainable_names(model)
    missing = [n for n in expected if n not in sd]
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where} does not match the LoRA settings: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]} (same --lora-rank, --lora-targets and base model as when it was trained?)")
    with torch.no_grad():
        for n in expected:
            p = params[n]
            if tuple(sd[n].shape) != tuple(p.shape):
                raise UserError(f"{where}: {n} has shape {tuple(sd[n].shape)}, the model expects {tuple(p.shape)} "
                                f"(was it trained with another --lora-rank or base model?)")
            p.copy_(sd[n].to(p.dtype))


# --- files -----------------------------------------------------------------------------------

def weights_fingerprint(d: Path) -> str | None:
    """size:sha256 of a model directory's weight file: lets a later load notice that the base model
    the adapters were trained on has been replaced (same shapes, other weights => silently wrong)."""
    for name in ("model.safetensors", ADAPTER_WEIGHTS):
        f = d / name
        if f.exists():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            return f"{f.stat().st_size}:{h.hexdigest()}"
    return None


def adapter_config(model: nn.Module) -> dict:
    spec = lora_spec(model)
    if spec is None:
        raise ValueError("model has no lora_spec: apply_lora first")
    if spec.base_dir is None:
        raise UserError("cannot save LoRA adapters without knowing their base model directory")
    return {
        # PEFT's LoraConfig fields
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": spec.targets,
        "modules_to_save": spec.modules_to_save or None, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True,
        "base_model_name_or_path": str(Path(spec.base_dir).resolve()),
    }


def write_adapter_files(d: Path, model: nn.Module) -> dict:
    """adapter_config.json + adapter_model.safetensors into d. Returns what config.json's "chatsmith"
    block keeps about them (kept out of adapter_config.json, where PEFT warns about unknown keys):
    the base weights' fingerprint."""
    from safetensors.torch import save_file

    save_file(adapter_state_dict(model), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(d / ADAPTER_CONFIG, "w") as f:
        json.dump(adapter_config(model), f, indent=2)
        f.write("\n")
    return {"base": str(Path(lora_spec(model).base_dir).resolve()), "base_fingerprint": lora_spec(model).fingerprint()}


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def read_adapter_config(d: Path) -> dict:
    f = d / ADAPTER_CONFIG
    try:
        acfg = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{f} cannot be read ({e}); the adapter directory is corrupt") from None
    if acfg.get("peft_type", "LORA") != "LORA" or not isinstance(acfg.get("r"), int):
        raise UserError(f"{f} does not describe LoRA adapters (peft_type {acfg.get('peft_type')!r})")
    if not acfg.get("base_model_name_or_path"):
        raise UserError(f"{f} has no base_model_name_or_path: the adapters cannot be placed on a base model")
    return acfg


def summary(model: nn.Module) -> str:
    spec = lora_spec(model)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = f" + {', '.join(spec.modules_to_save)} in full" if spec.modules_to_save else ""
    return (f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {', '.join(spec.targets)}{extra}: "
            f"{n_train / 1e6:.3f}M of {n_all / 1e6:.2f}M parameters trainable ({100 * n_train / max(n_all, 1):.2f}%)")


__all__ = ["LoRALinear", "LoraSpec", "apply_lora", "apply_lora_from_config", "merge_lora", "has_lora",
           "lora_spec", "adapter_state_dict", "load_adapter_state_dict", "write_adapter_files",
           "is_adapter_dir", "read_adapter_config", "weights_fingerprint", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]
