"""Image–text data for the clip family: the built-in sets, a user's folders, decoding and preprocessing.

    chatsmith data build --what images      OUT/images/fashion/{train,test}/  OUT/images/emoji/{train,test,heldout}/

A built split is a directory with `images.npy` (N, H, W, 3 uint8, RGB) and `records.jsonl` (one line
per image: {"texts": [captions...], "label": class or emoji name, "seen": bool}) plus `meta.json`
beside the splits (classes, which are held out, the caption templates, sources and licences).

- Fashion-MNIST (Debian `dataset-fashion-mnist`, MIT; IDX files read with numpy): 10 classes, 28x28.
  HELD_OUT classes (pullover, dress, ankle boot) never appear in train/ — neither their images nor
  their names — so the test set's accuracy on them measures zero-shot transfer. train/ = the 42,000
  official training images of the 7 seen classes; test/ = the official 10,000 test images, all 10.
  Captions (meta.json, ~80 per class): name templates and every combination of up to three of the
  class's attributes ("a shoe for the foot, low, closed with laces"), English and Chinese. The
  attributes are shared between classes ("upper body", "long sleeves", "a shoe for the foot"): that
  is what a held-out class can be recognised by, since its name is a word never trained on.
- Emoji (npm `emoji-datasource-google` 64x64 PNGs, Apache-2.0; names and tags from npm
  `emojibase-data` en + zh, MIT): the "food & drink" group is held out entirely (heldout/); of the
  rest, every 10th emoji by code point goes to test/, the others to train/.

A user's data (`--data FOLDER` of `chatsmith clip train`): FOLDER/captions.jsonl with
{"image": path relative to FOLDER, "text": caption or [captions]} per line, or one sub-folder of
images per class (captions from the class templates). Images are decoded with Pillow and converted
to RGB (transparency composited on white, palette/grey/CMYK converted, 16-bit scaled to 8 bits);
an unreadable, truncated or degenerate image is a UserError naming the file (and the JSONL line).

Preprocessing is transformers' CLIPImageProcessor (its Pillow backend) step for step — resize the
shortest edge to S (bicubic), centre-crop SxS, x/255, (x - mean)/std — so a saved model's
preprocessor_config.json reproduces our pixels exactly.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from chatsmith import atomic
from chatsmith.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [  # (English, Chinese), in label order
    ("t-shirt", "T恤"), ("trouser", "裤子"), ("pullover", "套头衫"), ("dress", "连衣裙"), ("coat", "外套"),
    ("sandal", "凉鞋"), ("shirt", "衬衫"), ("sneaker", "运动鞋"), ("bag", "包"), ("ankle boot", "短靴")]
# What each class looks like, in words shared between classes: a held-out class can only be found by
# these (its name is a word the text tower never read), so its attributes reuse seen ones where true.
FASHION_ATTRS = {
    "t-shirt": [("a top for the upper body", "上身穿的上衣"), ("short sleeves", "短袖"), ("no buttons", "没有扣子"),
                ("thin cloth", "薄布")],
    "trouser": [("clothing for the legs", "腿上穿的衣服"), ("two long legs", "两条长裤腿"), ("long", "长的")],
    "pullover": [("a top for the upper body", "上身穿的上衣"), ("long sleeves", "长袖"), ("no buttons", "没有扣子"),
                 ("warm cloth", "暖和的布")],
    "dress": [("clothing for the upper body and the legs", "上身和腿一起穿的衣服"), ("one long piece", "长长的一件"),
              ("no sleeves", "没有袖子")],
    "coat": [("a top for the upper body", "上身穿的上衣"), ("long sleeves", "长袖"), ("buttons", "扣子"),
             ("warm cloth", "暖和的布")],
    "sandal": [("a shoe for the foot", "脚上穿的鞋"), ("open with straps", "有带子的露脚鞋"), ("low", "低帮")],
    "shirt": [("a top for the upper body", "上身穿的上衣"), ("long sleeves", "长袖"), ("buttons", "扣子"),
              ("a collar", "领子")],
    "sneaker": [("a shoe for the foot", "脚上穿的鞋"), ("low", "低帮"), ("closed with laces", "有鞋带"),
                ("for sports", "运动用的")],
    "bag": [("a bag to carry things", "装东西的包"), ("a handle or a strap", "提手或背带")],
    "ankle boot": [("a shoe for the foot", "脚上穿的鞋"), ("high", "高帮"), ("closed", "包住脚的"),
                   ("covers the ankle", "盖住脚踝")],
}
HELD_OUT = ("pullover", "dress", "ankle boot")
TEMPLATES_EN = ("a photo of a {name}.", "a picture of a {name}.", "a black and white photo of a {name}.",
                "a small image of a {name}.")
TEMPLATES_ZH = ("一张{name}的照片。", "{name}的图片", "一张{name}的黑白照片。")
ATTR_TEMPLATES_EN = ("{attrs}.", "a photo of something: {attrs}.", "a {name}: {attrs}.")
ATTR_TEMPLATES_ZH = ("{attrs}。", "{name}：{attrs}。")
EMOJI_HELD_OUT_GROUP = 4  # emojibase's "food & drink"
EMOJI_PACKAGES = ("emoji-datasource-google-16.0.0.tgz", "emojibase-data-17.0.0.tgz")
MIN_SIDE = 4  # pixels: anything smaller holds no picture worth a caption


def class_captions(name: str, zh: str | None = None, attrs: list[tuple[str, str]] | None = None) -> list[str]:
    """Every caption of a class: the name templates, and (with attributes) every combination of up to
    three of its attributes, with and without the name, in English and (with a Chinese name) Chinese."""
    out = [t.format(name=name) for t in TEMPLATES_EN]
    if zh:
        out += [t.format(name=zh) for t in TEMPLATES_ZH]
    for r in range(1, min(3, len(attrs or ())) + 1):
        for combo in itertools.combinations(attrs, r):
            out += [t.format(name=name, attrs=", ".join(a[0] for a in combo)) for t in ATTR_TEMPLATES_EN]
            if zh:
                out += [t.format(name=zh, attrs="，".join(a[1] for a in combo)) for t in ATTR_TEMPLATES_ZH]
    return out


def fashion_captions() -> dict[str, list[str]]:
    return {en: class_captions(en, zh, FASHION_ATTRS[en]) for en, zh in FASHION_CLASSES}


# --- decoding ------------------------------------------------------------------------------------

def to_rgb(img: Image.Image, where: str) -> Image.Image:
    """Any Pillow image as RGB, or a UserError saying why it cannot be one."""
    if img.width < MIN_SIDE or img.height < MIN_SIDE:
        raise UserError(f"{where}: image is {img.width}x{img.height}; at least {MIN_SIDE}x{MIN_SIDE} pixels needed")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale the used range to 8 bits
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * 255.0 / hi, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise UserError(f"{where}: 32-bit float images have no fixed brightness scale; save it as 8-bit PNG/JPEG")
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # transparent pixels become white, as transformers' convert_rgb does
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def read_image(src, where: str | None = None) -> Image.Image:
    """Decode a file path or bytes into an RGB Pillow image (the first frame of an animation)."""
    where = where or str(src)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.load()  # a truncated file fails here, not later inside a batch
            return to_rgb(im, where)
    except FileNotFoundError:
        raise UserError(f"{where}: no such image file") from None
    except UnidentifiedImageError:
        raise UserError(f"{where}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as e:
        raise UserError(f"{where}: the image is truncated or corrupt ({e})") from None


def resize_crop(images, size: int) -> np.ndarray:
    """RGB images (Pillow images or HxWx3 uint8 arrays) -> (N, size, size, 3) uint8: the shortest edge
    resized to `size` (bicubic; the long edge rounded down, as transformers does), then centre-cropped."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)  # already the model's size: Pillow would return a copy
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        if isinstance(im, np.ndarray):
            im = Image.fromarray(im)
        w, h = im.size
        if min(w, h) != size:
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        w, h = im.size
        top, left = (h - size) // 2, (w - size) // 2
        out[i] = np.asarray(im)[top:top + size, left:left + size]
    return out


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32: x/255, then (x - mean)/std per channel."""
    m, s = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    return (x.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255) - m) / s


def preprocess(images, size: int, mean, std) -> np.ndarray:
    """RGB images -> (N, 3, size, size) float32, CLIPImageProcessor's way (resize, crop, rescale, normalise)."""
    return normalize(resize_crop(images, size), mean, std)


