"""The n-gram baseline: modified Kneser–Ney by hand, against a direct dict implementation,
against nltk's interpolated Kneser–Ney, normalisation, files, commands and bad input."""

import itertools
import json
import math
import random
from collections import Counter
from fractions import Fraction as F

import numpy as np
import pytest

from chatsmith.errors import UserError
from chatsmith.eval.ngram import NGramLM, eval_command, modified_kn_discounts, train_command
from chatsmith.tokenizer import train_tokenizer

# The tiny vocabulary of the hand-computed tests: s = bos, d never occurs in training.
S, A, B, C, D = range(5)
TINY = [[A, B, A, B, A, B, A, B, C], [A, C]]


def approx(x):
    return pytest.approx(float(x), rel=1e-12, abs=1e-15)


# --------------------------------------------------------------------------- by hand

def test_discounts_from_count_of_counts():
    # counts 1,1,1,1,2,2,3,4: n1=4 n2=2 n3=1 n4=1, Y = n1/(n1+2 n2) = 4/8 = 1/2
    # D1 = 1 - 2Y n2/n1 = 1 - 2(1/2)(2/4) = 1/2
    # D2 = 2 - 3Y n3/n2 = 2 - 3(1/2)(1/2) = 5/4
    # D3+ = 3 - 4Y n4/n3 = 3 - 4(1/2)(1/1) = 1
    d, ok = modified_kn_discounts(np.array([1, 1, 1, 1, 2, 2, 3, 4, 0]))
    assert ok and d == [approx(F(1, 2)), approx(F(5, 4)), approx(1)]
    # n2 = 0 while count 2 is absent: D1 = 1 - 0 = 1, the other classes unused (fallback values)
    d, ok = modified_kn_discounts(np.array([1, 1]))
    assert ok and d[0] == 1.0
    # counts >= 3 present but n3 = 0 (only a 4): D3+ cannot be estimated -> KenLM's fallback
    d, ok = modified_kn_discounts(np.array([1, 2, 4]))
    assert not ok and d == [0.5, 1.0, 1.5]


def test_hand_computed_bigram():
    # Padded docs: s a b a b a b a b c | s a c
    # Bigram raw counts: (s,a)=2 (a,b)=4 (b,a)=3 (b,c)=1 (a,c)=1
    #   n1=2 n2=1 n3=1 n4=1, Y = 2/(2+2) = 1/2
    #   D1 = 1 - 2(1/2)(1/2) = 1/2, D2 = 2 - 3(1/2)(1/1) = 1/2, D3+ = 3 - 4(1/2)(1/1) = 1
    # Unigram continuation counts (distinct left neighbours): a {s,b}=2, b {a}=1, c {b,a}=2
    #   n1=1 n2=2 n3=0 n4=0, Y = 1/(1+4) = 1/5
    #   D1 = 1 - 2(1/5)(2/1) = 1/5, D2 = 2 - 3(1/5)(0/2) = 2, D3+ unused (fallback 1.5)
    #   sum = 5, gamma() = (D1*1 + D2*2)/5 = (1/5 + 4)/5 = 21/25, uniform 1/5
    #   P1(a) = (2-2)/5 + (21/25)(1/5) = 21/125
    #   P1(b) = (1-1/5)/5 + 21/125 = 20/125 + 21/125 = 41/125
    #   P1(c) = P1(s) = P1(d) = 21/125                 (sum 4*21 + 41 = 125)
    lm = NGramLM.train(TINY, order=2, vocab_size=5, bos_id=S)
    assert lm.discounts == [[approx(F(1, 5)), approx(2), 1.5], [approx(F(1, 2)), approx(F(1, 2)), approx(1)]]
    # history a: (a,b)=4, (a,c)=1, A=5, gamma = (D1*1 + D3*1)/5 = (1/2 + 1)/5 = 3/10
    #   P(b|a) = (4-1)/5 + (3/10)(41/125) = 750/1250 + 123/1250 = 873/1250
    #   P(c|a) = (1-1/2)/5 + (3/10)(21/125) = 125/1250 + 63/1250 = 188/1250
    #   P(d|a) = (3/10)(21/125) = 63/1250          (sum 873 + 188 + 3*63 = 1250)
    assert lm.prob((A,), B) == approx(F(873, 1250))
    assert lm.prob((A,), C) == approx(F(188, 1250))
    assert lm.prob((A,), D) == approx(F(63, 1250))
    # history b: (b,a)=3, (b,c)=1, A=4, gamma = (1/2 + 1)/4 = 3/8
    #   P(a|b) = (3-1)/4 + (3/8)(21/125) = 1/2 + 63/1000 = 563/1000
    assert lm.prob((B,), A) == approx(F(563, 1000))
    # history s: (s,a)=2, A=2, gamma = D2/2 = 1/4: P(a|s) = (2-1/2)/2 + (1/4)(21/125) = 396/500
    assert lm.prob((S,), A) == approx(F(396, 500))
    assert lm.prob((), A) == approx(F(396, 500))          # empty history = document start
    # c is never followed by anything and d never occurs: both back off to P1 entirely
    assert lm.prob((C,), B) == approx(F(41, 125))
    assert lm.prob((D,), A) == approx(F(21, 125))
    # log-probability of a document = sum over its tokens, from the bos-padded start
    assert lm.logprob_doc([A, C]) == approx(math.log(396 / 500) + math.log(188 / 1250))


