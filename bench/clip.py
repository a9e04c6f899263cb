#!/usr/bin/env python
"""The clip family against two baselines, in one run, on the built-in image sets.

    zero-shot top-1 on the Fashion-MNIST test set (10,000 images): the model trained on the 7 seen
        classes, classifying among all 10 class prompts, seen and held-out classes separately (and
        the held-out images among the 3 held-out classes alone)
    baselines, supervised on all 60,000 training images of all 10 classes:
        a linear probe: logistic regression on the frozen clip image embeddings
        logistic regression on the raw 784 pixels
    retrieval recall@1/5/10 on the held-out emoji (food & drink, never trained on), both directions
    training images/s (the trainer's progress) and `clip embed`'s images/s

Training goes through `chatsmith clip train` with a minutes budget, so the number of steps depends
on how busy the machine is (it is printed, and the run can be repeated with --max-steps). One torch
thread: on a shared 2-core machine OpenMP threads spinning against other processes made a step 10x
slower.

    python -m chatsmith data build --what images --out data
    nice -n 10 python bench/clip.py --data data/images --out runs/bench-clip --minutes 15
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (see the docstring)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from chatsmith.clip_engine import ClipEngine  # noqa: E402
from chatsmith.clip_verbs import render_grid, save_png  # noqa: E402
from chatsmith.data.images import FASHION_DIR, read_idx, read_set  # noqa: E402
from chatsmith.eval.clip import run_clip_eval  # noqa: E402

from cli_run import sh  # noqa: E402  (bench/ is on sys.path when a script runs)


def logreg(x_train, y_train, x_test, y_test, seen_mask) -> dict:
    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=300, C=1.0).fit(x_train, y_train)
    pred = clf.predict(x_test)
    return {"accuracy": float((pred == y_test).mean()), "accuracy_seen": float((pred[seen_mask] == y_test[seen_mask]).mean()),
            "accuracy_heldout": float((pred[~seen_mask] == y_test[~seen_mask]).mean()),
            "seconds": round(time.perf_counter() - t0, 1)}


# the README's picture: searches of the Fashion-MNIST test set in words; the last two describe held-out
# classes (ankle boot, pullover) by their attributes, words the model read about other classes
QUERIES = ("a bag to carry things", "clothing for the legs", "a shoe for the foot, low, closed with laces",
           "a shoe for the foot, high, covers the ankle", "a top for the upper body, long sleeves, no buttons")


def draw_grid(engine, test, test_vecs, path):
    grid = []
    for q in QUERIES:
        s = engine.embed_texts([q])[0] @ test_vecs.T
        grid.append((q, [(test.images[i], float(s[i])) for i in np.argsort(-s, kind="stable")[:8]]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(render_grid(grid, thumb=56), path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/images")
    ap.add_argument("--out", default="runs/bench-clip")
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--max-steps", type=int, default=None, help="fixed steps instead of the budget's fit")
    ap.add_argument("--grid", default="docs/clip_search.png", help="where the search-result picture goes")
    ap.add_argument("--grid-only", action="store_true", help="redraw the picture from OUT/model, nothing else")
    a = ap.parse_args()
    out, data = Path(a.out), Path(a.data)
    if a.grid_only:
        engine, test = ClipEngine.load(out / "model"), read_set(data / "fashion/test")
        draw_grid(engine, test, engine.embed_images(test.images), a.grid)
        return
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    res = {"machine": "2 CPU cores shared with other agents' jobs, 1 torch thread", "minutes_budget": a.minutes}
    train_args = ["clip", "train", "--data", data / "fashion/train", data / "emoji/train", "--val", data / "emoji/test",
                  "--out", model, "--log-every", 20, "--eval-every", 200, "--save-every", 200]
    train_args += ["--max-steps", a.max_steps] if a.max_steps else ["--max-minutes", a.minutes]
    res["train_seconds"] = round(sh(*train_args, log=out / "train.log"), 1)
    summary = json.loads((model / "train_summary.json").read_text())
    rows = [json.loads(x) for x in (model / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]  # the first window holds one-off costs
    res["train"] = {"steps": summary["steps"], "images_seen": summary["tokens"], "seconds": summary["seconds"],
                    "images_per_s_median": float(np.median(speeds)) if speeds else None, "params": summary["params"]}
    print(json.dumps(res["train"]), flush=True)

    metrics = run_clip_eval(model, ["clip"], out=model / "eval", images_root=str(data), quiet=True)
    res["zero_shot"] = {k: v for k, v in metrics["tasks"]["fashion_zero_shot"].items()
                        if k not in ("confusion_matrix", "labels", "kind")}
    res["emoji_heldout_retrieval"] = {k: v for k, v in metrics["tasks"]["emoji_heldout_retrieval"].items() if k != "kind"}
    print(json.dumps(res["zero_shot"]), flush=True)

    # baselines: supervised on all 60k training images (all 10 classes), same 10k test images
    engine = ClipEngine.load(model)
    x_tr = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    y_tr = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz").astype(int)
    test = read_set(data / "fashion/test")
    x_te = np.asarray(test.images)
    y_te = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").astype(int)
    seen = np.array(test.seen, bool)
    t0 = time.perf_counter()
    e_te = engine.embed_images(x_te)
    res["embed_images_per_s"] = round(len(x_te) / (time.perf_counter() - t0), 1)
    e_tr = engine.embed_images(np.repeat(x_tr[..., None], 3, -1))
    res["linear_probe"] = logreg(e_tr, y_tr, e_te, y_te, seen)
    print("probe", json.dumps(res["linear_probe"]), flush=True)
    res["pixels_logreg"] = logreg(x_tr.reshape(len(x_tr), -1) / 255.0, y_tr, x_te[..., 0].reshape(len(x_te), -1) / 255.0,
                                  y_te, seen)
    print("pixels", json.dumps(res["pixels_logreg"]), flush=True)
    # `clip embed` as a user runs it, on the held-out emoji written out as PNG files
    emoji = read_set(data / "emoji/heldout")
    folder = out / "emoji_heldout_png"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(emoji.images):
        Image.fromarray(np.asarray(im)).save(folder / f"{i:04d}.png")
    t0 = time.perf_counter()
    sh("clip", "embed", model, "--images", folder, "--out", out / "emoji.npy", log=out / "embed.log")
    res["clip_embed_cli_seconds"] = round(time.perf_counter() - t0, 2)
    res["clip_embed_cli"] = (out / "embed.log").read_text().strip().splitlines()[-1]
    draw_grid(engine, test, e_te, a.grid)
    res["grid"] = a.grid
    (out / "bench.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(res, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
