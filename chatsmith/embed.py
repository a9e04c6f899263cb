"""`chatsmith embed` and `chatsmith fill-mask`: use an encoder from the command line.

    chatsmith embed minilm --input texts.txt --out vectors.npy      one vector per line (or .jsonl out)
    chatsmith fill-mask runs/bert "The cat sat on the [MASK]."       the likeliest tokens per [MASK]

Vectors are the attention-masked mean of the last hidden states, L2-normalised (what
sentence-transformers computes for all-MiniLM-L6-v2), so cosine similarity is a dot product.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from chatsmith import atomic
from chatsmith.data.corpus import iter_jsonl, text_lines
from chatsmith.encoder_engine import EncoderEngine
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.runtime import resolve_device


def read_lines(path: str | None) -> list[str]:
    """Texts one per line from a file (.txt) or JSONL with a "text" field (.jsonl); stdin if None.
    A bad line (not UTF-8, not JSON, no "text" string) is a UserError naming file:line."""
    if path is None:
        try:
            text = sys.stdin.read()
            text.encode("utf-8")  # under a C locale stdin decodes bad bytes to lone surrogates
        except UnicodeError:
            raise UserError("<stdin>: not UTF-8 text") from None
        return [t for t in text.split("\n") if t.strip()]
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--input {p}: no such file")
    if p.suffix != ".jsonl":
        return [t for _, t in text_lines(p) if t.strip()]
    out = []
    for n, rec in iter_jsonl(p, "JSONL input ({\"text\": ...} per line)"):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
            raise UserError(f'{p}:{n}: expected an object with a non-empty "text" string')
        out.append(rec["text"])
    return out


def _embed_arguments(p):
    p.add_argument("model", help="an encoder directory or minilm")
    p.add_argument("--input", help="texts, one per line (.txt) or {\"text\": …} per line (.jsonl); default stdin")
    p.add_argument("--out", help="vectors to .npy (float32, N x d) or .jsonl ({\"index\", \"embedding\"}); "
                   "default: JSON lines on stdout")
    p.add_argument("--max-len", type=int, default=256, help="tokens per text; longer texts are truncated")
    p.add_argument("--no-normalize", action="store_true", help="raw mean-pooled vectors instead of unit length")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where the model runs")


def _embed_main(a):
    texts = read_lines(a.input)
    if not texts:
        raise UserError("no text to embed")
    eng = EncoderEngine.load(a.model, device=resolve_device(a.device), max_len=a.max_len, batch_size=a.batch_size)
    vecs = eng.embed(texts, normalize=not a.no_normalize).numpy().astype(np.float32)
    cut = sum(n > eng.max_len for n in eng.token_counts(texts))
    print(f"{len(texts)} texts -> {vecs.shape[1]}-dim vectors ({cut} truncated to {eng.max_len} tokens)", file=sys.stderr)
    if a.out and a.out.endswith(".npy"):
        with atomic.atomic_file(a.out, "wb") as f:
            np.save(f, vecs)
    elif a.out:
        atomic.write_jsonl(a.out, [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)])
    else:
        for i, v in enumerate(vecs):
            print(json.dumps({"index": i, "embedding": [round(float(x), 7) for x in v]}))


def _fill_arguments(p):
    p.add_argument("model", help="an encoder with an MLM head (pretrain --family bert)")
    p.add_argument("text", nargs="+", help="text with one or more [MASK] tokens")
    p.add_argument("--top-k", type=int, default=5, help="candidates shown per [MASK]")


def _fill_main(a):
    eng = EncoderEngine.load(a.model)
    for text in a.text:
        for i, cands in enumerate(eng.fill_mask(text, a.top_k)):
            print(json.dumps({"text": text, "mask": i, "candidates": [{"token": t, "prob": round(p, 5)} for t, p in cands]},
                             ensure_ascii=False))


VERB = Verb("embed", "sentence embeddings from an encoder (mean pooling, normalised)", _embed_arguments, _embed_main)
FILL_VERB = Verb("fill-mask", "the likeliest tokens for each [MASK] (an encoder with an MLM head)",
                 _fill_arguments, _fill_main)