def test_hand_computed_trigram():
    # Padded docs: s s a b a b a b a b c | s s a c
    # Trigram raw counts: (s,s,a)=2 (s,a,b)=1 (a,b,a)=3 (b,a,b)=3 (a,b,c)=1 (s,a,c)=1
    #   n1=3 n2=1 n3=2 n4=0, Y = 3/5, D2 = 2 - 3(3/5)(2/1) = -8/5 < 0: not estimable,
    #   the order falls back to D = 1/2, 1, 3/2
    # Bigram continuation counts (distinct left neighbours among the trigram types):
    #   (s,a){s}=1 (a,b){s,b}=2 (b,a){a}=1 (b,c){a}=1 (a,c){s}=1
    #   n1=4 n2=1 n3=0, Y = 4/6 = 2/3, D1 = 1 - 2(2/3)(1/4) = 2/3, D2 = 2 - 0 = 2
    # Unigram level: the bigram types are the same as in the bigram model, so P1 is as there:
    #   P1(b) = 41/125, P1(anything else) = 21/125
    lm = NGramLM.train(TINY, order=3, vocab_size=5, bos_id=S)
    assert lm.discounts[1][:2] == [approx(F(2, 3)), approx(2)]
    assert lm.discounts[2] == [0.5, 1.0, 1.5]
    assert lm.info["discounts_estimated"] == [True, True, False]
    # Bigram level:
    #   history a: (a,b)=2 (a,c)=1, A=3, gamma = (D2 + D1)/3 = (2 + 2/3)/3 = 8/9
    #     P2(b|a) = (2-2)/3 + (8/9)(41/125) = 328/1125
    #   history b: (b,a)=1 (b,c)=1, A=2, gamma = 2 D1/2 = 2/3
    #     P2(a|b) = (1-2/3)/2 + (2/3)(21/125) = 125/750 + 84/750 = 209/750
    #     P2(b|b) = (2/3)(41/125) = 164/750, P2(s|b) = P2(d|b) = 84/750, P2(c|b) = 209/750
    #   history s: (s,a)=1, A=1, gamma = 2/3
    #     P2(a|s) = (1-2/3) + (2/3)(21/125) = 125/375 + 42/375 = 167/375
    #     P2(b|s) = (2/3)(41/125) = 82/375
    # Trigram level (D = 1/2, 1, 3/2):
    #   history (a,b): (a,b,a)=3 (a,b,c)=1, A=4, gamma = (D3 + D1)/4 = (3/2 + 1/2)/4 = 1/2
    #     P(a|a,b) = (3-3/2)/4 + (1/2)(209/750) = 1125/3000 + 418/3000 = 1543/3000
    #     P(c|a,b) = (1-1/2)/4 + (1/2)(209/750) = 375/3000 + 418/3000 = 793/3000
    #     P(b|a,b) = (1/2)(164/750) = 328/3000, P(d|a,b) = (1/2)(84/750) = 168/3000
    #     (sum 1543 + 793 + 328 + 2*168 = 3000)
    assert lm.prob((A, B), A) == approx(F(1543, 3000))
    assert lm.prob((A, B), C) == approx(F(793, 3000))
    assert lm.prob((A, B), B) == approx(F(328, 3000))
    assert lm.prob((A, B), D) == approx(F(168, 3000))
    #   history (s,a): (s,a,b)=1 (s,a,c)=1, A=2, gamma = 2 D1/2 = 1/2
    #     P(b|s,a) = (1-1/2)/2 + (1/2)(328/1125) = 1125/4500 + 656/4500 = 1781/4500
    assert lm.prob((S, A), B) == approx(F(1781, 4500))
    #   history (s,s): (s,s,a)=2, A=2, gamma = D2/2 = 1/2
    #     P(a|s,s) = (2-1)/2 + (1/2)(167/375) = 375/750 + 167/750 = 542/750
    #     P(b|s,s) = (1/2)(82/375) = 41/375
    assert lm.prob((S, S), A) == approx(F(542, 750))
    assert lm.prob((), B) == approx(F(41, 375))
    #   unseen histories back off: (c,a) was never followed -> P2(b|a); (d,d) -> P1(b)
    assert lm.prob((C, A), B) == approx(F(328, 1125))
    assert lm.prob((D, D), B) == approx(F(41, 125))
    # only the last order-1 tokens of a longer context count
    assert lm.prob((D, D, C, A, B), A) == lm.prob((A, B), A)


