"""`chatsmith serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /tokenize, POST /detokenize, GET /tokenizer_info. Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}} with a 4xx status; a malformed request never
yields a 500 and never stops the server.

Requests are generated one at a time by a single worker thread (the model is not re-entrant);
waiting requests queue up to `max_queue`, beyond which the server answers 429. A client that
disconnects mid-stream cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsmith.engine import Engine, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --- request parsing: explicit, so every bad field gets a 400 that names it -----------------

def _get(body: dict, name: str, types, default=None, check=None, what: str | None = None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {what or types}", param=name, code="invalid_type")
    if not isinstance(v, types):
        raise APIError(400, f"'{name}' must be {what or types}", param=name, code="invalid_type")
    if check and not check(v):
        raise APIError(400, f"'{name}' is out of range: {v!r} ({what})", param=name, code="invalid_value")
    return v


def sampling_from(body: dict) -> tuple[SamplingParams, int]:
    num = (int, float)
    temperature = _get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise APIError(400, "'max_tokens' must be a positive integer", param="max_tokens", code="invalid_value")
    n = _get(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]")
    seed = _get(body, "seed", int, None, what="an integer")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    # accepted and validated for compatibility; chatsmith's sampler has repetition_penalty instead
    _get(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    _get(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    top_k = _get(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0")  # vLLM's extension
    rep = _get(body, "repetition_penalty", num, 1.0, lambda v: v > 0, "a number > 0")
    return SamplingParams(max_new_tokens=max_tokens or 0, temperature=float(temperature), top_p=float(top_p),
                          top_k=top_k, repetition_penalty=float(rep), stop=stops, seed=seed,
                          num_return_sequences=n), n


class Server:
    def __init__(self, model, tok, model_name: str, api_key: str | None = None, max_queue: int = 64):
        self.engine = Engine(model, tok)
        self.tok, self.model_name, self.api_key = tok, model_name, api_key
        self.max_queue = max_queue
        self.pending = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.created = int(time.time())
        self.has_chat = tok.has_chat  # our chat tokens, or an imported model's chat template

    # --- generation in the worker thread, pieces handed to the event loop ----------------------
    async def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event):
        """Async iterator of (index, text) pieces; the Completions arrive as a final ('done', list)."""
        if self.pending >= self.max_queue:
            raise APIError(429, f"the server is busy: {self.pending} requests are waiting; retry later",
                           type_="rate_limit_error", code="queue_full")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.pending += 1

        def work():
            try:
                if cancel.is_set():
                    return
                gen = self.engine.stream(prompt_ids, params)
                for item in gen:
                    if cancel.is_set():
                        gen.close()
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", item))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", self.engine.last))
            except BaseException as e:  # handed to the request, never kills the worker
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        fut = loop.run_in_executor(self.pool, work)
        try:
            while True:
                kind, item = await queue.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise item
                yield kind, item
        finally:
            cancel.set()
            self.pending -= 1
            await asyncio.shield(fut)

    def check_prompt(self, ids: list[int], params: SamplingParams):
        ctx = self.engine.model.cfg.max_seq_len
        room = ctx - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's maximum context length is {ctx} "
                                f"tokens", param="messages", code="context_length_exceeded")
        if params.max_new_tokens == 0:
            params.max_new_tokens = room
        elif len(ids) + params.max_new_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens; you requested "
                                f"{len(ids) + params.max_new_tokens} ({len(ids)} in the prompt, {params.max_new_tokens} "
                                f"for the completion): reduce the prompt or max_tokens",
                           param="max_tokens", code="context_length_exceeded")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def create_app(model_dir: str | Path, api_key: str | None = None, model_name: str | None = None,
               max_queue: int = 64, device: str = "cpu") -> FastAPI:
    from chatsmith.checkpoint import load_model
    from chatsmith.tokenizer import Tokenizer

    model = load_model(model_dir, device=device)
    tok = Tokenizer.load(model_dir)
    name = model_name or Path(model_dir).resolve().name
    srv = Server(model, tok, name, api_key, max_queue)
    app = FastAPI(title="chatsmith", version="0.1.0")
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()[:3]), "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_req, e: Exception):  # a bug in chatsmith: say so, keep serving
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    def auth_only(request: Request):
        if srv.api_key is not None:
            auth = request.headers.get("authorization", "")
            if not secrets.compare_digest(auth.encode(), f"Bearer {srv.api_key}".encode()):
                raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               type_="authentication_error", code="invalid_api_key")

    async def body_of(request: Request) -> dict:
        auth_only(request)
        raw = await request.body()
        if len(raw) > 4 * 1024 * 1024:
            raise APIError(413, "the request body is larger than 4 MiB", code="request_too_large")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != srv.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server has '{srv.model_name}'",
                           param="model", code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_name, "waiting": srv.pending}

    @app.get("/v1/models")
    async def models(request: Request):
        auth_only(request)
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "chatsmith"}]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str, request: Request):
        auth_only(request)
        if model_id != srv.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "chatsmith"}

    async def complete(request: Request, chat: bool):
        body = await body_of(request)
        params, n = sampling_from(body)
        if chat:
            if not srv.has_chat:
                raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
            messages = parse_messages(body)
            prompt_ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (or a list holding one string)", param="prompt")
            prompt_ids = tok.encode(prompt, bos=True)
        srv.check_prompt(prompt_ids, params)
        stream = _get(body, "stream", bool, False, what="a boolean")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        cancel = threading.Event()

        def usage(comps):
            c = sum(len(x.token_ids) for x in comps)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": c, "total_tokens": len(prompt_ids) + c}

        if not stream:
            comps = None
            async for kind, item in srv.run(prompt_ids, params, cancel):
                if kind == "done":
                    comps = item
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(comps)]
            else:
                choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                           for i, c in enumerate(comps)]
            return {"id": rid, "object": obj, "created": created, "model": srv.model_name, "choices": choices,
                    "usage": usage(comps), "system_fingerprint": None}

        # streaming: check the queue before the 200 goes out, so a full queue is still a 429
        if srv.pending >= srv.max_queue:
            raise APIError(429, "the server is busy; retry later", type_="rate_limit_error", code="queue_full")
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, usage_=None):
            d = {"id": rid, "object": chunk_obj, "created": created, "model": srv.model_name, "choices": choices,
                 "system_fingerprint": None}
            if include_usage:
                d["usage"] = usage_
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        async def events():
            try:
                if chat:
                    for i in range(n):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None, "logprobs": None}])
                async for kind, item in srv.run(prompt_ids, params, cancel):
                    if await request.is_disconnected():
                        cancel.set()
                        return
                    if kind == "piece":
                        i, text = item
                        if chat:
                            yield chunk([{"index": i, "delta": {"content": text}, "finish_reason": None,
                                          "logprobs": None}])
                        else:
                            yield chunk([{"index": i, "text": text, "finish_reason": None, "logprobs": None}])
                    else:
                        for i, c in enumerate(item):
                            if chat:
                                yield chunk([{"index": i, "delta": {}, "finish_reason": c.finish_reason,
                                              "logprobs": None}])
                            else:
                                yield chunk([{"index": i, "text": "", "finish_reason": c.finish_reason,
                                              "logprobs": None}])
                        if include_usage:
                            yield chunk([], usage(item))
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request)
        if "messages" in body:
            ids, _ = tok.render_chat(parse_messages(body), add_generation_prompt=bool(body.get("add_generation_prompt", True)))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
            ids = tok.encode(prompt, bos=bool(body.get("add_special_tokens", True)))
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.engine.model.cfg.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request)
        ids = body.get("tokens")
        V = tok.vocab_size
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < V
                                                 for i in ids):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {V})", param="tokens")
        return {"prompt": tok.decode(ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        auth_only(request)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": tok.vocab_size,
                "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                "model_max_length": srv.engine.model.cfg.max_seq_len,
                "chat_template": json.loads((Path(model_dir) / "tokenizer_config.json").read_text()).get("chat_template")
                if (Path(model_dir) / "tokenizer_config.json").exists() else None}

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_queue: int = 64, device: str = "cpu"):
    import uvicorn

    app = create_app(model_dir, api_key, model_name, max_queue, device)
    print(f"serving {model_dir} as '{app.state.server.model_name}' on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")

