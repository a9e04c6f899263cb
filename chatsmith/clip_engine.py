"""Inference for the clip family: captions and images into one space, zero-shot labels, search, recall.

What chatsmith/encoder_engine.py is for the encoder, this is for the image–text pair:

    embed_texts(texts)                 L2-normalised caption vectors ([BOS] caption [EOS], cut to the text tower)
    embed_images(images)               L2-normalised image vectors (Pillow preprocessing = CLIPImageProcessor's)
    class_vectors(prompts per class)   the prompt ensemble of each class: the mean of its prompts' unit
                                       vectors, renormalised (Radford et al. 2021, section 3.1.4)
    zero_shot / search / recall_at_k   what classify, search and `eval --tasks clip` report

The text tokenizer is chatsmith's byte-level BPE with a post-processor that wraps every caption in
<|bos|> … <|eos|>, so `transformers`' CLIPProcessor, loading the same tokenizer.json, produces the
same ids; padding is <|pad|> and never read (the causal text tower pools at the first EOS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import processors

from chatsmith import atomic
from chatsmith.checkpoint import load_model
from chatsmith.data.images import preprocess
from chatsmith.errors import UserError
from chatsmith.model.clip import Clip, ClipConfig
from chatsmith.tokenizer import BOS, EOS, Tokenizer, train_tokenizer

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a small image of a {}.", "{}")


def train_caption_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Byte-level BPE on the captions, wrapping each encoded caption in BOS … EOS."""
    tok = train_tokenizer(iter(texts), vocab_size).tok
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return Tokenizer(tok)


def write_processor_files(d: Path, cfg: ClipConfig):
    """preprocessor_config.json: the image half of CLIPProcessor, matching data.images.preprocess."""
    s = cfg.image_size
    atomic.write_json(d / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": s}, "resample": 3,  # 3 = PIL bicubic
        "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std), "do_convert_rgb": True})


def load_clip(path, device="cpu") -> tuple[Clip, Tokenizer]:
    model = load_model(path, device=device)
    if not isinstance(model, Clip):
        raise UserError(f"{path} is a {getattr(model, 'family', 'decoder')} model; this needs a clip model "
                        f"(train one with `chatsmith clip train`)")
    return model, Tokenizer.load(path)


class ClipEngine:
    def __init__(self, model: Clip, tok: Tokenizer, batch_size: int = 256):
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size
        self.cfg: ClipConfig = model.cfg
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path, device="cpu", **kw) -> "ClipEngine":
        return cls(*load_clip(path, device), **kw)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """(N, T) ids, T = the longest caption (at most the text tower's positions); a longer caption
        is cut and keeps its EOS, which is where it is read."""
        L, eos, pad = self.cfg.max_text_len, self.cfg.eos_token_id, self.cfg.pad_token_id
        rows = [e.ids for e in self.tok.plain.encode_batch(list(texts), add_special_tokens=True)]
        rows = [r if len(r) <= L else r[:L - 1] + [eos] for r in rows]
        T = max(map(len, rows))
        return torch.tensor([r + [pad] * (T - len(r)) for r in rows], dtype=torch.long)

    def pixels(self, images) -> torch.Tensor:
        return torch.from_numpy(preprocess(images, self.cfg.image_size, self.cfg.image_mean, self.cfg.image_std))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.cfg.projection_dim), np.float32)
        out = [self.model.encode_text(self.token_ids(texts[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def embed_images(self, images) -> np.ndarray:
        out = [self.model.encode_image(self.pixels(images[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.cfg.projection_dim), np.float32)

    def class_vectors(self, prompts: list[list[str]]) -> np.ndarray:
        """One unit vector per class: the renormalised mean of its prompts' embeddings (an ensemble)."""
        flat = [p for ps in prompts for p in ps]
        e = self.embed_texts(flat)
        out, i = [], 0
        for ps in prompts:
            v = e[i:i + len(ps)].mean(0)
            out.append(v / max(np.linalg.norm(v), 1e-12))
            i += len(ps)
        return np.stack(out)

    @property
    def scale(self) -> float:
        return float(self.model.logit_scale.detach().clamp(max=np.log(100)).exp())

    def probabilities(self, image_vecs: np.ndarray, class_vecs: np.ndarray) -> np.ndarray:
        """softmax(exp(t) * cosine) over the classes, per image."""
        z = self.scale * image_vecs @ class_vecs.T
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


def label_prompts(labels: list[str], templates=DEFAULT_TEMPLATES) -> list[list[str]]:
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"--template {bad[0]!r} has no {{}} where the label goes")
    return [[t.format(lab) for t in templates] for lab in labels]


def parse_labels(s: str) -> list[str]:
    labels = [x.strip() for x in s.split(",")]
    if not s.strip() or not all(labels):
        raise UserError(f"--labels {s!r}: give at least two comma-separated, non-empty labels")
    if len(labels) < 2:
        raise UserError(f"--labels {s!r}: zero-shot classification needs at least two labels")
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise UserError(f"--labels lists {dup!r} twice")
    return labels


def recall_at_k(image_vecs: np.ndarray, texts: list[list[str]], text_vecs: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Image->text and text->image recall@k. texts[i] are image i's captions, text_vecs their
    embeddings in that order (flattened): an image is found by any caption ranking it in the top k,
    a caption finds its own image."""
    owner = np.array([i for i, ts in enumerate(texts) for _ in ts])
    sim = image_vecs @ text_vecs.T  # (images, captions)
    res = {}
    # image -> text: rank of the best-ranked own caption
    order = np.argsort(-sim, axis=1, kind="stable")
    own = owner[order] == np.arange(len(texts))[:, None]
    first = own.argmax(1)
    # text -> image: rank of the own image among all images
    t_order = np.argsort(-sim.T, axis=1, kind="stable")
    t_rank = (t_order == owner[:, None]).argmax(1)
    for k in ks:
        res[f"image_to_text_r@{k}"] = float((first < k).mean())
        res[f"text_to_image_r@{k}"] = float((t_rank < k).mean())
    res["images"], res["captions"] = len(texts), int(len(owner))
    return res


__all__ = ["ClipEngine", "load_clip", "train_caption_tokenizer", "write_processor_files", "label_prompts",
           "parse_labels", "recall_at_k", "DEFAULT_TEMPLATES"]
