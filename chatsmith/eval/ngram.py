"""The classical baseline: an n-gram language model over chatsmith's own tokenizer, with
interpolated modified Kneser–Ney smoothing (Chen & Goodman 1998), so that its bits-per-byte
can be set beside the neural models'.

The model
---------
Every document is left-padded with ``order - 1`` ``<|bos|>`` tokens; each real token is
predicted from the ``order - 1`` tokens before it (no end-of-document token is predicted).
For an order-k history ``h`` and token ``w``::

    P_k(w | h) = max(a_k(hw) - D_k(a_k(hw)), 0) / A_k(h) + gamma_k(h) * P_{k-1}(w | h[1:])
    gamma_k(h) = (D_k1 N1(h) + D_k2 N2(h) + D_k3 N3+(h)) / A_k(h)
    A_k(h)     = sum_w a_k(hw)                  (a history with A_k(h) = 0 passes P_{k-1} on)
    P_0(w)     = 1 / vocab_size                 (uniform over the whole vocabulary)

``a_k`` is the raw count at the highest order and the continuation count
``N1+(. h w)`` (the number of distinct tokens seen before ``hw``) below it. ``Nr(h)`` is the
number of tokens with ``a_k(hw) = r`` (``N3+``: ``>= 3``). The discounts of each order come from
that order's count-of-counts ``n1..n4``: ``Y = n1 / (n1 + 2 n2)``, ``D_kr = r - (r+1) Y n_{r+1} / n_r``
(D1, D2, D3+). When a discount cannot be estimated (a count class is present but its ``n_r`` or
the result is out of ``(0, r]``, which happens on tiny corpora) the order falls back to
KenLM's defaults 0.5, 1, 1.5. ``discount=d`` instead uses one fixed discount at every order
(plain interpolated Kneser–Ney, what ``nltk.lm.KneserNeyInterpolated`` implements).

Probabilities are positive and sum to one over the vocabulary for every history.

Storage and speed
-----------------
n-grams are never held as Python tuples. The k-grams of the padded training stream get dense
ids level by level: the key of a k-gram is ``id(its (k-1)-gram prefix) * vocab_size + last
token`` (an int64), and ``np.unique`` over the keys of all positions gives the sorted key table
of that order (lexicographic order of the n-grams) and every position's id at once. Counts are
``np.bincount`` over ids; continuation counts are bincounts over the suffix ids of the
higher-order types. A lookup is a ``np.searchsorted`` per order, vectorised over all the
positions of many documents.

On disk a model directory holds ``ngram.json`` (order, vocabulary, discounts, statistics),
``ngram.npz`` (plain numeric arrays, loaded with ``allow_pickle=False``) and the tokenizer's
``tokenizer.json`` / ``tokenizer_config.json``; it is written into a temporary sibling and
renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from chatsmith.atomic import atomic_dir
from chatsmith.data.corpus import iter_input_documents, split_files
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.tokenizer import Tokenizer

FORMAT = "chatsmith-ngram"
FORMAT_VERSION = 1
META_FILE = "ngram.json"
ARRAYS_FILE = "ngram.npz"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback defaults
EVAL_CHUNK = 1 << 20                  # positions scored per vectorised batch
ENCODE_BATCH = 256                    # documents per tokenizer call


# --------------------------------------------------------------------------- discounts

def count_of_counts(counts: np.ndarray) -> list[int]:
    """[n1, n2, n3, n4]: how many n-grams have (adjusted) count exactly 1, 2, 3, 4."""
    small = np.bincount(np.minimum(counts[counts > 0], 5), minlength=6)
    return [int(small[r]) for r in (1, 2, 3, 4)]


def modified_kn_discounts(counts: np.ndarray) -> tuple[list[float], bool]:
    """Chen & Goodman's D1, D2, D3+ for one order from its count-of-counts, and whether the
    estimate was used (False: a present count class had no usable estimate, and the
    fallback discounts are returned instead)."""
    n = [0, *count_of_counts(counts)]                     # n[r], r = 1..4
    present = [n[1] > 0, n[2] > 0, bool(np.any(counts >= 3))]
    if n[1] + 2 * n[2] == 0:
        return list(FALLBACK_DISCOUNTS), not any(present)
    y = n[1] / (n[1] + 2 * n[2])
    out = []
    for r in (1, 2, 3):
        if not present[r - 1]:                            # class unused at this order
            out.append(FALLBACK_DISCOUNTS[r - 1])
            continue
        if n[r] == 0:
            return list(FALLBACK_DISCOUNTS), False
        d = r - (r + 1) * y * n[r + 1] / n[r]
        if not (0.0 < d <= r):
            return list(FALLBACK_DISCOUNTS), False
        out.append(d)
    return out, True


# --------------------------------------------------------------------------- the model

def _find(keys: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of every query in the sorted key table, and whether it is there."""
    if len(keys) == 0:
        return np.zeros(len(q), dtype=np.int64), np.zeros(len(q), dtype=bool)
    idx = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return idx, keys[idx] == q


