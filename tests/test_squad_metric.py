"""SQuAD exact match / F1 against hand-computed cases (v1.1 and v2.0 no-answer), and the
classification metrics against hand-computed cases and scikit-learn."""

import random

import pytest

from chatsmith.errors import UserError
from chatsmith.eval.classification import classification_report, confusion_matrix
from chatsmith.eval.squad import exact_match, f1, normalize_answer, score_question, squad_scores


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an  apple,  a   pear ", "apple pear"),
    ("Theatre", "theatre"),            # "the" only as a whole word
    ("A.D. 1066", "ad 1066"),          # punctuation goes before articles are matched
    ("the", ""),
    ("“smart” quotes", "“smart” quotes"),  # only ASCII punctuation, as in the official script
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos", "Denver Broncos") == 1
    assert exact_match("Denver", "Denver Broncos") == 0
    # pred {denver}, gold {denver, broncos}: P = 1, R = 1/2, F1 = 2/3
    assert f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    # pred "the cat sat on mat" -> [cat sat on mat]; gold "a cat on the hat" -> [cat on hat]
    # common = {cat, on} = 2; P = 2/4, R = 2/3; F1 = 2*(1/2)(2/3)/(1/2+2/3) = 4/7
    assert f1("the cat sat on mat", "a cat on the hat") == pytest.approx(4 / 7)
    # multiset overlap: pred [a? no: "b b b"] -> [b b b]; gold [b c] -> common 1; P = 1/3, R = 1/2, F1 = 0.4
    assert f1("b b b", "b c") == pytest.approx(0.4)
    assert f1("nothing shared", "at all") == 0.0


def test_max_over_gold_answers():
    em, f = score_question("Broncos", ["Denver Broncos", "the Broncos", "Denver"])
    assert em == 1 and f == 1.0
    em, f = score_question("Denver team", ["Denver Broncos", "Broncos"])
    assert em == 0 and f == pytest.approx(0.5)  # vs "Denver Broncos": P 1/2, R 1/2


def test_v2_no_answer():
    assert score_question("", []) == (1, 1.0)           # abstaining on an unanswerable question
    assert score_question("Denver", []) == (0, 0.0)     # answering one
    assert score_question("", ["Denver"]) == (0, 0.0)   # abstaining on an answerable one
    assert score_question("the", []) == (1, 1.0)        # normalises to "" too
    golds = {"q1": ["Denver Broncos"], "q2": [], "q3": ["1066", "in 1066"], "q4": []}
    preds = {"q1": "Denver", "q2": "", "q3": "1066", "q4": "Paris"}
    s = squad_scores(golds, preds)
    # EM: q1 0, q2 1, q3 1, q4 0 -> 50; F1: 2/3, 1, 1, 0 -> (2/3 + 2)/4 = 66.67
    assert s["exact"] == pytest.approx(50.0) and s["f1"] == pytest.approx(100 * (2 / 3 + 2) / 4)
    assert s["total"] == 4
    assert s["HasAns"] == pytest.approx({"exact": 50.0, "f1": 100 * (2 / 3 + 1) / 2, "total": 2})
    assert s["NoAns"] == pytest.approx({"exact": 50.0, "f1": 50.0, "total": 2})


def test_v1_has_no_noans_block_and_missing_prediction_is_an_error():
    s = squad_scores({"a": ["x y"]}, {"a": "x y", "extra": "ignored"})
    assert s == {"exact": 100.0, "f1": 100.0, "total": 1, "HasAns": {"exact": 100.0, "f1": 100.0, "total": 1}}
    with pytest.raises(UserError, match="1 of 2 questions have no prediction .*'b'"):
        squad_scores({"a": ["x"], "b": ["y"]}, {"a": "x"})


def test_classification_by_hand():
    gold = ["pos", "pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "neg", "pos", "neg", "pos", "pos"]
    labels = ["neg", "neu", "pos"]
    assert confusion_matrix(gold, pred, labels).tolist() == [[1, 0, 1], [0, 0, 1], [1, 0, 2]]
    r = classification_report(gold, pred, labels)
    assert r["accuracy"] == pytest.approx(3 / 6)
    # neg: P 1/2 R 1/2 F 1/2; neu: 0; pos: P 2/4 R 2/3 F 4/7 -> macro (1/2 + 0 + 4/7)/3
    assert r["macro_f1"] == pytest.approx((0.5 + 0 + 4 / 7) / 3)
    assert r["per_class"]["pos"]["support"] == 3 and r["per_class"]["neu"]["f1"] == 0.0
    # a known label nobody uses (gold or predicted) is left out of the macro mean
    r2 = classification_report(gold, pred, labels + ["spam"])
    assert r2["macro_f1"] == pytest.approx(r["macro_f1"]) and len(r2["confusion_matrix"]) == 4
    with pytest.raises(UserError, match="'maybe' is not one of"):
        classification_report(["pos"], ["maybe"], labels)


def test_classification_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    labels = ["a", "b", "c", "d"]
    for _ in range(20):
        n = rng.randint(1, 60)
        gold = [rng.choice(labels[:3]) for _ in range(n)]
        pred = [rng.choice(labels) for _ in range(n)]
        r = classification_report(gold, pred, labels)
        assert r["accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred))
        assert r["macro_f1"] == pytest.approx(metrics.f1_score(gold, pred, average="macro", zero_division=0))
        assert r["confusion_matrix"] == metrics.confusion_matrix(gold, pred, labels=labels).tolist()
