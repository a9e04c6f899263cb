"""`chatsmith serve` over a translation (encoder–decoder) model: the OpenAI routes mapped onto
`Seq2SeqEngine`.

- POST /v1/completions: each prompt string is a source text, each choice's `text` its translation.
  POST /v1/chat/completions: the last user turn is the source and the reply is its translation;
  earlier turns and system messages are ignored (a translator has no conversation state).
- The target language is named by the model id: /v1/models lists NAME and one NAME:LANG per
  target language the model knows. NAME:LANG translates into LANG; plain NAME (or no `model`)
  uses `serve --tgt`, else the model's only language, else, for a zh+en model, the language the
  source is not (it counts as Chinese when it has at least as many CJK characters as Latin-script
  words); anything else is a 400 naming the choices.
- Decoding: `temperature` > 0 samples (with top_p, top_k, seed, repetition_penalty); temperature 0
  is greedy; `num_beams` > 1 (a vLLM/HF-style extension field, with `length_penalty`), or on
  /v1/completions `best_of` > 1, is beam search and `n` returns the n best beams. A request that
  sets none of these gets the server's default: `serve --num-beams` beams (1 = greedy), raised to
  `n` when n > 1, so asking for n translations gives an n-best list rather than n copies. A
  translator sampled at temperature 1 (the decoder's default) writes noise, so that default is
  not taken over.
- `max_tokens` absent: up to the decoder's whole context (not the legacy 16), since a cut
  translation is worth little; more than the context holds is a 400. A source longer than the
  context is refused (400 context_length_exceeded), not cut: an API client gets told, the CLI warns.
- Unsupported here, each a 400 naming the field: logprobs / top_logprobs, echo, suffix, tools /
  functions, logit_bias, token-id prompts, repetition_penalty without sampling.
- Streaming sends each choice's translation as one content chunk, then its finish chunk: the
  engine decodes a batch of sources to the end in one call (beam search cannot know its final
  text before then).

Concurrency: `TranslationWorker` is one thread that owns the engine (the model is not
re-entrant); it speaks the scheduler's ticket protocol (`chatsmith.serve.scheduler.run_jobs`,
`admit`), so queue limits (429), client disconnects and streaming are the decoder server's own
code. The requests waiting when the thread comes round are decoded together, one batch per
decoding setting (sampled requests alone, so a seed reproduces its reply). A client that leaves
before its batch starts is dropped from it; one whose batch is already decoding is answered into
the void (a batch is at most the model's context in steps).
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import re
import secrets
import threading

from chatsmith import runtime
from chatsmith.engine import Event, SamplingParams
from chatsmith.errors import UserError
from chatsmith.seq2seq_engine import Seq2SeqEngine
from chatsmith.serve import protocol
from chatsmith.serve.protocol import APIError, get_field

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
MAX_BEAMS = 16


def looks_chinese(text: str) -> bool:
    """At least as many CJK characters as Latin-script words (and some): a Chinese sentence that
    names "LibreOffice Writer" is still Chinese, an English one quoting 你好 is still English."""
    cjk = len(_CJK.findall(text))
    return cjk > 0 and cjk >= len(_LATIN_WORD.findall(text))


class Translator:
    """What the routes need of a translation model: its cards, the target rule, request parsing."""

    def __init__(self, engine: Seq2SeqEngine, name: str, tgt: str | None = None, num_beams: int = 1):
        self.engine, self.name = engine, name
        self.languages = list(engine.cfg.languages)
        self.directions = [f"{a}->{b}" for a, b in engine.directions]
        if tgt is not None:
            engine.check_direction(None, tgt)  # UserError naming what the model knows
        if not 1 <= num_beams <= MAX_BEAMS:
            raise UserError(f"--num-beams must be in [1, {MAX_BEAMS}], got {num_beams}")
        self.tgt, self.num_beams = tgt, num_beams
        self.ctx = engine.cfg.max_seq_len

    # --- models -----------------------------------------------------------------------------------
    def cards(self, created: int) -> list[dict]:
        def card(id_, target):
            return {"id": id_, "object": "model", "created": created, "owned_by": "chatsmith",
                    "chatsmith": {"family": "seq2seq", "task": "translation", "languages": self.languages,
                                  "directions": self.directions, "target": target}}
        return [card(self.name, self.tgt)] + [card(f"{self.name}:{x}", x) for x in self.languages]

    def _ids(self) -> list[str]:
        return [self.name] + [f"{self.name}:{x}" for x in self.languages]

    def target_of_model(self, model) -> tuple[str, str | None]:
        """(the model id to answer with, its fixed target or None: decided per source)."""
        if model is None or model == self.name:
            return self.name, self.tgt
        if isinstance(model, str) and model.startswith(self.name + ":"):
            lang = model[len(self.name) + 1:]
            if lang not in self.languages:
                raise APIError(400, f"'{self.name}' does not translate into {lang!r}; it knows "
                               f"{', '.join(self.languages) or 'no tagged language'} (models: "
                               f"{', '.join(self._ids())})", param="model", code="unsupported_language")
            return model, lang
        raise APIError(404, f"the model {model!r} does not exist; this server has {', '.join(self._ids())}",
                       param="model", code="model_not_found")

    def target(self, fixed: str | None, text: str) -> str | None:
        if not self.languages:  # an untagged model: one direction, nothing to choose
            return None
        if fixed is not None:
            return fixed
        if len(self.languages) == 1:
            return self.languages[0]
        if set(self.languages) == {"en", "zh"}:
            return "en" if looks_chinese(text) else "zh"
        raise APIError(400, f"this model translates into {', '.join(self.languages)}: name the target in "
                       f"'model' ({', '.join(self._ids()[1:])})", param="model", code="target_required")

    def source(self, text: str, tgt: str | None, param: str) -> list[int]:
        if not text.strip():
            raise APIError(400, "the text to translate is empty", param=param, code="invalid_value")
        ids, cut = self.engine.source_ids(text, tgt)
        if cut:
            raise APIError(400, f"the text to translate is longer than this model's context of {self.ctx} "
                           f"tokens (its language tag and end token included); split it", param=param,
                           code="context_length_exceeded")
        return ids

    # --- requests ---------------------------------------------------------------------------------
    def decoding(self, body: dict, chat: bool) -> tuple[SamplingParams, int]:
        """SamplingParams by the rules in the module docstring; the shared fields parsed by protocol."""
        best_of = None if chat else get_field(body, "best_of", int, None, lambda v: 1 <= v <= MAX_BEAMS,
                                              f"an integer in [1, {MAX_BEAMS}] (the beam width)")
        # protocol refuses best_of != n (the decoder has no best-of): here it is the beam width
        p, n = protocol.sampling_from({k: v for k, v in body.items() if k != "best_of"}, chat)
        if p.logprobs is not None or body.get("top_logprobs") is not None:
            raise APIError(400, "logprobs are not available from a translation model", param="logprobs",
                           code="unsupported_parameter")
        for field in ("echo", "tools", "functions", "logit_bias"):
            if body.get(field):
                raise APIError(400, f"'{field}' is not supported by a translation model", param=field,
                               code="unsupported_parameter")
        beams = get_field(body, "num_beams", int, None, lambda v: 1 <= v <= MAX_BEAMS,
                          f"an integer in [1, {MAX_BEAMS}]")
        if beams is not None and best_of is not None and beams != best_of:
            raise APIError(400, "'num_beams' and 'best_of' both set the beam width; they differ", param="best_of")
        beams = beams or best_of
        if get_field(body, "use_beam_search", bool, False, what="a boolean") and beams is None:
            beams = max(4, n)  # vLLM's switch: its usual width
        p.length_penalty = float(get_field(body, "length_penalty", (int, float), 1.0, lambda v: -10 <= v <= 10,
                                           "a number in [-10, 10]"))
        sampled = body.get("temperature") is not None and p.temperature > 0
        if not sampled:  # greedy or beams: no temperature (protocol's default is 1), so such requests batch
            p.temperature = 0.0
        if beams is not None and beams > 1:
            if sampled:
                raise APIError(400, "beam search ('num_beams'/'best_of' > 1) does not sample: leave 'temperature' "
                               "out or set it to 0", param="temperature")
            if n > beams:
                raise APIError(400, f"'n' ({n}) cannot exceed the beam width ({beams})", param="n")
        elif not sampled:
            if beams is None and body.get("temperature") is None:  # the server's default decoding
                beams = max(self.num_beams, n)
        if not sampled and p.repetition_penalty != 1.0:
            raise APIError(400, "'repetition_penalty' applies when sampling (temperature > 0) only",
                           param="repetition_penalty")
        p.num_beams = beams or 1
        if sampled and p.seed is None:  # the engine seeds 0 by default; a server's replies should vary
            p.seed = secrets.randbelow(2 ** 31)
        limit = self.ctx - 1  # the decoder's positions: the start token, then the translation
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            p.max_new_tokens = limit
        elif p.max_new_tokens > limit:
            raise APIError(400, f"this model writes at most {limit} tokens per translation; you asked for "
                           f"{p.max_new_tokens}", param="max_tokens", code="context_length_exceeded")
        try:
            p.validate()
        except UserError as e:
            raise APIError(400, str(e)) from None
        return p, n

    def sources(self, body: dict, chat: bool, max_chars: int | None) -> tuple[list[str], str]:
        """The texts to translate and the field they came from."""
        if chat:
            msgs = protocol.parse_messages(body)
            users = [m["content"] for m in msgs if m["role"] == "user"]
            if not users:
                raise APIError(400, "'messages' has no user turn: its text is what gets translated",
                               param="messages")
            texts, param = [users[-1]], "messages"
        else:
            prompt = body.get("prompt")
            texts = [prompt] if isinstance(prompt, str) else prompt
            if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
                raise APIError(400, "'prompt' must be a string or a non-empty list of strings (the texts to "
                               "translate; token ids are not taken)", param="prompt", code="invalid_type")
            if len(texts) > protocol.MAX_PROMPTS:
                raise APIError(400, f"at most {protocol.MAX_PROMPTS} prompts per request", param="prompt")
            param = "prompt"
        for t in texts:
            protocol.check_chars(len(t), param, self.ctx, max_chars)
        return texts, param

    def parse_call(self, body: dict, chat: bool, max_batch: int, max_chars: int | None = None) -> protocol.Call:
        """The validated call, one engine job per source (run off the event loop: it tokenises)."""
        model, fixed = self.target_of_model(body.get("model"))
        p, n = self.decoding(body, chat)
        texts, param = self.sources(body, chat, max_chars)
        stream, include_usage = protocol._stream_options(body)
        jobs = [(self.source(t, self.target(fixed, t), param), dataclasses.replace(p, stop=list(p.stop)))
                for t in texts]
        if len(jobs) * n > max_batch:
            raise APIError(400, f"{len(jobs)} prompts x n={n} is more than the {max_batch} sequences this "
                                f"server decodes at once", param="n")
        return protocol.Call(chat, jobs, texts, n, stream, include_usage, False, model=model)

    def tokenize(self, body: dict, token_text: protocol.TokenText) -> dict:
        """POST /tokenize: the ids the encoder reads for `prompt` (or the last user turn of
        `messages`): the target's <2LANG> tag, the text, the end token."""
        _, fixed = self.target_of_model(body.get("model"))
        if "messages" in body:
            (text,), param = self.sources(body, True, None)
        else:
            text, param = body.get("prompt"), "prompt"
            if not isinstance(text, str):
                raise APIError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
        ids = self.source(text, self.target(fixed, text), param)
        out = {"tokens": ids, "count": len(ids), "max_model_len": self.ctx}
        if get_field(body, "return_token_strs", bool, False, what="a boolean"):
            out["token_strs"] = [token_text.text[i] for i in ids]
        return out