# --------------------------------------------------------------------------- definitions

def reference_probability(docs, order, vocab_size, bos_id, discount=None):
    """Interpolated (modified) Kneser–Ney straight from the definitions, with dicts of tuples."""
    counts = [Counter() for _ in range(order + 1)]
    for d in docs:
        p = [bos_id] * (order - 1) + list(d)
        for i in range(order - 1, len(p)):
            counts[order][tuple(p[i - order + 1:i + 1])] += 1
    for k in range(order - 1, 0, -1):            # continuation counts: distinct left neighbours
        for gram in counts[k + 1]:
            counts[k][gram[1:]] += 1
    disc = [None]
    for k in range(1, order + 1):
        if discount is not None:
            disc.append([discount] * 3)
            continue
        vals = list(counts[k].values())
        n = [vals.count(r) for r in range(5)]
        y = n[1] / (n[1] + 2 * n[2]) if n[1] + n[2] else 0.0
        ds = []
        for r, present in ((1, n[1] > 0), (2, n[2] > 0), (3, any(v >= 3 for v in vals))):
            ds.append(r - (r + 1) * y * n[r + 1] / n[r] if present and n[r] else [0.5, 1.0, 1.5][r - 1])
        if not all(0 < x <= r for r, x in enumerate(ds, 1)):
            ds = [0.5, 1.0, 1.5]
        disc.append(ds)
    by_history = [{} for _ in range(order + 1)]
    for k in range(1, order + 1):
        for gram, c in counts[k].items():
            by_history[k].setdefault(gram[:-1], []).append(c)

    def prob(history, w, k=order):
        if k == 0:
            return 1.0 / vocab_size
        h = tuple(history[len(history) - (k - 1):]) if k > 1 else ()
        lower = prob(history, w, k - 1)
        cs = by_history[k].get(h)
        if not cs:
            return lower
        dof = lambda c: disc[k][min(c, 3) - 1] if c else 0.0   # noqa: E731
        a = counts[k].get(h + (w,), 0)
        return (a - dof(a)) / sum(cs) + sum(map(dof, cs)) / sum(cs) * lower

    return prob


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("discount", [None, 0.3])
def test_matches_a_direct_implementation_of_the_definitions(order, discount):
    rng = random.Random(order)
    V, bos = 80, 0
    # heavy-tailed token frequencies: most orders have estimable discounts (order 4's bigram
    # level falls back), and the top token id never occurs
    docs = [[min(int(rng.paretovariate(0.8)), V - 2) for _ in range(rng.randint(0, 60))]
            for _ in range(40)]
    lm = NGramLM.train(docs, order, V, bos, discount=discount)
    if discount is None:
        expected = [True, False, True, True] if order == 4 else [True] * order
        assert lm.info["discounts_estimated"] == expected
    ref = reference_probability(docs, order, V, bos, discount)
    histories = [tuple(rng.randrange(V) for _ in range(order - 1)) for _ in range(30)]
    histories += [tuple(([bos] * (order - 1) + d)[i:i + order - 1]) for d in docs[:5] for i in range(5)]
    for h in histories:
        if len(h) < order - 1:       # a short slice; the reference does not bos-pad
            continue
        got = lm.distribution(h)
        want = np.array([ref(h, w) for w in range(V)])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("discount", [None, 0.1, 1.0])
