"""Token shards: a corpus tokenised once into flat memory-mapped arrays.

    DIR/train.bin, DIR/val.bin   every document as <|bos|> + its tokens, concatenated
    DIR/meta.json                dtype, token and byte counts, tokenizer, sources

uint16 when the vocabulary fits (< 65536), else uint32. Written streaming, in batches, to a
temporary file renamed into place, so corpora larger than RAM work and a failed run leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from chatsmith import atomic
from chatsmith.data.corpus import iter_input_documents
from chatsmith.errors import UserError


def shard_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shards(splits: dict[str, list[str]], tok, out: str | os.PathLike,
                 batch_docs: int = 512) -> dict:
    """splits: {"train": [paths…], "val": [paths…]} of corpus files → DIR/{split}.bin + meta.json.
    tok: a chatsmith.tokenizer.Tokenizer (data sits below the tokenizer: only its methods are used)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = shard_dtype(tok.vocab_size)
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "splits": {}}
    t0 = time.time()
    for split, paths in splits.items():
        n_tok = n_bytes = n_docs = 0
        # the UserError inside the block leaves no file behind: atomic_file removes its temporary
        with atomic.atomic_file(out / f"{split}.bin", "wb") as f:
            batch: list[str] = []

            def flush():
                nonlocal n_tok, n_bytes, n_docs
                for ids in tok.encode_batch(batch):
                    arr = np.asarray([tok.bos_id, *ids], dtype=dtype)
                    f.write(arr.tobytes())
                    n_tok += len(arr)
                n_bytes += sum(len(t.encode()) for t in batch)
                n_docs += len(batch)
                batch.clear()

            for _src, text in iter_input_documents(paths):
                batch.append(text)
                if len(batch) >= batch_docs:
                    flush()
                    if sys.stderr.isatty():
                        print(f"\r{split} shard: {n_docs} docs, {n_tok / 1e6:.2f}M tokens", end="", file=sys.stderr)
            if batch:
                flush()
            if n_tok == 0:
                raise UserError(f"the {split} split ({', '.join(map(str, paths))}) has no documents")
        print(f"\r{split} shard: {n_docs} docs, {n_tok:,} tokens, {n_bytes:,} bytes "
              f"({n_bytes / max(n_tok - n_docs, 1):.2f} bytes/token)", file=sys.stderr)
        meta["splits"][split] = {"tokens": n_tok, "bytes": n_bytes, "documents": n_docs,
                                 "sources": [str(p) for p in paths]}
    meta["seconds"] = round(time.time() - t0, 1)
    atomic.write_json(out / "meta.json", meta)
    return meta


class TokenShards:
    """Random fixed-length windows from a shard; the window for (seed, step, rank) is fixed, which
    is what makes resume exact: a resumed run draws the very batches it would have drawn."""

    def __init__(self, directory: str | os.PathLike, split: str):
        d = Path(directory)
        meta_f = d / "meta.json"
        if not meta_f.exists():
            raise UserError(f"{d} has no meta.json: build token shards first (chatsmith pretrain --input …)")
        self.meta = json.loads(meta_f.read_text())
        f = d / f"{split}.bin"
        if not f.exists():
            raise UserError(f"{d} has no {split}.bin")
        self.data = np.memmap(f, dtype=np.dtype(self.meta["dtype"]), mode="r")
        self.split = split

    def __len__(self):
        return len(self.data)

    def batch(self, batch_size: int, seq_len: int, seed: int, step: int, rank: int = 0):
        n = len(self.data) - seq_len - 1
        if n <= 0:
            raise UserError(f"the {self.split} split has {len(self.data)} tokens, fewer than one window of "
                            f"{seq_len + 1}: use a smaller --seq-len or more data")
        rng = np.random.default_rng([seed, step, rank])
        starts = rng.integers(0, n + 1, size=batch_size)
        window = np.stack([self.data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(window)
        return t[:, :-1], t[:, 1:]

    def sequential(self, seq_len: int, max_batches: int, batch_size: int):
        """Non-overlapping windows from the start, for a deterministic evaluation."""
        n_win = min((len(self.data) - 1) // seq_len, max_batches * batch_size)
        for b in range(0, n_win, batch_size):
            rows = [self.data[i * seq_len:i * seq_len + seq_len + 1] for i in range(b, min(b + batch_size, n_win))]
            t = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield t[:, :-1], t[:, 1:]
