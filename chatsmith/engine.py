"""The one generation engine: KV-cached decoding with per-request sampling settings.

`generate` returns finished completions; `stream` yields text as it is decoded. Sampling is
temperature / top-k / top-p (nucleus, Holtzman et al. 2020) / repetition penalty (CTRL, Keskar et
al. 2019); temperature 0 is greedy; `num_beams > 1` is beam search. Stop strings are matched on
the decoded text, never appear in the output, and streamed text is held back while it could still
be the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from chatsmith.errors import UserError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score / length**length_penalty

    def validate(self):
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("top_k must be >= 0 (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise UserError("repetition_penalty must be > 0 (1 turns it off)")
        if self.num_return_sequences < 1 or self.num_beams < 1:
            raise UserError("num_return_sequences and num_beams must be at least 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise UserError("num_return_sequences cannot exceed num_beams in beam search")


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end token or stop string) | "length"
    score: float | None = None  # beam search: length-normalised log-probability


def process_logits(logits: torch.Tensor, p: SamplingParams, history: torch.Tensor | None) -> torch.Tensor:
    """(N, V) raw logits -> logits to sample from (temperature, penalty, top-k, top-p applied)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = torch.gather(logits, 1, history)
        # CTRL: divide positive logits, multiply negative ones, so repeats always get less likely
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if p.temperature > 0:
        logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p of the mass
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


