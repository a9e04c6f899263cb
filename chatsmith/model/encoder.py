"""The encoder family: a BERT-style bidirectional Transformer, its config, presets and HF mapping.

BERT (Devlin et al. 2019) is the original post-norm Transformer encoder: token + position +
segment embeddings, then blocks of

    h = LayerNorm(x + Dropout(Attention(x)))        attention sees every non-padding token
    x = LayerNorm(h + Dropout(W2 GELU(W1 h)))

Every token sees the whole input (no causal mask), so the model reads a sentence rather than
continues it: it is trained by filling in masked tokens (the "mlm" head) and, optionally, by
telling whether segment B really followed segment A (the "nsp" head, on the pooled [CLS] state).
Fine-tuning adds a small head: "classify" (sentence / sentence-pair labels, on the pooled state)
or "span" (extractive QA: a start and an end logit per token). Sentence embeddings are the
attention-masked mean of the last hidden states (`embed`), as sentence-transformers pools MiniLM.

Module names are Hugging Face's BertModel names under `bert.`, so the trunk's state dict *is* a
`transformers` state dict; the heads map onto BertForPreTraining / BertForMaskedLM /
BertForSequenceClassification / BertForQuestionAnswering at the bottom of this file.

Shapes: B batch, T tokens, H heads, D head dim, d model width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatsmith.errors import UserError
from chatsmith.model.family import Family, FamilyModel
from chatsmith.model.heads import HEADS, head_output

ENCODER_HEADS = ("mlm", "nsp", "classify", "span")
POOLED_HEADS = ("nsp", "classify")  # read the pooled [CLS] state, so they need the pooler


@dataclass
class EncoderConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int | None = None  # None: 4 * d_model
    max_seq_len: int = 512  # learned absolute positions (HF: max_position_embeddings)
    type_vocab_size: int = 2  # segment A / segment B
    norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden states (HF: hidden_dropout_prob)
    attn_dropout: float = 0.1  # attention probabilities (HF: attention_probs_dropout_prob)
    init_std: float = 0.02
    pad_token_id: int = 0
    pooler: bool = True  # tanh(W h_[CLS]): what "nsp" and "classify" read
    # heads (chatsmith/model/heads.py): "mlm" masked-token logits, "nsp" is-next logits, "classify"
    # label logits, "span" start/end logits; none = a bare trunk for embeddings
    heads: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # the classify head's label names, index = class id
    problem: str = "single_label_classification"

    def __post_init__(self):
        self.heads = tuple(self.heads)
        self.labels = tuple(self.labels)
        bad = [h for h in self.heads if h not in ENCODER_HEADS]
        if bad:
            raise UserError(f"encoder heads must be among {', '.join(ENCODER_HEADS)}, got {bad}")
        if any(h in POOLED_HEADS for h in self.heads):
            self.pooler = True
        if "classify" in self.heads and len(self.labels) < 2:
            raise UserError(f"a classify head needs at least 2 labels, got {list(self.labels)}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.d_model % self.n_head:
            raise UserError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # --- Hugging Face config.json -------------------------------------------------------
    def hf_architecture(self) -> str:
        """The transformers class that reads this model's heads (the most specific one)."""
        if "span" in self.heads:
            return "BertForQuestionAnswering"
        if "classify" in self.heads:
            return "BertForSequenceClassification"
        if "mlm" in self.heads:
            return "BertForPreTraining" if "nsp" in self.heads else "BertForMaskedLM"
        return "BertModel"

    def to_hf(self) -> dict:
        d = {
            "architectures": [self.hf_architecture()],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "intermediate_size": self.d_ff,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.attn_dropout,
            "max_position_embeddings": self.max_seq_len,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.norm_eps,
            "initializer_range": self.init_std,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }
        if self.labels:
            d["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
            d["label2id"] = {name: i for i, name in enumerate(self.labels)}
            d["problem_type"] = self.problem
        return d

    @classmethod
    def from_hf(cls, d: dict) -> "EncoderConfig":
        if d.get("model_type") != "bert":
            raise UserError(f"config.json has model_type={d.get('model_type')!r}; the encoder family reads 'bert'")
        if d.get("hidden_act", "gelu") != "gelu":
            raise UserError(f"hidden_act={d['hidden_act']!r} is not supported (BERT uses gelu)")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"position_embedding_type={d['position_embedding_type']!r} is not supported")
        arch = (d.get("architectures") or ["BertModel"])[0]
        heads = {"BertForPreTraining": ("mlm", "nsp"), "BertForMaskedLM": ("mlm",),
                 "BertForSequenceClassification": ("classify",), "BertForQuestionAnswering": ("span",)
                 }.get(arch, ())
        labels = ()
        if "classify" in heads:
            id2label = d.get("id2label") or {}
            labels = tuple(id2label[k] for k in sorted(id2label, key=int))
        return cls(
            vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
            d_model=d["hidden_size"], d_ff=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
            norm_eps=d.get("layer_norm_eps", 1e-12), dropout=d.get("hidden_dropout_prob", 0.1),
            attn_dropout=d.get("attention_probs_dropout_prob", 0.1), init_std=d.get("initializer_range", 0.02),
            pad_token_id=d.get("pad_token_id") or 0,
            # BertForMaskedLM and BertForQuestionAnswering are built without the pooler
            pooler=arch not in ("BertForMaskedLM", "BertForQuestionAnswering"),
            heads=heads, labels=labels,
            problem=d.get("problem_type") or "single_label_classification",
        )


