"""The one generation engine: continuous batching over a slot KV cache, per-request sampling.

Requests of any prompt length share one forward pass per decoding step; new ones join between
steps and finished or cancelled ones leave at once (`Engine.step`). `generate` returns finished
completions, `generate_many` batches many prompts, `stream` yields text as it is decoded. Sampling is
temperature / top-k / top-p (nucleus, Holtzman et al. 2020) / repetition penalty (CTRL, Keskar et
al. 2019); temperature 0 is greedy; `num_beams > 1` is beam search. Stop strings are matched on
the decoded text, never appear in the output, and streamed text is held back while it could still
be the start of a stop string.

Only ids the tokenizer has are ever sampled or reported: a model's vocabulary is padded (to a
multiple of 64 by `pretrain`), and the logits of those padding rows are masked out of sampling,
logprobs and top_logprobs. `logit_bias` (OpenAI's: token id -> a bias in [-100, 100] added to its
logit before sampling) shifts what is sampled; reported logprobs stay the model's own.

Tools run inside generation through a per-sequence hook (`SamplingParams.tool_hook`, see
chatsmith.tools.inline): after a sampled token the hook may queue tokens (a tool's result), which
are fed one per step in place of sampling; they never end the reply and `Completion.forced` says
where they are.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from chatsmith.errors import UserError
from chatsmith.model.decoder import cpu_int8_supported
from chatsmith.runtime import cpu_has_native_bf16
from chatsmith.watermark import Watermark, context_tail


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
    logprobs: int | None = None  # report each generated token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (echo scoring); allows max_new_tokens=0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI's)
    # tools run inside generation: a factory of per-sequence hooks; a hook sees the reply's text after
    # each sampled token and may return tokens to feed instead of sampling (a tool's result, see
    # chatsmith.tools.inline). Forced tokens are never end tokens and never call the hook.
    tool_hook: object | None = None
    watermark: Watermark | None = None  # green-list watermark (Kirchenbauer et al. 2023)

    def validate(self):
        if self.max_new_tokens < (0 if self.prompt_logprobs is not None else 1):
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
        for t, b in (self.logit_bias or {}).items():
            if not (isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100):
                raise UserError(f"logit_bias maps token ids to biases in [-100, 100]; got {t!r}: {b!r}")


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end token or stop string) | "length"
    score: float | None = None  # beam search: length-normalised log-probability
    # with SamplingParams.logprobs: (token id, log-probability, [(id, log-probability)] alternatives)
    # per generated token (under the model's raw distribution, before temperature and filters)
    logprobs: list | None = None
    prompt_logprobs: list | None = None  # the same per prompt token; None for the first
    forced: list[int] | None = None  # indices into token_ids fed by a tool hook, not sampled (RL masks them)


# families this engine does not decode, and what to use instead
NOT_DECODED = {
    "clip": "this is a clip (image-text) model: it does not generate text; use "
            "`chatsmith clip classify | search | embed` or `chatsmith eval MODEL --tasks clip`",
    "seq2seq": "this is an encoder-decoder (translation) model: use `chatsmith translate MODEL`, "
               "`chatsmith serve MODEL` (the OpenAI API translates) or `chatsmith eval MODEL --tasks "
               "translation`; chat and generate need a decoder",
}
# decode weights: fp32 as trained, int8, or bf16 (see GPT.fuse_decode_weights)
QUANTIZE = ("none", "int8", "bf16")


def check_quantize(model, mode: str):
    """Refuse a --quantize the model or machine cannot honour, before any work."""
    if mode not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {mode!r}")
    device = next(model.parameters()).device.type
    if mode == "int8" and device != "cpu":
        raise UserError("--quantize int8 runs PyTorch's CPU int8 kernels: use it with --device cpu")
    if mode == "int8" and not cpu_int8_supported():
        raise UserError("--quantize int8: this PyTorch build has no CPU int8 engine (fbgemm, x86 or qnnpack)")
    if mode == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        raise UserError("--quantize bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), so "
                        "PyTorch would emulate it, ~100x slower than fp32; use --quantize none or int8")
    if getattr(model, "fuse_decode_weights", lambda: None)() is None:
        raise UserError(f"--quantize {mode} needs a plain Llama-shaped decoder (no biases); "
                        "this model is not one")


CACHE_BLOCK = 64  # the slot cache's length grows in multiples of this many positions


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index (N, 1) into each row of probs (N, V) at the row's uniform number u (N,) of its mass."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)


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
        """Length of the prefix that cannot become part of a stop string as more text arrives.
        Looks only at the text's end (no copy of it): the cost per token is bounded by the stop
        strings, not by the length of the reply."""
        n = len(text)
        while n and text[n - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for its other bytes
            n -= 1
        for s in self.stops:
            for k in range(min(len(s) - 1, n), 0, -1):
                if text.endswith(s[:k], 0, n):
                    n -= k
                    break
        return n


_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, stream) pairs over the seed space


class Detokenizer:
    """Incremental detokenization: text grows by the decode of the newest tokens only, so a long
    reply costs O(1) per token instead of re-decoding everything. Text is committed only at
    character boundaries: a token that ends inside a multi-byte UTF-8 character is held until the
    rest arrives (byte-level BPE splits characters such as 你 across tokens).

    With a byte-level vocabulary (`tok.byte_pieces()`) the tokens' bytes go through an incremental
    UTF-8 decoder: a sequence that can still complete is held however long it waits, and only one
    that cannot (the model emitted invalid UTF-8) becomes U+FFFD, exactly where decoding the whole
    reply puts it. Other tokenizers: the decode of the newest tokens is held while it ends in U+FFFD,
    for up to 8 tokens."""

    __slots__ = ("tok", "ids", "prefix", "read", "text", "pieces", "utf8")

    def __init__(self, tok):
        self.tok, self.ids, self.prefix, self.read, self.text = tok, [], 0, 0, ""
        pieces = getattr(tok, "byte_pieces", None)
        self.pieces = pieces() if callable(pieces) else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if self.pieces is not None else None

    def push(self, t: int) -> str:
        self.ids.append(t)
        if self.utf8 is not None:
            delta = self.utf8.decode(self.pieces[t] if 0 <= t < len(self.pieces) else b"")
            self.text += delta
            return delta
        new = self.tok.decode(self.ids[self.prefix:])
        if new.endswith("\ufffd") and len(self.ids) - self.read < 8:
            return ""  # incomplete character; after 8 tokens it is real garbage: let it through
        old = self.tok.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        delta = new[len(old):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        if self.utf8 is not None:  # the reply ended inside a character: it can no longer complete
            tail = self.utf8.decode(b"", final=True)
            self.text += tail
            return tail
        if self.read == len(self.ids):
            return ""
        new = self.tok.decode(self.ids[self.prefix:])
        old = self.tok.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        self.prefix = self.read = len(self.ids)
        self.text += new[len(old):]
        return new[len(old):]


class Seq:
    """One decoded sequence (a request with n > 1 has n): its slot row, tokens, text, sampler."""

    __slots__ = ("req", "index", "row", "out", "detok", "text", "emitted", "finish", "gen", "lps", "new_lps",
                 "history", "hook", "forced", "forced_at")

    def __init__(self, req: "Request", index: int, tok):
        self.req, self.index, self.row = req, index, -1
        self.out: list[int] = []
        self.detok = Detokenizer(tok)
        self.text, self.emitted, self.finish = "", 0, None
        self.gen = None
        self.lps: list | None = [] if req.params.logprobs is not None else None
        self.new_lps: list = []  # logprob entries not yet handed out with an event
        self.history = None
        self.hook = req.params.tool_hook() if req.params.tool_hook is not None else None
        self.forced: list[int] = []  # tokens the tool hook queued, fed one per step
        self.forced_at: list[int] = []  # where in `out` the fed tokens went


@dataclass
class Event:
    """What one step produced for one sequence: new text (held back while it could still be part of
    a stop string), the logprob entries of the tokens decoded since the last event, and the finish
    reason once the sequence is done."""

    req: "Request"
    index: int
    text: str
    logprobs: list
    finish_reason: str | None = None


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int, seed: int, tok, stream_id: int):
        self.prompt_ids, self.params, self.budget = prompt_ids, params, budget
        self.seqs = [Seq(self, i, tok) for i in range(params.num_return_sequences)]
        self.seed, self.stream_id = seed, stream_id
        self.stopper = StopMatcher(params.stop)
        self.prompt_logprobs: list | None = None
        self.completions: list[Completion] | None = None
        self.cancelled = False
        self.user = None  # the caller's handle (the server's response queue)

    @property
    def finished(self) -> bool:
        return self.completions is not None



def end_ids(tokenizer) -> set[int]:
    """The tokens that end a reply: the tokenizer's eos, an imported model's own stop tokens, and
    chatsmith's `<|assistant_end|>` where the vocabulary has it."""
    ids = {tokenizer.eos_id} | set(getattr(tokenizer, "stop_ids", ()))
    i = tokenizer.token_to_id("<|assistant_end|>")
    return ids if i is None else ids | {i}

