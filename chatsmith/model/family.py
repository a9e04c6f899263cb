"""What a model family is, and what the rest of chatsmith may ask of one of its models.

A *family* is one kind of network — the decoder-only Transformer today; the BERT-style encoder,
the encoder–decoder Transformer and the CLIP-style pair as they arrive. Each family lives in one
module of `chatsmith/model/` (config beside module, the math visible, its Hugging Face mapping
inside) and describes itself with a `Family`, listed in `chatsmith/model/registry.py`.

Everything above the model (the checkpoint format, the trainer, LoRA, FSDP, the engine) reaches a
family only through the registry and through `FamilyModel`'s methods, never through a concrete
class, so adding a family means one model module plus one registry entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from chatsmith.errors import UserError
from chatsmith.model.heads import HEADS, head_output, new_head


@dataclass(frozen=True)
class Family:
    name: str                      # recorded in config.json's "chatsmith" block
    config: type                   # a dataclass: Config(**fields), .to_hf() -> HF config dict
    model: type                    # model(cfg) -> a FamilyModel
    hf_model_types: tuple[str, ...]  # the HF `model_type`s this family reads (config.from_hf)
    to_hf_state_dict: Callable[[nn.Module], dict]          # our tensors -> HF names
    from_hf_state_dict: Callable[[object, dict], dict]     # HF names -> our state dict
    presets: dict[str, dict] = field(default_factory=dict)  # named shapes: config overrides
    preset: Callable[..., object] | None = None  # (name, **overrides) -> config


class FamilyModel(nn.Module):
    """The seam every family's model implements.

    - `cfg`: its config (a dataclass with `heads`: the names of the heads it carries);
    - `blocks()`: the repeated layers — the unit FSDP shards and the scope of LoRA's `all-linear`;
    - heads (`chatsmith/model/heads.py`): output modules registered by name on a trunk that
      produces hidden states; `add_head`, `head`, `run_heads`;
    - `tie_weights()`: re-establish shared parameters after loading a state dict;
    - `generation_config()`: what `generation_config.json` holds (None for non-generative models).
    """

    cfg: object

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def tie_weights(self):
        pass

    def generation_config(self) -> dict | None:
        return None

    # --- heads --------------------------------------------------------------------------------
    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(self.cfg.heads)

    def head(self, name: str) -> nn.Module:
        if name not in self.heads:
            raise UserError(f"this model has no {name!r} head (it has: {', '.join(self.heads) or 'none'})")
        return getattr(self, HEADS[name].attr)

    def _build_heads(self):
        for name in self.heads:
            setattr(self, HEADS[name].attr, new_head(name, self.cfg))

    def add_head(self, name: str, std: float | None = None) -> "FamilyModel":
        """Register head `name` if the model lacks it, initialised N(0, std) (std 0: zeros, e.g. so a
        value function starts at 0; None: the config's init_std). Returns the model."""
        if name not in self.heads:
            self.cfg = dataclasses.replace(self.cfg, heads=(*self.heads, name))
            p = next(self.parameters())
            with torch.device(p.device):  # drawn where the old add_score_head drew it: same RNG stream
                m = new_head(name, self.cfg).to(dtype=p.dtype)
            std = getattr(self.cfg, "init_std", 0.02) if std is None else std
            with torch.no_grad():
                for w in m.parameters():
                    nn.init.normal_(w, std=std) if std > 0 and w.dim() > 1 else nn.init.zeros_(w)
            setattr(self, HEADS[name].attr, m)
        return self

    def run_heads(self, h: torch.Tensor, names: str | tuple[str, ...]):
        """Each named head applied to the hidden states h: one output for a name, a tuple for a tuple."""
        if isinstance(names, str):
            return head_output(names, self.head(names), h)
        return tuple(head_output(n, self.head(n), h) for n in names)
