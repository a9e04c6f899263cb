#!/usr/bin/env python
"""The classical baseline for the built-in sentiment sets: TF-IDF features + logistic regression.

The bar an encoder has to clear (issue 15: fine-tuned MiniLM should beat it by >= 3 points of
accuracy). Trained on each set's train.jsonl, scored on its test.jsonl with the same metrics
`classify eval` reports (chatsmith.eval.classification):

    en, en-reviews  word 1-2 grams (sublinear tf), lower-cased: the texts are already
                    tokenised with spaces around punctuation, so words are the natural unit
    zh              character 1-3 grams: Chinese has no spaces, and character n-grams are the
                    usual segmentation-free baseline (no jieba dictionary needed)

The regularisation strength C is picked by 5-fold cross-validation on train only, so the test
split is touched once. Build the sets first:

    python -m chatsmith data build --what sentiment --out data
    python bench/sentiment_baseline.py --data data/sentiment [--sets en zh] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from chatsmith.data.labelled import read_eval, read_train
from chatsmith.eval.classification import classification_report

FEATURES = {
    "en": dict(analyzer="word", ngram_range=(1, 2), lowercase=True, sublinear_tf=True, min_df=1,
               token_pattern=r"(?u)\b\w[\w']*\b|[!?]"),
    "zh": dict(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
}
C_GRID = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def run(set_dir: Path, name: str, seed: int) -> dict:
    train = read_train(set_dir / "train.jsonl")
    test = read_eval(set_dir / "test.jsonl", train.labels)
    feats = FEATURES["zh" if name.startswith("zh") else "en"]
    pipe = make_pipeline(TfidfVectorizer(**feats), LogisticRegression(max_iter=2000, random_state=seed))
    search = GridSearchCV(pipe, {"logisticregression__C": C_GRID}, cv=5, scoring="accuracy", n_jobs=1)
    t0 = time.perf_counter()
    search.fit([e.text for e in train.examples], [e.label for e in train.examples])
    pred = list(search.predict([e.text for e in test.examples]))
    rep = classification_report([e.label for e in test.examples], pred, train.labels)
    return {"set": name, "train": len(train.examples), "test": len(test.examples),
            "C": search.best_params_["logisticregression__C"], "cv_accuracy": search.best_score_,
            "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
            "confusion_matrix": rep["confusion_matrix"], "labels": rep["labels"],
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/sentiment", help="the OUT/sentiment folder of `data build --what sentiment`")
    ap.add_argument("--sets", nargs="+", help="sets to run (default: every set in --data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    root = Path(a.data)
    names = a.sets or sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file()) if root.is_dir() else []
    if not names:
        print(f"no sentiment sets under {root}: run `python -m chatsmith data build --what sentiment`", file=sys.stderr)
        return 2
    results = []
    print(f"{'set':<12}{'train':>7}{'test':>6}{'C':>6}{'cv acc':>8}{'accuracy':>10}{'macro-F1':>10}")
    for name in names:
        r = run(root / name, name, a.seed)
        results.append(r)
        print(f"{name:<12}{r['train']:>7}{r['test']:>6}{r['C']:>6g}{100 * r['cv_accuracy']:>8.2f}"
              f"{100 * r['accuracy']:>10.2f}{100 * r['macro_f1']:>10.2f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
