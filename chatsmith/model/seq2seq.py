"""The seq2seq family: the encoder–decoder Transformer of "Attention Is All You Need" (Vaswani et
al. 2017), its config, presets and Hugging Face mapping.

The architecture is the original one, which is also Marian's (HF `MarianMTModel`), so a directory
loads in transformers as that class with the same logits:

    x = E[src] * sqrt(d) + PE                      sinusoidal positions (sin half, then cos half)
    encoder block:  h = LN(x + Drop(SelfAttn(x)))   every source token sees every other
                    x = LN(h + Drop(W2 act(W1 h)))
    decoder block:  the same, with masked (causal) self-attention, then cross-attention to the
                    encoder output between the two: h2 = LN(h + Drop(CrossAttn(h, enc)))
    logits = x E^T + b                              one embedding matrix E shared by the source,
                                                    the target and the output projection

Post-norm, as the paper and Marian (mBART/BART's pre-norm with learned positions would be the
other choice; we keep the tutorials' architecture, and warmup makes post-norm train fine at these
sizes). The decoder starts from the pad token (Marian's decoder_start_token_id), and a target-
language tag such as `<2en>` first in the source lets one model translate both ways.

Decoding (chatsmith/seq2seq_engine.py) runs the encoder once per source (`encode`), precomputes
each layer's cross-attention keys and values once (`new_cache`), and caches the decoder's
self-attention keys and values step by step; `Cache.reorder` follows beam search.

Module names are HF's (`model.shared`, `model.encoder.layers.N.self_attn.q_proj`, …).
Shapes: B batch, S source tokens, T target tokens, H heads, D head dim, d model width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatsmith.errors import UserError
from chatsmith.model.family import Family, FamilyModel

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu}


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 8192
    n_layer: int = 3  # encoder layers
    n_decoder_layer: int | None = None  # None: n_layer
    n_head: int = 4
    d_model: int = 256
    d_ff: int | None = None  # None: 4 * d_model
    max_seq_len: int = 256  # positions, source and target alike
    activation: str = "relu"  # the paper's; Marian's opus models use swish
    dropout: float = 0.1
    attn_dropout: float = 0.0
    act_dropout: float = 0.0
    scale_embedding: bool = True  # E * sqrt(d), as the paper
    init_std: float = 0.02
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int | None = None  # None: pad_token_id (Marian's convention)
    heads: tuple[str, ...] = ("lm",)
    languages: tuple[str, ...] = ()  # target-language tags the tokenizer has (<2en>, <2zh>), for checks

    def __post_init__(self):
        self.heads = tuple(self.heads)
        self.languages = tuple(self.languages)
        if self.heads != ("lm",):
            raise UserError(f"the seq2seq family has one head, lm; got {list(self.heads)}")
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        if self.d_model % self.n_head:
            raise UserError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_hf(self) -> dict:
        return {
            "architectures": ["MarianMTModel"], "model_type": "marian",
            "vocab_size": self.vocab_size, "decoder_vocab_size": self.vocab_size,
            "d_model": self.d_model, "encoder_layers": self.n_layer, "decoder_layers": self.n_decoder_layer,
            "encoder_attention_heads": self.n_head, "decoder_attention_heads": self.n_head,
            "encoder_ffn_dim": self.d_ff, "decoder_ffn_dim": self.d_ff,
            "activation_function": self.activation, "max_position_embeddings": self.max_seq_len,
            "dropout": self.dropout, "attention_dropout": self.attn_dropout, "activation_dropout": self.act_dropout,
            "scale_embedding": self.scale_embedding, "init_std": self.init_std,
            "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
            "forced_eos_token_id": self.eos_token_id, "bos_token_id": None,
            "decoder_start_token_id": self.decoder_start_token_id,
            "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True,
            "is_encoder_decoder": True, "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, d: dict) -> "Seq2SeqConfig":
        if d.get("model_type") != "marian":
            raise UserError(f"config.json has model_type={d.get('model_type')!r}; the seq2seq family reads 'marian'")
        if not d.get("share_encoder_decoder_embeddings", True) or not d.get("tie_word_embeddings", True):
            raise UserError("only Marian models with shared, tied embeddings are supported")
        if d.get("encoder_attention_heads") != d.get("decoder_attention_heads", d.get("encoder_attention_heads")) \
                or d.get("encoder_ffn_dim") != d.get("decoder_ffn_dim", d.get("encoder_ffn_dim")):
            raise UserError("encoder and decoder of different widths are not supported")
        return cls(vocab_size=d["vocab_size"], n_layer=d["encoder_layers"], n_decoder_layer=d["decoder_layers"],
                   n_head=d["encoder_attention_heads"], d_model=d["d_model"], d_ff=d["encoder_ffn_dim"],
                   max_seq_len=d.get("max_position_embeddings", 512),
                   activation=d.get("activation_function", "swish"), dropout=d.get("dropout", 0.1),
                   attn_dropout=d.get("attention_dropout", 0.0), act_dropout=d.get("activation_dropout", 0.0),
                   scale_embedding=d.get("scale_embedding", False), init_std=d.get("init_std", 0.02),
                   pad_token_id=d["pad_token_id"], eos_token_id=d["eos_token_id"],
                   decoder_start_token_id=d.get("decoder_start_token_id"))


# Named model shapes; vocab_size comes from the tokenizer when a run starts.
PRESETS: dict[str, dict] = {
    "micro": dict(n_layer=2, n_head=4, d_model=64, max_seq_len=64, dropout=0.0),  # tests: seconds
    "mini": dict(n_layer=2, n_head=4, d_model=128, max_seq_len=160),  # ~1.6M + embeddings: CPU minutes
    "tiny": dict(n_layer=3, n_head=4, d_model=256, max_seq_len=192),  # ~5M + embeddings
    "small": dict(n_layer=6, n_head=8, d_model=512, max_seq_len=256),  # the paper's base shape
}


def preset(name: str, **overrides) -> Seq2SeqConfig:
    if name not in PRESETS:
        raise UserError(f"unknown seq2seq preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return Seq2SeqConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def sinusoids(n_pos: int, dim: int) -> torch.Tensor:
    """The paper's positional encoding laid out as Marian's: angle pos / 10000^(2i/d), the sines
    of every pair in the first half of the vector and the cosines in the second (computed in float64
    as transformers does, so the tables are identical)."""
    j = np.arange(dim)
    angle = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    half = (dim + 1) // 2
    out = torch.empty(n_pos, dim)
    out[:, :half] = torch.from_numpy(np.sin(angle[:, 0::2])).float()
    out[:, half:] = torch.from_numpy(np.cos(angle[:, 1::2])).float()
    return out


# --- the network ------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        d = cfg.d_model
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.n_head, self.p = cfg.n_head, cfg.attn_dropout

    def heads(self, x):  # (B, T, d) -> (B, H, T, D)
        B, T, d = x.shape
        return x.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)

    def kv(self, x):
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def forward(self, x, k, v, mask=None, causal=False):
        """Queries from x; keys/values k, v (B, H, S, D). mask: bool, True = may attend."""
        q = self.heads(self.q_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           dropout_p=self.p if self.training else 0.0)
        B, H, T, D = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * D))


class Layer(nn.Module):
    """One post-norm block; a decoder block (cross=True) adds attention to the encoder output."""

    def __init__(self, cfg: Seq2SeqConfig, cross: bool):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        if cross:
            self.encoder_attn = Attention(cfg)
            self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.d_ff), nn.Linear(cfg.d_ff, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = ACTIVATIONS[cfg.activation]
        self.p, self.p_act = cfg.dropout, cfg.act_dropout

    def _drop(self, x, p=None):
        return F.dropout(x, self.p if p is None else p, self.training)

    def forward(self, x, self_mask=None, causal=False, past=None, cross_kv=None, cross_mask=None):
        """-> (x, (k, v) of this call's self-attention, concatenated onto `past` when given)."""
        k, v = self.self_attn.kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        x = self.self_attn_layer_norm(x + self._drop(self.self_attn(x, k, v, self_mask, causal)))
        if cross_kv is not None:
            x = self.encoder_attn_layer_norm(x + self._drop(self.encoder_attn(x, *cross_kv, cross_mask)))
        h = self.fc2(self._drop(self.act(self.fc1(x)), self.p_act))
        return self.final_layer_norm(x + self._drop(h)), (k, v)


class Stack(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, n: int, cross: bool):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg, cross) for _ in range(n))


