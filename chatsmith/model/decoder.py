"""The decoder family: a decoder-only Transformer (GPT), its config, presets and HF mapping.

Default shape is Llama's (pre-norm RMSNorm, rotary positions, SwiGLU MLP, optional grouped-query
attention); `arch="gpt2"` switches to GPT-2's (LayerNorm with bias, learned positions, GELU MLP).
Module names follow Hugging Face's LlamaForCausalLM, so for the Llama shape our state dict *is*
a `transformers` state dict; the GPT-2 shape is converted at the bottom of this file.

Heads (chatsmith/model/heads.py) sit on the trunk: "lm" always, "score" for reward models, PPO's
value function and the discriminator.

Shapes: B batch, T new tokens, S = cached + new tokens, H query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatsmith.errors import UserError
from chatsmith.model.family import Family, FamilyModel
from chatsmith.model.lora import LoRALinear


DECODER_HEADS = ("lm", "score")


@dataclass
class DecoderConfig:
    arch: str = "llama"  # "llama": RMSNorm, rotary, SwiGLU | "gpt2": LayerNorm, learned positions, GELU
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int | None = None  # < n_head: grouped-query attention; None = n_head
    d_model: int = 256
    d_ff: int | None = None  # None: 8/3*d rounded up to 64 (SwiGLU) or 4*d (GELU)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False  # GPT-2 shape has biases everywhere; Llama none
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # output heads on the trunk (chatsmith/model/heads.py): "lm" (next-token logits), "score" (a
    # scalar: the reward model's output, PPO's value function, the discriminator's logit)
    heads: tuple[str, ...] = ("lm",)

    def __post_init__(self):
        self.heads = tuple(self.heads)
        unknown = [h for h in self.heads if h not in DECODER_HEADS]
        if unknown or "lm" not in self.heads:
            raise UserError(f"decoder heads must include 'lm' and be among {', '.join(DECODER_HEADS)}, "
                            f"got {list(self.heads)}")
        if self.arch not in ("llama", "gpt2"):
            raise UserError(f"model arch must be 'llama' or 'gpt2', got {self.arch!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.arch == "gpt2" else _round_up(8 * self.d_model // 3, 64)
        if self.d_model % self.n_head:
            raise UserError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise UserError("the gpt2 shape has no grouped-query attention: leave n_kv_head unset")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def score_head(self) -> bool:
        return "score" in self.heads

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        """The config from its fields as config.json's "chatsmith" block records them; a checkpoint
        written before heads were modules says `score_head: true/false` instead of `heads`."""
        d = dict(d)
        if "score_head" in d:
            d["heads"] = ("lm", "score") if d.pop("score_head") else ("lm",)
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # --- Hugging Face config.json -------------------------------------------------------
    def to_hf(self) -> dict:
        common = {
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "initializer_range": self.init_std,
        }
        if self.arch == "gpt2":
            return {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_embd": self.d_model,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_inner": self.d_ff,
                "n_positions": self.max_seq_len,
                "n_ctx": self.max_seq_len,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": "gelu_new",
                "resid_pdrop": self.dropout,
                "embd_pdrop": self.dropout,
                "attn_pdrop": self.dropout,
                **common,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "hidden_act": "silu",
            "attention_bias": self.bias,
            "mlp_bias": self.bias,
            "attention_dropout": self.dropout,
            **common,
        }

    @classmethod
    def from_hf(cls, d: dict) -> "DecoderConfig":
        mt = d.get("model_type")
        ids = {k: d.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        ids = {k: (v[0] if isinstance(v, list) and v else v) for k, v in ids.items()}
        if mt == "gpt2":
            return cls(
                arch="gpt2", vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
                d_model=d["n_embd"], d_ff=d.get("n_inner") or 4 * d["n_embd"],
                max_seq_len=d.get("n_positions", 1024), norm_eps=d.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=d.get("tie_word_embeddings", True), dropout=d.get("resid_pdrop", 0.0),
                bias=True, init_std=d.get("initializer_range", 0.02), **ids,
            )
        if mt == "llama":
            rope = d.get("rope_parameters") or {}
            theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            if (rope.get("rope_type") or "default") != "default" or d.get("rope_scaling"):
                raise UserError("this Llama config uses rope scaling, which chatsmith does not implement")
            n_head = d["num_attention_heads"]
            if d.get("head_dim") not in (None, d["hidden_size"] // n_head):
                raise UserError("head_dim != hidden_size / num_attention_heads is not supported")
            return cls(
                arch="llama", vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
                n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
                d_ff=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
                rope_theta=theta, norm_eps=d.get("rms_norm_eps", 1e-6),
                tie_embeddings=d.get("tie_word_embeddings", False),
                dropout=d.get("attention_dropout", 0.0), bias=bool(d.get("attention_bias", False)),
                init_std=d.get("initializer_range", 0.02), **ids,
            )
        raise UserError(f"config.json has model_type={mt!r}; chatsmith reads 'llama' and 'gpt2'")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# Named model shapes. vocab_size is taken from the tokenizer when a run starts.
PRESETS: dict[str, dict] = {
    # seconds on a CPU: for tests
    "micro": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64),
    # between the two: about 3.5x tiny's pretraining tokens per second on 2 cores, with a context
    # that holds the SFT dialogues; 1.9M parameters with an 8k vocabulary (the 15-minute speedrun's)
    "mini": dict(n_layer=4, n_head=4, d_model=128, max_seq_len=256),
    # the CPU default: ~6.5M parameters with an 8k vocabulary
    "tiny": dict(n_layer=6, n_head=4, d_model=256, max_seq_len=256),
    # a bigger CPU / small GPU model: ~28M parameters with an 8k vocabulary
    "small": dict(n_layer=8, n_head=8, n_kv_head=4, d_model=512, max_seq_len=512),
    # the GPT-2 (124M) shape, so real GPT-2 checkpoints can be imported and fine-tuned
    "gpt2-124m": dict(arch="gpt2", n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                      vocab_size=50257, bias=True),
}


def preset(name: str, **overrides) -> DecoderConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    kw = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    if kw.get("arch") == "gpt2" and PRESETS[name].get("arch") != "gpt2":
        # switching a Llama-shaped preset to the GPT-2 shape: no GQA, biases as GPT-2 has them
        kw["n_kv_head"] = overrides.get("n_kv_head")
        kw.setdefault("bias", True) if "bias" in overrides else kw.update(bias=True)
    return DecoderConfig(**kw)


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


def make_norm(cfg: DecoderConfig, dim: int) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps)


def rotate_half(x):
    # Llama's rotary layout: the two halves of the head dim form the (real, imaginary) pairs
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def swap_halves(x):
    """(x1, x2) -> (x2, x1) along the last dim, in one copy: rotate_half(x) = swap_halves(x) * (-1, +1)."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)


