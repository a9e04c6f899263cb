"""Heads: small output modules registered on a trunk by name.

A trunk turns tokens into hidden states h (B, T, d); a head turns h into what a task reads:

    lm      d -> vocab   next-token logits (HF: `lm_head`)
    score   d -> 1       one scalar per position: a reward model reads it at the last token, PPO's
                         value function at every token, the adversarial discriminator as a logit
                         (HF's *ForSequenceClassification name, `score`)

Each head's module sits on the model under its HF attribute name, so the state dict keeps the names
`transformers` expects. Families with other objectives (classification, spans, pooling) register
their heads here:

    mlm       d -> vocab  masked-token logits through BERT's transform (dense, GELU, LayerNorm),
                          decoder tied to the word embeddings (HF: `cls.predictions`)
    nsp       d -> 2      is-next-sentence logits on the pooled [CLS] state (HF: `cls.seq_relationship`)
    classify  d -> labels sentence (pair) classification on the pooled state (HF: `classifier`)
    span      d -> 2      start and end logits per token, extractive QA (HF: `qa_outputs`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLMHead(nn.Module):
    """BERT's masked-LM head: logits = LayerNorm(GELU(W h)) E^T + b, E the (tied) embedding matrix."""

    def __init__(self, cfg):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.transform.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h):
        t = self.transform
        return self.decoder(t.LayerNorm(F.gelu(t.dense(h)))) + self.bias


@dataclass(frozen=True)
class HeadSpec:
    attr: str                                         # attribute on the model = weight-name prefix
    build: Callable[[object], nn.Module]              # cfg -> module
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, h: m(h)


HEADS: dict[str, HeadSpec] = {
    "lm": HeadSpec("lm_head", lambda cfg: nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)),
    "score": HeadSpec("score", lambda cfg: nn.Linear(cfg.d_model, 1, bias=False),
                      lambda m, h: m(h).squeeze(-1)),
    "mlm": HeadSpec("mlm_head", MLMHead),
    "nsp": HeadSpec("nsp_head", lambda cfg: nn.Linear(cfg.d_model, 2)),
    "classify": HeadSpec("classifier", lambda cfg: nn.Linear(cfg.d_model, cfg.num_labels)),
    "span": HeadSpec("qa_outputs", lambda cfg: nn.Linear(cfg.d_model, 2)),
}


def new_head(name: str, cfg) -> nn.Module:
    return HEADS[name].build(cfg)


def head_output(name: str, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return HEADS[name].output(module, h)


def head_attrs(names) -> list[str]:
    """The module attribute names of these heads (what LoRA must not adapt, e.g. lm_head, score)."""
    return [HEADS[n].attr for n in names]


__all__ = ["MLMHead", "HeadSpec", "HEADS", "new_head", "head_output", "head_attrs"]
