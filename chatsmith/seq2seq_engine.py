"""Decoding for encoder–decoder models: greedy, sampling and beam search, batched across sources.

The decoder-only engine (chatsmith/engine.py) continues one token stream; here each source is read
once by the encoder, every decoder layer's cross-attention keys/values are computed once from that
(`Seq2Seq.new_cache`), and the decoder runs step by step on its own KV cache. The sampling rules
(temperature, top-k/top-p, repetition penalty) and the result type are the engine's own
(`process_logits`, `SamplingParams`, `Completion`), not a copy.

Beam search keeps, per source, the `num_beams` best partial translations by summed log-probability;
a hypothesis that emits the end token joins that source's finished pool scored
logp / length**length_penalty, and a source is done when it has num_beams finished hypotheses and
its best live beam, scored at its current length, no longer beats the worst of them (as the
decoder's beam search and HF's). All sources' beams advance in one batch, B rows per source, and `Cache.reorder` moves each row's
cache with its beam; a source that is done (and, in greedy decoding, a row that has ended) leaves
the batch, so a batch runs as long as its longest translation, not each row to the budget.

The padding rows of the vocabulary (ids the tokenizer lacks) and the pad token are never produced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from chatsmith.checkpoint import load_model, read_config
from chatsmith.engine import Completion, SamplingParams, StopMatcher, process_logits
from chatsmith.errors import UserError
from chatsmith.model.registry import family_of
from chatsmith.tokenizer import Tokenizer


def lang_tag(lang: str) -> str:
    return f"<2{lang}>"


def is_seq2seq(path: str | os.PathLike) -> bool:
    return family_of(read_config(path)).name == "seq2seq"


class Seq2SeqEngine:
    def __init__(self, model, tok, max_batch: int = 32, directions: list | None = None):
        if family_of(model).name != "seq2seq":
            raise UserError("this needs an encoder-decoder (seq2seq) model, e.g. one from `chatsmith translate train`")
        self.model, self.tok, self.max_batch = model.eval(), tok, max_batch
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.directions = [tuple(d) for d in (directions or [])]
        self.n_real = min(tok.vocab_size, self.cfg.vocab_size)
        self.banned = [self.cfg.pad_token_id, self.cfg.decoder_start_token_id]

    @classmethod
    def load(cls, path, device="cpu", max_batch: int = 32) -> "Seq2SeqEngine":
        model = load_model(path, device=device)
        block = json.loads((Path(path) / "config.json").read_text()).get("chatsmith") or {}
        return cls(model, Tokenizer.load(path), max_batch, block.get("directions"))

    # --- sources ------------------------------------------------------------------------------------
    def check_direction(self, src: str | None, tgt: str | None) -> str:
        """The target language to use; UserError naming what the model knows if it cannot."""
        langs = list(self.cfg.languages)
        if tgt is None:
            if len(langs) != 1:
                raise UserError(f"this model translates into {', '.join(langs) or 'no tagged language'}: pass --tgt")
            tgt = langs[0]
        if langs and tgt not in langs:
            raise UserError(f"this model does not translate into {tgt!r}; it knows: {', '.join(langs)}")
        if src is not None and self.directions and (src, tgt) not in self.directions:
            raise UserError(f"this model was not trained on {src}->{tgt}; it knows: "
                            f"{', '.join(f'{a}->{b}' for a, b in self.directions)}")
        return tgt

    def source_ids(self, text: str, tgt: str | None) -> tuple[list[int], bool]:
        """[<2tgt>] + text + [eos], cut to the model's context: (ids, whether it was cut)."""
        head = []
        if tgt is not None and self.cfg.languages:
            tid = self.tok.tok.token_to_id(lang_tag(tgt))
            if tid is None:
                raise UserError(f"the tokenizer has no {lang_tag(tgt)} tag")
            head = [tid]
        body = self.tok.encode(text)
        room = self.cfg.max_seq_len - len(head) - 1
        return head + body[:room] + [self.cfg.eos_token_id], len(body) > room

    def translate(self, texts: list[str], tgt: str | None = None, p: SamplingParams | None = None,
                  src: str | None = None) -> tuple[list[list[Completion]], int]:
        """Each text's completions (num_return_sequences of them) and how many sources were cut."""
        p = p or SamplingParams(temperature=0.0)
        tgt = self.check_direction(src, tgt) if self.cfg.languages else tgt
        enc = [self.source_ids(t, tgt) for t in texts]
        return self.generate_ids([e for e, _ in enc], p), sum(c for _, c in enc)

    # --- decoding ---------------------------------------------------------------------------------------
    def _budget(self, p: SamplingParams) -> int:
        return max(1, min(p.max_new_tokens, self.cfg.max_seq_len - 1))

    def _logp(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits[:, self.n_real:] = float("-inf")
        logits[:, self.banned] = float("-inf")
        return logits

    def _encode(self, srcs: list[list[int]]):
        L = max(len(s) for s in srcs)
        x = torch.full((len(srcs), L), self.cfg.pad_token_id, dtype=torch.long)
        m = torch.zeros((len(srcs), L), dtype=torch.long)
        for i, s in enumerate(srcs):
            x[i, :len(s)], m[i, :len(s)] = torch.tensor(s), 1
        return self.model.encode(x.to(self.device), m.to(self.device))

    @torch.no_grad()
    def generate_ids(self, srcs: list[list[int]], p: SamplingParams) -> list[list[Completion]]:
        p.validate()
        if any(len(s) > self.cfg.max_seq_len for s in srcs):
            raise UserError(f"a source is longer than the model's {self.cfg.max_seq_len} positions")
        out: list[list[Completion]] = [[] for _ in srcs]
        # similar lengths together: less padding per batch
        order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))
        per = self.max_batch if p.num_beams == 1 else max(1, self.max_batch // p.num_beams)
        for k in range(0, len(order), per):
            idx = order[k:k + per]
            batch = [srcs[i] for i in idx]
            res = self._beam(batch, p) if p.num_beams > 1 else self._sample(batch, p, k)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _finish(self, seq: list[int], reason: str, score, stopper: StopMatcher) -> Completion:
        text = self.tok.decode(seq)
        cut = stopper.find(text) if stopper.stops else -1
        return Completion(seq, text[:cut] if cut >= 0 else text, "stop" if cut >= 0 else reason, score)

    def _sample(self, srcs, p: SamplingParams, offset: int) -> list[list[Completion]]:
        """Greedy (temperature 0) or sampled decoding; num_return_sequences rows per source share
        its encoder output."""
        R = p.num_return_sequences
        enc, keep = self._encode(srcs)
        if R > 1:
            enc, keep = enc.repeat_interleave(R, 0), keep.repeat_interleave(R, 0)
        cache = self.model.new_cache(enc, keep)
        N = enc.shape[0]
        gen = torch.Generator(device="cpu").manual_seed((p.seed if p.seed is not None else 0) + offset)
        cur = torch.full((N, 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=self.device)
        seqs: list[list[int]] = [[] for _ in range(N)]
        logps = torch.zeros(N)
        done = [False] * N
        reasons = ["length"] * N
        alive = list(range(N))  # the rows still decoding, in cache order: a finished row leaves the batch
        history = torch.zeros((N, 0), dtype=torch.long, device=self.device)  # each row's tokens, for the penalty
        for _ in range(self._budget(p)):
            logits = self._logp(self.model.decode(cur, cache)[:, -1])
            lp = logits.log_softmax(-1).cpu()
            if p.temperature == 0:
                nxt = logits.argmax(-1).cpu()
            else:
                probs = process_logits(logits, p, history).softmax(-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            for li, (i, t) in enumerate(zip(alive, nxt.tolist())):
                logps[i] += lp[li, t]
                if t == self.cfg.eos_token_id:
                    done[i], reasons[i] = True, "stop"
                else:
                    seqs[i].append(t)
            keep = [li for li, i in enumerate(alive) if not done[i]]
            if not keep:
                break
            history = torch.cat([history, nxt.to(self.device)[:, None]], 1)
            if len(keep) < len(alive):
                idx = torch.tensor(keep, device=self.device)
                cache.reorder(idx)
                nxt, history = nxt[keep], history.index_select(0, idx)
                alive = [alive[li] for li in keep]
            cur = nxt.to(self.device)[:, None]
        stopper = StopMatcher(p.stop)
        comps = [self._finish(s, r, float(lp_), stopper) for s, r, lp_ in zip(seqs, reasons, logps.tolist())]
        return [comps[i * R:(i + 1) * R] for i in range(len(srcs))]

    def _beam(self, srcs, p: SamplingParams) -> list[list[Completion]]:
        B, N, lp_pow = p.num_beams, len(srcs), p.length_penalty
        enc, keep = self._encode(srcs)
        cache = self.model.new_cache(enc.repeat_interleave(B, 0), keep.repeat_interleave(B, 0))
        active = list(range(N))  # sources still searching; rows a*B .. a*B+B-1 of the cache are active[a]'s
        scores = torch.full((N, B), float("-inf"))
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        seqs: list[list[int]] = [[] for _ in range(N * B)]  # per cache row
        finished: list[list[tuple[float, list[int], str]]] = [[] for _ in range(N)]
        live_end: list[list[tuple[float, list[int]]]] = [[] for _ in range(N)]  # live beams at the budget
        cur = torch.full((N * B, 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=self.device)
        eos = self.cfg.eos_token_id
        budget = self._budget(p)
        for step in range(budget):
            logp = self._logp(self.model.decode(cur, cache)[:, -1]).log_softmax(-1).cpu()
            V = logp.shape[-1]
            cand = (scores.view(-1, 1) + logp).view(len(active), B * V)
            top_v, top_i = torch.topk(cand, min(2 * B, B * V), dim=-1)
            rows, toks, new_scores, new_seqs, still = [], [], [], [], []
            for a, n in enumerate(active):
                live: list[tuple[float, int, int, list[int]]] = []
                for s, idx in zip(top_v[a].tolist(), top_i[a].tolist()):
                    if s == float("-inf"):
                        break
                    b, t = divmod(idx, V)
                    prev = seqs[a * B + b]
                    if t == eos:
                        finished[n].append((s / (len(prev) + 1) ** lp_pow, prev, "stop"))
                    else:
                        live.append((s, a * B + b, t, prev + [t]))
                    if len(live) == B:
                        break
                if not live:
                    continue  # nothing left to extend: done
                if len(finished[n]) >= B:
                    worst = sorted((f[0] for f in finished[n]), reverse=True)[B - 1]
                    if max(x[0] for x in live) / len(live[0][3]) ** lp_pow <= worst:
                        continue  # no live beam can still beat the finished ones: done
                if step == budget - 1:  # out of budget: the live beams end here
                    live_end[n] = [(x[0], x[3]) for x in live]
                    continue
                while len(live) < B:  # dead beams keep B rows per source
                    live.append((float("-inf"), a * B, eos, []))
                still.append(n)
                for s, row, t, seq in live:
                    new_scores.append(s), rows.append(row), toks.append(t), new_seqs.append(seq)
            if not still:
                break
            active, seqs = still, new_seqs
            scores = torch.tensor(new_scores).view(len(active), B)
            cache.reorder(torch.tensor(rows, device=self.device))  # also drops the rows of finished sources
            cur = torch.tensor(toks, device=self.device)[:, None]
        stopper = StopMatcher(p.stop)
        out = []
        for n in range(N):
            pool = finished[n] + [(s / max(len(seq), 1) ** lp_pow, seq, "length") for s, seq in live_end[n]]
            pool.sort(key=lambda f: -f[0])
            out.append([self._finish(seq, reason, score, stopper) for score, seq, reason in
                        pool[:p.num_return_sequences]])
        return out

    @torch.no_grad()
    def score(self, src: list[int], tgt: list[int]) -> float:
        """log P(tgt + [eos] | src) under the model, with the same banned ids as decoding."""
        enc, keep = self._encode([src])
        y = list(tgt) + [self.cfg.eos_token_id]
        x = torch.tensor([[self.cfg.decoder_start_token_id] + y[:-1]], device=self.device)
        logits = self.model.decode(x, self.model.new_cache(enc, keep))[0]
        lp = self._logp(logits).log_softmax(-1)
        return float(sum(lp[i, t] for i, t in enumerate(y)))


__all__ = ["Seq2SeqEngine", "lang_tag", "is_seq2seq"]