def apply_rope(x, cos, sin_signed, swap=None):
    """x * cos + rotate_half(x) * sin, with the sign of rotate_half folded into the table:
    sin_signed = (-sin, +sin) over the two halves. Bit-identical to the textbook form, one op fewer
    and no cat. `swap` (the index arange(D).roll(D // 2), built once by a caller that rotates many
    times) makes the half swap one gather and the sum one addcmul: 3 kernels, for the decode step."""
    if swap is None:
        return x * cos + swap_halves(x) * sin_signed
    return torch.addcmul(x * cos, x.index_select(-1, swap), sin_signed)


def rope_cache(cfg: DecoderConfig, device=None):
    """cos/sin tables for RoPE (Su et al. 2021): angle(pos, i) = pos * theta^(-2i/D)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, D)
    return angles.cos(), angles.sin()


# --- fused lm_head + cross-entropy ------------------------------------------------------------
# The textbook `F.cross_entropy(lm_head(h).float())` writes and re-reads several (tokens x vocab)
# tensors per step in eager mode: the log-softmax output, a zero-filled gradient for the picked
# log-probs, the softmax gradient. At 16x256 tokens and an 8k vocabulary each is 134 MB, fresh
# memory every step. LMHeadCrossEntropy computes the same function -- logits = h @ W^T (in
# autocast's dtype when it is on), then the mean fp32 cross-entropy over targets != -100 -- a block
# of rows at a time: the forward keeps only the logits (which it returns anyway) and one log-sum-exp
# per row; the backward rebuilds each block's softmax gradient from them in a block-sized scratch
# buffer and feeds it straight into the two matmuls, so no full-size gradient is ever materialised.
# On a 2-core CPU at that shape, lm_head + loss forward and backward take ~0.4 s instead of ~0.5 s
# and the peak RSS of a step is ~0.2 GB lower. Under torch.compile the textbook form is used.

def _ce_rows_per_block(n_rows: int, vocab: int, device: torch.device) -> int:
    budget = (1 << 22) if device.type == "cpu" else (1 << 26)  # elements per block of logits
    return max(1, min(n_rows, max(64, budget // vocab)))


class LMHeadCrossEntropy(torch.autograd.Function):
    """(h (N, d), w (V, d), targets (N,), dtype, block) -> (logits (N, V), mean CE loss in fp32).

    dtype: the matmul dtype autocast would use (None: h's own). block: rows per block.
    """

    @staticmethod
    def forward(ctx, h, w, targets, dtype, block):
        hc, wc = (h.to(dtype), w.to(dtype)) if dtype is not None else (h, w)
        n, wt = h.shape[0], wc.t()
        logits = torch.empty(n, w.shape[0], dtype=hc.dtype, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        buf = torch.empty(min(block, n), w.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, n, block):
            j = min(i + block, n)
            x = torch.mm(hc[i:j], wt, out=logits[i:j]).float()
            m = x.amax(dim=-1, keepdim=True)  # log-sum-exp = m + log(sum(exp(x - m))), as logsumexp
            lse[i:j] = torch.sub(x, m, out=buf[:j - i]).exp_().sum(dim=-1).log_().add_(m.squeeze(1))
        valid = targets != -100
        t = targets.masked_fill(~valid, 0)
        picked = logits.gather(1, t[:, None]).squeeze(1).float()
        n_valid = valid.sum()
        loss = torch.where(valid, lse - picked, 0.0).sum() / n_valid
        ctx.save_for_backward(h, w, t, valid, n_valid, logits, lse)
        ctx.dtype, ctx.block = dtype, block
        ctx.set_materialize_grads(False)  # an unused logits gradient arrives as None, not as zeros
        return logits, loss

    @staticmethod
    def backward(ctx, g_logits, g_loss):
        h, w, t, valid, n_valid, logits, lse = ctx.saved_tensors
        dtype, block = ctx.dtype, ctx.block
        hc, wc = (h.to(dtype), w.to(dtype)) if dtype is not None else (h, w)
        n = h.shape[0]
        if g_loss is not None:
            # d loss / d logit = (softmax - onehot) * g / n_valid on valid rows, 0 on ignored ones
            scale = torch.where(valid, g_loss.float() / n_valid, 0.0)[:, None]
            t = t[:, None]
            buf = torch.empty(min(block, n), w.shape[0], dtype=torch.float32, device=h.device)
        need_h, need_w = ctx.needs_input_grad[:2]
        gh, gw = (torch.empty_like(hc) if need_h else None), None
        for i in range(0, n, block):
            j = min(i + block, n)
            if g_loss is not None:
                g = torch.sub(logits[i:j].float(), lse[i:j, None], out=buf[:j - i]).exp_().mul_(scale[i:j])
                g.scatter_add_(1, t[i:j], -scale[i:j])
                if g_logits is not None:
                    g.add_(g_logits[i:j])
                g = g.to(hc.dtype)
            else:
                g = g_logits[i:j].to(hc.dtype)
            if need_h:
                torch.mm(g, wc, out=gh[i:j])
            if need_w and gw is None:
                gw = torch.mm(g.t(), hc[i:j]).to(w.dtype)
            elif need_w and wc.dtype == w.dtype:
                gw.addmm_(g.t(), hc[i:j])
            elif need_w:  # low-precision matmuls, accumulated in the weight's dtype
                gw.add_(torch.mm(g.t(), hc[i:j]))
        return (gh.to(h.dtype) if need_h else None), gw, None, None, None


class KVCache:
    """Preallocated keys/values for every layer: (B, G, max_len, D). `pos` is how many are filled.

    Generation writes new keys at [pos, pos+T) and attends over [0, pos+T). Beam search reorders
    rows with `reorder`.
    """

    def __init__(self, cfg: DecoderConfig, batch_size: int, max_len: int, device, dtype):
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


# The C++ op under the resolved overload: both Python wrappers (the op packet and the overload)
# scan every call's arguments for fake script objects, which only tracing creates and this eager
# decode path never sees; at batch 1 that scan cost ~9% of an int8 SmolLM2 token
_LINEAR_DYNAMIC = getattr(torch.ops.quantized.linear_dynamic.default, "_op", torch.ops.quantized.linear_dynamic)


class Int8Linear:
    """y = x W^T with W in int8, one scale per output row (symmetric: w ~ scale * q, |q| <= 127),
    through PyTorch's own quantized linear kernel (fbgemm on x86, qnnpack on ARM), which also
    quantizes each activation row on the fly. A decode-time copy: it holds no gradient and is
    rebuilt from the fp32 weight whenever the engine snapshots the weights."""

    def __init__(self, w: torch.Tensor):
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        with warnings.catch_warnings():  # torch marks its quantized tensor API as deprecated
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0,
                                           torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.out_features = w.shape[0]
        self.nbytes = w.numel() + 4 * len(scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, which fbgemm's x86 kernels need to avoid overflow
        if x.dtype == torch.float32:
            return _LINEAR_DYNAMIC(x, self.packed, True)
        return _LINEAR_DYNAMIC(x.float(), self.packed, True).to(x.dtype)


class Bf16Linear:
    """y = x W^T with W^T stored (in, out) contiguous in bf16: the row is cast to bf16, the product
    comes back in x's dtype. On a CPU with native bf16 (AVX-512 BF16, AMX) a batch of 32 rows times
    SmolLM2's matrices runs 2.4-3x faster than fp32 (2-core AMD EPYC Zen 4: gate/up 1.59 -> 0.48 ms,
    the LM head 32.5 -> 11.0 ms), which is what RL's rollouts and the evaluations' batched replies
    decode at. A decode-time copy like Int8Linear: no gradient, rebuilt on every weight change."""

    def __init__(self, w: torch.Tensor):
        self.wt = w.detach().t().contiguous().to(torch.bfloat16)
        self.out_features = w.shape[0]
        self.nbytes = self.wt.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.bfloat16) @ self.wt).to(x.dtype)


DECODE_MATRIX = {"int8": Int8Linear, "bf16": Bf16Linear}  # --quantize -> the decode step's matrix type


def _plain(mod) -> bool:
    """A projection the fused decode step can take: a bias-free nn.Linear, or LoRA on one."""
    return (type(mod) is nn.Linear or type(mod) is LoRALinear) and mod.bias is None


def _decode_weight(mod) -> torch.Tensor:
    """The (out, in) matrix a decode step multiplies by: the layer's weight, LoRA merged in."""
    if type(mod) is LoRALinear:
        return (mod.weight.float() + mod.delta_weight()).to(mod.weight.dtype)
    return mod.weight