def test_probabilities_sum_to_one_for_seen_and_unseen_histories(order, discount):
    rng = np.random.default_rng(order)
    V = 50
    docs = [list(rng.zipf(1.5, size=rng.integers(1, 80)) % (V - 1) + 1) for _ in range(30)]
    lm = NGramLM.train(docs, order, V, 0, discount=discount)
    seen = [tuple(d[:i][-(order - 1):]) if order > 1 else () for d in docs[:6] for i in (0, 1, 3, 7)]
    unseen = [tuple(rng.integers(0, V, size=order - 1)) for _ in range(6)]
    unseen += [(V - 1,) * (order - 1), (0,) * (order - 1)]  # V-1 never occurs; all-bos = doc start
    for h in seen + unseen:
        p = lm.distribution(h)
        assert (p > 0).all()
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
    # the vectorised scorer agrees with prob() token by token
    doc = docs[7]
    assert lm.logprob_doc(doc) == pytest.approx(
        sum(math.log(lm.prob(doc[:i], doc[i])) for i in range(len(doc))), rel=1e-12)
    nats, n = lm.score_docs([doc, [], docs[8]])
    assert n == len(doc) + len(docs[8])
    assert -nats == pytest.approx(lm.logprob_doc(doc) + lm.logprob_doc(docs[8]), rel=1e-12)


# --------------------------------------------------------------------------- nltk

@pytest.mark.parametrize("order", [2, 3, 4])
def test_fixed_discount_matches_nltk_kneser_ney_interpolated(order):
    """nltk 3.10's KneserNeyInterpolated is interpolated KN with one fixed discount. Two
    conventions differ from ours and are bridged here:

    1. Padding and which n-grams are counted: nltk's padded_everygram_pipeline pads both ends
       with <s>/</s> and counts every everygram, padding-only ones included. We hand nltk
       exactly our events instead: for every real token, the 1..order-grams ending at it, with
       order-1 bos on the left and no right padding.
    2. The lowest order: nltk's unigram_score is the continuation distribution
       N1+(. w) / N1+(. .) with no discount and no uniform term, so a token never seen in
       training gets probability 0 there. Ours discounts the unigram level too and
       interpolates with 1/vocab_size. nltk's unigram_score is overridden (below) with ours,
       computed from nltk's own continuation counts; every level above it is nltk's code.

    nltk's vocabulary holds every one of our token ids (as strings), so nothing maps to <UNK>."""
    nltk_lm = pytest.importorskip("nltk.lm")
    from nltk.lm.smoothing import KneserNey

    V, bos, discount = 10, 0, 0.1
    rng = random.Random(order)
    docs = [[rng.randint(1, 7) for _ in range(rng.randint(1, 25))] for _ in range(25)]  # 8, 9 unseen
    sym = lambda i: f"t{i}"  # noqa: E731  nltk's Vocabulary takes strings

    class UniformFloorKN(KneserNey):
        def unigram_score(self, word):
            cont, total = self._continuation_counts(word)
            types = len({w for fd in self.counts[2].values() for w in fd if fd[w] > 0})
            return (max(cont - self.discount, 0.0) + self.discount * types / V) / total

    text = []
    for d in docs:
        p = [sym(t) for t in [bos] * (order - 1) + d]
        text.append([tuple(p[i - k + 1:i + 1]) for i in range(order - 1, len(p)) for k in range(1, order + 1)])
    ref = nltk_lm.KneserNeyInterpolated(order, discount=discount,
                                        vocabulary=nltk_lm.Vocabulary(map(sym, range(V)), unk_cutoff=1))
    ref.estimator = UniformFloorKN(ref.vocab, ref.counts, order=order, discount=discount)
    ref.fit(text)

    lm = NGramLM.train(docs, order, V, bos, discount=discount)
    histories = [h for h in itertools.product(range(V), repeat=order - 1)]
    histories = rng.sample(histories, min(len(histories), 40))
    histories += [tuple(([bos] * (order - 1) + d)[i:i + order - 1]) for d in docs[:4] for i in range(4)]
    worst = 0.0
    for h in histories:
        if len(h) < order - 1:       # a short slice: nltk would not bos-pad it
            continue
        ours = lm.distribution(h)
        theirs = np.array([ref.score(sym(w), tuple(map(sym, h))) for w in range(V)])
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst < 1e-14, worst   # measured: 5.6e-17 (float64 rounding only)
    # convention 2 is real: unmodified nltk gives a never-seen token zero unigram mass
    plain = KneserNey(ref.vocab, ref.counts, order=order, discount=discount)
    assert plain.unigram_score(sym(9)) == 0.0


# --------------------------------------------------------------------------- files and commands

