"""Language-model metrics on whole documents: loss, perplexity and bits-per-byte.

Every document is scored as <|bos|> + its tokens, predicting each real token (not the padding,
not the next document's <|bos|>), so the numbers are directly comparable with the n-gram
baseline's. Documents longer than the context are scored in windows that overlap by half, each
token counted once, with at least half a context of history after the first window.
Bits-per-byte = total nats / (ln 2 * UTF-8 bytes): independent of the tokenizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chatsmith.batching import collate


@torch.no_grad()
def score_documents(model, tok, texts, batch_windows: int = 16) -> dict:
    device = next(model.parameters()).device
    ctx = model.cfg.max_seq_len
    stride = ctx // 2
    windows = []  # (ids, number of leading targets already counted)
    n_bytes = 0
    for text in texts:
        # the first token is scored given BOS, as the model saw documents start in training; a model
        # trained without BOS (imported, add_bos_token false) gets its end-of-text token as that
        # context instead, as lm-evaluation-harness does
        first = tok.bos_id if getattr(tok, "add_bos", True) else tok.eos_id
        ids = [first, *tok.encode(text)]
        n_bytes += len(text.encode())
        start = 0
        while True:
            chunk = ids[start:start + ctx + 1]
            if len(chunk) < 2:
                break
            skip = 0 if start == 0 else ctx - stride  # those targets were scored by the previous window
            windows.append((chunk, skip))
            if start + ctx + 1 >= len(ids):
                break
            start += stride
    nats, n_tok = 0.0, 0
    was_training = model.training
    model.eval()
    windows.sort(key=lambda w: len(w[0]))  # similar lengths together: less padding
    for i in range(0, len(windows), batch_windows):
        group = windows[i:i + batch_windows]
        # each window's first `skip` targets were scored by the previous window: masked out
        b = collate([c for c, _ in group], tok.pad_id, masks=[[0] * (skip + 1) + [1] * (len(c) - 1 - skip)
                                                             for c, skip in group])
        x, y = b["x"], b["y"].masked_fill(b["mask"] == 0, -100)
        logits = model(x.to(device)).float()
        nats += F.cross_entropy(logits.flatten(0, 1), y.flatten().to(device), ignore_index=-100,
                                reduction="sum").item()
        n_tok += int((y != -100).sum())
    model.train(was_training)
    loss = nats / max(n_tok, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": nats / (math.log(2) * max(n_bytes, 1)),
            "tokens": n_tok, "bytes": n_bytes}
