"""The OpenAI protocol of `chatsmith serve`: errors in OpenAI's shape, request bodies in (parsed
explicitly, so every bad field gets a 400 that names it in `param`), response bodies and streamed
chunks out. Pure functions of their arguments (a tokenizer, the model's limits), no server state.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math

from chatsmith.engine import SamplingParams
from chatsmith.errors import UserError
from chatsmith.messages import MessageError, check_messages
from chatsmith.serve import tools as servetools
from chatsmith.tokenizer import SPECIAL_TOKENS, _bytes_to_unicode

MAX_LOGPROBS = 20
MAX_PROMPTS = 64
# What one request may ask for. Each bound keeps one request's cost to the shared scheduler thread
# and the event loop small: the stop check is per token and per stop string, a message list is
# validated and rendered before anything else runs.
MAX_STOPS = 16  # OpenAI allows 4; lm-evaluation-harness tasks send a few more
MAX_STOP_CHARS = 256
MAX_MESSAGES = 2048
MAX_DIGITS = 100  # an integer literal longer than this is out of range for every field


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # HTTP headers of the error response (Retry-After on a 429)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --- request bodies ---------------------------------------------------------------------------

class _Huge(float):
    """An integer literal of more than MAX_DIGITS digits, kept as +-inf: Python would refuse to
    convert it past 4,300 digits, and no field takes it; `check_strings` names where it was."""


def _parse_int(digits: str):
    if len(digits.lstrip("-")) > MAX_DIGITS:
        return _Huge("-inf" if digits.startswith("-") else "inf")
    return int(digits)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def check_strings(body) -> None:
    """400 naming the field for what JSON can carry but the server cannot take: a lone surrogate
    ("\\ud800" is valid JSON, not valid Unicode: it cannot be tokenised, encoded or echoed back)
    in a value or key, or an integer too long to be a number (`_Huge`). Iterative: nesting depth is
    whatever json.loads allowed."""
    stack = [(body, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"'{where or 'body'}' holds a lone UTF-16 surrogate (invalid Unicode)",
                               param=where or None, code="invalid_value") from None
        elif isinstance(node, _Huge):
            raise APIError(400, f"'{where}' is a number out of range (more than {MAX_DIGITS} digits)",
                           param=where or None, code="invalid_value")
        elif isinstance(node, dict):
            for k, v in node.items():
                stack.append((k, where or "body"))
                stack.append((v, f"{where}.{k}" if where else k))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))


def parse_body(raw: bytes, model_name: str | None) -> dict:
    """A request body: a JSON object whose optional 'model' names this server's model (None: the
    route checks it itself). Strict JSON
    (no NaN / Infinity literals); lone surrogates and over-long integers are refused by field."""
    try:
        body = json.loads(raw or b"null", parse_int=_parse_int, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN literals
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_strings(body)
    model = body.get("model")
    if model is not None and model_name is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server has '{model_name}'",
                       param="model", code="model_not_found")
    return body


def get_field(body: dict, name: str, types, default=None, check=None, what: str | None = None):
    """body[name] if it has one of `types` (bool only when asked for) and passes `check`; absent or
    null: `default`."""
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in
                                    (types if isinstance(types, tuple) else (types,))):
        raise APIError(400, f"'{name}' must be {what or types}", param=name, code="invalid_type")
    if check and not check(v):
        raise APIError(400, f"'{name}' is out of range: {v!r} ({what})", param=name, code="invalid_value")
    return v


def _max_tokens(body: dict, chat: bool, echo: bool) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    lowest = 0 if echo else 1  # echo with max_tokens 0 scores the prompt only (lm-evaluation-harness)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < lowest):
        raise APIError(400, f"'{name}' must be an integer >= {lowest}", param=name, code="invalid_value")
    if max_tokens is None and not chat:
        max_tokens = 16  # the legacy completions API's default
    return max_tokens


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"'stop' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                       param="stop", code="invalid_value")
    return stop


def _logprobs(body: dict, chat: bool, n: int) -> int | None:
    """How many alternatives per token to report, None for no logprobs; plus the legacy-only fields."""
    if chat:
        want = get_field(body, "logprobs", bool, False, what="a boolean")
        top = get_field(body, "top_logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS,
                        f"an integer in [0, {MAX_LOGPROBS}]")
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (top or 0) if want else None
    logprobs = get_field(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS,
                         f"an integer in [0, {MAX_LOGPROBS}]")
    get_field(body, "best_of", int, None, lambda v: v == n, "equal to n (best_of is not supported)")
    if body.get("suffix") is not None:
        raise APIError(400, "'suffix' (insertion) is not supported", param="suffix")
    return logprobs


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (JSON keys are strings)."""
    lb = body.get("logit_bias")
    if lb is None:
        return None
    if not isinstance(lb, dict):
        raise APIError(400, "'logit_bias' must be an object mapping token ids to biases", param="logit_bias",
                       code="invalid_type")
    out = {}
    for k, v in lb.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 9) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not -100 <= v <= 100:
            raise APIError(400, f"'logit_bias' maps token ids to numbers in [-100, 100]; got {k!r}: {v!r}",
                           param="logit_bias", code="invalid_value")
        out[int(k)] = float(v)
    return out or None


