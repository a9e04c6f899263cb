"""`chatsmith clip classify | search | embed`: using a trained clip model on a folder of images.

    chatsmith clip classify runs/clip --images photos/ --labels "t-shirt,trouser,sneaker"
    chatsmith clip search   runs/clip --images photos/ --query "a red heart" --top-k 5 [--grid top.png]
    chatsmith clip embed    runs/clip --images photos/ --out vectors.npy     (or .jsonl; --text for captions)

classify is zero-shot: each label becomes a prompt ensemble (every --template with the label in
place of {}), the image goes to the label whose ensemble vector is nearest. Every input is checked
(labels, templates, each image decoded) before anything is printed or written, and files are
written atomically: a bad input is one clear line, exit 2, and no half-written output.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from chatsmith import atomic
from chatsmith.clip_engine import DEFAULT_TEMPLATES, ClipEngine, label_prompts, parse_labels
from chatsmith.config import DEVICES
from chatsmith.data.images import list_images, read_image
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.runtime import resolve_device


def _load_images(folder: str) -> tuple[list[Path], list[np.ndarray]]:
    files = list_images(Path(folder))
    return files, [np.asarray(read_image(p)) for p in files]  # each bad file named, before any output


def _common(p, images_required: bool = True):
    p.add_argument("model", help="a clip model directory (`chatsmith clip train`)")
    p.add_argument("--images", required=images_required, help="a folder of images (searched recursively)")
    p.add_argument("--batch-size", type=int, default=256, help="images or captions per forward pass")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (auto: cuda, else mps, else cpu)")


def _engine(a) -> ClipEngine:
    if a.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return ClipEngine.load(a.model, device=resolve_device(a.device), batch_size=a.batch_size)


def _write_lines(out: str | None, rows: list[dict]):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out:
        atomic.write_text(out, text)
    else:
        sys.stdout.write(text)


# --- classify -----------------------------------------------------------------------------------------

def _classify_arguments(p):
    _common(p)
    p.add_argument("--labels", required=True, help='comma-separated class names, e.g. "t-shirt,trouser,bag"')
    p.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="a prompt with {} for the label; repeat for an ensemble (default: "
                   + " | ".join(DEFAULT_TEMPLATES) + ")")
    p.add_argument("--top-k", type=int, default=3, help="labels listed per image with their probabilities")
    p.add_argument("--out", default=None, help="write the JSON lines here instead of stdout")


def _classify_main(a):
    labels = parse_labels(a.labels)
    prompts = label_prompts(labels, tuple(a.template) if a.template else DEFAULT_TEMPLATES)
    if a.top_k < 1:
        raise UserError("--top-k must be at least 1")
    engine = _engine(a)  # a wrong model directory fails before a big folder is decoded
    files, images = _load_images(a.images)
    probs = engine.probabilities(engine.embed_images(images), engine.class_vectors(prompts))
    rows = []
    for f, p in zip(files, probs):
        order = np.argsort(-p, kind="stable")[:a.top_k]
        rows.append({"image": str(f), "label": labels[order[0]],
                     "top": [{"label": labels[i], "prob": round(float(p[i]), 6)} for i in order]})
    _write_lines(a.out, rows)


# --- search ------------------------------------------------------------------------------------------

def render_grid(rows: list[tuple[str, list[tuple[np.ndarray, float]]]], thumb: int = 64) -> Image.Image:
    """One row per query: its text, then its top images with their cosine scores below them."""
    k = max(len(r[1]) for r in rows)
    text_w, cell_h = 320, thumb + 16
    grid = Image.new("RGB", (text_w + k * (thumb + 4), len(rows) * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (query, hits) in enumerate(rows):
        y = r * (cell_h + 4)
        draw.text((4, y + thumb // 2 - 6), query[:52], fill="black")  # Pillow's default font: Latin only
        for c, (im, score) in enumerate(hits):
            x = text_w + c * (thumb + 4)
            grid.paste(Image.fromarray(np.asarray(im, np.uint8)).convert("RGB").resize((thumb, thumb),
                                                                                  Image.Resampling.NEAREST), (x, y))
            draw.text((x + 2, y + thumb + 2), f"{score:.3f}", fill="black")
    return grid


def save_png(img: Image.Image, path: str | Path):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with atomic.atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _search_arguments(p):
    _common(p)
    p.add_argument("--query", required=True, action="append", help="what to look for, in words; repeat for several")
    p.add_argument("--top-k", type=int, default=5, help="matches listed per query")
    p.add_argument("--grid", default=None, metavar="PNG", help="also draw the matches as an image grid here")


def _search_main(a):
    queries = [q.strip() for q in a.query]
    if not all(queries):
        raise UserError("--query is empty: say what to look for")
    if a.top_k < 1:
        raise UserError("--top-k must be at least 1")
    engine = _engine(a)  # a wrong model directory fails before a big folder is decoded
    files, images = _load_images(a.images)
    sim = engine.embed_texts(queries) @ engine.embed_images(images).T
    rows, grid = [], []
    for q, s in zip(queries, sim):
        order = np.argsort(-s, kind="stable")[:a.top_k]
        rows += [{"query": q, "rank": r + 1, "image": str(files[i]), "score": round(float(s[i]), 6)}
                 for r, i in enumerate(order)]
        grid.append((q, [(images[i], float(s[i])) for i in order]))
    if a.grid:
        save_png(render_grid(grid), a.grid)
    _write_lines(None, rows)


# --- embed --------------------------------------------------------------------------------------------

def _embed_arguments(p):
    _common(p, images_required=False)
    p.add_argument("--text", action="append", default=None, help="a caption to embed; repeat for several")
    p.add_argument("--out", required=True, help="FILE.jsonl ({image|text, embedding} per line) or FILE.npy "
                   "(the matrix, with FILE.index.jsonl naming its rows)")


def _embed_main(a):
    if not (a.images or a.text):
        raise UserError("nothing to embed: pass --images DIR and/or --text CAPTION")
    out = Path(a.out)
    if out.suffix not in (".jsonl", ".npy"):
        raise UserError(f"--out {out}: write .jsonl or .npy")
    texts = [t for t in a.text or []]
    if any(not t.strip() for t in texts):
        raise UserError("--text is empty")
    engine = _engine(a)
    files, images = _load_images(a.images) if a.images else ([], [])
    t0 = time.time()
    iv = engine.embed_images(images)
    dt = time.time() - t0
    tv = engine.embed_texts(texts)
    index = [{"image": str(f)} for f in files] + [{"text": t} for t in texts]
    vecs = np.concatenate([iv, tv]) if len(texts) else iv
    if out.suffix == ".npy":
        with atomic.atomic_file(out, "wb") as f:
            np.save(f, vecs.astype(np.float32))
        atomic.write_text(out.with_suffix(".index.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                  for r in index))
    else:
        _write_lines(str(out), [{**r, "embedding": [round(float(x), 6) for x in v]} for r, v in zip(index, vecs)])
    speed = f", {len(images) / max(dt, 1e-9):.0f} images/s" if images else ""
    print(f"{len(index)} vectors of {vecs.shape[1]} dimensions written to {out}{speed}", file=sys.stderr)


CLASSIFY_VERB = Verb("clip classify", "zero-shot image classification with a clip model (labels in words)",
                     _classify_arguments, _classify_main)
SEARCH_VERB = Verb("clip search", "find the images that best match a text query", _search_arguments, _search_main)
EMBED_VERB = Verb("clip embed", "image and caption vectors of a clip model as JSONL or .npy", _embed_arguments,
                  _embed_main)

__all__ = ["CLASSIFY_VERB", "SEARCH_VERB", "EMBED_VERB", "render_grid", "save_png"]
