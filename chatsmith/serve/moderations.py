"""POST /v1/moderations in OpenAI's schema, and `serve --moderation`'s checks of requests and replies.

    {"input": "text" | ["text", …] | [{"type": "text", "text": …}, …], "model": "…"}
    -> {"id": "modr-…", "model", "results": [{"flagged", "categories", "category_scores",
        "category_applied_input_types"}]}

As OpenAI's API: an empty string or list is a 400; more than MAX_INPUTS inputs is a 400 and more
than MAX_CHARS characters in all a 413 (the body itself is capped at 4 MiB by the server); an
image input is a 400 (this moderator reads text). Categories: see chatsmith/moderation/__init__.py
(OpenAI's thirteen are always present; only "offensive" and the self-harm pair are judged).

With `serve --moderation`, each chat / completions request is checked first (the last user
message of a chat, every prompt of a completion). A flagged request is answered, with status
200, by a polite refusal (a crisis phrase: a supportive reply with help lines) with
finish_reason "content_filter", not by a 400: a chat client (the web page, the SDK) then shows
the reply in the conversation like any other, and a person in crisis gets the help text instead
of an error. The replies are checked as they stream: the event that would complete flagged text
is withheld, and that choice ends with finish_reason "content_filter": its sample stops decoding
and frees its batch row (`Samples.stop`), while the call's other choices go on; a non-streamed
reply is cut before the first flagged word the same way. The learned
layer, when there is one, runs on the request and, in a reply, on each further 200 characters and
on the finished text; the lexicon runs on every streamed event.
"""

from __future__ import annotations

import asyncio
import secrets
import threading

from fastapi.responses import JSONResponse, StreamingResponse

from chatsmith.engine import Event
from chatsmith.moderation import CRISIS_REPLY, REFUSAL, Moderator
from chatsmith.serve import protocol
from chatsmith.serve.protocol import APIError

MAX_INPUTS = 256
MAX_CHARS = 1_000_000
LEARNED_EVERY = 200  # reply characters between runs of the learned layer while streaming


def parse_input(value) -> list[str]:
    def text(v, where):
        if not isinstance(v, str) or not v.strip():
            raise APIError(400, f"{where} is empty; every input must have text", param="input", code="invalid_value")
        return v

    if isinstance(value, str):
        return [text(value, "'input'")]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a non-empty string or a non-empty list of strings or text objects",
                       param="input", code="invalid_type")
    if len(value) > MAX_INPUTS:
        raise APIError(400, f"'input' has {len(value)} items; at most {MAX_INPUTS} per request", param="input",
                       code="too_many_inputs")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, dict):
            if v.get("type") == "image_url":
                raise APIError(400, f"'input[{i}]' is an image; this moderation model reads text only",
                               param="input", code="invalid_value")
            if v.get("type") != "text":
                raise APIError(400, f"'input[{i}]' must be a string or {{\"type\": \"text\", \"text\": …}}",
                               param="input", code="invalid_type")
            v = v.get("text")
        out.append(text(v, f"'input[{i}]'"))
    if sum(map(len, out)) > MAX_CHARS:
        raise APIError(413, f"the inputs hold {sum(map(len, out))} characters; at most {MAX_CHARS} per request",
                       param="input", code="request_too_large")
    return out