def _response_format(body: dict):
    """Only plain text: JSON mode would need decoding constrained to a grammar, which chatsmith does not
    do, and checking the reply after the fact would fail requests the client already paid for."""
    rf = body.get("response_format")
    if rf is None or (isinstance(rf, dict) and rf.get("type") == "text"):
        return
    kind = rf.get("type") if isinstance(rf, dict) else None
    raise APIError(400, f"'response_format' {kind!r} is not supported: chatsmith does not constrain replies to "
                        f"JSON; only {{\"type\": \"text\"}} is accepted", param="response_format",
                   code="unsupported_value")


def sampling_from(body: dict, chat: bool) -> tuple[SamplingParams, int]:
    """SamplingParams from an OpenAI request body. max_new_tokens 0 means 'the rest of the context'
    (chat's default) until `check_prompt` knows the prompt."""
    num = (int, float)
    temperature = get_field(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = get_field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    echo = (not chat) and get_field(body, "echo", bool, False, what="a boolean")
    max_tokens = _max_tokens(body, chat, echo)
    n = get_field(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]")
    seed = get_field(body, "seed", int, None, what="an integer")
    stops = _stops(body)
    # accepted and validated for compatibility; chatsmith's sampler has repetition_penalty instead
    get_field(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    get_field(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    top_k = get_field(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0")  # vLLM's extension
    rep = get_field(body, "repetition_penalty", num, 1.0, lambda v: v > 0, "a number > 0")
    logprobs = _logprobs(body, chat, n)
    _response_format(body)
    if not chat and (body.get("tools") or body.get("functions")):
        raise APIError(400, "tool calling is a chat feature: use /v1/chat/completions", param="tools")
    params = SamplingParams(max_new_tokens=max_tokens or 0, temperature=float(temperature), top_p=float(top_p),
                            top_k=top_k, repetition_penalty=float(rep), stop=stops, seed=seed,
                            num_return_sequences=n, logprobs=logprobs, logit_bias=_logit_bias(body),
                            prompt_logprobs=logprobs if (echo and logprobs is not None) else None)
    if echo and max_tokens == 0 and params.prompt_logprobs is None:
        params.prompt_logprobs = 0  # echo without generation: still a valid (scoring-free) request
    return params, n


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > MAX_MESSAGES:
        raise APIError(400, f"'messages' has {len(msgs)} messages; at most {MAX_MESSAGES} are allowed",
                       param="messages", code="invalid_value")
    try:
        return check_messages(body.get("messages"), "messages", parts=True, null_assistant=True, tools=True)
    except MessageError as e:
        if e.field == "messages":  # not a list at all
            raise APIError(400, f"'messages' {e.problem}", param="messages", code="invalid_type") from None
        raise APIError(400, str(e), param=e.field) from None


def _token_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def check_chars(text_len: int, param: str, ctx: int, max_chars: int | None):
    """Refuse, before tokenising it, a prompt too long for any tokenisation to fit the context:
    `max_chars` is the context times the most characters one token covers (with slack), so
    tokenising a 4 MiB body never holds a thread for seconds to find that out."""
    if max_chars is not None and text_len > max_chars:
        raise APIError(400, f"the prompt is {text_len} characters, more than this model's maximum context "
                            f"length of {ctx} tokens can hold", param=param, code="context_length_exceeded")


def completion_prompts(body: dict, tok, ctx: int = 0, max_chars: int | None = None
                       ) -> tuple[list[list[int]], list[str | None]]:
    """The legacy `prompt`: a string, a list of strings, a list of token ids, or a list of lists.
    -> token ids per prompt, and its text (None for token ids: decoded once they are known valid)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list "
                            "of token id lists (non-empty)", param="prompt", code="invalid_type")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    for p in prompts:
        check_chars(len(p), "prompt", ctx, max_chars)
    ids = [tok.encode(p, bos=True, special=True) if isinstance(p, str) else list(p) for p in prompts]
    return ids, [p if isinstance(p, str) else None for p in prompts]


def check_prompt(ids: list[int], params: SamplingParams, param: str, ctx: int, vocab_size: int):
    """The prompt fits the context with room for the completion (max_new_tokens 0 becomes the rest
    of the context) and its ids are in the vocabulary."""
    room = ctx - len(ids)
    if not ids:
        raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
    if room < (0 if params.max_new_tokens == 0 and params.prompt_logprobs is not None else 1):
        raise APIError(400, f"the prompt is {len(ids)} tokens; this model's maximum context length is "
                            f"{ctx} tokens", param=param, code="context_length_exceeded")
    if params.max_new_tokens == 0 and params.prompt_logprobs is None:
        params.max_new_tokens = room
    elif len(ids) + params.max_new_tokens > ctx:
        raise APIError(400, f"this model's maximum context length is {ctx} tokens; you requested "
                            f"{len(ids) + params.max_new_tokens} ({len(ids)} in the prompt, {params.max_new_tokens} "
                            f"for the completion): reduce the prompt or max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"token ids must be in [0, {vocab_size})", param=param, code="invalid_value")
    if any(not 0 <= t < vocab_size for t in params.logit_bias or ()):
        raise APIError(400, f"'logit_bias' token ids must be in [0, {vocab_size})", param="logit_bias",
                       code="invalid_value")


@dataclasses.dataclass
class Call:
    """A validated chat or legacy completions call: one engine job (ids, params) per prompt, n samples each."""

    chat: bool
    jobs: list[tuple[list[int], SamplingParams]]
    texts: list[str]  # each prompt's text (echo)
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    # per prompt: leading tokens the server added (a text prompt's <|bos|>), which the echoed text
    # does not contain, so echo's logprobs leave them out (OpenAI's tokens join to the text)
    added: list[int] = dataclasses.field(default_factory=list)
    tools: servetools.Tools | None = None  # function calling (chat): see chatsmith.serve.tools
    model: str | None = None  # the model id to answer with, when not the server's name (a translator's NAME:LANG)


def _stream_options(body: dict) -> tuple[bool, bool]:  # (stream, include_usage)
    stream = get_field(body, "stream", bool, False, what="a boolean")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    if opts and not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    return stream, bool(get_field(opts or {}, "include_usage", bool, False, what="a boolean"))


def _tools(body: dict, tok, builtin: dict | None) -> servetools.Tools | None:
    try:
        return servetools.parse_tools(body, tok, builtin or {})
    except MessageError as e:
        raise APIError(400, str(e), param=e.field, code="invalid_value") from None


def parse_call(body: dict, chat: bool, tok, ctx: int, max_batch: int, max_chars: int | None = None,
               builtin_tools: dict | None = None) -> Call:
    """The validated call; tokenises, so the server runs it off the event loop. builtin_tools: the
    tools the server runs itself (chatsmith.tools.inline.builtin_tools)."""
    params, n = sampling_from(body, chat)
    tools = None
    if chat:
        if not tok.has_chat:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        msgs = parse_messages(body)
        tools = _tools(body, tok, builtin_tools)
        # the tool definitions and calls are rendered into the prompt too
        extra = (len(json.dumps(tools.defs)) if tools else 0) + sum(
            len(c["function"]["arguments"]) for m in msgs for c in m.get("tool_calls", ()))
        check_chars(sum(len(m["content"]) for m in msgs) + extra, "messages", ctx, max_chars)
        try:
            ids, _ = tok.render_chat(msgs, add_generation_prompt=True, tools=tools.defs if tools else None)
        except UserError as e:  # a template that refuses tools
            raise APIError(400, str(e), param="tools" if tools else "messages") from None
        if tools:
            ids += tok.encode(tools.prefix, special=True) if tools.prefix else []
            params.tool_hook = tools.hook()
            if ban := tools.ban(tok):
                params.logit_bias = {**(params.logit_bias or {}), **ban}
        prompts, texts = [ids], [None]
    else:
        prompts, texts = completion_prompts(body, tok, ctx, max_chars)
    stream, include_usage = _stream_options(body)
    jobs = []
    for ids in prompts:
        p = dataclasses.replace(params, stop=list(params.stop))
        check_prompt(ids, p, "messages" if chat else "prompt", ctx, tok.vocab_size)
        jobs.append((ids, p))
    added = [int(t is not None and tok.add_bos) for t in texts]  # encode(text, bos=True) put one <|bos|> first
    texts = [t if t is not None else tok.decode(ids) for t, ids in zip(texts, prompts)]
    if len(jobs) * n > max_batch:
        raise APIError(400, f"{len(jobs)} prompts x n={n} is more than the {max_batch} sequences this "
                            f"server decodes at once", param="n")
    return Call(chat, jobs, texts, n, stream, include_usage, (not chat) and bool(body.get("echo")), added, tools)


# --- response bodies --------------------------------------------------------------------------

class TokenText:
    """Per token id: its text (a lone piece of a multi-byte character decodes to U+FFFD) and its
    raw UTF-8 bytes, from the byte-level alphabet of the vocabulary."""

    def __init__(self, tok):
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.bytes: list[bytes] = [b""] * tok.vocab_size
        self.text: list[str] = [""] * tok.vocab_size
        special = set(SPECIAL_TOKENS)
        for token, i in tok.tok.get_vocab().items():
            if i >= tok.vocab_size:
                continue
            if token in special or not all(ch in byte_of for ch in token):
                b = token.encode()
            else:
                b = bytes(byte_of[ch] for ch in token)
            self.bytes[i] = b
            self.text[i] = b.decode("utf-8", errors="replace")


def chat_logprobs(tt: TokenText, entries) -> dict:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    return {"content": [{"token": tt.text[t], "logprob": lp, "bytes": list(tt.bytes[t]),
                         "top_logprobs": [{"token": tt.text[a], "logprob": alp, "bytes": list(tt.bytes[a])}
                                          for a, alp in alts]} for t, lp, alts in entries],
            "refusal": None}


def utf8_decoder():
    """Bytes in, text out, holding back a multi-byte character until its last byte arrives; only a
    sequence that can no longer complete becomes U+FFFD (as the whole text's decode does)."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def completion_logprobs(tt: TokenText, entries, offset0: int, token_ids=None, decoder=None, final=True) -> dict:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
    entries may start with None (the first prompt token has no logprob; its id is in token_ids).

    `tokens` join to the text, as in OpenAI's API: a token that ends inside a multi-byte character
    is "" and the token that completes it carries the whole character. A stream passes its choice's
    `decoder` along, and final=False until its last chunk."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    off, dec = offset0, decoder or utf8_decoder()
    for j, e in enumerate(entries):
        t = e[0] if e is not None else token_ids[j]
        piece = dec.decode(tt.bytes[t])
        out["tokens"].append(piece)
        out["token_logprobs"].append(e[1] if e is not None else None)
        out["top_logprobs"].append({tt.text[a]: alp for a, alp in e[2]} if e is not None else None)
        out["text_offset"].append(off)
        off += len(piece)
    if final and out["tokens"]:
        out["tokens"][-1] += dec.decode(b"", final=True)
    return out


def usage(call: Call, comps_by_job) -> dict:
    p = sum(len(ids) for ids, _ in call.jobs)
    c = sum(len(x.token_ids) for comps in comps_by_job for x in comps)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat_choice(i: int, c, tt: TokenText, tools: servetools.Tools | None = None) -> dict:
    message, finish = {"role": "assistant", "content": c.text, "refusal": None}, c.finish_reason
    if tools is not None:
        fields, called = servetools.reply(tools, c.text)
        message.update(fields)
        finish = "tool_calls" if called and finish == "stop" else finish
    return {"index": i, "message": message, "finish_reason": finish,
            "logprobs": chat_logprobs(tt, c.logprobs) if c.logprobs is not None else None}


def _completion_choice(call: Call, j: int, i: int, c, tt: TokenText) -> dict:
    lp = None
    if c.logprobs is not None or c.prompt_logprobs is not None:
        if call.echo:
            k = call.added[j] if call.added else 0
            lp = completion_logprobs(tt, (c.prompt_logprobs or [])[k:] + (c.logprobs or []), 0, call.jobs[j][0][k:])
        else:
            lp = completion_logprobs(tt, c.logprobs or [], len(call.texts[j]))
    return {"index": j * call.n + i, "text": (call.texts[j] if call.echo else "") + c.text,
            "finish_reason": c.finish_reason, "logprobs": lp}


def response(call: Call, done: dict[int, list], rid: str, created: int, model: str, tt: TokenText) -> dict:
    """The whole chat.completion / text_completion body from each job's Completions."""
    by_job = [done[j] for j in range(len(call.jobs))]
    choices = [_chat_choice(i, c, tt, call.tools) if call.chat else _completion_choice(call, j, i, c, tt)
               for j, comps in enumerate(by_job) for i, c in enumerate(comps)]
    return json_safe({"id": rid, "object": "chat.completion" if call.chat else "text_completion",
                      "created": created, "model": model, "choices": choices, "usage": usage(call, by_job)})


SSE_DONE = "data: [DONE]\n\n"


def json_safe(d):
    """d with every NaN/Infinity replaced by -9999.0 (OpenAI's "very unlikely" logprob): JSON has no
    such numbers, and a client's parser rejects the bare NaN Python would write. The engine already
    reports finite logprobs; this is the last line, for whatever else a broken model makes."""
    if isinstance(d, float):
        return d if math.isfinite(d) else -9999.0
    if isinstance(d, dict):
        return {k: json_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_safe(v) for v in d]
    return d


def sse(d: dict, ensure_ascii: bool = False) -> str:
    try:
        text = json.dumps(d, ensure_ascii=ensure_ascii, allow_nan=False)
    except ValueError:  # a non-finite number: the slow path only then
        text = json.dumps(json_safe(d), ensure_ascii=ensure_ascii, allow_nan=False)
    return f"data: {text}\n\n"


class Chunks:
    """The streamed chunks of one call (chat.completion.chunk or text_completion), in order: the
    role chunks (chat), one chunk per engine event, the usage chunk."""

    def __init__(self, call: Call, rid: str, created: int, model: str, tt: TokenText):
        self.call, self.tt = call, tt
        self.head = {"id": rid, "object": "chat.completion.chunk" if call.chat else "text_completion",
                     "created": created, "model": model}
        self.offsets: dict[int, int] = {}  # completions logprobs: the text offset of each choice so far
        self.decoders: dict[int, codecs.IncrementalDecoder] = {}  # and its tokens' UTF-8 decoder
        self.tool_streams: dict[tuple[int, int], servetools.ToolStream] = {}  # per (job, choice), with tools

    def chunk(self, choices: list, usage_: dict | None = None) -> str:
        d = {**self.head, "choices": choices}
        # chat chunks carry "usage": null until the last (as OpenAI's do); the legacy schema has
        # no null usage, so completions chunks leave it out until then
        if self.call.include_usage and (self.call.chat or usage_ is not None):
            d["usage"] = usage_
        return sse(d)

    def roles(self) -> list[str]:
        if not self.call.chat:
            return []
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None, "logprobs": None}]) for i in range(self.call.n)]

    def event(self, j: int, ev) -> str:
        if self.call.chat and self.call.tools is not None:
            return "".join(self.chunk([c]) for c in self._chat_tools(j, ev))
        return self.chunk([self._chat(j, ev) if self.call.chat else self._completion(j, ev)])

    def _chat_tools(self, j: int, ev) -> list[dict]:
        """With tools, one event may make several chunks (content, then each call's deltas); the
        logprobs ride on the first, the finish reason on the last."""
        ts = self.tool_streams.setdefault((j, ev.index), servetools.ToolStream(self.call.tools))
        deltas, finish = ts.feed(ev.text), ev.finish_reason
        if finish is not None:
            more, called = ts.finish()
            deltas += more
            finish = "tool_calls" if called and finish == "stop" else finish
        lp = chat_logprobs(self.tt, ev.logprobs) if self.call.jobs[j][1].logprobs is not None else None
        if not deltas and (finish is not None or lp is not None):
            deltas = [{}]
        return [{"index": ev.index, "delta": d, "finish_reason": finish if k == len(deltas) - 1 else None,
                 "logprobs": lp if k == 0 else None} for k, d in enumerate(deltas)]

    def _chat(self, j: int, ev) -> dict:
        lp = chat_logprobs(self.tt, ev.logprobs) if self.call.jobs[j][1].logprobs is not None else None
        return {"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                "finish_reason": ev.finish_reason, "logprobs": lp}

    def _completion(self, j: int, ev) -> dict:
        call, idx = self.call, j * self.call.n + ev.index
        text, entries, ids0 = ev.text, ev.logprobs or [], None
        if idx not in self.offsets:  # the choice's first chunk
            self.offsets[idx] = 0 if call.echo else len(call.texts[j])
            self.decoders[idx] = utf8_decoder()
            if call.echo:
                text = call.texts[j] + text
                if ev.req.prompt_logprobs is not None:
                    k = call.added[j] if call.added else 0
                    entries, ids0 = ev.req.prompt_logprobs[k:] + entries, call.jobs[j][0][k:]
        lp = None
        if call.jobs[j][1].logprobs is not None:
            lp = completion_logprobs(self.tt, entries, self.offsets[idx], ids0, self.decoders[idx],
                                     final=ev.finish_reason is not None)
            self.offsets[idx] += sum(len(s) for s in lp["tokens"])
        return {"index": idx, "text": text, "finish_reason": ev.finish_reason, "logprobs": lp}

    def usage(self, done: dict[int, list]) -> list[str]:
        return [self.chunk([], usage(self.call, [done[j] for j in sorted(done)]))] if self.call.include_usage else []
