"""The clip family: a CLIP-style image–text pair (Radford et al. 2021), its config, presets and HF mapping.

Two towers map an image and a caption into one d_proj-dimensional space:

    image: patches (Conv2d, stride = patch) -> [class; patches] + positions -> LayerNorm ("pre_layrnorm",
           HF's spelling) -> pre-norm blocks -> LayerNorm(h_class) ("post_layernorm") -> W_img
    text:  tokens + positions -> pre-norm blocks under a causal mask -> LayerNorm -> the state at the
           first EOS token (the only position that has read the whole caption) -> W_txt

    block: x = x + Attn(LN1(x));  x = x + W2 quick_gelu(W1 LN2(x))     quick_gelu(x) = x * sigmoid(1.702 x)

Training (section 2.3's pseudocode) scores every image against every caption of a batch of N pairs:
logits = exp(t) * norm(I) @ norm(T)^T, and the loss is the mean of cross-entropy over rows (which
caption is this image's?) and over columns (which image is this caption's?), the symmetric InfoNCE
loss. t is learned (`logit_scale`, initialised to ln(1/0.07) and clamped at ln 100 as in the paper).

Module names are transformers' CLIPModel names, so the state dict *is* a CLIPModel state dict and a
saved directory loads in `CLIPModel.from_pretrained` with the same embeddings (tests/test_clip.py).

Shapes: B batch, T tokens (or 1 + patches), d width of a tower, p projection dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatsmith.errors import UserError
from chatsmith.model.family import Family, FamilyModel

# OpenAI CLIP's pixel statistics (what CLIPImageProcessor normalises with by default)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipConfig:
    # text tower
    vocab_size: int = 2048
    max_text_len: int = 32  # learned positions; captions are cut to this (EOS kept last)
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    bos_token_id: int = 0
    eos_token_id: int = 1  # pooling reads the first EOS position
    pad_token_id: int = 2
    # image tower
    image_size: int = 28
    patch_size: int = 7
    channels: int = 3
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    # shared
    mlp_ratio: int = 4
    projection_dim: int = 128
    logit_scale_init: float = math.log(1 / 0.07)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD
    heads: tuple[str, ...] = ()  # no heads: the projections are the model's output

    def __post_init__(self):
        self.heads, self.image_mean, self.image_std = tuple(self.heads), tuple(self.image_mean), tuple(self.image_std)
        if self.heads:
            raise UserError(f"the clip family has no heads, got {list(self.heads)}")
        for w, h, what in ((self.text_width, self.text_heads, "text"), (self.vision_width, self.vision_heads, "vision")):
            if w % h:
                raise UserError(f"{what} width {w} is not divisible by its {h} heads")
        if self.image_size % self.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.eos_token_id == 2:  # transformers reads eos_token_id 2 as its pre-2023 argmax pooling
            raise UserError("eos_token_id 2 is reserved by transformers' CLIP for argmax pooling; use another id")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # --- Hugging Face config.json -------------------------------------------------------
    def to_hf(self) -> dict:
        common = {"hidden_act": "quick_gelu", "layer_norm_eps": self.norm_eps, "attention_dropout": 0.0,
                  "initializer_range": self.init_std, "initializer_factor": 1.0, "projection_dim": self.projection_dim}
        return {
            "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init, "torch_dtype": "float32",
            "text_config": {**common, "model_type": "clip_text_model", "vocab_size": self.vocab_size,
                            "hidden_size": self.text_width, "intermediate_size": self.mlp_ratio * self.text_width,
                            "num_hidden_layers": self.text_layers, "num_attention_heads": self.text_heads,
                            "max_position_embeddings": self.max_text_len, "bos_token_id": self.bos_token_id,
                            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id},
            "vision_config": {**common, "model_type": "clip_vision_model", "hidden_size": self.vision_width,
                              "intermediate_size": self.mlp_ratio * self.vision_width,
                              "num_hidden_layers": self.vision_layers, "num_attention_heads": self.vision_heads,
                              "image_size": self.image_size, "patch_size": self.patch_size,
                              "num_channels": self.channels},
        }

    @classmethod
    def from_hf(cls, d: dict) -> "ClipConfig":
        t, v = d.get("text_config") or {}, d.get("vision_config") or {}
        for c in (t, v):
            if c.get("hidden_act", "quick_gelu") != "quick_gelu":
                raise UserError(f"hidden_act={c['hidden_act']!r} is not supported (CLIP uses quick_gelu)")
        ratio = t.get("intermediate_size", 2048) // t.get("hidden_size", 512)
        if v.get("intermediate_size", 3072) != ratio * v.get("hidden_size", 768):
            raise UserError("the text and vision towers have different MLP ratios; chatsmith's clip family shares one")
        return cls(vocab_size=t.get("vocab_size", 49408), max_text_len=t.get("max_position_embeddings", 77),
                   text_width=t.get("hidden_size", 512), text_layers=t.get("num_hidden_layers", 12),
                   text_heads=t.get("num_attention_heads", 8), bos_token_id=t.get("bos_token_id", 49406),
                   eos_token_id=t.get("eos_token_id", 49407), pad_token_id=t.get("pad_token_id", 1),
                   image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                   channels=v.get("num_channels", 3), vision_width=v.get("hidden_size", 768),
                   vision_layers=v.get("num_hidden_layers", 12), vision_heads=v.get("num_attention_heads", 12),
                   mlp_ratio=ratio, projection_dim=d.get("projection_dim", 512),
                   logit_scale_init=d.get("logit_scale_init_value", 2.6592), norm_eps=t.get("layer_norm_eps", 1e-5))


# Named shapes. vocab_size and the special ids come from the tokenizer; image_size from the data.
PRESETS: dict[str, dict] = {
    "micro": dict(text_width=32, text_layers=2, text_heads=2, vision_width=32, vision_layers=2, vision_heads=2,
                  projection_dim=32, max_text_len=24),  # tests
    "tiny": dict(text_width=128, text_layers=3, text_heads=4, vision_width=128, vision_layers=4, vision_heads=4,
                 projection_dim=128, max_text_len=32),  # ~1.6M: the 15-minute CPU run
    "small": dict(text_width=256, text_layers=6, text_heads=4, vision_width=256, vision_layers=6, vision_heads=4,
                  projection_dim=256, max_text_len=64),
}


def preset(name: str, **overrides) -> ClipConfig:
    if name not in PRESETS:
        raise UserError(f"unknown clip preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ClipConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


# --- the network ------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.n_head = n_head

    def forward(self, x, causal: bool):
        B, T, d = x.shape
        q, k, v = (m(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2)
                   for m in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # scale 1/sqrt(head dim), as HF
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu: OpenAI's CLIP activation


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, cfg: ClipConfig):
        super().__init__()
        self.self_attn = Attention(d, n_head)
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = MLP(d, cfg.mlp_ratio * d)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)

    def forward(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Stack(nn.Module):
    def __init__(self, d: int, n_head: int, n_layer: int, cfg: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, n_head, cfg) for _ in range(n_layer))

    def forward(self, x, causal: bool):
        for layer in self.layers:
            x = layer(x, causal)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position_embedding = nn.Embedding(cfg.max_text_len, cfg.text_width)


class TextModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Stack(cfg.text_width, cfg.text_heads, cfg.text_layers, cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.text_width, eps=cfg.norm_eps)
        self.eos = cfg.eos_token_id

    def forward(self, ids):
        B, T = ids.shape
        e = self.embeddings
        x = e.token_embedding(ids) + e.position_embedding(torch.arange(T, device=ids.device))
        # causal: padding after EOS is never read by the EOS state, so no padding mask is needed
        h = self.final_layer_norm(self.encoder(x, causal=True))
        is_eos = ids == self.eos
        # the first EOS of each row (a row without one, e.g. cut short, pools at its last token)
        pos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], T - 1))
        return h[torch.arange(B, device=ids.device), pos]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.vision_width))
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.vision_width, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.n_patches + 1, cfg.vision_width)


class VisionModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.vision_width, eps=cfg.norm_eps)  # sic: HF's name
        self.encoder = Stack(cfg.vision_width, cfg.vision_heads, cfg.vision_layers, cfg)
        self.post_layernorm = nn.LayerNorm(cfg.vision_width, eps=cfg.norm_eps)

    def forward(self, pixels):
        e = self.embeddings
        p = e.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, d)
        x = torch.cat([e.class_embedding.expand(p.shape[0], 1, -1).to(p.dtype), p], 1) + e.position_embedding.weight
        h = self.encoder(self.pre_layrnorm(x), causal=False)
        return self.post_layernorm(h[:, 0])  # the class token's state


class Clip(FamilyModel):
    family = "clip"

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextModel(cfg)
        self.vision_model = VisionModel(cfg)
        self.visual_projection = nn.Linear(cfg.vision_width, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.apply(self._init_weights)
        nn.init.normal_(self.vision_model.embeddings.class_embedding, std=cfg.vision_width ** -0.5)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def blocks(self) -> list[nn.Module]:
        return [*self.text_model.encoder.layers, *self.vision_model.encoder.layers]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, S, S) normalised pixels -> (B, p) image embeddings."""
        z = self.visual_projection(self.vision_model(pixels))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, T) token ids ([BOS] caption [EOS] padding) -> (B, p) text embeddings."""
        if ids.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed the text tower's {self.cfg.max_text_len} positions")
        z = self.text_projection(self.text_model(ids))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, pixels, ids):
        """-> logits_per_image (B_img, B_txt): exp(t) * cosine similarities, t clamped at ln 100."""
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        # a batch of class-level captions repeats few distinct ones: each is encoded once (same result)
        uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)
        return scale * self.encode_image(pixels) @ self.encode_text(uniq)[inverse].T


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i is the right answer of row i (image -> text) and column i (text -> image)."""
    y = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), y) + F.cross_entropy(logits.float().T, y)) / 2


# --- Hugging Face tensors: our names are CLIPModel's ------------------------------------------------

def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def from_hf_state_dict(cfg: ClipConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # HF's rebuilt buffers


FAMILY = Family(name="clip", config=ClipConfig, model=Clip, hf_model_types=("clip",),
                to_hf_state_dict=to_hf_state_dict, from_hf_state_dict=from_hf_state_dict,
                presets=PRESETS, preset=preset)