# --- the worker thread ------------------------------------------------------------------------------

class _Running:
    """A ticket's `req` once the worker took it: run_jobs cancels what has not `finished`."""

    __slots__ = ("finished",)

    def __init__(self):
        self.finished = False


def _key(t) -> tuple:
    """Tickets decoded in one engine call share every decoding setting; a sampled one goes alone,
    so its seed gives the same reply whatever else is waiting."""
    p = t.params
    return (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty, tuple(p.stop),
            p.num_return_sequences, p.num_beams, p.length_penalty, p.seed, id(t) if p.temperature > 0 else 0)


class TranslationWorker:
    """The thread that owns the Seq2SeqEngine, in the shape `scheduler.run_jobs` and `admit` drive
    (submit / cancel / stop, alive, waiting). `batches` counts engine calls, `cancelled` the tickets
    dropped before they ran (both read by tests)."""

    def __init__(self, engine: Seq2SeqEngine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.stopping = False
        self.batches = self.cancelled = 0
        self.running = 0  # sources in the batch being decoded
        self.pending: list = []  # tickets taken, not yet decoded (the thread's own)
        self.current: list = []  # the batch being decoded
        self.thread = threading.Thread(target=self._run, name="chatsmith-translate", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def waiting(self) -> int:
        return self.inbox.qsize() + len(self.pending)

    def submit(self, t):
        self.inbox.put(("add", t))

    def cancel(self, t):
        self.inbox.put(("cancel", t))

    def stop(self):
        self.stopping = True
        self.inbox.put(("stop", None))

    def _run(self):
        try:
            while self._take():
                if not self.pending:
                    continue
                # the oldest waiting ticket's setting first, with every ticket that shares it
                key = _key(self.pending[0])
                group = [t for t in self.pending if _key(t) == key]
                self.pending = [t for t in self.pending if _key(t) != key]
                self.current = group
                self._decode(group)
                self.current = []
                if not self.pending:
                    runtime.return_freed_memory()
        except BaseException as e:  # a bug: fail every open request instead of hanging them
            self.error = e
            err = APIError(500, f"the translation engine failed: {type(e).__name__}: {e}", "server_error")
            self.loop.call_soon_threadsafe(_deliver, [(t, "error", err) for t in self.current + self.pending])
            raise

    def _take(self) -> bool:
        """Apply the inbox (block only when nothing waits); False on 'stop'. Between two batches,
        so a request that arrives while one decodes joins the next, and a cancel lands in time."""
        msgs = [] if self.pending else [self.inbox.get()]
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for kind, t in msgs:
            if kind == "stop":
                return False
            if kind == "add":
                t.req = _Running()
                self.pending.append(t)
            elif kind == "cancel" and t in self.pending:
                self.pending.remove(t)
                self.cancelled += 1
        return True

    def _decode(self, group: list):
        self.running = len(group)
        try:
            outs = self.engine.generate_ids([t.prompt_ids for t in group], group[0].params)
            out = []
        except UserError as e:  # parse_call validated the request: a model that refuses is still the client's 400
            outs, out = [], [(t, "error", APIError(400, str(e))) for t in group]
        finally:
            self.running = 0
        self.batches += 1
        for t, comps in zip(group, outs):
            evs = []
            for i, c in enumerate(comps):
                if c.text:
                    evs.append(Event(None, i, c.text, []))
                evs.append(Event(None, i, "", [], c.finish_reason))
            out += [(t, "events", evs), (t, "done", comps)]
        for t in group:
            t.req.finished = True
        self.loop.call_soon_threadsafe(_deliver, out)


def _deliver(out):
    for t, kind, item in out:
        t.queue.put_nowait((kind, item))


__all__ = ["Translator", "TranslationWorker", "looks_chinese"]
