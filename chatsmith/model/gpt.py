"""The one model: a decoder-only Transformer.

Default shape is Llama's (pre-norm RMSNorm, rotary positions, SwiGLU MLP, optional grouped-query
attention); `arch="gpt2"` switches to GPT-2's (LayerNorm with bias, learned positions, GELU MLP).
Module names follow Hugging Face's LlamaForCausalLM, so for the Llama shape our state dict *is*
a `transformers` state dict; the GPT-2 shape is converted in `chatsmith.model.hf`.

Shapes: B batch, T new tokens, S = cached + new tokens, H query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatsmith.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w  (Zhang & Sennrich 2019), computed in fp32 like Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps)


def rotate_half(x):
    # Llama's rotary layout: the two halves of the head dim form the (real, imaginary) pairs
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cache(cfg: ModelConfig, device=None):
    """cos/sin tables for RoPE (Su et al. 2021): angle(pos, i) = pos * theta^(-2i/D)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, D)
    return angles.cos(), angles.sin()


class KVCache:
    """Preallocated keys/values for every layer: (B, G, max_len, D). `pos` is how many are filled.

    Generation writes new keys at [pos, pos+T) and attends over [0, pos+T). Beam search reorders
    rows with `reorder`.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k, v):
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos}+{T} > {self.max_len}")
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor):
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * D, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, G * D, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, G * D, bias=cfg.bias)
        self.o_proj = nn.Linear(H * D, cfg.d_model, bias=cfg.bias)

    def forward(self, x, cos, sin, cache: KVCache | None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(B, T, G, D).transpose(1, 2)
        if cos is not None:  # rotary: rotate q and k by their absolute positions
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k.to(cache.k[0].dtype), v.to(cache.v[0].dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        if G != H:  # grouped-query attention: each key/value head serves H/G query heads
            k = k.repeat_interleave(H // G, dim=1)
            v = v.repeat_interleave(H // G, dim=1)
        p = cfg.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # one new token sees all
        else:  # T new tokens after `past` cached: query i sees keys [0, past + i]
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gpt2 = cfg.arch == "gpt2"
        if not self.gpt2:  # SwiGLU (Shazeer 2020): down(silu(gate x) * up x)
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.gpt2:
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Trunk(nn.Module):
    """Embeddings + blocks + final norm: the part shared by the LM, value and reward heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "gpt2":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.d_model)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.arch == "llama":
            cos, sin = rope_cache(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds variance, so shrink the projections
        # that write into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if hasattr(self.model, "embed_positions"):
                n -= self.model.embed_positions.weight.numel()
        return n

    def hidden_states(self, idx, cache: KVCache | None = None):
        """Final-norm hidden states (B, T, d) for token ids idx (B, T)."""
        cfg = self.cfg
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {cfg.max_seq_len}")
        x = self.model.embed_tokens(idx)
        cos = sin = None
        if cfg.arch == "gpt2":
            x = x + self.model.embed_positions(torch.arange(start, start + T, device=idx.device))
        else:
            cos = self.rope_cos[start:start + T].to(x.dtype)
            sin = self.rope_sin[start:start + T].to(x.dtype)
        x = self.model.drop(x)
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, idx, targets=None, cache: KVCache | None = None, loss_mask=None):
        """Logits (B, T, V); with targets also the mean cross-entropy over unmasked positions.

        targets use -100 for positions to ignore (the PyTorch / HF convention); `loss_mask`
        (B, T) of 0/1 is an alternative used by stages that train on part of a sequence.
        """
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self.lm_head(h)
        logits = self.lm_head(h)
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -100)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, dtype or p.dtype)