class StopMatcher:
    """Finds the earliest stop string in growing text; tells how much text is safe to emit."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]

    def find(self, text: str, start: int = 0) -> int:
        hits = [i for s in self.stops if (i := text.find(s, max(0, start - len(s)))) >= 0]
        return min(hits) if hits else -1

    def safe_len(self, text: str) -> int:
        """Length of the prefix that cannot become part of a stop string as more text arrives."""
        n = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            n = len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[:n].endswith(s[:k]):
                    n -= k
                    break
        return n


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.eos_ids = {tokenizer.eos_id} | set(getattr(tokenizer, "stop_ids", ()))  # imported models' end tokens
        for t in ("<|assistant_end|>",):
            i = tokenizer.token_to_id(t)
            if i is not None:
                self.eos_ids.add(i)

    def _check(self, prompt_ids: list[int], p: SamplingParams) -> int:
        p.validate()
        ctx = self.model.cfg.max_seq_len
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= ctx:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {ctx}")
        return min(p.max_new_tokens, ctx - len(prompt_ids))

    @torch.no_grad()
    def stream(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[tuple[int, str]]:
        """Yield (sequence index, new text) as tokens are decoded; then the Completions are in
        `self.last`. Sampling only (beam search has no meaningful partial output)."""
        if p.num_beams > 1:
            for c in self._beam(prompt_ids, p):
                yield 0, c.text
            return
        yield from self._sample([prompt_ids] * p.num_return_sequences, p)

    def _sample(self, prompts: list[list[int]], p: SamplingParams) -> Iterator[tuple[int, str]]:
        """Decode a batch of equally long prompts together, one forward pass per step."""
        n = len(prompts)
        budget = min(self._check(ids, p) for ids in prompts)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(p.seed if p.seed is not None else torch.seed())
        cache = self.model.new_cache(n, len(prompts[0]) + budget)
        x = torch.tensor(prompts, device=self.device)
        logits = self.model(x, cache=cache)[:, -1]
        out = [[] for _ in range(n)]
        texts, emitted = [""] * n, [0] * n
        done = [None] * n  # finish reason per row
        stopper = StopMatcher(p.stop)
        history = x
        for _ in range(budget):
            lg = process_logits(logits, p, history if p.repetition_penalty != 1.0 else None)
            if p.temperature == 0:
                nxt = lg.argmax(-1)
            else:
                nxt = torch.multinomial(lg.softmax(-1), 1, generator=gen).squeeze(1)
            for i in range(n):
                if done[i]:
                    continue
                t = int(nxt[i])
                if t in self.eos_ids:
                    done[i] = "stop"
                else:
                    out[i].append(t)
                    text = self.tok.decode(out[i])
                    cut = stopper.find(text, len(texts[i]))
                    if cut >= 0:
                        text, done[i] = text[:cut], "stop"
                    texts[i] = text
                safe = len(texts[i]) if done[i] else stopper.safe_len(texts[i])
                if safe > emitted[i]:
                    yield i, texts[i][emitted[i]:safe]
                    emitted[i] = safe
            if all(done):
                break
            history = torch.cat([history, nxt[:, None]], 1)
            logits = self.model(nxt[:, None], cache=cache)[:, -1]
        for i in range(n):
            if not done[i]:
                done[i] = "length"
                if len(texts[i]) > emitted[i]:
                    yield i, texts[i][emitted[i]:]
        self.last = [Completion(out[i], texts[i], done[i]) for i in range(n)]

    def generate(self, prompt_ids: list[int], p: SamplingParams) -> list[Completion]:
        if p.num_beams > 1:
            return self._beam(prompt_ids, p)
        for _ in self.stream(prompt_ids, p):
            pass
        return self.last

    def generate_many(self, prompts: list[list[int]], p: SamplingParams, max_batch: int = 32) -> list[Completion]:
        """One completion per prompt. Prompts of equal length are decoded together in batches."""
        p.validate()
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):
            by_len.setdefault(len(ids), []).append(i)
        res: list[Completion | None] = [None] * len(prompts)
        for idx in by_len.values():
            for k in range(0, len(idx), max_batch):
                chunk = idx[k:k + max_batch]
                for _ in self._sample([prompts[i] for i in chunk], p):
                    pass
                for i, c in zip(chunk, self.last):
                    res[i] = c
        return res

    @torch.no_grad()
    def _beam(self, prompt_ids: list[int], p: SamplingParams) -> list[Completion]:
        """Beam search: keep the B best partial sequences by summed log-probability; a sequence
        that ends joins the finished pool with score logp / len**length_penalty."""
        B = p.num_beams
        budget = self._check(prompt_ids, p)
        cache = self.model.new_cache(B, len(prompt_ids) + budget)
        x = torch.tensor([prompt_ids] * B, device=self.device)
        logp = self.model(x, cache=cache)[:, -1].float().log_softmax(-1)
        scores = torch.zeros(B, device=self.device)
        scores[1:] = float("-inf")  # all beams start identical: expand only the first
        seqs: list[list[int]] = [[] for _ in range(B)]
        finished: list[tuple[float, list[int], str]] = []
        stopper = StopMatcher(p.stop)
        V = logp.size(-1)
        for step in range(budget):
            cand = (scores[:, None] + logp).view(-1)
            top = torch.topk(cand, 2 * B)
            new_seqs, new_scores, rows, toks = [], [], [], []
            for s, idx in zip(top.values.tolist(), top.indices.tolist()):
                b, t = divmod(idx, V)
                seq = seqs[b] + [t]
                if t in self.eos_ids:
                    finished.append((s / max(len(seq), 1) ** p.length_penalty, seqs[b], "stop"))
                    continue
                text = self.tok.decode(seq)
                if stopper.stops and stopper.find(text) >= 0:
                    finished.append((s / len(seq) ** p.length_penalty, seq, "stop"))
                    continue
                new_seqs.append(seq), new_scores.append(s), rows.append(b), toks.append(t)
                if len(new_seqs) == B:
                    break
            if not new_seqs:
                break
            # done when B hypotheses are finished and the best live beam, scored at its current
            # length, no longer beats the worst of them (the usual heuristic, as in HF's beam search)
            if len(finished) >= B:
                worst_kept = sorted((f[0] for f in finished), reverse=True)[B - 1]
                if max(new_scores) / len(new_seqs[0]) ** p.length_penalty <= worst_kept:
                    break
            while len(new_seqs) < B:  # pad with dead beams so the batch shape stays fixed
                new_seqs.append(new_seqs[0]), new_scores.append(float("-inf")), rows.append(rows[0]), toks.append(toks[0])
            cache.reorder(torch.tensor(rows, device=self.device))
            seqs, scores = new_seqs, torch.tensor(new_scores, device=self.device)
            logp = self.model(torch.tensor(toks, device=self.device)[:, None], cache=cache)[:, -1].float().log_softmax(-1)
        for s, seq in zip(scores.tolist(), seqs):
            if s > float("-inf"):
                finished.append((s / max(len(seq), 1) ** p.length_penalty, seq, "length"))
        finished.sort(key=lambda f: -f[0])
        res = []
        for score, seq, reason in finished[:p.num_return_sequences]:
            text = self.tok.decode(seq)
            cut = stopper.find(text)
            res.append(Completion(seq, text[:cut] if cut >= 0 else text, reason, score))
        return res
