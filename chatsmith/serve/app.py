"""`chatsmith serve`: an OpenAI-compatible HTTP API and a web chat page over the batching engine.

Endpoints: GET / (the chat page), GET /health, GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, POST /tokenize, POST /detokenize, GET /tokenizer_info. Errors use OpenAI's
shape {"error": {"message", "type", "param", "code"}} with a 4xx status; a malformed request never
yields a 500 and never stops the server.

One scheduler thread owns the engine (the model is not re-entrant) and steps the whole batch:
every active request advances one token per forward pass, new requests join between steps and
finished ones leave (continuous batching, `chatsmith.engine`). Handlers talk to it through queues:
a request goes in through the scheduler's inbox, its tokens come back on its own asyncio queue.
Beyond `max_queue` waiting requests the server answers 429. A client that disconnects cancels its
generation, which frees its batch rows at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import secrets
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError

STATIC = Path(__file__).parent / "static"
MAX_BODY = 4 * 1024 * 1024
MAX_LOGPROBS = 20


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


def sampling_from(body: dict, chat: bool) -> tuple[SamplingParams, int]:
    """SamplingParams from an OpenAI request body. max_new_tokens 0 means 'the rest of the context'
    (chat's default) until `Server.check_prompt` knows the prompt."""
    num = (int, float)
    temperature = _get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    echo = (not chat) and _get(body, "echo", bool, False, what="a boolean")
    lowest = 0 if echo else 1  # echo with max_tokens 0 scores the prompt only (lm-evaluation-harness)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < lowest):
        raise APIError(400, f"'{name}' must be an integer >= {lowest}", param=name, code="invalid_value")
    if max_tokens is None and not chat:
        max_tokens = 16  # the legacy completions API's default
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
    if chat:
        want = _get(body, "logprobs", bool, False, what="a boolean")
        top = _get(body, "top_logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS,
                   f"an integer in [0, {MAX_LOGPROBS}]")
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _get(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS,
                        f"an integer in [0, {MAX_LOGPROBS}]")
        _get(body, "best_of", int, None, lambda v: v == n, "equal to n (best_of is not supported)")
        if body.get("suffix") is not None:
            raise APIError(400, "'suffix' (insertion) is not supported", param="suffix")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tool and function calling are not supported", param="tools")
    params = SamplingParams(max_new_tokens=max_tokens or 0, temperature=float(temperature), top_p=float(top_p),
                            top_k=top_k, repetition_penalty=float(rep), stop=stops, seed=seed,
                            num_return_sequences=n, logprobs=logprobs,
                            prompt_logprobs=logprobs if (echo and logprobs is not None) else None)
    if echo and max_tokens == 0 and params.prompt_logprobs is None:
        params.prompt_logprobs = 0  # echo without generation: still a valid (scoring-free) request
    return params, n


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
        if content is None and role == "assistant":
            content = ""
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


# --- the scheduler: one thread steps the engine --------------------------------------------

class Ticket:
    """One engine request as the event loop sees it: its queue of ('events', [...]) / ('done',
    completions) / ('error', APIError) messages."""

    __slots__ = ("prompt_ids", "params", "stream_id", "queue", "req")

    def __init__(self, prompt_ids, params, stream_id):
        self.prompt_ids, self.params, self.stream_id = prompt_ids, params, stream_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.req = None


class Scheduler:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="chatsmith-scheduler", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def waiting(self) -> int:
        """Requests not yet decoding (an estimate read from another thread; both sides are atomic)."""
        return self.inbox.qsize() + len(self.engine.waiting)

    def submit(self, t: Ticket):
        self.inbox.put(("add", t))

    def cancel(self, t: Ticket):
        self.inbox.put(("cancel", t))

    def stop(self):
        self.stopping = True
        self.inbox.put(("stop", None))

    def _run(self):
        eng = self.engine
        tickets: dict[int, Ticket] = {}  # id(engine request) -> ticket
        try:
            while True:
                # block only when there is nothing to decode; otherwise take what arrived and step
                msgs = [self.inbox.get()] if not eng.has_work() else []
                while True:
                    try:
                        msgs.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                out = []
                for kind, t in msgs:
                    if kind == "stop":
                        return
                    if kind == "add":
                        try:
                            t.req = eng.add_request(t.prompt_ids, t.params, stream_id=t.stream_id)
                            tickets[id(t.req)] = t
                        except UserError as e:
                            out.append((t, "error", APIError(400, str(e))))
                    elif kind == "cancel" and t.req is not None and not t.req.finished:
                        eng.cancel(t.req)
                        tickets.pop(id(t.req), None)
                if eng.has_work():
                    events = eng.step()
                    self.steps += 1
                    by_req: dict[int, list] = {}
                    for ev in events:
                        by_req.setdefault(id(ev.req), []).append(ev)
                    for rid, evs in by_req.items():
                        t = tickets.get(rid)
                        if t is None:
                            continue
                        out.append((t, "events", evs))
                        if t.req.finished:
                            out.append((t, "done", t.req.completions))
                            del tickets[rid]
                if out:
                    self.loop.call_soon_threadsafe(_deliver, out)
        except BaseException as e:  # a bug: fail every open request instead of hanging them
            self.error = e
            err = APIError(500, f"the generation engine failed: {type(e).__name__}: {e}", "server_error")
            pending = list(tickets.values())
            try:
                while True:
                    kind, t = self.inbox.get_nowait()
                    if kind == "add":
                        pending.append(t)
            except queue.Empty:
                pass
            self.loop.call_soon_threadsafe(_deliver, [(t, "error", err) for t in pending])
            raise


def _deliver(out):
    for t, kind, item in out:
        t.queue.put_nowait((kind, item))


# --- token text for logprobs ----------------------------------------------------------------

class TokenText:
    """Per token id: its text (a lone piece of a multi-byte character decodes to U+FFFD) and its
    raw UTF-8 bytes, from the byte-level alphabet of the vocabulary."""

    def __init__(self, tok):
        from chatsmith.tokenizer import SPECIAL_TOKENS, _bytes_to_unicode

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


# --- the server -------------------------------------------------------------------------------

class Server:
    def __init__(self, model, tok, model_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_batch: int = 32):
        self.engine = Engine(model, tok, max_batch=max_batch)
        self.tok, self.model_name, self.api_key = tok, model_name, api_key
        self.max_queue, self.max_batch = max_queue, max_batch
        self.created = int(time.time())
        self.has_chat = tok.has_chat  # our chat tokens, or an imported model's chat template
        self.ctx = model.cfg.max_seq_len
        self.scheduler: Scheduler | None = None
        self._token_text: TokenText | None = None

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.tok)
        return self._token_text

    def start(self, loop):
        if self.scheduler is None or not self.scheduler.thread.is_alive():
            self.scheduler = Scheduler(self.engine, loop)

    def stop(self):
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler.thread.join(timeout=10)

    def admit(self, jobs: int):
        """Refuse new work before a response starts: 503 without a running engine, 429 when full."""
        s = self.scheduler
        if s is None or not s.alive:
            raise APIError(503, "the generation engine is not running" + (f" ({s.error})" if s and s.error else ""),
                           type_="server_error", code="engine_unavailable")
        if s.waiting() + jobs > self.max_queue:
            raise APIError(429, f"the server is busy: {s.waiting()} requests are waiting; retry later",
                           type_="rate_limit_error", code="queue_full")

    async def run(self, jobs: list[tuple[list[int], SamplingParams]], request: Request | None = None):
        """Run several engine requests (the prompts of one API call) together. Async iterator of
        (job index, kind, item): kind 'events' (a list of engine Events) or 'done' (Completions).
        Leaving early (client gone, error) cancels whatever is still running."""
        sched = self.scheduler
        tickets = [Ticket(ids, p, i) for i, (ids, p) in enumerate(jobs)]
        merged: asyncio.Queue = asyncio.Queue()
        for i, t in enumerate(tickets):
            t.queue = _Tagged(merged, i)
            sched.submit(t)
        left = len(tickets)
        try:
            while left:
                try:
                    i, (kind, item) = await asyncio.wait_for(merged.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    # a non-streaming client that hung up is only noticed by asking
                    if request is not None and await request.is_disconnected():
                        return
                    if not sched.alive:
                        raise APIError(503, "the generation engine stopped", "server_error",
                                       code="engine_unavailable") from None
                    continue
                if kind == "error":
                    raise item
                if kind == "done":
                    left -= 1
                yield i, kind, item
        finally:
            for t in tickets:
                if t.req is None or not t.req.finished:
                    sched.cancel(t)

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str):
        room = self.ctx - len(ids)
        if not ids:
            raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
        if room < (0 if params.max_new_tokens == 0 and params.prompt_logprobs is not None else 1):
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's maximum context length is "
                                f"{self.ctx} tokens", param=param, code="context_length_exceeded")
        if params.max_new_tokens == 0 and params.prompt_logprobs is None:
            params.max_new_tokens = room
        elif len(ids) + params.max_new_tokens > self.ctx:
            raise APIError(400, f"this model's maximum context length is {self.ctx} tokens; you requested "
                                f"{len(ids) + params.max_new_tokens} ({len(ids)} in the prompt, {params.max_new_tokens} "
                                f"for the completion): reduce the prompt or max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        V = self.tok.vocab_size
        if any(not 0 <= t < V for t in ids):
            raise APIError(400, f"token ids must be in [0, {V})", param=param, code="invalid_value")

    # --- logprobs in OpenAI's two shapes -----------------------------------------------------
    def chat_logprobs(self, entries) -> list[dict]:
        tt = self.token_text
        return [{"token": tt.text[t], "logprob": lp, "bytes": list(tt.bytes[t]),
                 "top_logprobs": [{"token": tt.text[a], "logprob": alp, "bytes": list(tt.bytes[a])}
                                  for a, alp in alts]} for t, lp, alts in entries]

    def completion_logprobs(self, entries, offset0: int, token_ids=None) -> dict:
        """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
        entries may start with None (the first prompt token has no logprob)."""
        tt = self.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = offset0
        for j, e in enumerate(entries):
            t = e[0] if e is not None else token_ids[j]
            out["tokens"].append(tt.text[t])
            out["token_logprobs"].append(e[1] if e is not None else None)
            out["top_logprobs"].append({tt.text[a]: alp for a, alp in e[2]} if e is not None else None)
            out["text_offset"].append(off)
            off += len(tt.text[t])
        return out


class _Tagged:
    """Routes a ticket's messages into the call's merged queue, tagged with the job index."""

    __slots__ = ("q", "i")

    def __init__(self, q, i):
        self.q, self.i = q, i

    def put_nowait(self, item):
        self.q.put_nowait((self.i, item))


def create_app(model_dir: str | Path, api_key: str | None = None, model_name: str | None = None,
               max_queue: int = 64, device: str = "cpu", max_batch: int = 32) -> FastAPI:
    from contextlib import asynccontextmanager

    from chatsmith.checkpoint import load_model
    from chatsmith.tokenizer import Tokenizer

    model = load_model(model_dir, device=device)
    tok = Tokenizer.load(model_dir)
    name = model_name or Path(model_dir).resolve().name
    srv = Server(model, tok, name, api_key, max_queue, max_batch)
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    chat_template = json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.exists() else None

    @asynccontextmanager
    async def lifespan(_app):
        srv.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            srv.stop()

    app = FastAPI(title="chatsmith", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
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
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise APIError(413, "the request body is larger than 4 MiB", code="request_too_large")
        raw = bytearray()
        async for part in request.stream():  # read at most 4 MiB, whatever the headers said
            raw += part
            if len(raw) > MAX_BODY:
                raise APIError(413, "the request body is larger than 4 MiB", code="request_too_large")
        try:
            body = json.loads(bytes(raw) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != srv.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server has '{srv.model_name}'",
                           param="model", code="model_not_found")
        return body

    def model_card():
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "chatsmith"}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        f = STATIC / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise APIError(404, f"no such file: {name}", "not_found_error")
        return FileResponse(f, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        s = srv.scheduler
        ok = s is not None and s.alive
        body = {"status": "ok" if ok else "unavailable", "model": srv.model_name,
                "running": srv.engine.num_active, "waiting": s.waiting() if s else 0}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        auth_only(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str, request: Request):
        auth_only(request)
        if model_id != srv.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", "invalid_request_error", param="model",
                           code="model_not_found")
        return model_card()

    def completion_prompts(body: dict) -> tuple[list[list[int]], list[str]]:
        """The legacy `prompt`: a string, a list of strings, a list of token ids, or a list of lists."""
        prompt = body.get("prompt")

        def ids_ok(x):
            return isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        if isinstance(prompt, str):
            prompts = [prompt]
        elif ids_ok(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list "
                                "of token id lists (non-empty)", param="prompt", code="invalid_type")
        if len(prompts) > 64:
            raise APIError(400, "at most 64 prompts per request", param="prompt")
        ids, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                ids.append(tok.encode(p, bos=True))
                texts.append(p)
            else:
                ids.append(list(p))
                texts.append(None)  # decoded once the ids are known to be valid
        return ids, texts

    async def complete(request: Request, chat: bool):
        body = await body_of(request)
        params, n = sampling_from(body, chat)
        if chat:
            if not srv.has_chat:
                raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
            ids, _ = tok.render_chat(parse_messages(body), add_generation_prompt=True)
            prompts, texts = [ids], [None]
        else:
            prompts, texts = completion_prompts(body)
        stream = _get(body, "stream", bool, False, what="a boolean")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        if opts and not stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        include_usage = bool(_get(opts or {}, "include_usage", bool, False, what="a boolean"))
        echo = (not chat) and bool(body.get("echo"))
        jobs = []
        for ids in prompts:
            p = dataclasses.replace(params, stop=list(params.stop))
            srv.check_prompt(ids, p, "messages" if chat else "prompt")
            jobs.append((ids, p))
        texts = [t if t is not None else tok.decode(ids) for t, ids in zip(texts, prompts)]
        if len(jobs) * n > srv.max_batch:
            raise APIError(400, f"{len(jobs)} prompts x n={n} is more than the {srv.max_batch} sequences this "
                                f"server decodes at once", param="n")
        srv.admit(len(jobs))
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        n_prompt = sum(len(ids) for ids in prompts)

        def usage(comps_by_job) -> dict:
            c = sum(len(x.token_ids) for comps in comps_by_job for x in comps)
            return {"prompt_tokens": n_prompt, "completion_tokens": c, "total_tokens": n_prompt + c}

        def echo_text(j: int) -> str:
            return texts[j] if echo else ""

        if not stream:
            done: dict[int, list] = {}
            async for j, kind, item in srv.run(jobs, request):
                if kind == "done":
                    done[j] = item
            if len(done) < len(jobs):  # the client left; nobody reads this
                return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=400)
            choices = []
            for j in range(len(jobs)):
                for i, c in enumerate(done[j]):
                    if chat:
                        lp = ({"content": srv.chat_logprobs(c.logprobs), "refusal": None}
                              if c.logprobs is not None else None)
                        choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                                        "finish_reason": c.finish_reason, "logprobs": lp})
                    else:
                        lp = None
                        if c.logprobs is not None or c.prompt_logprobs is not None:
                            entries = (c.prompt_logprobs or []) + (c.logprobs or [])
                            lp = srv.completion_logprobs(entries, 0, prompts[j] if echo else None) if echo \
                                else srv.completion_logprobs(c.logprobs or [], len(texts[j]))
                        choices.append({"index": j * n + i, "text": echo_text(j) + c.text,
                                        "finish_reason": c.finish_reason, "logprobs": lp})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": srv.model_name, "choices": choices, "usage": usage([done[j] for j in range(len(jobs))])}

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, usage_=None) -> str:
            d = {"id": rid, "object": chunk_obj, "created": created, "model": srv.model_name, "choices": choices}
            # chat chunks carry "usage": null until the last (as OpenAI's do); the legacy schema has
            # no null usage, so completions chunks leave it out until then
            if include_usage and (chat or usage_ is not None):
                d["usage"] = usage_
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        async def events():
            offsets = {}  # completions logprobs: text offset per choice
            try:
                if chat:
                    for i in range(n):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None, "logprobs": None}])
                done: dict[int, list] = {}
                first = set()
                async for j, kind, item in srv.run(jobs):
                    if kind == "done":
                        done[j] = item
                        continue
                    for ev in item:
                        idx = ev.index if chat else j * n + ev.index
                        if chat:
                            delta = {"content": ev.text} if ev.text else {}
                            lp = ({"content": srv.chat_logprobs(ev.logprobs), "refusal": None}
                                  if jobs[j][1].logprobs is not None else None)
                            yield chunk([{"index": idx, "delta": delta, "finish_reason": ev.finish_reason,
                                          "logprobs": lp}])
                        else:
                            text, entries, ids0 = ev.text, ev.logprobs or [], None
                            if idx not in first:
                                first.add(idx)
                                offsets[idx] = 0 if echo else len(texts[j])
                                if echo:
                                    text = texts[j] + text
                                    if ev.req.prompt_logprobs is not None:
                                        entries, ids0 = ev.req.prompt_logprobs + entries, jobs[j][0]
                            lp = None
                            if jobs[j][1].logprobs is not None:
                                lp = srv.completion_logprobs(entries, offsets[idx], ids0)
                                offsets[idx] += sum(len(s) for s in lp["tokens"])
                            yield chunk([{"index": idx, "text": text, "finish_reason": ev.finish_reason,
                                          "logprobs": lp}])
                if include_usage:
                    yield chunk([], usage([done[j] for j in sorted(done)]))
                yield "data: [DONE]\n\n"
            except APIError as e:  # after the 200 went out: the error travels as an event
                yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"

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
            gen = _get(body, "add_generation_prompt", bool, True, what="a boolean")
            ids, _ = tok.render_chat(parse_messages(body), add_generation_prompt=gen)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
            ids = tok.encode(prompt, bos=bool(_get(body, "add_special_tokens", bool, True, what="a boolean")))
        out = {"tokens": ids, "count": len(ids), "max_model_len": srv.ctx}
        if _get(body, "return_token_strs", bool, False, what="a boolean"):
            out["token_strs"] = [srv.token_text.text[i] for i in ids]
        return out

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
                "model_max_length": srv.ctx, "chat_template": chat_template}

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_queue: int = 64, device: str = "cpu", max_batch: int = 32,
          threads: int | None = None):
    import torch
    import uvicorn

    torch.seed()  # requests without a seed should differ from one server start to the next
    if threads:
        torch.set_num_threads(threads)
    app = create_app(model_dir, api_key, model_name, max_queue, device, max_batch)
    print(f"serving {model_dir} as '{app.state.server.model_name}' on http://{host}:{port}/v1 "
          f"(chat page: http://{host}:{port}/)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