def _linear(x, w):
    """x W^T: w is an Int8Linear or Bf16Linear, or the fp32 W^T stored (in, out) contiguous (see
    fuse_decode_weights)."""
    return x @ w if isinstance(w, torch.Tensor) else w(x)


def _add_linear(x, y, w_t):
    """x + y @ w_t (w_t: a transposed fp32 weight, fused into one addmm) or x + w(y) (Int8Linear, Bf16Linear)."""
    return torch.addmm(x, y, w_t) if isinstance(w_t, torch.Tensor) else x + w_t(y)


def cpu_int8_supported() -> bool:
    return bool(set(torch.backends.quantized.supported_engines) & {"fbgemm", "x86", "qnnpack"})


class SlotCache:
    """KV cache for continuous batching: row r is one request's slot, at its own length lens[r].

    (n_slots, G, max_len, D) per layer. A request is prefilled into its row by `GPT.prefill` (on
    the fused weights, or through `row_view`: an ordinary KVCache over that row, so the normal
    forward writes it), then decoded together
    with every other active row by `GPT.decode_step`, one token per row and step. The engine keeps
    active rows packed at [0, B): a finished row is overwritten by the last one (`move_row`), so a
    step never computes on empty slots. It starts small and `grow`s with the rows and tokens in
    flight, so memory follows what is being generated, not rows x the model's whole context.
    """

    def __init__(self, cfg: DecoderConfig, n_slots: int, max_len: int, device, dtype):
        shape = (n_slots, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.lens = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.n_slots, self.max_len = n_slots, max_len
        self.rows = torch.arange(n_slots, device=device)
        self.positions = torch.arange(max_len, device=device)

    def grow(self, n_slots: int, max_len: int):
        """Reallocate to at least (n_slots, max_len), keeping every row's keys, values and length.
        Zero-filled, as at allocation: masked positions then hold 0, never NaN garbage that a zero
        attention weight would still turn into NaN."""
        n, L = max(n_slots, self.n_slots), max(max_len, self.max_len)
        if (n, L) == (self.n_slots, self.max_len):
            return

        def bigger(t):
            out = t.new_zeros((n, t.shape[1], L, t.shape[3]))
            out[:self.n_slots, :, :self.max_len] = t
            return out

        self.k, self.v = [bigger(t) for t in self.k], [bigger(t) for t in self.v]
        lens = self.lens.new_zeros(n)
        lens[:self.n_slots] = self.lens
        self.lens, self.n_slots, self.max_len = lens, n, L
        self.rows = torch.arange(n, device=lens.device)
        self.positions = torch.arange(L, device=lens.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def row_view(self, r: int, start: int = 0) -> KVCache:
        """A KVCache whose tensors are views of row r, filled up to `start`: writes land in the slot."""
        c = KVCache.__new__(KVCache)
        c.k = [k[r:r + 1] for k in self.k]
        c.v = [v[r:r + 1] for v in self.v]
        c.max_len, c.pos = self.max_len, start
        return c

    def move_row(self, src: int, dst: int, length: int):
        """Copy the first `length` positions of row src into row dst (compaction, or sharing a
        prefilled prompt between the n samples of one request)."""
        for t in (*self.k, *self.v):
            t[dst, :, :length].copy_(t[src, :, :length])
        self.lens[dst] = length


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
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
        if cos is not None:  # rotary: rotate q and k by their absolute positions (sin is sign-folded)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
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

    def decode(self, x, cos, sin, cache: SlotCache, pos, mask):
        """One new token per row (x: (B, 1, d)), row b at position pos[b]: write its key/value into
        its slot, attend over the slot's keys [0, pos[b]] (mask (B, 1, 1, S) hides the rest)."""
        cfg = self.cfg
        B = x.shape[0]
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q = self.q_proj(x).view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
        k = self.k_proj(x).view(B, G, D)
        v = self.v_proj(x).view(B, G, D)
        if cos is not None:  # cos/sin: (B, 1, 1, D), each row's own position
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos[:, 0], sin[:, 0])
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        rows = cache.rows[:B]
        kc[rows, :, pos] = k.to(kc.dtype)  # (B, G, D) scattered to each row's own position
        vc[rows, :, pos] = v.to(vc.dtype)
        S = mask.shape[-1]
        k, v = kc[:B, :, :S].to(q.dtype), vc[:B, :, :S].to(q.dtype)
        # enable_gqa lets each key/value head serve H/G query heads without copying the cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
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
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))

    def decode(self, x, cos, sin, cache, pos, mask):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, cache, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Embeddings + blocks + final norm: the part shared by the LM, value and reward heads."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "gpt2":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.d_model)


