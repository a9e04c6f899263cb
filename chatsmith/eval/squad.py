"""SQuAD exact match and F1, as the official v1.1 and v2.0 evaluation defines them.

Both compare *normalised* answers. Normalisation (:func:`normalize_answer`): lower-case,
delete every ASCII punctuation character (``string.punctuation``), delete the whole words
"a", "an" and "the", and collapse whitespace to single spaces.

- exact match: 1 when the normalised prediction equals a normalised gold answer, else 0.
- F1: over whitespace tokens of the normalised strings, with the overlap counted as a
  multiset (``common = |pred ∩ gold|`` with multiplicity); ``P = common/|pred|``,
  ``R = common/|gold|``, ``F1 = 2PR/(P+R)``, 0 when nothing is shared. When either side has no
  tokens at all (a no-answer, or an answer made only of articles and punctuation), F1 is 1 if
  both are empty and 0 otherwise.
- Each question takes the maximum over its gold answers; the totals are means over the
  questions, reported as percentages (0-100).
- v2.0: a question with no gold answer (``is_impossible``) has the gold list ``[""]``, so the
  prediction ``""`` (abstain) scores 1 on both metrics and any text scores 0; on an answerable
  question ``""`` scores 0. The totals are split into ``HasAns`` and ``NoAns`` as well.

The tokenisation is whitespace, as in the official script: a Chinese answer is one "token",
so F1 on unsegmented Chinese degenerates towards exact match.
"""

from __future__ import annotations

import collections
import re
import string

from chatsmith.errors import UserError

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score_question(prediction: str, golds: list[str]) -> tuple[int, float]:
    """(exact match, F1) of one prediction: the best over the gold answers; no gold answers
    (an unanswerable question) means the gold list is ``[""]``."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    return (max(exact_match(prediction, g) for g in golds),
            max(f1(prediction, g) for g in golds))


def squad_scores(golds: dict[str, list[str]], predictions: dict[str, str]) -> dict:
    """Totals over the questions in ``golds`` (id -> gold answer texts, ``[]`` for
    unanswerable). Every question needs a prediction: a missing one is an error, not a silent
    zero, since it means the predictions belong to a different file."""
    missing = [qid for qid in golds if qid not in predictions]
    if missing:
        raise UserError(f"{len(missing)} of {len(golds)} questions have no prediction "
                        f"(first: id {missing[0]!r})")
    if not golds:
        raise UserError("no questions to score")
    per = {qid: score_question(predictions[qid], g) for qid, g in golds.items()}

    def summary(ids: list[str]) -> dict:
        return {"exact": 100.0 * sum(per[i][0] for i in ids) / len(ids),
                "f1": 100.0 * sum(per[i][1] for i in ids) / len(ids), "total": len(ids)}

    out = summary(list(golds))
    has = [q for q, g in golds.items() if any(normalize_answer(a) for a in g)]
    no = [q for q in golds if q not in set(has)]
    if has:
        out["HasAns"] = summary(has)
    if no:
        out["NoAns"] = summary(no)
    return out


__all__ = ["normalize_answer", "exact_match", "f1", "score_question", "squad_scores"]
