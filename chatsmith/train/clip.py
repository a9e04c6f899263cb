"""`chatsmith clip train`: contrastive image–text training of the clip family, on the one trainer.

    chatsmith data build --what images
    chatsmith clip train --data data/images/fashion/train data/images/emoji/train --out runs/clip --max-minutes 15

A step draws a batch of N (image, caption) pairs — the images in a fixed shuffled order (a pure
function of seed and step, so --resume is exact), one of each image's captions drawn the same way —
and minimises the symmetric InfoNCE loss of Radford et al. (2021), section 2.3:

    logits = exp(t) * norm(W_i f(image)) @ norm(W_t g(caption))^T          (N x N)
    loss   = (CE(logits, targets) + CE(logits^T, targets^T)) / 2

with the temperature t learned (`logit_scale`). One refinement, for data with class-level
captions (Fashion-MNIST: thousands of images share "a photo of a sneaker."): pairs whose images
carry the same label are both right answers, so a row's target is uniform over them instead of a
one-hot that would tell the model two sneakers must differ. With all labels distinct (captioned
photos, emoji) this is exactly CLIP's one-hot loss.

Images are resized/cropped once to the model's image_size with Pillow (uint8 in memory) and
normalised per batch. The caption tokenizer (byte-level BPE, English and Chinese) is trained on the
training captions unless --tokenizer names one. "tok/s" in the progress line counts images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatsmith import atomic, runtime
from chatsmith.batching import epoch_batch
from chatsmith.clip_engine import ClipEngine, train_caption_tokenizer, write_processor_files
from chatsmith.config import TrainConfig
from chatsmith.data.images import ImageTextSet, read_set, resize_crop
from chatsmith.errors import UserError
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.model import registry
from chatsmith.model.clip import PRESETS
from chatsmith.tokenizer import Tokenizer
from chatsmith.train.trainer import Trainer, steps_for_epochs

DEFAULTS = dict(out="runs/clip", preset="tiny", lr=1e-3, warmup_steps=50, weight_decay=0.1, beta2=0.98,
                batch_size=256, eval_every=200, eval_batches=4, save_every=200, log_every=20)


def soft_targets(labels: torch.Tensor) -> torch.Tensor:
    """(N, N) row-stochastic targets: uniform over the pairs that share row i's label."""
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(1, keepdim=True)


def clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    t = soft_targets(labels)  # symmetric, so the text->image targets are the same matrix
    lg = logits.float()
    return (F.cross_entropy(lg, t) + F.cross_entropy(lg.T, t)) / 2