class Trunk(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.encoder = Stack(cfg, cfg.n_layer, cross=False)
        self.decoder = Stack(cfg, cfg.n_decoder_layer, cross=True)


class Cache:
    """What decoding keeps per row: the encoder's padding mask, every decoder layer's cross-attention
    keys/values (computed once per source) and its self-attention keys/values so far."""

    def __init__(self, cross: list, enc_keep: torch.Tensor):
        self.cross, self.enc_keep = cross, enc_keep
        self.self_kv: list | None = None

    @property
    def length(self) -> int:
        return 0 if self.self_kv is None else self.self_kv[0][0].shape[2]

    def reorder(self, index: torch.Tensor):
        """Row i becomes old row index[i] (beam search: a beam continues another's prefix)."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        self.cross = [(pick(k), pick(v)) for k, v in self.cross]
        self.enc_keep = pick(self.enc_keep)
        if self.self_kv is not None:
            self.self_kv = [(pick(k), pick(v)) for k, v in self.self_kv]


class Seq2Seq(FamilyModel):
    family = "seq2seq"

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self._build_heads()  # lm_head, tied to model.shared
        self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))
        self.register_buffer("positions", sinusoids(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def tie_weights(self):
        self.lm_head.weight = self.model.shared.weight

    def blocks(self) -> list[nn.Module]:
        return [*self.model.encoder.layers, *self.model.decoder.layers]

    def generation_config(self) -> dict:
        c = self.cfg
        return {"decoder_start_token_id": c.decoder_start_token_id, "eos_token_id": c.eos_token_id,
                "forced_eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, "bos_token_id": None,
                "max_length": c.max_seq_len, "num_beams": 4}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids, start: int = 0):
        T = ids.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"{start + T} tokens exceed the model's {self.cfg.max_seq_len} positions")
        x = self.model.shared(ids) * self.embed_scale + self.positions[start:start + T]
        return F.dropout(x, self.cfg.dropout, self.training)

    def encode(self, src, src_mask=None):
        """Encoder output (B, S, d) and its key mask (B, 1, 1, S); src_mask (B, S): 1 real, 0 padding."""
        keep = (src_mask if src_mask is not None else src != self.cfg.pad_token_id).bool()[:, None, None, :]
        x = self._embed(src)
        for layer in self.model.encoder.layers:
            x, _ = layer(x, self_mask=keep)
        return x, keep

    def new_cache(self, enc, keep) -> Cache:
        return Cache([layer.encoder_attn.kv(enc) for layer in self.model.decoder.layers], keep)

    def decode(self, tgt, cache: Cache):
        """Logits (B, T, V) of the target prefix tgt (B, T) continuing `cache` (which grows)."""
        start = cache.length
        x = self._embed(tgt, start)
        T = tgt.shape[1]
        mask = None
        if T > 1 and start:  # a chunk after a cached prefix: causal with an offset
            mask = torch.ones(T, start + T, dtype=torch.bool, device=tgt.device).tril(start)
        new = []
        for i, layer in enumerate(self.model.decoder.layers):
            past = cache.self_kv[i] if cache.self_kv is not None else None
            x, kv = layer(x, self_mask=mask, causal=T > 1 and not start, past=past, cross_kv=cache.cross[i],
                          cross_mask=cache.enc_keep)
            new.append(kv)
        cache.self_kv = new
        return self.lm_head(x) + self.final_logits_bias

    def forward(self, src, tgt_in, src_mask=None):
        """Teacher forcing: logits (B, T, V) of every target position given the whole source and the
        target shifted right (tgt_in starts with decoder_start_token_id)."""
        enc, keep = self.encode(src, src_mask)
        return self.decode(tgt_in, self.new_cache(enc, keep))


# --- Hugging Face tensor names ---------------------------------------------------------------------

def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    # lm_head is tied to model.shared (HF re-ties it, and the embed_tokens, on load); the sinusoid
    # tables are not saved (HF rebuilds them: _keys_to_ignore_on_save)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def from_hf_state_dict(cfg: Seq2SeqConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("embed_positions.weight") or k.endswith(("encoder.embed_tokens.weight",
                                                               "decoder.embed_tokens.weight")):
            continue  # rebuilt / the shared matrix again
        out[k] = v
    if "final_logits_bias" not in out:
        out["final_logits_bias"] = torch.zeros(1, cfg.vocab_size)
    out["lm_head.weight"] = out.get("lm_head.weight", out.get("model.shared.weight"))
    if out["lm_head.weight"] is None:
        raise KeyError("model.shared.weight")
    return out


FAMILY = Family(name="seq2seq", config=Seq2SeqConfig, model=Seq2Seq, hf_model_types=("marian",),
                to_hf_state_dict=to_hf_state_dict, from_hf_state_dict=from_hf_state_dict,
                presets=PRESETS, preset=preset)