class GPT(FamilyModel):
    family = "decoder"

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self._build_heads()  # lm_head (+ score): chatsmith/model/heads.py
        self.tie_weights()
        if cfg.arch == "llama":
            cos, sin = rope_cache(cfg)
            half = cfg.head_dim // 2
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            # (-sin, +sin) over the two halves of the head dim: see apply_rope
            self.register_buffer("rope_sin_signed", torch.cat((-sin[:, :half], sin[:, half:]), -1),
                                 persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds variance, so shrink the projections
        # that write into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def blocks(self) -> list[nn.Module]:
        return list(self.model.layers)

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def generation_config(self) -> dict:
        cfg = self.cfg
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
               "max_new_tokens": 256}
        return {k: v for k, v in gen.items() if v is not None}

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
            sin = self.rope_sin_signed[start:start + T].to(x.dtype)
        x = self.model.drop(x)
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, idx, targets=None, cache: KVCache | None = None, loss_mask=None, head="lm", logits_at=None):
        """Logits (B, T, V); with targets also the mean cross-entropy over unmasked positions.

        head names the head(s) to read (chatsmith/model/heads.py): "lm" (default), "score" (the
        scalar head at every position, (B, T): a reward model reads it at a sequence's last token),
        or a tuple such as ("lm", "score") for one trunk pass feeding several (PPO's policy and
        value). Going through forward keeps DDP and torch.compile in the loop.

        targets use -100 for positions to ignore (the PyTorch / HF convention); `loss_mask`
        (B, T) of 0/1 is an alternative used by stages that train on part of a sequence.

        logits_at (B, T) bool: the head(s) read only those positions, (n, V) for n true ones. A
        stage that scores replies (RL, DPO, the retention check) needs the logits at the reply's
        tokens only; the prompt's positions would cost the LM head (a fifth of SmolLM2's FLOPs per
        token) and a (B, T, V) fp32 tensor for nothing.
        """
        h = self.hidden_states(idx, cache)
        if logits_at is not None:
            return self.run_heads(h[logits_at], head)
        if head != "lm":
            return self.run_heads(h, head)
        if targets is None:
            return self.lm_head(h)
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -100)
        if torch.compiler.is_compiling():
            # inductor fuses the textbook loss into a forward and a backward kernel itself, which
            # measured as fast as the fused function (a compiled graph also materialises a zero
            # gradient for the returned logits, so the function's saving is smaller there)
            logits = self.lm_head(h)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
            return logits, loss
        # = lm_head(h) and F.cross_entropy(logits.float(), targets, ignore_index=-100), fused
        dev = h.device.type
        amp = (torch.get_autocast_dtype(dev)
               if dev in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(dev) else None)
        h2 = h.reshape(-1, h.shape[-1])
        w = self.lm_head.weight
        block = _ce_rows_per_block(h2.shape[0], w.shape[0], h.device)
        logits, loss = LMHeadCrossEntropy.apply(h2, w, targets.reshape(-1), None if amp == w.dtype else amp,
                                                block)
        return logits.view(*h.shape[:-1], -1), loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, dtype or p.dtype)

    def new_slot_cache(self, n_slots: int, max_len: int | None = None, dtype=None) -> SlotCache:
        p = self.lm_head.weight
        return SlotCache(self.cfg, n_slots, max_len or self.cfg.max_seq_len, p.device, dtype or p.dtype)

    def fuse_decode_weights(self, quantize: str | None = None):
        """Per-layer weights for `decode_step`'s fast path: q/k/v stacked into one matrix and gate/up
        into another, so a layer is 4 matmuls instead of 7 and no module calls (~12% less CPU per
        token on the tiny preset). None when a layer is not plain Llama (the GPT-2 shape, biases,
        a projection wrapped in anything but LoRA): those take the module path. A LoRA layer's
        update is merged into the copy (W0 + (alpha/r) B A), so an adapter being trained (RL's
        rollouts, LoRA SFT's evaluations) decodes as fast as a plain model. The copies are a
        snapshot: the engine takes a new one whenever a weight changed, so weights trained between
        generate calls (RL) are always the ones used.

        The matrices with many outputs (q/k/v, gate/up, the LM head) are stored transposed and
        contiguous, (in, out), so a row vector times them is MKL's plain x @ W product: for one row
        its x @ W^T kernel (F.linear on the (out, in) weight) is the slow one. Measured on a 2-core
        AMD EPYC, 1 thread, weights not in cache: SmolLM2's LM head 14.2 -> 8.4 ms, gate/up 1.03 ->
        0.62 ms, q/k/v 0.26 -> 0.18 ms; o/down (few outputs) gain nothing and stay views. The LM
        head's copy is the one extra tensor (vocab x d: 8 MB for `tiny`, 113 MB for SmolLM2 in fp32).

        Each RMSNorm's weight, times sqrt(d), is folded into the matrix that reads its output (q/k/v,
        gate/up, the LM head): RMSNorm(x) W^T = (x / sqrt(|x|^2 + d eps)) (W diag(g sqrt(d)))^T, so the
        step normalises without a weight and one multiply per norm is gone (13 kernels per token on
        `tiny`, 61 on SmolLM2). The same value up to rounding.

        quantize="int8": every matrix of the step, the LM head included, as `Int8Linear` (int8
        weights, one scale per output row). Decoding one token reads every weight once, so at batch
        size 1 it is bound by memory bandwidth, and int8 reads a quarter of fp32's bytes.
        quantize="bf16": every matrix as `Bf16Linear` (half the bytes, and bf16 arithmetic where the
        CPU has it: the batched decode of RL's rollouts is compute-bound). Prefill and training keep
        the fp32 modules."""
        cfg = self.cfg
        if cfg.arch != "llama" or cfg.bias or not _plain(self.lm_head) or type(self.model.norm) is not RMSNorm:
            return None
        mat = DECODE_MATRIX.get(quantize)
        lin = mat or (lambda w: w.t().contiguous())
        root_d = math.sqrt(cfg.d_model)

        def folded(w, norm):  # W diag(g sqrt(d)), computed in fp32, kept in W's dtype
            return (w.float() * (norm.weight.float() * root_d)).to(w.dtype)

        out = []
        for b in self.model.layers:
            a, m = b.self_attn, b.mlp
            mods = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if not all(map(_plain, mods)) or type(b.input_layernorm) is not RMSNorm \
                    or type(b.post_attention_layernorm) is not RMSNorm or type(b.self_attn) is not Attention:
                return None
            with torch.no_grad():
                wq, wk, wv, wo, wg, wu, wd = map(_decode_weight, mods)
                qkv = folded(torch.cat([wq, wk, wv]), b.input_layernorm)
                gu = folded(torch.cat([wg, wu]), b.post_attention_layernorm)
                out.append((lin(qkv), mat(wo) if mat else wo.t(), lin(gu), mat(wd) if mat else wd.t()))
        with torch.no_grad():  # the last entry: the LM head
            out.append(lin(folded(_decode_weight(self.lm_head), self.model.norm)))
        return out

    def _fused_trunk(self, x, fused, cos, sin, attend, last: bool = False):
        """Rows x (N, d) through every layer on fused weights (see fuse_decode_weights) and the LM
        head: logits (N, V), or (1, V) for the last row only when `last`. The rows are a batch of sequences (decode: one new token each) or the
        positions of one prompt (prefill); attend(layer, q (N, H, D), k (N, G, D), v (N, G, D))
        stores k/v in the cache and returns the attention output (N, H*D), which is all that
        differs between the two."""
        cfg = self.cfg
        N, d = x.shape
        H, G, D, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
        # Per token and layer this is ~15 tensor ops; at batch 1 on the tiny preset their dispatch
        # costs as much as the matmuls, so every op saved counts: fp32 needs no casts, q and k are
        # rotated in one call (they are adjacent in the qkv output)
        same = x.dtype == torch.float32
        swap = torch.arange(D, device=x.device).roll(D // 2)  # apply_rope's half swap as one gather
        deps = x.new_full((1,), d * eps)  # addcmul adds it as a tensor: one kernel

        def norm(t):
            # RMSNorm without its weight or sqrt(d), both folded into the next matrix (see
            # fuse_decode_weights): x * rsqrt(|x|^2 + d eps) from one vector_norm, 4 kernels where
            # F.rms_norm's CPU composite runs ~10 (pow, mean = sum + div, casts)
            if same:
                r = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
                return t * torch.rsqrt(torch.addcmul(deps, r, r))
            # other dtypes: in fp32 as the module computes it
            return (F.rms_norm(t.float(), (d,), eps=eps) / math.sqrt(d)).to(t.dtype)

        for layer, (wqkv, wo_t, wgu, wd_t) in enumerate(fused[:cfg.n_layer]):
            qkv = _linear(norm(x), wqkv)
            qk = apply_rope(qkv[:, :(H + G) * D].view(N, H + G, D), cos, sin, swap)
            y = attend(layer, qk[:, :H], qk[:, H:], qkv[:, (H + G) * D:].view(N, G, D))
            x = _add_linear(x, y, wo_t)  # x + o_proj(y)
            gate, up = _linear(norm(x), wgu).chunk(2, dim=-1)
            x = _add_linear(x, F.silu(gate).mul_(up), wd_t)  # x + down(silu(gate) * up)
        return _linear(norm(x[-1:] if last else x), fused[-1])

    def _decode_fast(self, idx, cache: SlotCache, pos, span: int, fused):
        """decode_step on fused weights, functional: the same math as the module path."""
        cfg = self.cfg
        B = idx.shape[0]
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        x = F.embedding(idx, self.model.embed_tokens.weight)  # (B, d): one token per row, no T axis
        # One row (chat, generate, a single stream): it is at position span - 1, every cached key
        # up to it is its own, so attention needs no mask and the cache takes a plain slice write;
        # that drops ~6 ops per step and 2 index_put per layer (tiny preset: ~0.3 ms of ~6 ms)
        single = B == 1
        if single:
            p = span - 1
            cos, sin = self.rope_cos[p:span][:, None], self.rope_sin_signed[p:span][:, None]  # (1, 1, D)
            if cos.dtype != x.dtype:
                cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            mask = None
        else:
            cos = self.rope_cos[pos].to(x.dtype)[:, None]  # (B, 1, D), broadcast over heads
            sin = self.rope_sin_signed[pos].to(x.dtype)[:, None]
            mask = torch.zeros(B, 1, 1, span, dtype=x.dtype, device=x.device).masked_fill_(
                (cache.positions[:span] > pos[:, None])[:, None, None], float("-inf"))
        rows = cache.rows[:B]
        same = x.dtype == cache.k[0].dtype  # the cache dtype is checked once, not per layer

        def attend(layer, q, k, v):
            kc, vc = cache.k[layer], cache.v[layer]
            if single:
                kc[0, :, p] = k[0]  # copy_ casts to the cache's dtype
                vc[0, :, p] = v[0]
            else:
                kc[rows, :, pos] = k if same else k.to(kc.dtype)
                vc[rows, :, pos] = v if same else v.to(vc.dtype)
            ks, vs = kc[:B, :, :span], vc[:B, :, :span]
            if not same:
                ks, vs = ks.to(q.dtype), vs.to(q.dtype)
            y = F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask, enable_gqa=G != H)
            return y.view(B, H * D)

        logits = self._fused_trunk(x, fused, cos, sin, attend)
        cache.lens[:B] += 1
        return logits

    def prefill(self, ids, cache: SlotCache, row: int, fused=None, every_position: bool = False):
        """Logits for a prompt ids (T,) written into slot `row` from position 0: (1, V) at its last
        position, or (T, V) at every one (prompt logprobs). Sets the row's length to T.

        With fp32 fused weights (`fuse_decode_weights()`) the prompt takes the decode step's fused
        path, its T positions as the rows: 4 matmuls a layer instead of 7 and no module calls, which
        on the tiny preset is most of a short prompt's cost (one thread, Zen 4: 10 tokens 6.0 -> 3.9
        ms, 40 tokens 9.4 -> 7.3 ms, 200 tokens 29.7 -> 28.7 ms, where the matmuls dominate). Otherwise (quantized decode weights, which stay decode-only, or a model the
        fused path does not take) it runs through the modules."""
        T = ids.shape[0]
        if T > cache.max_len:
            raise ValueError(f"KV cache full: {T} > {cache.max_len}")
        plain = fused is not None and not self.training and all(
            isinstance(w, torch.Tensor) for w in (*fused[0], fused[-1]))
        if not plain or cache.k[0].dtype != fused[-1].dtype:
            h = self.hidden_states(ids[None], cache=cache.row_view(row))[0]  # (T, d)
            cache.lens[row] = T
            return self.lm_head(h if every_position else h[-1:])
        cfg = self.cfg
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        x = F.embedding(ids, self.model.embed_tokens.weight)  # (T, d)
        cos, sin = self.rope_cos[:T][:, None].to(x.dtype), self.rope_sin_signed[:T][:, None].to(x.dtype)

        def attend(layer, q, k, v):  # q (T, H, D), k/v (T, G, D): one sequence, causal
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # (G, T, D)
            cache.k[layer][row, :, :T] = k
            cache.v[layer][row, :, :T] = v
            y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=T > 1,
                                               enable_gqa=G != H)  # (1, H, T, D)
            return y[0].transpose(0, 1).reshape(T, H * D)

        logits = self._fused_trunk(x, fused, cos, sin, attend, last=not every_position)
        cache.lens[row] = T
        return logits

    def decode_step(self, idx, cache: SlotCache, span: int | None = None, fused=None):
        """Logits (B, V) for one new token per slot row 0..B-1 (idx: (B,)), each at its own position
        cache.lens[b]; advances those lengths by one. `span` = max(lens[:B]) + 1 when the caller
        knows it (saves a device sync); attention covers only that many positions. `fused`: the
        result of `fuse_decode_weights()` for the fast path (None: through the modules)."""
        B = idx.shape[0]
        pos = cache.lens[:B]
        if span is None:
            span = int(pos.max()) + 1
        if span > cache.max_len:
            raise ValueError(f"KV cache full: position {span - 1} >= {cache.max_len}")
        if fused is not None and not self.training:
            return self._decode_fast(idx, cache, pos, span, fused)
        x = self.model.embed_tokens(idx)[:, None]  # (B, 1, d)
        cos = sin = None
        if self.cfg.arch == "gpt2":
            x = x + self.model.embed_positions(pos)[:, None]
        else:
            cos = self.rope_cos[pos].to(x.dtype)[:, None, None]  # (B, 1, 1, D)
            sin = self.rope_sin_signed[pos].to(x.dtype)[:, None, None]
        # row b sees keys 0..pos[b] (its own new key included); the rest of the span is another
        # row's longer history or stale data from a previous occupant of the slot. An additive
        # float mask: CPU SDPA with a boolean mask over the strided cache slice takes a slow path
        # (~100x slower at these sizes)
        mask = torch.zeros(B, 1, 1, span, dtype=x.dtype, device=x.device).masked_fill_(
            (cache.positions[:span] > pos[:, None])[:, None, None], float("-inf"))
        for block in self.model.layers:
            x = block.decode(x, cos, sin, cache, pos, mask)
        cache.lens[:B] += 1
        return self.lm_head(self.model.norm(x))[:, 0]