class ClipStage:
    name = "clip"
    show = ("temperature",)

    def __init__(self, engine: ClipEngine, cfg: TrainConfig, train: ImageTextSet, val: ImageTextSet | None):
        self.engine, self.cfg = engine, cfg
        mc = engine.cfg
        self.mean = torch.tensor(mc.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(mc.image_std).view(1, 3, 1, 1)
        self.train = self._prepare(train)
        self.val = self._prepare(val) if val is not None and len(val) else None

    def _prepare(self, s: ImageTextSet) -> dict:
        """Pixels at the model's size (uint8), captions as ids (each distinct caption encoded once), label ids."""
        px = torch.from_numpy(resize_crop(s.images, self.engine.cfg.image_size))
        lists = {id(ts): ts for ts in s.texts}  # a class's images share one caption list object
        uniq = sorted({t for ts in lists.values() for t in ts})
        where = {t: i for i, t in enumerate(uniq)}
        ids = self.engine.token_ids(uniq)
        rows = {k: [where[t] for t in ts] for k, ts in lists.items()}
        label_ids = {lab: i for i, lab in enumerate(dict.fromkeys(s.labels))}
        return {"pixels": px, "caption_ids": ids, "captions": [rows[id(ts)] for ts in s.texts],
                "labels": torch.tensor([label_ids[lab] for lab in s.labels]), "n": len(s)}

    def _pixels(self, px: torch.Tensor) -> torch.Tensor:
        return (px.permute(0, 3, 1, 2).float() * (1 / 255) - self.mean) / self.std

    def _batch(self, d: dict, rows: list[int], seed: int, index: int) -> dict:
        rng = np.random.default_rng([seed, index, 11])
        caps = [d["captions"][r][rng.integers(len(d["captions"][r]))] for r in rows]
        ids = d["caption_ids"][caps]
        width = int((ids != self.engine.cfg.pad_token_id).sum(1).max())  # drop all-padding columns
        return {"pixels": self._pixels(d["pixels"][rows]), "ids": ids[:, :width], "labels": d["labels"][rows]}

    def batch(self, step: int, micro: int, rank: int) -> dict:
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, runtime.world_size())
        rows = epoch_batch(self.cfg.seed, i, self.cfg.batch_size, self.train["n"])
        return self._batch(self.train, rows, self.cfg.seed, i)

    def loss(self, model, b):
        logits = model(b["pixels"], b["ids"])
        loss = clip_loss(logits, b["labels"])
        m = getattr(model, "module", model)  # DDP wraps the model
        return loss, {"temperature": float(1 / m.logit_scale.detach().clamp(max=np.log(100)).exp())}

    def tokens(self, b) -> int:
        return int(b["pixels"].shape[0])  # images: the progress line's tok/s is images/s

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Loss and in-batch image->caption accuracy (the right label's column ranked first) on fixed
        val batches."""
        if self.val is None:
            return {}
        device = next(model.parameters()).device
        loss = hits = n = 0.0
        for k in range(self.cfg.eval_batches):
            rows = epoch_batch(4242, k, min(self.cfg.batch_size, self.val["n"]), self.val["n"])
            b = {key: v.to(device) for key, v in self._batch(self.val, rows, 4242, k).items()}
            logits = model(b["pixels"], b["ids"])
            loss += clip_loss(logits, b["labels"]).item()
            hits += (b["labels"][logits.argmax(1)] == b["labels"]).sum().item()
            n += len(rows)
        return {"val_loss": loss / self.cfg.eval_batches, "val_i2t_acc": hits / n}


def concat_sets(sets: list[ImageTextSet], size: int) -> ImageTextSet:
    ims = np.concatenate([resize_crop(s.images, size) for s in sets])
    return ImageTextSet(ims, [t for s in sets for t in s.texts], [lab for s in sets for lab in s.labels],
                        [x for s in sets for x in s.seen], ",".join(s.source for s in sets))


def run(cfg: TrainConfig, data: list[str], val: str | None = None, tokenizer: str | None = None,
        vocab_size: int = 2048, epochs: float = 10.0, model_overrides: dict | None = None) -> dict:
    out = Path(cfg.out)
    overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    size = overrides.get("image_size", 28)
    train = concat_sets([read_set(d) for d in data], size)  # every bad file named before any work
    val_set = concat_sets([read_set(val)], size) if val else None
    if len(train) < 2:
        raise UserError(f"--data holds {len(train)} image; contrastive training needs at least 2")
    tok_dir = Path(tokenizer) if tokenizer else out / "tokenizer"
    with runtime.rank0_first(cfg.device):
        if not (tok_dir / "tokenizer.json").exists():
            if tokenizer:
                raise UserError(f"--tokenizer {tok_dir} has no tokenizer.json")
            print(f"training a {vocab_size}-token caption tokenizer on {len(train)} images' captions", file=sys.stderr)
            train_caption_tokenizer(sorted({t for ts in train.texts for t in ts}), vocab_size).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    mcfg = registry.preset(cfg.preset, family="clip", vocab_size=(tok.vocab_size + 63) // 64 * 64,
                           bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                           **{"image_size": size, **overrides})
    if runtime.rank() == 0:
        write_processor_files(tok_dir, mcfg)  # copied into every checkpoint with the tokenizer
    torch.manual_seed(cfg.seed)
    model = registry.build(mcfg)
    print(f"model: clip preset {cfg.preset}, {model.num_params() / 1e6:.2f}M parameters, images "
          f"{mcfg.image_size}px in {mcfg.n_patches} patches, captions up to {mcfg.max_text_len} tokens; "
          f"{len(train)} training images", file=sys.stderr)
    stage = ClipStage(ClipEngine(model, tok), cfg, train, val_set)
    model.train()
    steps_for_epochs(cfg, len(train), epochs)
    trainer = Trainer(model, stage, cfg, tokenizer_dir=tok_dir, extra_config={"stage": "clip"})
    summary = trainer.fit()
    summary["data"] = {"train": [str(d) for d in data], "images": len(train), "val": val}
    summary["params"] = model.num_params()
    if trainer.master:
        atomic.write_json(out / "train_summary.json", summary)
    return summary


def _train_arguments(p):
    p.add_argument("--data", nargs="+", required=True, help="training sets: built splits (data/images/fashion/train) "
                   "or your folders (captions.jsonl + images, or one sub-folder of images per class)")
    p.add_argument("--val", help="a validation set (same forms as --data) for the loss and in-batch accuracy "
                   "(default: none)")
    p.add_argument("--tokenizer", help="a caption tokenizer directory (default: trained on the captions into "
                   "OUT/tokenizer)")
    p.add_argument("--vocab-size", type=int, default=2048, help="size of the trained caption tokenizer")
    p.add_argument("--epochs", type=float, default=10.0, help="passes over the data when neither --max-steps nor "
                   "--max-minutes is given")
    p.add_argument("--image-size", type=int, default=28, help="pixels per side the images are resized and cropped to")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch side in pixels (default: the preset's, 7)")
    add_train_flags(p, DEFAULTS, skip=(), choices={"preset": tuple(PRESETS)})


def _train_main(a):
    cfg = dataclass_from_args(TrainConfig, a)
    summary = run(cfg, a.data, val=a.val, tokenizer=a.tokenizer, vocab_size=a.vocab_size, epochs=a.epochs,
                  model_overrides={"image_size": a.image_size, "patch_size": a.patch_size})
    print(json.dumps(summary, indent=2))


TRAIN_VERB = Verb("clip train", "train a CLIP-style image-text model (symmetric InfoNCE, learned temperature)",
                  _train_arguments, _train_main)

__all__ = ["ClipStage", "clip_loss", "soft_targets", "run", "TRAIN_VERB"]