class Moderations:
    def __init__(self, moderator: Moderator):
        self.moderator = moderator
        self.lock = threading.Lock()  # the learned layer's encoder is not re-entrant across threads

    def _check(self, texts: list[str], learned: bool = True):
        with self.lock:
            return self.moderator.check(texts, learned=learned)

    async def check(self, texts: list[str], learned: bool = True):
        return await asyncio.to_thread(self._check, texts, learned)

    async def create(self, body: dict) -> dict:
        unknown = sorted(set(body) - {"input", "model"})
        if unknown:
            raise APIError(400, f"unknown parameter '{unknown[0]}'", param=unknown[0], code="unknown_parameter")
        if "input" not in body:
            raise APIError(400, "'input' is required", param="input", code="missing_required_parameter")
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
        verdicts = await self.check(parse_input(body["input"]))
        return {"id": "modr-" + secrets.token_hex(12), "model": self.moderator.name,
                "results": [v.result() for v in verdicts]}

    # --- requests ------------------------------------------------------------------------------
    async def request_reply(self, body: dict, chat: bool) -> str | None:
        """The reply that replaces the model's when the request is flagged (None: go ahead)."""
        if chat:
            users = [m.get("content") for m in body.get("messages") or [] if isinstance(m, dict)
                     and m.get("role") == "user"]
            last = users[-1] if users else None
            if isinstance(last, list):  # content parts: their text
                last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
            texts = [last] if isinstance(last, str) and last.strip() else []
        else:
            p = body.get("prompt")
            texts = [p] if isinstance(p, str) else [x for x in p if isinstance(x, str)] if isinstance(p, list) else []
        texts = [t for t in texts if t.strip()]
        if not texts:
            return None
        verdicts = await self.check(texts)
        if any(v.crisis for v in verdicts):
            return CRISIS_REPLY
        return REFUSAL if any(v.flagged for v in verdicts) else None

    @staticmethod
    def refusal(call: protocol.Call, text: str, rid: str, created: int, model: str):
        """The whole answer to a flagged request: each choice is `text`, finish_reason content_filter."""
        n = len(call.jobs) * call.n
        p = sum(len(ids) for ids, _ in call.jobs)
        usage = {"prompt_tokens": p, "completion_tokens": 0, "total_tokens": p}
        if not call.stream:
            if call.chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": text},
                            "finish_reason": "content_filter", "logprobs": None} for i in range(n)]
            else:
                choices = [{"index": i, "text": text, "finish_reason": "content_filter", "logprobs": None}
                           for i in range(n)]
            return JSONResponse({"id": rid, "object": "chat.completion" if call.chat else "text_completion",
                                 "created": created, "model": model, "choices": choices, "usage": usage})
        chunks = protocol.Chunks(call, rid, created, model, None)

        def events():
            yield from chunks.roles()
            for i in range(n):
                if call.chat:
                    yield chunks.chunk([{"index": i, "delta": {"content": text, "refusal": text},
                                         "finish_reason": None, "logprobs": None}])
                    yield chunks.chunk([{"index": i, "delta": {}, "finish_reason": "content_filter",
                                         "logprobs": None}])
                else:
                    yield chunks.chunk([{"index": i, "text": text, "finish_reason": "content_filter",
                                         "logprobs": None}])
            if call.include_usage:
                yield chunks.chunk([], usage)
            yield protocol.SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- replies -------------------------------------------------------------------------------
    def guard(self, call: protocol.Call) -> "ReplyGuard":
        return ReplyGuard(self, len(call.jobs) * call.n, call.n)

    async def cut_completions(self, done: dict[int, list]):
        """Non-streamed replies: a flagged one is cut before its first flagged word (learned layer
        alone: all of it) and ends with finish_reason content_filter."""
        comps = [c for j in sorted(done) for c in done[j]]
        verdicts = await self.check([c.text for c in comps])
        for c, v in zip(comps, verdicts):
            if v.categories["offensive"]:
                c.text, c.finish_reason = self._safe_prefix(c.text), "content_filter"

    def _safe_prefix(self, text: str) -> str:
        """The longest prefix of text, cut at a space, that the lexicon does not flag."""
        lex = self.moderator.lexicon
        cuts = [i for i, ch in enumerate(text) if ch.isspace()] + [len(text)]
        for k in cuts:
            if lex.hits(text[:k]):
                prev = [c for c in cuts if c < k]
                return text[:prev[-1]] if prev else ""
        return ""


class ReplyGuard:
    """Streamed replies of one call: per choice, the text so far; stops a choice whose text is flagged."""

    def __init__(self, mods: Moderations, n_choices: int, n: int):
        self.mods, self.n = mods, n
        self.text: dict[tuple[int, int], str] = {}
        self.learned_at: dict[tuple[int, int], int] = {}
        self.stopped: set[tuple[int, int]] = set()
        self.left = n_choices

    @property
    def all_stopped(self) -> bool:
        return self.left == 0 and bool(self.stopped)

    async def check(self, j: int, ev: Event) -> Event | None:
        """ev, or None (drop it: its choice was stopped), or the content_filter end of its choice."""
        key = (j, ev.index)
        if key in self.stopped:
            return None
        before = self.text.get(key, "")
        text = before + ev.text
        self.text[key] = text
        # a flagged word can only end in the new piece: look at it with enough text before it
        window = text[max(0, len(before) - 64):]
        flagged = bool(self.mods.moderator.lexicon.hits(window)) if ev.text else False
        if not flagged and self.mods.moderator.classifier is not None and (
                ev.finish_reason is not None or len(text) - self.learned_at.get(key, 0) >= LEARNED_EVERY):
            self.learned_at[key] = len(text)
            flagged = (await self.mods.check([text]))[0].categories["offensive"]
        if flagged:
            self.stopped.add(key)
            self.left -= 1
            return Event(ev.req, ev.index, "", [], "content_filter")
        if ev.finish_reason is not None:
            self.left -= 1
        return ev


__all__ = ["Moderations", "ReplyGuard", "parse_input", "MAX_INPUTS", "MAX_CHARS"]