# Named model shapes. vocab_size is taken from the tokenizer when a run starts.
PRESETS: dict[str, dict] = {
    "micro": dict(n_layer=2, n_head=4, d_model=64, max_seq_len=128),  # seconds on a CPU: tests
    "tiny": dict(n_layer=4, n_head=4, d_model=256, max_seq_len=128),  # ~5M: the 15-minute CPU encoder
    "minilm": dict(n_layer=6, n_head=12, d_model=384, d_ff=1536, max_seq_len=512),  # all-MiniLM-L6's shape
}


def preset(name: str, **overrides) -> EncoderConfig:
    if name not in PRESETS:
        raise UserError(f"unknown encoder preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return EncoderConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


# --- the network ------------------------------------------------------------------------------

class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids, token_type_ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        self.key = nn.Linear(cfg.d_model, cfg.d_model)
        self.value = nn.Linear(cfg.d_model, cfg.d_model)
        self.n_head, self.p = cfg.n_head, cfg.attn_dropout

    def forward(self, x, keep):
        B, T, d = x.shape
        q, k, v = (m(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        # keep (B, 1, 1, T): a query attends to every real token of its sequence, never to padding
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, d)


class AddNorm(nn.Module):
    """Post-norm residual: LayerNorm(residual + Dropout(W x)). HF: BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.d_model)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AddNorm(cfg.d_model, cfg)

    def forward(self, x, keep):
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_ff)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg.d_ff, cfg)

    def forward(self, x, keep):
        h = self.attention(x, keep)
        return self.output(self.intermediate(h), h)


class Stack(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))


class Pooler(nn.Module):
    """tanh(W h_[CLS] + b): BERT's sentence representation for NSP and classification."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class Trunk(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Stack(cfg)
        if cfg.pooler:
            self.pooler = Pooler(cfg)


class Encoder(FamilyModel):
    family = "encoder"

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = Trunk(cfg)
        self._build_heads()  # chatsmith/model/heads.py: mlm_head, nsp_head, classifier, qa_outputs
        self.apply(self._init_weights)
        self.tie_weights()

    def blocks(self) -> list[nn.Module]:
        return list(self.bert.encoder.layer)

    def tie_weights(self):
        if "mlm" in self.heads:  # the MLM decoder reads the input embedding matrix (BERT ties them)
            self.mlm_head.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def add_head(self, name: str, std: float | None = None, labels: tuple[str, ...] | None = None) -> "Encoder":
        """As FamilyModel.add_head; a pooled head also brings the pooler (fresh, if the model had none)
        and a classify head its label names (a different label set replaces the head)."""
        if name == "classify":
            labels = tuple(labels or self.cfg.labels)
            if name in self.heads and labels != self.cfg.labels:
                delattr(self, HEADS[name].attr)
                self.cfg = dataclasses.replace(self.cfg, heads=tuple(h for h in self.heads if h != name))
            self.cfg = dataclasses.replace(self.cfg, labels=labels) if name not in self.heads else self.cfg
        if name in POOLED_HEADS and not hasattr(self.bert, "pooler"):
            p = next(self.parameters())
            self.bert.pooler = Pooler(self.cfg).to(device=p.device, dtype=p.dtype)
            self.bert.pooler.apply(self._init_weights)
        super().add_head(name, std)
        if name == "mlm":
            self.mlm_head.apply(self._init_weights)
            self.tie_weights()
        return self

    def keep_heads(self, names: tuple[str, ...]) -> "Encoder":
        """Drop every head not in names (a fine-tuned classifier keeps no MLM head: its directory then
        loads in transformers as the task class without unused weights)."""
        for n in self.heads:
            if n not in names:
                delattr(self, HEADS[n].attr)
        self.cfg = dataclasses.replace(self.cfg, heads=tuple(n for n in self.heads if n in names))
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, ids, attention_mask=None, token_type_ids=None):
        """Last-layer hidden states (B, T, d). attention_mask (B, T): 1 real token, 0 padding."""
        B, T = ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the encoder's {self.cfg.max_seq_len} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.bert.embeddings(ids, token_type_ids)
        for layer in self.bert.encoder.layer:
            x = layer(x, keep)
        return x

    def forward(self, ids, attention_mask=None, token_type_ids=None, head: str | tuple[str, ...] | None = None):
        """Hidden states (head=None), or the output of one head (a name) or several (a tuple):
        mlm (B, T, V) · nsp (B, 2) · classify (B, labels) · span (B, T, 2). Going through forward
        keeps DDP and torch.compile in the loop."""
        h = self.hidden_states(ids, attention_mask, token_type_ids)
        if head is None:
            return h
        names = (head,) if isinstance(head, str) else head
        pooled = self.bert.pooler(h) if any(n in POOLED_HEADS for n in names) else None
        outs = []
        for n in names:
            x = h if n not in POOLED_HEADS else pooled
            if n == "classify":  # BertForSequenceClassification: dropout on the pooled state
                x = F.dropout(x, self.cfg.dropout, self.training)
            outs.append(head_output(n, self.head(n), x))
        return outs[0] if isinstance(head, str) else tuple(outs)

    def embed(self, ids, attention_mask, normalize: bool = True):
        """Sentence embeddings (B, d): the mean of the last hidden states over real tokens
        (sentence-transformers' mean pooling), L2-normalised by default."""
        h = self.hidden_states(ids, attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(e, dim=-1) if normalize else e


# --- Hugging Face tensor names ----------------------------------------------------------------
# ours -> theirs, for the heads whose HF names differ (the trunk, `classifier` and `qa_outputs`
# already carry HF's names)
_HEAD_NAMES = (("mlm_head.transform.", "cls.predictions.transform."), ("mlm_head.bias", "cls.predictions.bias"),
               ("nsp_head.", "cls.seq_relationship."))
_TRUNK = ("embeddings.", "encoder.", "pooler.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg: EncoderConfig = model.cfg
    out = {}
    for k, v in model.state_dict().items():
        if k == "mlm_head.decoder.weight":
            continue  # tied to the word embeddings: HF re-ties it on load
        for ours, theirs in _HEAD_NAMES:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                break
        if cfg.hf_architecture() == "BertModel":
            k = k.removeprefix("bert.")  # a bare BertModel's names have no prefix
        out[k] = v.detach().contiguous()
    return out


def from_hf_state_dict(cfg: EncoderConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors (a BertModel with or without the `bert.` prefix, or a Bert*For* model) -> ours."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_BUFFERS) or k.startswith("cls.predictions.decoder."):
            continue  # rebuilt buffers; the tied decoder (weight = embeddings, bias = predictions.bias)
        if k.startswith(_TRUNK):
            k = "bert." + k
        for ours, theirs in _HEAD_NAMES:
            if k.startswith(theirs):
                k = ours + k[len(theirs):]
                break
        if k.startswith(("mlm_head.", "nsp_head.")) and k.split(".")[0] not in {HEADS[h].attr for h in cfg.heads}:
            continue  # e.g. a BertForPreTraining checkpoint read as a plain trunk
        if k.startswith("bert.pooler.") and not cfg.pooler:
            continue
        out[k] = v
    if "mlm" in cfg.heads and "bert.embeddings.word_embeddings.weight" in out:
        out["mlm_head.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    return out


FAMILY = Family(name="encoder", config=EncoderConfig, model=Encoder, hf_model_types=("bert",),
                to_hf_state_dict=to_hf_state_dict, from_hf_state_dict=from_hf_state_dict,
                presets=PRESETS, preset=preset)
