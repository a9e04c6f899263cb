"""Dataclass configs and named presets.

`ModelConfig` describes the network; it round-trips through a Hugging Face `config.json`
(Llama or GPT-2 keys), so a chatsmith checkpoint is also a `transformers` checkpoint.
`TrainConfig` holds every knob of the one trainer loop; CLI flags map 1:1 onto its fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from chatsmith.errors import UserError


@dataclass
class ModelConfig:
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
    # a scalar head `score` (d_model -> 1) next to the LM head: the reward model's output, the
    # PPO value function, the discriminator's logit (HF's *ForSequenceClassification name)
    score_head: bool = False

    def __post_init__(self):
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
    def from_hf(cls, d: dict) -> "ModelConfig":
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
    # the CPU default: ~6.5M parameters with an 8k vocabulary
    "tiny": dict(n_layer=6, n_head=4, d_model=256, max_seq_len=256),
    # a bigger CPU / small GPU model: ~28M parameters with an 8k vocabulary
    "small": dict(n_layer=8, n_head=8, n_kv_head=4, d_model=512, max_seq_len=512),
    # the GPT-2 (124M) shape, so real GPT-2 checkpoints can be imported and fine-tuned
    "gpt2-124m": dict(arch="gpt2", n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                      vocab_size=50257, bias=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    kw = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    if kw.get("arch") == "gpt2" and PRESETS[name].get("arch") != "gpt2":
        # switching a Llama-shaped preset to the GPT-2 shape: no GQA, biases as GPT-2 has them
        kw["n_kv_head"] = overrides.get("n_kv_head")
        kw.setdefault("bias", True) if "bias" in overrides else kw.update(bias=True)
    return ModelConfig(**kw)


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


__all__ = ["ModelConfig", "TrainConfig", "PRESETS", "preset", "asdict", "fields", "field"]
