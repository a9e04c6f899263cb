"""Classification metrics: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix.

Written with numpy rather than imported from scikit-learn: these are a few lines each, and
importing ``sklearn.metrics`` costs about a second at every CLI start. The tests check them
against scikit-learn (``accuracy_score``, ``f1_score(average="macro")``, ``confusion_matrix``).

Conventions (scikit-learn's defaults): the confusion matrix has gold labels as rows and
predictions as columns, in the order of ``labels``; a class's precision (recall) is 0 when
nothing was predicted as (is) that class; macro-F1 is the unweighted mean F1 over the classes
that occur in the gold labels or in the predictions, so a class the model knows but the test
set never mentions and the model never predicts does not drag the mean down.
"""

from __future__ import annotations

import numpy as np

from chatsmith.errors import UserError


def confusion_matrix(gold: list[str], pred: list[str], labels: list[str]) -> np.ndarray:
    """``m[i, j]`` = how many items of gold class ``labels[i]`` were predicted ``labels[j]``."""
    if len(gold) != len(pred):
        raise UserError(f"{len(gold)} gold labels but {len(pred)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({x for x in (*gold, *pred) if x not in index})
    if unknown:
        raise UserError(f"label {unknown[0]!r} is not one of {', '.join(map(repr, labels))}")
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(m, (np.array([index[g] for g in gold], dtype=np.int64),
                  np.array([index[p] for p in pred], dtype=np.int64)), 1)
    return m


def classification_report(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """accuracy, macro_f1, per-class precision/recall/F1/support, and the confusion matrix
    (as nested lists, rows = gold), JSON-ready."""
    if not gold:
        raise UserError("no items to score")
    m = confusion_matrix(gold, pred, labels)
    tp = np.diag(m).astype(np.float64)
    predicted, support = m.sum(axis=0), m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (predicted + support) > 0
    return {
        "accuracy": float(tp.sum() / m.sum()),
        "macro_f1": float(f1[present].mean()),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]),
                              "f1": float(f1[i]), "support": int(support[i])}
                      for i, label in enumerate(labels)},
        "labels": list(labels),
        "confusion_matrix": m.tolist(),
        "total": int(m.sum()),
    }


__all__ = ["confusion_matrix", "classification_report"]
