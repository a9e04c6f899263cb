"""Inference for encoder models: embeddings, labels, answer spans and masked tokens, batched.

What chatsmith/engine.py is for decoders (generation), this is for the encoder family: one place
that turns texts into model inputs (chatsmith/wordpiece.py), runs the trunk in batches without
gradients, and reads the heads:

    embed(texts)             mean-pooled, L2-normalised sentence vectors (sentence-transformers' pooling)
    classify(texts, pairs)   label probabilities from the classify head
    answer(question, ctx)    the best answer span (or none) from the span head, over strided windows
    fill_mask(text)          the likeliest tokens for each [MASK] from the mlm head

Used by the classify/qa stages' evaluation, by `chatsmith embed` / `fill-mask`, and by
`chatsmith serve`'s /v1/embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatsmith.checkpoint import load_model
from chatsmith.errors import UserError
from chatsmith.model.encoder import Encoder
from chatsmith.wordpiece import EncoderTokenizer


@dataclass
class Span:
    text: str          # "" when the model says the context holds no answer
    start: int         # character offset in the context (-1 for no answer)
    score: float       # start + end logit of the best span
    null_score: float  # start + end logit at [CLS]: the "no answer" score


def load_encoder(path: str, device="cpu") -> tuple[Encoder, EncoderTokenizer]:
    """An encoder checkpoint (any chatsmith or imported BERT directory) and its tokenizer; a decoder
    is a clear error, not a crash deeper down."""
    model = load_model(path, device=device)
    if not isinstance(model, Encoder):
        raise UserError(f"{path} is a {getattr(model, 'family', 'decoder')} model; this needs an encoder (BERT-style) "
                        f"model: pretrain one with `chatsmith pretrain --family bert` or use minilm")
    return model, EncoderTokenizer.load(path)  # names what is missing: tokenizer.json, [CLS]/[SEP]


class EncoderEngine:
    def __init__(self, model: Encoder, tok: EncoderTokenizer, max_len: int | None = None, batch_size: int = 32):
        self.model, self.tok = model.eval(), tok
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str, device="cpu", **kw) -> "EncoderEngine":
        return cls(*load_encoder(path, device), **kw)

    def _inputs(self, rows):
        return self.tok.batch(rows, self.device)

    @torch.no_grad()
    def embed(self, texts: list[str] | None = None, ids: list[list[int]] | None = None,
              normalize: bool = True) -> torch.Tensor:
        """(N, d) float32 sentence vectors of texts, or of pre-tokenised ids (wrapped in [CLS] … [SEP])."""
        pieces = ids if ids is not None else self.tok.pieces(texts)
        out = []
        for i in range(0, len(pieces), self.batch_size):
            b = self._inputs([self.tok.join(p, None, self.max_len) for p in pieces[i:i + self.batch_size]])
            out.append(self.model.embed(b["input_ids"], b["attention_mask"], normalize=normalize).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.d_model)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens each text becomes as a model input ([CLS] and [SEP] included, before truncation)."""
        return [len(p) + 2 for p in self.tok.pieces(texts)]

    @torch.no_grad()
    def classify(self, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
        """(N, labels) probabilities from the classify head."""
        self.model.head("classify")
        a = self.tok.pieces(texts)
        b = self.tok.pieces(pairs) if pairs is not None else [None] * len(a)
        rows = [self.tok.join(x, y, self.max_len) for x, y in zip(a, b)]
        # batches of similar lengths: a batch is padded to its longest row, so mixed lengths waste work
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        out = []
        for i in range(0, len(rows), self.batch_size):
            batch = self._inputs([rows[j] for j in order[i:i + self.batch_size]])
            logits = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], head="classify")
            out.append(logits.float().softmax(-1).cpu())
        if not out:
            return torch.zeros(0, len(getattr(self.model.cfg, "labels", None) or ()))
        probs = torch.empty(len(rows), out[0].shape[-1])
        probs[torch.tensor(order)] = torch.cat(out)
        return probs

    @torch.no_grad()
    def span_logits(self, rows) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Start and end logits per input position for each (ids, type_ids) row."""
        res = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            b = self._inputs(chunk)
            lg = self.model(b["input_ids"], b["attention_mask"], b["token_type_ids"], head="span").float().cpu()
            res += [(lg[j, :len(ids), 0], lg[j, :len(ids), 1]) for j, (ids, _) in enumerate(chunk)]
        return res

    def answer(self, question: str, context: str, stride: int = 32, max_answer_tokens: int = 30,
               null_threshold: float | None = 0.0) -> Span:
        """The best span over every window of the context. With null_threshold set (SQuAD v2), the
        answer is "" when null_score - best span score > threshold; None always gives a span."""
        windows = self.tok.qa_windows(question, context, self.max_len, stride)
        logits = self.span_logits([(w.ids, w.type_ids) for w in windows])
        return best_span(windows, logits, context, max_answer_tokens, null_threshold)

    @torch.no_grad()
    def fill_mask(self, text: str, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each [MASK] in text, the k likeliest tokens with their probabilities."""
        self.model.head("mlm")
        if self.tok.mask_id is None:
            raise UserError("this tokenizer has no [MASK] token")
        ids, types = self.tok.join(self.tok.pieces([text])[0], None, self.max_len)
        where = [i for i, t in enumerate(ids) if t == self.tok.mask_id]
        if not where:
            raise UserError(f"the text has no {self.tok.decode([self.tok.mask_id], skip_special=False)} token to fill")
        b = self._inputs([(ids, types)])
        probs = self.model(b["input_ids"], b["attention_mask"], b["token_type_ids"], head="mlm")[0].float().softmax(-1)
        n_real = self.tok.vocab_size
        out = []
        for i in where:
            p, j = probs[i, :n_real].topk(k)
            out.append([(self.tok.decode([int(t)]), float(q)) for q, t in zip(p, j)])
        return out


def best_span(windows, logits, context: str, max_answer_tokens: int, null_threshold: float | None) -> Span:
    """Highest start+end logit over context positions (start <= end, at most max_answer_tokens
    apart) across windows; the null score is the lowest [CLS] score over windows (the window in
    which the model is surest there is an answer decides)."""
    best, null = None, float("inf")
    for w, (s, e) in zip(windows, logits):
        null = min(null, float(s[0] + e[0]))
        ctx = torch.tensor([o is not None for o in w.offsets])
        s = s.masked_fill(~ctx, float("-inf"))
        e = e.masked_fill(~ctx, float("-inf"))
        # score[i, j] = s_i + e_j for i <= j < i + max_answer_tokens
        score = s[:, None] + e[None, :]
        n = len(s)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        score = score.masked_fill((j < i) | (j - i >= max_answer_tokens), float("-inf"))
        flat = int(score.argmax())
        v = float(score.flatten()[flat])
        if v != float("-inf") and (best is None or v > best[0]):
            best = (v, w.offsets[flat // n][0], w.offsets[flat % n][1])
    if best is None:
        return Span("", -1, float("-inf"), null)
    v, a, b = best
    if null_threshold is not None and null - v > null_threshold:
        return Span("", -1, v, null)
    return Span(context[a:b], a, v, null)


__all__ = ["Span", "load_encoder", "EncoderEngine", "best_span"]