def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 30, size=rng.integers(1, 50))) for _ in range(40)]
    for discount in (None, 0.2):
        lm = NGramLM.train(docs, 3, 32, 0, discount=discount)
        out = tmp_path / f"m{discount}"
        lm.save(out)
        lm.save(out)                                       # replacing a model is fine
        again = NGramLM.load(out)
        assert (again.order, again.vocab_size, again.bos_id, again.discount) == (3, 32, 0, discount)
        assert again.discounts == lm.discounts
        for h in [(), (1,), (5, 7), (31, 31), tuple(docs[0][:2])]:
            assert np.array_equal(again.distribution(h), lm.distribution(h))
        assert again.logprob_doc(docs[3]) == lm.logprob_doc(docs[3])
        meta = json.loads((out / "ngram.json").read_text())
        assert meta["order"] == 3 and meta["train"]["tokens"] == sum(map(len, docs))
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


PHRASES = ["the cat sat on the mat.", "a dog ran in the park.", "the king said to the queen:",
           "one two three four five.", "in the night the sea was dark."]


def _repetitive_docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(PHRASES) for _ in range(rng.randint(5, 15))) for _ in range(n)]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("ngtok")
    train_tokenizer(iter(_repetitive_docs(200, 1)), 300).save(out)
    return out


def test_train_and_eval_commands(tmp_path, small_tokenizer):
    corpus = tmp_path / "corpus"                           # a `data build`-style directory
    corpus.mkdir()
    for split, n, seed in (("train", 150, 2), ("val", 20, 3)):
        (corpus / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in _repetitive_docs(n, seed)))
    results = {}
    for order in (1, 3):
        stats = train_command([str(corpus)], str(small_tokenizer), order, str(tmp_path / f"ng{order}"))
        assert stats["order"] == order and stats["tokens"] > 1000 and stats["documents"] == 150
        assert (tmp_path / f"ng{order}" / "tokenizer.json").exists()
        r = eval_command(str(tmp_path / f"ng{order}"), [str(corpus)])   # evaluates val.jsonl
        assert r["documents"] == 20
        assert r["bytes"] == sum(len(t.encode()) for t in _repetitive_docs(20, 3))
        assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]))
        results[order] = r
    assert results[3]["bits_per_byte"] < 0.5 * results[1]["bits_per_byte"]
    # plain text files work too, and the model dir alone is enough to evaluate
    txt = tmp_path / "held.txt"
    txt.write_text("the cat sat on the mat. the king said to the queen:")
    r = eval_command(str(tmp_path / "ng3"), [str(txt)])
    assert r["documents"] == 1 and r["bytes"] == len(txt.read_text().encode())


def test_bad_input_is_a_user_error(tmp_path, small_tokenizer):
    good = tmp_path / "good.txt"
    good.write_text("the cat sat on the mat.")
    for order in (0, -1):
        with pytest.raises(UserError, match="order must be an integer >= 1"):
            NGramLM.train([[1, 2]], order, 10, 0)
        with pytest.raises(UserError, match="order must be an integer >= 1"):
            train_command([str(good)], str(small_tokenizer), order, str(tmp_path / "m"))
    with pytest.raises(UserError, match="holds no tokens"):
        NGramLM.train([[], []], 2, 10, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="holds no tokens"):
        train_command([str(empty)], str(small_tokenizer), 3, str(tmp_path / "m"))
    with pytest.raises(UserError, match="no tokenizer at"):
        train_command([str(good)], str(tmp_path / "missing"), 3, str(tmp_path / "m"))
    with pytest.raises(UserError, match="no such file"):
        train_command([str(tmp_path / "nope.txt")], str(small_tokenizer), 3, str(tmp_path / "m"))
    with pytest.raises(UserError, match="outside the vocabulary"):
        NGramLM.train([[1, 12]], 2, 10, 0)
    with pytest.raises(UserError, match="discount"):
        NGramLM.train([[1, 2]], 2, 10, 0, discount=1.5)
    with pytest.raises(UserError, match="no n-gram model"):
        eval_command(str(tmp_path / "missing"), [str(good)])
    # a non-empty directory that is not a model is never replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an n-gram model directory"):
        train_command([str(good)], str(small_tokenizer), 2, str(other))
    assert (other / "keep.txt").read_text() == "mine"
    # a damaged arrays file is reported, not a traceback
    train_command([str(good)], str(small_tokenizer), 2, str(tmp_path / "m2"))
    (tmp_path / "m2" / "ngram.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="damaged"):
        NGramLM.load(tmp_path / "m2")