# --- image-text sets -------------------------------------------------------------------------------

@dataclass
class ImageTextSet:
    """Images (a list of HxWx3 uint8 arrays, or one (N, H, W, 3) array) and their captions."""
    images: object
    texts: list[list[str]]
    labels: list[str]
    seen: list[bool] = field(default_factory=list)
    source: str = ""

    def __len__(self):
        return len(self.texts)


def save_split(d: Path, images: np.ndarray, texts: list[list[str]] | None, labels: list[str], seen: list[bool]):
    """texts None: the records name their label only (its captions are meta.json's)."""
    d.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(d / "images.npy", "wb") as f:
        np.save(f, images)
    atomic.write_text(d / "records.jsonl", "".join(
        json.dumps({**({"texts": texts[i]} if texts is not None else {}), "label": lab, "seen": s},
                   ensure_ascii=False) + "\n" for i, (lab, s) in enumerate(zip(labels, seen))))


def load_split(d: Path) -> ImageTextSet:
    """A built split. A record without "texts" takes its class's captions from meta.json beside the
    split (Fashion-MNIST: ~80 captions per class, stored once instead of on 70,000 lines)."""
    recs = []
    meta = d.parent / "meta.json"
    captions = (json.loads(meta.read_text(encoding="utf-8")).get("captions") or {}) if meta.exists() else {}
    with open(d / "records.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                texts = list(r["texts"]) if "texts" in r else captions[r["label"]]  # (one shared list per class)
                recs.append((texts, str(r["label"]), bool(r.get("seen", True))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{d / 'records.jsonl'}:{n}: not a record ({e})") from None
    images = np.load(d / "images.npy", mmap_mode="r")
    if len(images) != len(recs):
        raise UserError(f"{d}: images.npy has {len(images)} images but records.jsonl {len(recs)} lines")
    return ImageTextSet(images, [r[0] for r in recs], [r[1] for r in recs], [r[2] for r in recs], str(d))


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def list_images(d: Path) -> list[Path]:
    if not d.is_dir():
        raise UserError(f"--images {d} is not a folder")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"{d} holds no images ({', '.join(IMAGE_EXTS)})")
    return files


def read_user_set(d: Path) -> ImageTextSet:
    """A user's folder: captions.jsonl + images, or one sub-folder of images per class."""
    cap = d / "captions.jsonl"
    images, texts, labels = [], [], []
    if cap.exists():
        with open(cap, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{cap}:{n}"
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not JSON ({e.msg})") from None
                if not isinstance(r, dict) or not isinstance(r.get("image"), str) or "text" not in r:
                    raise UserError(f'{where}: expected {{"image": path, "text": caption}}')
                t = [r["text"]] if isinstance(r["text"], str) else r["text"]
                if not isinstance(t, list) or not t or not all(isinstance(x, str) and x.strip() for x in t):
                    raise UserError(f"{where}: text must be a non-empty string or list of strings")
                p = d / r["image"]
                if not p.is_file():
                    raise UserError(f"{where}: image {r['image']!r} not found (looked for {p})")
                images.append(np.asarray(read_image(p, f"{where}: {p}")))
                texts.append(t)
                labels.append(t[0])
    elif d.is_dir():
        classes = sorted(c for c in d.iterdir() if c.is_dir())
        if not classes:
            raise UserError(f"{d} has neither captions.jsonl nor one sub-folder of images per class")
        for c in classes:
            files = list_images(c)
            name = c.name.replace("_", " ")
            for p in files:
                images.append(np.asarray(read_image(p)))
                texts.append(class_captions(name))
                labels.append(name)
    else:
        raise UserError(f"--data {d} is not a folder")
    if not texts:
        raise UserError(f"{cap} has no records")
    return ImageTextSet(images, texts, labels, [True] * len(texts), str(d))


def read_set(d: str | Path) -> ImageTextSet:
    """A built split (images.npy + records.jsonl) or a user's folder."""
    d = Path(d)
    if (d / "records.jsonl").exists() and (d / "images.npy").exists():
        return load_split(d)
    return read_user_set(d)


# --- the built-in sets --------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): magic 0x0000 0x08 <ndim>, then ndim big-endian int32 sizes, then uint8s."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file")
    nd = raw[3]
    shape = tuple(int(x) for x in np.frombuffer(raw, ">i4", nd, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * nd)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: {data.size} bytes for shape {shape}")
    return data.reshape(shape)


def build_fashion(out: Path, src: Path = FASHION_DIR) -> dict:
    names = [c[0] for c in FASHION_CLASSES]
    caps = fashion_captions()
    counts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        files = [src / f"{prefix}-{k}-ubyte.gz" for k in ("images-idx3", "labels-idx1")]
        if not all(f.exists() for f in files):
            raise UserError(f"Fashion-MNIST is not installed ({files[0]} is missing): "
                            f"apt-get install dataset-fashion-mnist (scripts/setup.sh does)")
        x, y = read_idx(files[0]), read_idx(files[1])
        keep = np.ones(len(y), bool) if split == "test" else ~np.isin(y, [names.index(h) for h in HELD_OUT])
        x, y = x[keep], y[keep]
        rgb = np.repeat(x[..., None], 3, axis=-1)  # grey -> RGB, as convert("RGB") does
        save_split(out / split, rgb, None, [names[i] for i in y], [names[i] not in HELD_OUT for i in y])
        counts[split] = int(len(y))
    meta = {"source": "Debian dataset-fashion-mnist (MIT)", "classes": names,
            "classes_zh": [c[1] for c in FASHION_CLASSES], "held_out": list(HELD_OUT),
            "attributes": {k: [a[0] for a in v] for k, v in FASHION_ATTRS.items()}, "captions": caps, "counts": counts,
            "splits": "train: the official training images of the 7 seen classes; test: all 10,000 test images"}
    atomic.write_json(out / "meta.json", meta)
    return meta


def _open_tarball(path: Path):
    if not path.exists():
        raise UserError(f"{path} is missing: run scripts/setup.sh (npm pack {path.name.rsplit('-', 1)[0]})")
    return tarfile.open(path, "r:gz")


def build_emoji(out: Path, sources: Path) -> dict:
    img_tgz, data_tgz = (sources / n for n in EMOJI_PACKAGES)
    with _open_tarball(data_tgz) as t:
        en = json.load(t.extractfile("package/en/data.json"))
        zh = {e["hexcode"]: e for e in json.load(t.extractfile("package/zh/data.json"))}
    pngs = {}
    with _open_tarball(img_tgz) as t:
        for m in t:
            if m.isfile() and m.name.startswith("package/img/google/64/") and m.name.endswith(".png"):
                pngs[m.name.rsplit("/", 1)[1][:-4].replace("-fe0f", "")] = t.extractfile(m).read()
    splits = {"train": ([], [], [], []), "test": ([], [], [], []), "heldout": ([], [], [], [])}
    skipped = 0
    for e in sorted(en, key=lambda e: e["hexcode"]):
        key = e["hexcode"].lower()
        png = pngs.get(key.replace("-fe0f", ""))  # the two packages differ on where FE0F is written
        if png is None or e.get("group") is None or e["group"] == 2:  # 2: skin-tone/hair components
            skipped += 1
            continue
        z = zh.get(e["hexcode"], {})
        texts = [f"an emoji of {e['label']}", e["label"], f"{e['label']}: {', '.join(e.get('tags') or [])}"]
        if z.get("label"):
            texts += [f"{z['label']}的表情符号", z["label"]]
        if z.get("tags"):
            texts.append(f"{z['label']}：{'、'.join(z['tags'])}")
        held = e["group"] == EMOJI_HELD_OUT_GROUP
        split = "heldout" if held else ("test" if int(e["hexcode"].split("-")[0], 16) % 10 == 0 else "train")
        im = np.asarray(read_image(png, f"{img_tgz}: {key}.png"))
        for lst, v in zip(splits[split], (im, texts, e["label"], not held)):
            lst.append(v)
    counts = {}
    for split, (ims, texts, labels, seen) in splits.items():
        save_split(out / split, np.stack(ims) if ims else np.zeros((0, 64, 64, 3), np.uint8), texts, labels, seen)
        counts[split] = len(labels)
    meta = {"source": "npm emoji-datasource-google 16.0.0 (images, Apache-2.0) + emojibase-data 17.0.0 "
            "(names/tags en+zh, MIT)", "held_out_group": "food & drink (emojibase group 4)", "counts": counts,
            "skipped": skipped, "splits": "heldout: every food & drink emoji; test: other emoji whose first "
            "code point is divisible by 10; train: the rest"}
    atomic.write_json(out / "meta.json", meta)
    return meta


def build_images(out: Path, sources_dir: str | Path, fashion_dir: Path = FASHION_DIR) -> dict:
    """OUT/images/{fashion,emoji}: see the module docstring. Each set is built in a temporary sibling
    and renamed into place, so a failure leaves no half-built set."""
    out = Path(out) / "images"
    res = {}
    for name, fn in (("fashion", lambda d: build_fashion(d, fashion_dir)),
                     ("emoji", lambda d: build_emoji(d, Path(sources_dir)))):
        with atomic.atomic_dir(out / name) as tmp:
            res[name] = fn(Path(tmp))
    return res


__all__ = ["FASHION_CLASSES", "HELD_OUT", "ImageTextSet", "read_image", "to_rgb", "preprocess", "resize_crop", "normalize", "read_set",
           "list_images", "read_idx", "build_images", "class_captions"]