class NGramLM:
    """An n-gram LM with interpolated (modified) Kneser–Ney smoothing; see the module doc.

    Per order k = 1..order it holds: ``keys[k]`` (sorted int64 keys of the k-grams, k >= 2;
    order 1 is indexed by the token id itself), ``counts[k]`` (adjusted count a_k of each
    k-gram), and, for each (k-1)-gram used as a history of order k, ``denom[k]`` (A_k) and
    ``gamma[k]`` (the numerator of gamma_k), indexed by the (k-1)-gram's id (one entry for
    the empty history of order 1)."""

    def __init__(self, order: int, vocab_size: int, bos_id: int, discounts: list[list[float]],
                 keys: list, counts: list, denom: list, gamma: list, discount: float | None = None,
                 info: dict | None = None):
        self.order, self.vocab_size, self.bos_id = order, vocab_size, bos_id
        self.discount = discount
        self.discounts = discounts                        # [order-1 index] -> [D1, D2, D3+]
        self.keys, self.counts, self.denom, self.gamma = keys, counts, denom, gamma  # index k
        self.info = info or {}
        self._dtab = [None] + [np.array([0.0, *d]) for d in discounts]

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, docs: Iterable[list[int]], order: int, vocab_size: int, bos_id: int,
              discount: float | None = None) -> "NGramLM":
        """Count and smooth. ``discount=None``: modified Kneser–Ney (three discounts per order,
        estimated); ``discount=d`` (0 < d <= 1): one fixed discount everywhere."""
        _check_order(order)
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise UserError(f"vocabulary size must be a positive integer, got {vocab_size!r}")
        if not 0 <= bos_id < vocab_size:
            raise UserError(f"bos id {bos_id} is outside the vocabulary (size {vocab_size})")
        if discount is not None and not (0.0 < discount <= 1.0):
            raise UserError(f"a fixed Kneser–Ney discount must be in (0, 1], got {discount}")
        V, N = int(vocab_size), int(order)

        # the padded stream and each position's offset inside its padded document
        pad = np.full(N - 1, bos_id, dtype=np.int64)
        pieces, lens = [], []
        n_docs = n_tok = 0
        for doc in docs:
            a = np.asarray(doc, dtype=np.int64).reshape(-1)
            if a.size == 0:
                continue
            if a.min() < 0 or a.max() >= V:
                bad = int(a[(a < 0) | (a >= V)][0])
                raise UserError(f"document {n_docs + 1} holds token id {bad}, outside the vocabulary "
                                f"(size {V}): the documents and the tokenizer do not match")
            pieces += [pad, a]
            lens.append(a.size + N - 1)
            n_docs += 1
            n_tok += a.size
        if n_tok == 0:
            raise UserError("the training corpus holds no tokens: nothing to count "
                            "(are the input files empty?)")
        tok = np.concatenate(pieces)
        del pieces
        lens_a = np.asarray(lens, dtype=np.int64)
        starts = np.cumsum(lens_a) - lens_a
        off = np.arange(tok.size, dtype=np.int64) - np.repeat(starts, lens_a)
        real = np.flatnonzero(off >= N - 1)                # positions of real tokens

        # ids of the k-gram ending at every position where one fits inside its padded doc
        keys: list = [None, None]
        sizes = [0, V]
        real_ids: list = [None, tok[real]]
        prev = tok                                         # ids of order k-1 at every position
        for k in range(2, N + 1):
            pos = np.flatnonzero(off >= k - 1)
            if sizes[k - 1] * V + V >= 2 ** 63:
                raise UserError(f"too many distinct {k - 1}-grams for int64 keys")
            key = prev[pos - 1] * V + tok[pos]
            uk, inv = np.unique(key, return_inverse=True)
            del key
            ids = np.full(tok.size, -1, dtype=np.int64)
            ids[pos] = inv.reshape(-1)
            del inv, pos
            keys.append(uk)
            sizes.append(len(uk))
            real_ids.append(ids[real])
            prev = ids
        del prev, tok, off

        # adjusted counts: raw at the top order, continuation counts below
        counts: list = [None] * (N + 1)
        counts[N] = np.bincount(real_ids[N], minlength=sizes[N])
        for k in range(N - 1, 0, -1):
            suffix = np.full(sizes[k + 1], -1, dtype=np.int64)
            suffix[real_ids[k + 1]] = real_ids[k]          # each (k+1)-gram type's k-suffix
            counts[k] = np.bincount(suffix[suffix >= 0], minlength=sizes[k])
            del suffix
        del real_ids

        discounts, estimated = [], []
        denom: list = [None] * (N + 1)
        gamma: list = [None] * (N + 1)
        for k in range(1, N + 1):
            c = counts[k]
            if discount is None:
                d, ok = modified_kn_discounts(c)
            else:
                d, ok = [float(discount)] * 3, True
            discounts.append(d)
            estimated.append(ok)
            hist = (keys[k] // V) if k >= 2 else np.zeros(sizes[1], dtype=np.int64)
            n_hist = sizes[k - 1] if k >= 2 else 1
            seen = c > 0
            denom[k] = np.bincount(hist[seen], weights=c[seen], minlength=n_hist).astype(np.int64)
            g = np.zeros(n_hist)
            for r, dr in enumerate(d, start=1):
                sel = (c == r) if r < 3 else (c >= 3)
                g += dr * np.bincount(hist[sel], minlength=n_hist)
            gamma[k] = g
            cmax = int(c.max()) if c.size else 0
            counts[k] = c.astype(np.int32 if cmax < 2 ** 31 else np.int64)
        info = {
            "documents": n_docs,
            "tokens": n_tok,
            "ngrams": [int(np.count_nonzero(counts[k])) for k in range(1, N + 1)],
            "count_of_counts": [count_of_counts(counts[k]) for k in range(1, N + 1)],
            "discounts_estimated": estimated,
        }
        if discount is None and not all(estimated):
            bad = [k for k, ok in zip(range(1, N + 1), estimated) if not ok]
            print(f"note: modified Kneser–Ney discounts of order(s) {bad} could not be estimated "
                  f"from the counts (corpus too small); using {list(FALLBACK_DISCOUNTS)}", file=sys.stderr)
        return cls(N, V, int(bos_id), discounts, keys, counts, denom, gamma, discount, info)

    # ------------------------------------------------------------------ scoring
    def probs(self, contexts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """P(tokens[i] | contexts[i]) for a batch: contexts is (M, order-1) token ids (the
        history, oldest first, bos-padded), tokens is (M,)."""
        N, V = self.order, self.vocab_size
        w = np.asarray(tokens, dtype=np.int64).reshape(-1)
        ctx = np.asarray(contexts, dtype=np.int64).reshape(len(w), N - 1)
        if w.size and (w.min() < 0 or w.max() >= V or (ctx.size and (ctx.min() < 0 or ctx.max() >= V))):
            raise ValueError(f"token ids must be in [0, {V})")
        p = np.full(len(w), 1.0 / V)
        for k in range(1, N + 1):
            dtab = self._dtab[k]
            if k == 1:
                hid = np.zeros(len(w), dtype=np.int64)
                hfound = np.ones(len(w), dtype=bool)
                gid, gfound = w, hfound
            else:
                hist = ctx[:, N - k:]                      # the last k-1 tokens
                hid, hfound = hist[:, 0].copy(), np.ones(len(w), dtype=bool)
                for j in range(1, k - 1):
                    idx, f = _find(self.keys[j + 1], hid * V + hist[:, j])
                    hfound &= f
                    hid = np.where(hfound, idx, 0)
                gid, gfound = _find(self.keys[k], hid * V + w)
                gfound &= hfound
                gid = np.where(gfound, gid, 0)
            a = np.where(gfound, self.counts[k][gid], 0).astype(np.float64)
            A = np.where(hfound, self.denom[k][hid], 0).astype(np.float64)
            gam = np.where(hfound, self.gamma[k][hid], 0.0)
            d = dtab[np.minimum(a, 3).astype(np.int64)]
            seen = A > 0
            Asafe = np.where(seen, A, 1.0)
            p = np.where(seen, (np.maximum(a - d, 0.0) + gam * p) / Asafe, p)
        return p

    def prob(self, context: tuple[int, ...], token: int) -> float:
        """P(token | the last order-1 tokens of context). A shorter context is the start of a
        document: it is left-padded with bos, as in training."""
        h = self._history(context)
        return float(self.probs(np.asarray([h], dtype=np.int64).reshape(1, self.order - 1),
                                np.asarray([token]))[0])

    def distribution(self, context: tuple[int, ...]) -> np.ndarray:
        """P(w | context) for every token w of the vocabulary (sums to 1)."""
        h = np.asarray(self._history(context), dtype=np.int64).reshape(1, self.order - 1)
        return self.probs(np.repeat(h, self.vocab_size, axis=0), np.arange(self.vocab_size))

    def _history(self, context) -> list[int]:
        n = self.order - 1
        c = [int(t) for t in context][-n:] if n else []
        return [self.bos_id] * (n - len(c)) + c

    def _windows(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = self.order - 1
        padded = np.concatenate([np.full(n, self.bos_id, dtype=np.int64), a])
        if n == 0:
            return np.zeros((a.size, 0), dtype=np.int64), a
        ctx = np.lib.stride_tricks.sliding_window_view(padded[:-1], n)
        return ctx, a

    def logprob_doc(self, ids: list[int]) -> float:
        """Sum of the natural-log probabilities of every token of a document (bos-padded like
        training; the padding itself is not scored)."""
        if len(ids) == 0:
            return 0.0
        ctx, w = self._windows(ids)
        return float(np.log(self.probs(ctx, w)).sum())

    def score_docs(self, docs: Iterable[list[int]]) -> tuple[float, int]:
        """(total negative log-likelihood in nats, tokens scored) over many documents, scored in
        vectorised batches."""
        nats, n_tok = 0.0, 0
        ctxs, ws, pending = [], [], 0

        def flush():
            nonlocal nats, ctxs, ws, pending
            if pending:
                p = self.probs(np.concatenate(ctxs), np.concatenate(ws))
                nats -= float(np.log(p).sum())
            ctxs, ws, pending = [], [], 0

        for ids in docs:
            if len(ids) == 0:
                continue
            c, w = self._windows(ids)
            ctxs.append(c)
            ws.append(w)
            pending += w.size
            n_tok += w.size
            if pending >= EVAL_CHUNK:
                flush()
        flush()
        return nats, n_tok

    # ------------------------------------------------------------------ files
    def _arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for k in range(1, self.order + 1):
            if k >= 2:
                out[f"keys_{k}"] = self.keys[k]
            out[f"counts_{k}"] = self.counts[k]
            out[f"denom_{k}"] = self.denom[k]
            out[f"gamma_{k}"] = self.gamma[k]
        return out

    def save(self, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
        """Write the model directory atomically (a temporary sibling renamed into place). An
        existing directory is replaced only when it is empty or holds an n-gram model."""
        out = Path(out_dir)
        if out.exists():
            if not out.is_dir():
                raise UserError(f"{out} exists and is not a directory")
            if any(out.iterdir()) and not (out / META_FILE).exists():
                raise UserError(f"{out} exists and is not an n-gram model directory; refusing to "
                                f"replace it (choose another --out or remove it)")

        with atomic_dir(out) as tmp:
            with open(tmp / ARRAYS_FILE, "wb") as f:
                np.savez(f, **self._arrays())
            meta = {
                "format": FORMAT, "version": FORMAT_VERSION, "order": self.order,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "smoothing": "modified-kneser-ney" if self.discount is None else "kneser-ney",
                "discount": self.discount, "discounts": self.discounts, "train": self.info,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if tokenizer_dir is not None:
                for name in TOKENIZER_FILES:
                    src = Path(tokenizer_dir) / name
                    if src.exists():
                        shutil.copyfile(src, tmp / name)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "NGramLM":
        d = Path(out_dir)
        mf, af = d / META_FILE, d / ARRAYS_FILE
        if not mf.exists() or not af.exists():
            raise UserError(f"no n-gram model at {d}: expected {META_FILE} and {ARRAYS_FILE} "
                            f"(train one with `chatsmith ngram train`)")
        try:
            meta = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{mf} is not valid JSON: {e}") from None
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise UserError(f"{mf} is not a version-{FORMAT_VERSION} chatsmith n-gram model")
        N, V = int(meta["order"]), int(meta["vocab_size"])
        keys, counts, denom, gamma = ([None] * (N + 1) for _ in range(4))
        try:
            with np.load(af, allow_pickle=False) as z:
                for k in range(1, N + 1):
                    if k >= 2:
                        keys[k] = z[f"keys_{k}"]
                    counts[k] = z[f"counts_{k}"]
                    denom[k] = z[f"denom_{k}"]
                    gamma[k] = z[f"gamma_{k}"]
        except (KeyError, ValueError, OSError, EOFError) as e:
            raise UserError(f"{af} is damaged or incomplete: {e}") from None
        for k in range(1, N + 1):     # shapes must agree, or lookups would read garbage
            n_k = V if k == 1 else len(keys[k])
            n_h = 1 if k == 1 else (V if k == 2 else len(keys[k - 1]))
            if len(counts[k]) != n_k or len(denom[k]) != n_h or len(gamma[k]) != n_h:
                raise UserError(f"{af} is damaged: the order-{k} arrays do not fit together")
        return cls(N, V, int(meta["bos_id"]), meta["discounts"], keys, counts, denom, gamma,
                   meta.get("discount"), meta.get("train"))


def _check_order(order) -> None:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise UserError(f"the n-gram order must be an integer >= 1 (1 = unigram, 3 = trigram), "
                        f"got {order!r}")


# --------------------------------------------------------------------------- commands

def _encoded_docs(tok, inputs: list[str], stats: dict) -> Iterator[list[int]]:
    """Token ids of every document of the inputs (encoded in batches); counts documents and
    UTF-8 bytes into stats."""
    batch: list[str] = []
    for _, text in iter_input_documents(inputs):
        stats["documents"] += 1
        stats["bytes"] += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            yield from tok.encode_batch(batch)
            batch = []
    if batch:
        yield from tok.encode_batch(batch)


def train_command(inputs: list[str], tokenizer_dir: str, order: int, out: str,
                  discount: float | None = None) -> dict:
    """Train an n-gram model on corpus files (a `data build` directory: its train.jsonl) and
    save it, with a copy of the tokenizer, to `out`."""
    _check_order(order)
    if not inputs:
        raise UserError("ngram train needs --input PATH… (corpus files or a `data build` directory)")
    tok = Tokenizer.load(tokenizer_dir)
    files = split_files(inputs, "train")
    t0 = time.time()
    print(f"counting {order}-grams over {', '.join(files)}", file=sys.stderr)
    read = {"documents": 0, "bytes": 0}
    lm = NGramLM.train(_encoded_docs(tok, files, read), order, tok.vocab_size, tok.bos_id, discount)
    lm.info.update(inputs=files, bytes=read["bytes"], seconds=round(time.time() - t0, 1))
    lm.save(out, tokenizer_dir=tokenizer_dir)
    return {"order": order, "vocab_size": lm.vocab_size, "documents": lm.info["documents"],
            "tokens": lm.info["tokens"], "bytes": read["bytes"], "ngrams": lm.info["ngrams"],
            "discounts": lm.discounts, "seconds": lm.info["seconds"], "out": str(out)}


def eval_command(model_dir: str, inputs: list[str]) -> dict:
    """Loss (nats/token), perplexity and bits-per-byte of a saved n-gram model on corpus files
    (a `data build` directory: its val.jsonl). Bytes are the UTF-8 bytes of the documents."""
    if not inputs:
        raise UserError("ngram eval needs --input PATH… (corpus files or a `data build` directory)")
    lm = NGramLM.load(model_dir)
    tok = Tokenizer.load(model_dir)
    if tok.vocab_size != lm.vocab_size or tok.bos_id != lm.bos_id:
        raise UserError(f"{model_dir}: the tokenizer files do not match the n-gram model "
                        f"(vocabulary {tok.vocab_size} vs {lm.vocab_size})")
    files = split_files(inputs, "val")
    read = {"documents": 0, "bytes": 0}
    nats, n_tok = lm.score_docs(_encoded_docs(tok, files, read))
    if n_tok == 0:
        raise UserError(f"nothing to evaluate: {', '.join(files)} hold no text")
    loss = nats / n_tok
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / (math.log(2) * read["bytes"]),
            "tokens": n_tok, "bytes": read["bytes"], "documents": read["documents"],
            "order": lm.order, "inputs": files}


# --- the verbs ------------------------------------------------------------------------------------

def _train_arguments(p):
    p.add_argument("--input", nargs="+", required=True,
                   help="corpus .jsonl/.txt/.md files or folders, or a `data build` dir (its train.jsonl)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--order", type=int, default=3, help="n: tokens per n-gram")
    p.add_argument("--discount", type=float, default=None, help="one fixed discount in (0,1] (plain "
                   "interpolated KN) instead of modified KN's estimated D1/D2/D3+")
    p.add_argument("--out", required=True, help="n-gram model directory to write")


def _eval_arguments(p):
    p.add_argument("model", help="n-gram model directory")
    p.add_argument("--input", nargs="+", required=True,
                   help="corpus files or folders, or a `data build` dir (its val.jsonl)")


TRAIN_VERB = Verb("ngram train", "count and smooth an n-gram model over a tokenizer's tokens", _train_arguments,
                  lambda a: print(json.dumps(train_command(a.input, a.tokenizer, a.order, a.out,
                                                           discount=a.discount), indent=2)))
EVAL_VERB = Verb("ngram eval", "loss, perplexity and bits-per-byte of an n-gram model", _eval_arguments,
                 lambda a: print(json.dumps(eval_command(a.model, a.input), indent=2)))
