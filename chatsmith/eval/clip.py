"""`chatsmith eval MODEL --tasks clip [clip:DIR ...]`: zero-shot accuracy and retrieval recall of a clip model.

`clip` is the built-in pair of sets (`chatsmith data build --what images`, under --images-root):

- Fashion-MNIST test (10,000 images): zero-shot top-1 over all 10 class prompts, reported for the
  7 seen classes and the 3 held-out ones separately, plus held-out images among the held-out
  classes alone (what a zero-shot classifier for new classes is asked in practice). Each class's
  prompt is the ensemble of its caption templates (English and Chinese, with its description).
- held-out emoji (the food & drink group, never trained on): image->text and text->image recall@1/5/10.

`clip:DIR` is any set (a built split or your folder): zero-shot over its labels when labels repeat
(classes), retrieval when every image has its own captions. The confusion matrix and the top
matches of a few queries go to clip_figures.json beside metrics.json, for `chatsmith report`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from chatsmith.atomic import write_json
from chatsmith.clip_engine import DEFAULT_TEMPLATES, ClipEngine, label_prompts, recall_at_k
from chatsmith.data.images import ImageTextSet, read_set
from chatsmith.errors import UserError


def _subset(s: ImageTextSet, limit: int | None) -> ImageTextSet:
    if not limit or limit >= len(s):
        return s
    return ImageTextSet(s.images[:limit], s.texts[:limit], s.labels[:limit], s.seen[:limit], s.source)


def _class_prompts(d: Path, labels: list[str]) -> list[list[str]]:
    """The set's own caption templates per class (meta.json beside a built split), else the defaults."""
    meta = d.parent / "meta.json"
    caps = {}
    if meta.exists():
        try:
            caps = json.loads(meta.read_text()).get("captions") or {}
        except json.JSONDecodeError:
            caps = {}
    if all(lab in caps for lab in labels):
        return [caps[lab] for lab in labels]
    return label_prompts(labels, DEFAULT_TEMPLATES)


def zero_shot(engine: ClipEngine, s: ImageTextSet, prompts: list[list[str]], labels: list[str],
              image_vecs: np.ndarray | None = None) -> dict:
    """Top-1 over `labels` (overall, seen, held-out), held-out among held-out, and the confusion matrix."""
    iv = engine.embed_images(s.images) if image_vecs is None else image_vecs
    cv = engine.class_vectors(prompts)
    y = np.array([labels.index(lab) for lab in s.labels])
    pred = (iv @ cv.T).argmax(1)
    seen = np.array(s.seen, bool)
    r = {"kind": "clip", "n": len(y), "accuracy": float((pred == y).mean()), "labels": labels}
    if seen.any():
        r["accuracy_seen"] = float((pred[seen] == y[seen]).mean())
    if (~seen).any():
        held = sorted({labels.index(lab) for lab, sn in zip(s.labels, s.seen) if not sn})
        r["accuracy_heldout"] = float((pred[~seen] == y[~seen]).mean())
        sub = (iv[~seen] @ cv[held].T).argmax(1)  # among the held-out classes alone
        r["accuracy_heldout_among_heldout"] = float((np.array(held)[sub] == y[~seen]).mean())
        r["heldout_classes"] = [labels[i] for i in held]
        r["chance_heldout_among_heldout"] = 1 / len(held)
    cm = np.zeros((len(labels), len(labels)), int)
    np.add.at(cm, (y, pred), 1)
    r["confusion_matrix"] = cm.tolist()
    return r


def retrieval(engine: ClipEngine, s: ImageTextSet) -> dict:
    iv = engine.embed_images(s.images)
    tv = engine.embed_texts([t for ts in s.texts for t in ts])
    return {"kind": "clip", "n": len(s), **recall_at_k(iv, s.texts, tv)}, iv


def top_matches(engine: ClipEngine, image_vecs: np.ndarray, queries: list[str], k: int = 8,
                query_vecs: np.ndarray | None = None) -> list[dict]:
    qv = engine.embed_texts(queries) if query_vecs is None else query_vecs
    sim = qv @ image_vecs.T
    return [{"query": q, "images": np.argsort(-row, kind="stable")[:k].tolist(),
             "scores": np.sort(row)[::-1][:k].round(4).tolist()} for q, row in zip(queries, sim)]


def evaluate_set(engine: ClipEngine, d: Path, limit: int | None, name: str) -> tuple[dict, dict]:
    s = _subset(read_set(d), limit)
    labels = list(dict.fromkeys(s.labels))
    figures = {"set": str(d), "limit": limit}
    results = {}
    if len(labels) < len(s):  # labels repeat: a classification set
        if len(labels) < 2:
            raise UserError(f"{d}: every image has the label {labels[0]!r}; zero-shot needs two classes")
        labels = sorted(labels)
        iv = engine.embed_images(s.images)
        prompts = _class_prompts(d, labels)
        r = zero_shot(engine, s, prompts, labels, iv)
        results[f"{name}_zero_shot"] = r
        figures["confusion"] = {"labels": labels, "matrix": r["confusion_matrix"]}
        # the queries are classes: each searched with its prompt ensemble, as classified
        picked = np.linspace(0, len(labels) - 1, min(4, len(labels))).astype(int)
        figures["matches"] = top_matches(engine, iv, [f"{labels[i]} (prompt ensemble)" for i in picked],
                                         query_vecs=engine.class_vectors([prompts[i] for i in picked]))
    else:
        r, iv = retrieval(engine, s)
        results[f"{name}_retrieval"] = r
        qs = [s.texts[i][0] for i in np.linspace(0, len(s) - 1, 4).astype(int)]
        figures["matches"] = top_matches(engine, iv, qs)
    return results, figures


def run_clip_eval(model_dir, tasks: list[str], out=None, limit: int | None = None, device: str = "cpu",
                  images_root: str = "data/images", quiet: bool = False) -> dict:
    t0 = time.time()
    sets = []
    for t in tasks:
        if t == "clip":
            root = Path(images_root)
            for sub, name in (("fashion/test", "fashion"), ("emoji/heldout", "emoji_heldout")):
                if not (root / sub / "records.jsonl").exists():
                    raise UserError(f"--tasks clip needs {root / sub}: run `chatsmith data build --what images` "
                                    f"(or pass --images-root)")
                sets.append((root / sub, name))
        elif t.startswith("clip:"):
            sets.append((Path(t[5:]), Path(t[5:]).name or "set"))
        else:
            raise UserError(f"--tasks {t!r}: clip tasks run on their own (clip, clip:DIR)")
    engine = ClipEngine.load(model_dir, device=device)
    results, figures = {}, {}
    for d, name in sets:
        r, f = evaluate_set(engine, d, limit, name)
        results.update(r)
        figures[name] = f
    metrics = {"model": str(model_dir), "tasks": results, "seconds": round(time.time() - t0, 3),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out_dir = Path(out) if out is not None else Path(model_dir) / "eval"
    write_json(out_dir / "clip_figures.json", figures)
    write_json(out_dir / "metrics.json", metrics)  # last: a metrics.json always has its figures beside it
    metrics["path"] = str(out_dir / "metrics.json")
    if not quiet:
        for name, r in results.items():
            shown = {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
            print(f"{name}: " + "  ".join(f"{k} {v}" for k, v in shown.items()))
        print(f"metrics written to {metrics['path']}")
    return metrics


__all__ = ["run_clip_eval", "zero_shot", "retrieval", "top_matches"]