class Engine:
    """Continuous batching over a slot KV cache (see `GPT.decode_step`).

    A request is prefilled alone into its slot row(s) (one per sample; the n samples of a request
    share one prefill), then every active row advances one token per `step` in a single forward
    pass, each at its own length with its own sampling settings. Requests join between steps as
    rows free up; a finished or cancelled request's rows are released at once and the last rows
    moved into the hole, so the batch stays packed at rows [0, B). Single-threaded by design: the
    server drives it from one scheduler thread.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, quantize: str | None = None):
        if getattr(model, "family", None) in NOT_DECODED:
            raise UserError(NOT_DECODED[model.family])
        self.model = model.eval()
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.eos_ids = end_ids(tokenizer)
        # the ids the tokenizer can decode: the model's rows past them are padding, never sampled
        self.n_vocab = min(getattr(tokenizer, "vocab_size", model.cfg.vocab_size), model.cfg.vocab_size)
        self.max_batch = max_batch
        self.cache = None
        self.rows: list[Seq] = []  # row r of the cache holds self.rows[r]
        self.lens: list[int] = []  # tokens in each row's slot (a Python mirror: no device sync)
        self.waiting: deque[Request] = deque()
        self.fast = True  # fused decode weights when the model is plain (see GPT.fuse_decode_weights)
        self._fused = None
        self._fused_key = None  # the weights' versions when _fused was taken
        self.quantize = None if quantize in (None, "none") else quantize
        if self.quantize:
            check_quantize(model, self.quantize)

    # --- requests ------------------------------------------------------------------------------
    def _check(self, prompt_ids: list[int], p: SamplingParams) -> int:
        p.validate()
        ctx = self.model.cfg.max_seq_len
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= ctx + (p.max_new_tokens == 0):
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {ctx}")
        if p.watermark is not None and p.watermark.vocab_size > self.n_vocab:
            raise UserError(f"the watermark's vocabulary ({p.watermark.vocab_size}) is larger than the model's "
                            f"({self.n_vocab}): build it with the model's tokenizer")
        bad = [t for t in [*prompt_ids, *(p.logit_bias or {})] if not 0 <= t < self.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        return min(p.max_new_tokens, ctx - len(prompt_ids))

    def add_request(self, prompt_ids: list[int], p: SamplingParams, stream_id: int | None = None) -> Request:
        """Queue a request; it joins the batch at the next `step` that has rows for it.
        stream_id: with a fixed seed, requests with different stream ids get different samples
        (generate_many sends the same prompt several times for RL groups)."""
        if p.num_beams > 1:
            raise UserError("beam search is not batched: use generate() for num_beams > 1")
        budget = self._check(list(prompt_ids), p)
        # no seed: draw one from torch's global generator, so torch.manual_seed makes a whole run
        # (e.g. RL rollouts) reproducible without touching the global generator's state otherwise
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))
        if stream_id is None:
            stream_id = 0
        req = Request(list(prompt_ids), p, budget, seed, self.tok, stream_id)
        self.waiting.append(req)
        return req

    @torch.inference_mode()
    def cancel(self, req: Request):
        """Drop a request now: a waiting one leaves the queue, a running one frees its rows."""
        if req.finished:
            return
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
        else:
            for s in sorted((s for s in req.seqs if s.row >= 0), key=lambda s: -s.row):
                self._release(s)
        self._complete(req, "cancelled")

    @torch.inference_mode()
    def stop_seq(self, req: Request, index: int, reason: str = "cancelled"):
        """End one sample of a request now, with `reason` as its finish reason, and free its row; the
        request's other samples decode on (the server's content filter cuts one choice of n). The
        request completes when it was the last one still decoding."""
        s = req.seqs[index]
        if req.finished or s.finish is not None:
            return
        s.finish = reason
        if s.row >= 0:
            self._release(s)
        if all(x.finish for x in req.seqs):
            if req in self.waiting:
                self.waiting.remove(req)
            self._complete(req)
        # otherwise, if it is still waiting, _admit leaves the stopped sample out of the batch

    @property
    def num_active(self) -> int:
        return len(self.rows)

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    # --- the slot cache --------------------------------------------------------------------------
    def _ensure_cache(self, rows: int, length: int):
        """A cache of at least `rows` slots of `length` positions. It grows geometrically (slots x2,
        positions x2 in blocks of CACHE_BLOCK, capped at the model's context), so a request's
        tokens cost O(1) copies each, and memory follows the rows and tokens in flight: SmolLM2
        (8k context) serving short chats holds a few hundred positions per slot, not 8k."""
        ctx = self.model.cfg.max_seq_len
        if self.cache is None:
            self.cache = self.model.new_slot_cache(rows, min(ctx, _round_up(length, CACHE_BLOCK)))
            return
        c = self.cache
        if rows > c.n_slots or length > c.max_len:
            n = max(rows, min(2 * c.n_slots, max(self.max_batch, rows))) if rows > c.n_slots else c.n_slots
            L = min(ctx, _round_up(max(length, 2 * c.max_len), CACHE_BLOCK)) if length > c.max_len else c.max_len
            c.grow(n, L)

    def _snapshot(self):
        """The fused (or int8) decode weights, rebuilt only when a weight changed since the last
        snapshot: every in-place update (an optimizer step, load_state_dict, a LoRA merge) bumps a
        tensor's version counter. Re-quantizing SmolLM2 takes about a second, which every request
        from idle would otherwise pay."""
        if not (self.fast or self.quantize):
            self._fused = None
            return
        key = tuple((id(p), p._version) for p in self.model.parameters())
        if key != self._fused_key:
            self._fused, self._fused_key = self.model.fuse_decode_weights(self.quantize), key

    def _fits(self, n: int) -> bool:
        if not self.rows:  # an idle engine takes any request, growing the cache for n > max_batch
            return True
        return len(self.rows) + n <= self.max_batch

    def _release(self, s: Seq):
        """Free s's row; the last row moves into it so rows stay packed."""
        r, last = s.row, len(self.rows) - 1
        if r != last:
            moved = self.rows[last]
            self.cache.move_row(last, r, self.lens[last])
            self.rows[r], self.lens[r], moved.row = moved, self.lens[last], r
        self.rows.pop()
        self.lens.pop()
        s.row = -1
        if not self.rows:  # idle: give the memory back; the next request allocates what it needs
            self.cache = None

    def _complete(self, req: Request, reason: str | None = None):
        comps = []
        for s in req.seqs:
            if s.finish is None:
                s.finish = reason or "length"
            comps.append(Completion(s.out, s.text, s.finish, logprobs=s.lps, prompt_logprobs=req.prompt_logprobs,
                                    forced=s.forced_at or None))
        req.completions = comps

    def _real(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) with the padding rows of the vocabulary at -inf (in place), so no
        sampler, argmax or top-k can reach an id the tokenizer does not have."""
        if logits.shape[-1] > self.n_vocab:
            logits[..., self.n_vocab:] = float("-inf")
        return logits

    # --- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests that fit (prefill + first token), then decode one token for every
        active row in one forward pass. Returns what each sequence produced."""
        events: list[Event] = []
        while self.waiting and self._fits(self.waiting[0].params.num_return_sequences):
            self._admit(self.waiting.popleft(), events)
        if self.rows:
            B = len(self.rows)
            self._ensure_cache(B, max(self.lens) + 1)
            idx = torch.tensor([s.out[-1] for s in self.rows], device=self.device)
            logits = self._real(self.model.decode_step(idx, self.cache, span=max(self.lens) + 1, fused=self._fused))
            for r in range(B):
                self.lens[r] += 1
            self._advance(list(self.rows), logits, events)
        return events

    def _admit(self, req: Request, events: list[Event]):
        n = len(req.seqs)
        if not self.rows:  # starting from idle: snapshot the weights (they may have been trained since)
            self._snapshot()
        r0 = len(self.rows)
        T = len(req.prompt_ids)
        self._ensure_cache(r0 + n, T + 1)
        x = torch.tensor(req.prompt_ids, device=self.device)
        echo = req.params.prompt_logprobs is not None  # echo + logprobs: score every prompt token
        logits = self.model.prefill(x, self.cache, r0, self._fused, every_position=echo)
        if echo:
            logp = self._real(logits.float()).log_softmax(-1)
            entries = [None]
            for t in range(1, T):
                entries.append(self._lp_entry(logp[t - 1], req.prompt_ids[t], req.params.prompt_logprobs))
            req.prompt_logprobs = entries
            logits = logp[-1:]  # log-softmax preserves the argmax and the sampling distribution
        else:
            logits = self._real(logits)
        for i, s in enumerate(req.seqs):
            if i:
                self.cache.move_row(r0, r0 + i, T)
            s.row = r0 + i
            self.rows.append(s)
            self.lens.append(T)
            g = torch.Generator(device=self.device)
            g.manual_seed((req.seed + (req.stream_id * 1_000_003 + i) * _MIX) % (1 << 63))
            s.gen = g
        if req.budget == 0:  # scoring only (echo with max_tokens 0)
            for s in sorted(req.seqs, key=lambda s: -s.row):
                self._release(s)
            self._complete(req, "length")
            for s in req.seqs:
                events.append(Event(req, s.index, "", [], "length"))
            return
        live = [s for s in req.seqs if s.finish is None]  # a sample stopped while waiting (stop_seq) never decodes
        for s in sorted((s for s in req.seqs if s.finish is not None), key=lambda s: -s.row):
            self._release(s)
        if not live:
            self._complete(req)
            return
        self._advance(live, logits.expand(len(live), -1), events)

    def _lp_entry(self, logp_row: torch.Tensor, t: int, top: int):
        """(token id, logprob, [(id, logprob) of the `top` most likely]) from a log-softmax row.
        A logprob that is not finite (-inf; NaN from broken weights) reads -9999.0, OpenAI's value for
        "very unlikely", so every response stays valid JSON."""
        alts = []
        if top > 0:
            v, i = logp_row.topk(min(top, self.n_vocab))
            alts = list(zip(i.tolist(), map(_finite, v.tolist())))
        return t, _finite(float(logp_row[t])), alts

    def _advance(self, seqs: list[Seq], logits: torch.Tensor, events: list[Event]):
        """Sample one token for each of seqs (row i of logits), append it, emit text, retire the done."""
        toks = self._sample(seqs, logits)
        forced = [bool(s.forced) for s in seqs]
        if any(forced):
            toks = [s.forced.pop(0) if f else t for s, t, f in zip(seqs, toks, forced)]
        need_lp = [i for i, s in enumerate(seqs) if s.lps is not None]
        if need_lp:
            logp = logits[need_lp].float().log_softmax(-1)
            for j, i in enumerate(need_lp):
                seqs[i].new_lps.append(self._lp_entry(logp[j], toks[i], seqs[i].req.params.logprobs))
        done = []
        for s, t, f in zip(seqs, toks, forced):
            req = s.req
            if t in self.eos_ids and not f:
                s.finish = "stop"
                if s.new_lps:
                    s.new_lps.pop()  # the end token is not part of the reply
            else:
                if f:
                    s.forced_at.append(len(s.out))
                s.out.append(t)
                before = len(s.text)
                delta = s.detok.push(t)
                if delta:
                    s.text += delta
                    if req.stopper.stops:
                        cut = req.stopper.find(s.text, before)
                        if cut >= 0:
                            s.text, s.finish = s.text[:cut], "stop"
                    if s.hook is not None and not f and s.finish is None:
                        s.forced = list(s.hook(s.text) or ())
                if s.finish is None and len(s.out) >= req.budget:
                    s.finish = "length"
            if s.finish == "length" or (s.finish == "stop" and t in self.eos_ids):
                tail = s.detok.flush()  # bytes held back for an unfinished character
                if tail:
                    s.text += tail
                    cut = req.stopper.find(s.text, len(s.text) - len(tail)) if req.stopper.stops else -1
                    if cut >= 0:
                        s.text = s.text[:cut]
            safe = len(s.text) if s.finish else req.stopper.safe_len(s.text)
            if safe > s.emitted or s.finish or s.new_lps and s.lps is not None and safe > s.emitted:
                piece = s.text[s.emitted:safe] if safe > s.emitted else ""
                if piece or s.finish:
                    lps = s.new_lps
                    if s.lps is not None:
                        s.lps.extend(lps)
                        s.new_lps = []
                    events.append(Event(req, s.index, piece, lps, s.finish))
                    s.emitted = max(s.emitted, safe)
            if s.finish:
                done.append(s)
        for s in sorted(done, key=lambda s: -s.row):
            self._release(s)
        for req in {id(s.req): s.req for s in done}.values():
            if all(x.finish for x in req.seqs) and not req.finished:
                self._complete(req)

    def _sample(self, seqs: list[Seq], logits: torch.Tensor) -> list[int]:
        """Next token per row, each row with its own settings and its own seeded generator.

        Vectorised over rows: temperature as a column, top-k / top-p on one sort of the batch, and
        inverse-CDF sampling with one uniform number per row from that row's generator, so a
        request's samples do not depend on what else shares the batch."""
        ps = [s.req.params for s in seqs]
        biased = [i for i, p in enumerate(ps) if p.logit_bias]
        if biased:  # before the penalty and temperature, as OpenAI adds it to the raw logits
            logits = logits.float().clone()
            for i in biased:
                logits[i] += self._bias_row(ps[i], logits.device)
        penal = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0]
        if penal:
            logits = logits.float().clone()
            for i in penal:
                s = seqs[i]
                hist = torch.tensor([s.req.prompt_ids + s.out], device=logits.device)
                logits[i:i + 1] = process_logits(logits[i:i + 1], SamplingParams(
                    temperature=0, repetition_penalty=ps[i].repetition_penalty), hist)
        marked = [i for i, p in enumerate(ps) if p.watermark is not None]
        if marked:  # each row's green list comes from its own context (prompt + reply so far)
            logits = logits.float().clone()
            by_wm: dict[int, list[int]] = {}  # one scatter per watermark (the server's one key: one for the batch)
            for i in marked:
                by_wm.setdefault(id(ps[i].watermark), []).append(i)
            for rows in by_wm.values():
                wm = ps[rows[0]].watermark
                wm.add_bias([context_tail(seqs[i].req.prompt_ids, seqs[i].out, wm.cfg.context_width) for i in rows],
                            logits, rows)
        greedy = [i for i, p in enumerate(ps) if p.temperature == 0]
        if len(greedy) == len(seqs):
            return logits.argmax(-1).tolist()
        out = [0] * len(seqs)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                out[i] = t
        samp = [i for i, p in enumerate(ps) if p.temperature > 0]
        lg = logits[samp].float() if len(samp) < len(seqs) else logits.float()
        sp = [ps[i] for i in samp]
        lg = lg / torch.tensor([p.temperature for p in sp], device=lg.device)[:, None]
        u = torch.cat([torch.rand(1, generator=seqs[i].gen, device=lg.device) for i in samp])
        V = lg.shape[-1]
        # rows with top-k / top-p sample from their probability-sorted distribution, the others from
        # the distribution in token order: two groups, so a row's sample never depends on whether a
        # neighbour in the batch filters (one sort of the filtering rows only)
        filt = [j for j, p in enumerate(sp) if p.top_k > 0 or p.top_p < 1.0]
        plain = [j for j, p in enumerate(sp) if not (p.top_k > 0 or p.top_p < 1.0)]
        pick = torch.empty(len(sp), 1, dtype=torch.long, device=lg.device)
        if plain:
            pick[plain] = _inverse_cdf(lg[plain].softmax(-1), u[plain])
        if filt:
            fp = [sp[j] for j in filt]
            lf, order = lg[filt].sort(dim=-1, descending=True)
            if any(p.top_k > 0 for p in fp):
                k = torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in fp], device=lg.device)
                kth = lf.gather(1, (k - 1)[:, None])
                lf = lf.masked_fill(lf < kth, float("-inf"))
            probs = lf.softmax(-1)
            if any(p.top_p < 1.0 for p in fp):
                top_p = torch.tensor([p.top_p for p in fp], device=lg.device)[:, None]
                # drop a token when the tokens ranked above it already cover top_p of the mass
                probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
            pick[filt] = order.gather(1, _inverse_cdf(probs, u[filt]))
        # NaN logits (broken weights) make the inverse CDF run off the end: keep even those in the vocabulary
        for i, t in zip(samp, pick[:, 0].clamp_(max=self.n_vocab - 1).tolist()):
            out[i] = t
        return out

    def _bias_row(self, p: SamplingParams, device) -> torch.Tensor:
        row = torch.zeros(self.model.cfg.vocab_size, device=device)
        ids = list(p.logit_bias)
        row[ids] = torch.tensor([float(p.logit_bias[t]) for t in ids], device=device)
        return row

    @staticmethod
    def _marked(p: SamplingParams, prompt_ids: list[int], seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        """Beam search's log-probabilities, each beam's logits watermarked from its own context."""
        if p.watermark is not None:
            w = p.watermark.cfg.context_width
            logits = p.watermark.add_bias([context_tail(prompt_ids, q, w) for q in seqs], logits.clone())
        return logits.log_softmax(-1)

    # --- the public API ---------------------------------------------------------------------------
    def run_until_done(self, reqs: list[Request]):
        while not all(r.finished for r in reqs):
            self.step()

    def stream(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[tuple[int, str]]:
        """Yield (sequence index, new text) as tokens are decoded; then the Completions are in
        `self.last`. Closing the generator early cancels the request and frees its rows."""
        if p.num_beams > 1:
            self.last = self._beam(prompt_ids, p)
            for c in self.last:
                yield 0, c.text
            return
        req = self.add_request(prompt_ids, p)
        try:
            while not req.finished:
                for ev in self.step():
                    if ev.req is req and ev.text:
                        yield ev.index, ev.text
        finally:
            if not req.finished:
                self.cancel(req)
        self.last = req.completions

    def generate(self, prompt_ids: list[int], p: SamplingParams) -> list[Completion]:
        if p.num_beams > 1:
            return self._beam(prompt_ids, p)
        req = self.add_request(prompt_ids, p)
        self.run_until_done([req])
        self.last = req.completions
        return req.completions

    def generate_many(self, prompts: list[list[int]], p: SamplingParams | list[SamplingParams],
                      max_batch: int = 32, n: int = 1) -> list[Completion]:
        """n completions per prompt, in prompt order (a prompt's n consecutive). Prompts of any
        lengths are decoded together, up to max_batch rows at a time; a finished row is refilled
        with the next prompt at once. With a fixed seed, prompt i gets its own sample stream (same
        prompt twice: two samples). n > 1 prefills each prompt once and copies its cache to n rows
        (an RL group: 4 samples of a 40-token prompt cost one prefill, not four). `p` may also be a
        list, one SamplingParams per prompt (e.g. each its own token budget)."""
        ps = list(p) if isinstance(p, (list, tuple)) else [p] * len(prompts)
        if len(ps) != len(prompts):
            raise ValueError(f"generate_many: {len(ps)} sampling settings for {len(prompts)} prompts")
        for q in ps:
            q.validate()
        ps = [dataclasses.replace(q, num_return_sequences=n) for q in ps]
        if any(q.num_beams > 1 for q in ps):
            if n > 1:
                raise UserError("generate_many: n > 1 samples per prompt is not beam search; use num_beams 1")
            return [self._beam(ids, q)[0] for ids, q in zip(prompts, ps)]
        saved = self.max_batch
        if not self.rows:
            self.max_batch = max(1, max_batch)
        try:
            reqs = [self.add_request(ids, q, stream_id=i) for i, (ids, q) in enumerate(zip(prompts, ps))]
            self.run_until_done(reqs)
        finally:
            self.max_batch = saved
        return [c for r in reqs for c in r.completions]

    @torch.no_grad()
    def _beam(self, prompt_ids: list[int], p: SamplingParams) -> list[Completion]:
        """Beam search: keep the B best partial sequences by summed log-probability; a sequence
        that ends joins the finished pool with score logp / len**length_penalty."""
        B = p.num_beams
        budget = self._check(prompt_ids, p)
        cache = self.model.new_cache(B, len(prompt_ids) + budget)
        x = torch.tensor([prompt_ids] * B, device=self.device)
        bias = self._bias_row(p, self.device) if p.logit_bias else 0.0
        logp = self._marked(p, prompt_ids, [[]] * B, self._real(self.model(x, cache=cache)[:, -1].float()) + bias)
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
            logits = self.model(torch.tensor(toks, device=self.device)[:, None], cache=cache)[:, -1].float()
            logp = self._marked(p, prompt_ids, seqs, self._real(logits) + bias)
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