# --- Hugging Face weight layouts ----------------------------------------------------------------
# Llama shape: our module names are LlamaForCausalLM's, so the state dict maps 1:1.
# GPT-2 shape: HF stores q/k/v fused in `c_attn` and uses Conv1D, whose weight is (in, out), the
# transpose of nn.Linear's; we convert both ways here.

# one GPT-2 block's tensors that map one to one: (ours, HF's, transposed: Conv1D stores (in, out));
# q/k/v are fused into HF's c_attn and handled apart
GPT2_LAYER = [
    ("input_layernorm.weight", "ln_1.weight", False), ("input_layernorm.bias", "ln_1.bias", False),
    ("post_attention_layernorm.weight", "ln_2.weight", False), ("post_attention_layernorm.bias", "ln_2.bias", False),
    ("self_attn.o_proj.weight", "attn.c_proj.weight", True), ("self_attn.o_proj.bias", "attn.c_proj.bias", False),
    ("mlp.up_proj.weight", "mlp.c_fc.weight", True), ("mlp.up_proj.bias", "mlp.c_fc.bias", False),
    ("mlp.down_proj.weight", "mlp.c_proj.weight", True), ("mlp.down_proj.bias", "mlp.c_proj.bias", False),
]


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg: DecoderConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # tied: HF re-ties it on load; safetensors refuses shared storage
    if cfg.arch == "llama":
        return {k: v.contiguous() for k, v in sd.items()}
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.wpe.weight": sd["model.embed_positions.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"],
           "transformer.ln_f.bias": sd["model.norm.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    if "score.weight" in sd:
        out["score.weight"] = sd["score.weight"]
    for i in range(cfg.n_layer):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs, transpose in GPT2_LAYER:
            out[h + theirs] = sd[p + ours].t() if transpose else sd[p + ours]
        a = p + "self_attn."
        out[h + "attn.c_attn.weight"] = torch.cat([sd[a + n + "_proj.weight"] for n in "qkv"], 0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[a + n + "_proj.bias"] for n in "qkv"], 0)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: DecoderConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (lm_head filled from the embedding when tied)."""
    if cfg.arch == "llama":
        out = dict(sd)
    else:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        d = cfg.d_model
        out = {"model.embed_tokens.weight": sd["wte.weight"],
               "model.embed_positions.weight": sd["wpe.weight"],
               "model.norm.weight": sd["ln_f.weight"], "model.norm.bias": sd["ln_f.bias"]}
        for name in ("lm_head.weight", "score.weight"):
            if name in sd:
                out[name] = sd[name]
        for i in range(cfg.n_layer):
            p, h = f"model.layers.{i}.", f"h.{i}."
            for ours, theirs, transpose in GPT2_LAYER:
                out[p + ours] = sd[h + theirs].t() if transpose else sd[h + theirs]
            w, b = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]
            for j, n in enumerate("qkv"):
                out[p + f"self_attn.{n}_proj.weight"] = w[j * d:(j + 1) * d]
                out[p + f"self_attn.{n}_proj.bias"] = b[j * d:(j + 1) * d]
    if cfg.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


FAMILY = Family(name="decoder", config=DecoderConfig, model=GPT, hf_model_types=("llama", "gpt2"),
                to_hf_state_dict=to_hf_state_dict, from_hf_state_dict=from_hf_state_dict,
                presets=PRESETS, preset=preset)
