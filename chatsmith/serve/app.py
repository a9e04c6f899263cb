"""`chatsmith serve`: an OpenAI-compatible HTTP API and a web chat page over the batching engine.

Endpoints: GET / (the chat page), GET /health, GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, POST /tokenize, POST /detokenize, GET /tokenizer_info, POST /v1/embeddings,
POST /v1/moderations (`serve/moderations.py`, which also checks requests and replies under
--moderation). --watermark-key watermarks every reply (chatsmith/watermark.py); the key stays here. Errors use OpenAI's
shape {"error": {"message", "type", "param", "code"}} with a 4xx status; a malformed request never
yields a 500 and never stops the server. A bug that does raise is answered with a generic 500 that
carries a request id; the details go to the server's log only. Browser-facing defaults: the API
takes `Content-Type: application/json` only, and the `Host` header must name an allowed host
(loopback by default), so a web page the user visits cannot drive the server (DNS rebinding).

This module wires the routes: request bodies are parsed and responses shaped by
`chatsmith.serve.protocol`, generation runs on the one thread of `chatsmith.serve.scheduler`. A
translation (seq2seq) model is served behind the same routes by `chatsmith.serve.translation`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsmith.checkpoint import load_model, read_config
from chatsmith.encoder_engine import EncoderEngine
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.runtime import set_threads
from chatsmith.model.encoder import EncoderConfig
from chatsmith.serve import protocol
from chatsmith.serve.embeddings import Embedder
from chatsmith.serve.moderations import Moderations
from chatsmith.serve.protocol import APIError, Call, TokenText, error_body, get_field
from chatsmith.serve.scheduler import Samples, Scheduler, admit, run_jobs
from chatsmith.serve.translation import TranslationWorker, Translator
from chatsmith.seq2seq_engine import Seq2SeqEngine, is_seq2seq
from chatsmith.tokenizer import Tokenizer
from chatsmith.moderation import load_moderator
from chatsmith.tools.inline import builtin_tools
from chatsmith.watermark import Watermark, WatermarkConfig

STATIC = Path(__file__).parent / "static"
# the page's files, listed once: a request names one of these or gets a 404 without the
# filesystem being asked about whatever it named
STATIC_FILES = {f.name: f for f in STATIC.iterdir() if f.is_file() and not f.name.startswith(".")}
MAX_BODY = 4 * 1024 * 1024
LOOPBACK = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("chatsmith.serve")


class Server:
    """What the routes share: the model's engine and tokenizer, the limits, the scheduler thread, and
    the embeddings model (an encoder served alone, model=None, or beside the generative model)."""

    def __init__(self, model, tok, model_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_batch: int = 32, chat_template: str | None = None, embedder: Embedder | None = None,
                 tools: dict | None = None, quantize: str | None = None, translator: Translator | None = None):
        self.tools = tools or {}  # the tools this server runs itself (serve --tools)
        self.translator = translator  # a translation model, served by chatsmith.serve.translation
        self.engine = Engine(model, tok, max_batch=max_batch, quantize=quantize) if model is not None else None
        self.tok, self.model_name, self.api_key = tok, model_name, api_key
        self.embedder = embedder
        self.moderation: Moderations | None = None  # serve --moderation
        self.watermark: Watermark | None = None  # serve --watermark-key: every reply
        self.max_queue, self.max_batch = max_queue, max_batch
        self.created = int(time.time())
        self.has_chat = tok is not None and tok.has_chat  # our chat tokens, or an imported model's template
        self.ctx = model.cfg.max_seq_len if model is not None else \
            translator.ctx if translator is not None else embedder.engine.max_len
        self.chat_template = chat_template
        self.scheduler: Scheduler | None = None
        self._token_text: TokenText | None = None
        self._max_chars: int | None = None
        # parsing and tokenising run here, off the event loop; two threads, so a burst of long
        # prompts queues instead of taking every core (and a malloc arena per thread)
        self.pool: ThreadPoolExecutor | None = None

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.tok)
        return self._token_text

    @property
    def max_chars(self) -> int:
        """The longest prompt text worth tokenising: the context times the most bytes one token
        covers, times 4 for normalisers that drop characters."""
        if self._max_chars is None:
            self._max_chars = self.ctx * max(1, max(map(len, self.token_text.bytes), default=1)) * 4
        return self._max_chars

    def start(self, loop):
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chatsmith-tokenize")
        if self.engine is not None and (self.scheduler is None or not self.scheduler.thread.is_alive()):
            self.scheduler = Scheduler(self.engine, loop)
        elif self.translator is not None and (self.scheduler is None or not self.scheduler.thread.is_alive()):
            self.scheduler = TranslationWorker(self.translator.engine, loop)  # the scheduler's interface

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def stop(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler.thread.join(timeout=10)

    def generative(self):
        """This route needs the generative model: an embeddings-only server says so (400)."""
        if self.engine is None and self.translator is None:
            raise APIError(400, f"'{self.model_name}' is an embeddings model (an encoder): this server answers "
                           f"POST /v1/embeddings only", param="model", code="model_not_supported")

    def admit(self, jobs: int):
        admit(self.scheduler, jobs, self.max_queue)

    def run(self, jobs: list[tuple[list[int], SamplingParams]], request: Request | None = None,
            samples: Samples | None = None):
        for _, p in jobs:
            p.watermark = self.watermark
        return run_jobs(self.scheduler, jobs, request.is_disconnected if request is not None else None, samples)


def server_of(request: Request) -> Server:
    return request.app.state.server


# --- errors: always OpenAI's shape ------------------------------------------------------------

async def on_api_error(_req, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def on_validation_error(_req, e: RequestValidationError):
    return JSONResponse(error_body(str(e.errors()[:3]), "invalid_request_error"), status_code=400)


async def on_http_error(_req, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)


def internal_error(request: Request | None, e: BaseException) -> dict:
    """A bug in chatsmith: the client gets a generic message and an id to quote; the exception,
    with its paths and values, goes to the server's log only."""
    rid = "req_" + secrets.token_hex(8)
    where = f"{request.method} {request.url.path}" if request is not None else "a stream"
    log.error("internal error in %s (request id %s)", where, rid, exc_info=e)
    return error_body(f"internal server error (request id {rid}); the details are in the server's log",
                      "server_error", code="internal_error")


async def on_unexpected_error(request: Request, e: Exception):  # keep serving
    return JSONResponse(internal_error(request, e), status_code=500)


class HostCheck:
    """ASGI middleware: a request whose Host header names no allowed host gets a 400 (a page on
    another site that rebinds its DNS name to 127.0.0.1 sends its own name). `allowed` None: any."""

    def __init__(self, app, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = next((v for k, v in scope["headers"] if k == b"host"), None)
            if host is not None and host_name(host) not in self.allowed:
                r = JSONResponse(error_body("the Host header names a host this server does not answer for "
                                            "(see chatsmith serve --allowed-hosts)", "invalid_request_error",
                                            code="invalid_host"), status_code=400)
                return await r(scope, receive, send)
        return await self.app(scope, receive, send)


def host_name(host: bytes) -> str:
    """'Host: name:port' / '[v6]:port' -> the name, lower-case."""
    h = host.decode("latin-1").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


# --- requests ---------------------------------------------------------------------------------

def auth_only(request: Request):
    key = server_of(request).api_key
    if key is not None:
        auth = request.headers.get("authorization", "")
        if not secrets.compare_digest(auth.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type_="authentication_error", code="invalid_api_key")


async def body_of(request: Request, model_name: str | None = "") -> dict:
    """The request's JSON body; its 'model' must be this server's generative model (model_name ""),
    a given name, or anything (None: the route checks)."""
    auth_only(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, "the request body is larger than 4 MiB", code="request_too_large")
    # JSON only: a browser sends text/plain or a form across sites without asking first (CORS
    # "simple" requests); application/json needs a preflight this server never grants
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, "the request body must be JSON sent with 'Content-Type: application/json'",
                       code="unsupported_media_type")
    raw = bytearray()
    async for part in request.stream():  # read at most 4 MiB, whatever the headers said
        raw += part
        if len(raw) > MAX_BODY:
            raise APIError(413, "the request body is larger than 4 MiB", code="request_too_large")
    return protocol.parse_body(bytes(raw), server_of(request).model_name if model_name == "" else model_name)


# --- routes -----------------------------------------------------------------------------------

async def index():
    return FileResponse(STATIC_FILES["index.html"], headers={"Cache-Control": "no-cache"})


async def static(name: str):
    f = STATIC_FILES.get(name)
    if f is None:
        raise APIError(404, "no such file", "not_found_error")
    return FileResponse(f, headers={"Cache-Control": "no-cache"})


async def health(request: Request):
    srv = server_of(request)
    s = srv.scheduler
    ok = (srv.engine is None and srv.translator is None) or (s is not None and s.alive)
    running = srv.engine.num_active if srv.engine else s.running if srv.translator and s else 0
    body = {"status": "ok" if ok else "unavailable", "model": srv.model_name,
            "running": running, "waiting": s.waiting() if s else 0}
    return JSONResponse(body, status_code=200 if ok else 503)


def model_cards(srv: Server) -> list[dict]:
    cards = srv.translator.cards(srv.created) if srv.translator else \
        [{"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "chatsmith"}]
    if srv.embedder is not None and srv.embedder.name != srv.model_name:
        cards.append(srv.embedder.card(srv.created))
    return cards


async def models(request: Request):
    auth_only(request)
    return {"object": "list", "data": model_cards(server_of(request))}


async def model_info(model_id: str, request: Request):
    auth_only(request)
    card = next((c for c in model_cards(server_of(request)) if c["id"] == model_id), None)
    if card is None:
        raise APIError(404, f"the model '{model_id}' does not exist", "invalid_request_error", param="model",
                       code="model_not_found")
    return card


async def complete(request: Request, chat: bool):
    srv = server_of(request)
    body = await body_of(request, None if srv.translator else "")  # a translator takes NAME:LANG too
    srv.generative()
    # tokenising can take seconds for a long prompt: in a worker thread, so /health and the
    # other clients are answered meanwhile (the tokenizer releases the GIL)
    if srv.translator is not None:
        call = await srv.off_loop(srv.translator.parse_call, body, chat, srv.max_batch, srv.max_chars)
    else:
        call = await srv.off_loop(protocol.parse_call, body, chat, srv.tok, srv.ctx, srv.max_batch, srv.max_chars,
                                  srv.tools)
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    model = call.model or srv.model_name
    if srv.moderation is not None:  # a flagged request gets a refusal (or crisis) reply, not the model's
        refusal = await srv.moderation.request_reply(body, chat)
        if refusal is not None:
            return srv.moderation.refusal(call, refusal, rid, created, model)
    srv.admit(len(call.jobs))
    if not call.stream:
        done: dict[int, list] = {}
        async for j, kind, item in srv.run(call.jobs, request):
            if kind == "done":
                done[j] = item
        if len(done) < len(call.jobs):  # the client left; nobody reads this
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=400)
        if srv.moderation is not None:
            await srv.moderation.cut_completions(done)
        return protocol.response(call, done, rid, created, model, srv.token_text)
    chunks = protocol.Chunks(call, rid, created, model, srv.token_text)
    return StreamingResponse(stream_events(srv, call, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream_events(srv: Server, call: Call, chunks: protocol.Chunks):
    """The server-sent events of a streamed call, ending with [DONE]."""
    try:
        for c in chunks.roles():
            yield c
        done: dict[int, list] = {}
        guard = srv.moderation.guard(call) if srv.moderation is not None else None
        samples = Samples()
        run = srv.run(call.jobs, samples=samples)
        try:
            async for j, kind, item in run:
                if kind == "done":
                    done[j] = item
                    continue
                for ev in item:
                    if guard is not None and (ev := await guard.check(j, ev)) is None:
                        continue
                    if ev.finish_reason == "content_filter":  # a cut choice stops decoding; the others go on
                        samples.stop(j, ev.index)
                    yield chunks.event(j, ev)
                if guard is not None and guard.all_stopped:
                    break  # every choice ended or was filtered: closing `run` cancels what still decodes
        finally:
            await run.aclose()
        for c in chunks.usage(done):
            yield c
        yield protocol.SSE_DONE
    except APIError as e:  # after the 200 went out: the error travels as an event
        yield protocol.sse(e.body(), ensure_ascii=True)
    except Exception as e:  # a bug: the stream still ends with a JSON event, not a cut connection
        yield protocol.sse(internal_error(None, e), ensure_ascii=True)


async def chat_completions(request: Request):
    return await complete(request, chat=True)


async def completions(request: Request):
    return await complete(request, chat=False)


async def tokenize(request: Request):
    srv = server_of(request)
    body = await body_of(request, None if srv.translator else "")
    srv.generative()
    if srv.translator is not None:  # the ids the encoder reads
        return await srv.off_loop(srv.translator.tokenize, body, srv.token_text)
    return await srv.off_loop(tokenize_body, srv, body)


def tokenize_body(srv: Server, body: dict) -> dict:
    tok = srv.tok
    if "messages" in body:
        gen = get_field(body, "add_generation_prompt", bool, True, what="a boolean")
        ids, _ = tok.render_chat(protocol.parse_messages(body), add_generation_prompt=gen)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
        bos = bool(get_field(body, "add_special_tokens", bool, True, what="a boolean"))
        ids = tok.encode(prompt, bos=bos, special=True)  # a raw prompt: its writer owns the control tokens
    out = {"tokens": ids, "count": len(ids), "max_model_len": srv.ctx}
    if get_field(body, "return_token_strs", bool, False, what="a boolean"):
        out["token_strs"] = [srv.token_text.text[i] for i in ids]
    return out


async def detokenize(request: Request):
    srv = server_of(request)
    body = await body_of(request, None if srv.translator else "")
    srv.generative()
    if srv.translator is not None:
        srv.translator.target_of_model(body.get("model"))  # NAME or NAME:LANG
    ids = body.get("tokens")
    V = srv.tok.vocab_size
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < V
                                             for i in ids):
        raise APIError(400, f"'tokens' must be a list of token ids in [0, {V})", param="tokens")
    return {"prompt": srv.tok.decode(ids)}


async def tokenizer_info(request: Request):
    auth_only(request)
    srv = server_of(request)
    srv.generative()
    return {"tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": srv.tok.vocab_size,
            "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
            "model_max_length": srv.ctx, "chat_template": srv.chat_template}


async def embeddings(request: Request):
    srv = server_of(request)
    body = await body_of(request, model_name=None)
    if srv.embedder is None:
        raise APIError(404, f"this server has no embeddings model ('{srv.model_name}' generates text); start it "
                       f"with --embeddings ENCODER_DIR (e.g. minilm)", param="model", code="model_not_found")
    return await srv.embedder.create(body)


async def moderations(request: Request):
    srv = server_of(request)
    body = await body_of(request, model_name=None)
    if srv.moderation is None:
        raise APIError(404, "this server does not moderate; start it with --moderation lexicon (or a classifier "
                       "directory)", code="moderation_not_enabled")
    return await srv.moderation.create(body)


# --- the app ----------------------------------------------------------------------------------

ROUTES = [  # (method, path, handler, in the OpenAPI schema)
    ("GET", "/", index, False), ("GET", "/static/{name}", static, False), ("GET", "/health", health, True),
    ("GET", "/v1/models", models, True), ("GET", "/v1/models/{model_id}", model_info, True),
    ("POST", "/v1/chat/completions", chat_completions, True), ("POST", "/v1/completions", completions, True),
    ("POST", "/tokenize", tokenize, True), ("POST", "/detokenize", detokenize, True),
    ("GET", "/tokenizer_info", tokenizer_info, True), ("POST", "/v1/embeddings", embeddings, True),
    ("POST", "/v1/moderations", moderations, True),
]


@asynccontextmanager
async def lifespan(app: FastAPI):
    srv = app.state.server
    srv.start(asyncio.get_running_loop())
    try:
        yield
    finally:
        srv.stop()


def create_app(model_dir: str | Path, api_key: str | None = None, model_name: str | None = None,
               max_queue: int = 64, device: str = "cpu", max_batch: int = 32,
               allowed_hosts: list[str] | None = None, embeddings: str | None = None,
               embeddings_name: str | None = None, tools: list[str] | None = None,
               quantize: str | None = None, moderation: str | None = None,
               watermark: WatermarkConfig | None = None, tgt: str | None = None,
               num_beams: int | None = None) -> FastAPI:
    """allowed_hosts: the names a request's Host header may give (default: loopback); '*': any.
    An encoder model_dir is served for /v1/embeddings alone; `embeddings` adds an encoder beside a
    generative model (clients pick it by `embeddings_name`, default its directory's name). tools:
    built-in tools the server runs inside generation (calculator). A translation (seq2seq) model_dir
    is served by chatsmith.serve.translation: `tgt` is the target of plain NAME requests, `num_beams`
    the default beam width."""
    try:
        builtin = builtin_tools(tools)
    except ValueError as e:
        raise UserError(f"--tools: {e}") from None
    name = model_name or Path(model_dir).resolve().name
    seq2seq = is_seq2seq(model_dir)
    if not seq2seq and (tgt is not None or num_beams is not None):
        raise UserError(f"--tgt and --num-beams are for translation models; {model_dir} is not one")
    if isinstance(read_config(model_dir), EncoderConfig):
        if embeddings:
            raise UserError(f"{model_dir} is itself an encoder: serve it alone, or give a generative model with --embeddings")
        srv = Server(None, None, name, api_key, max_queue, max_batch,
                     embedder=Embedder(EncoderEngine.load(str(model_dir), device=device), name))
    elif seq2seq:
        given = [f for f, on in (("--tools", builtin), ("--quantize int8", quantize not in (None, "none")),
                                 ("--watermark-key", watermark is not None)) if on]
        if given:
            raise UserError(f"{', '.join(given)}: not available for a translation (encoder-decoder) model")
        engine = Seq2SeqEngine.load(model_dir, device=device, max_batch=max_batch)
        embedder = _embedder(embeddings, embeddings_name, name, device)
        srv = Server(None, engine.tok, name, api_key, max_queue, max_batch, embedder=embedder,
                     translator=Translator(engine, name, tgt, 1 if num_beams is None else num_beams))
    else:
        model = load_model(model_dir, device=device)
        tok = Tokenizer.load(model_dir)
        cfg_path = Path(model_dir) / "tokenizer_config.json"
        chat_template = json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.exists() else None
        embedder = _embedder(embeddings, embeddings_name, name, device)
        if builtin and tok.tool_markers is None:
            raise UserError(f"--tools: the chat template of {model_dir} has no tool support")
        srv = Server(model, tok, name, api_key, max_queue, max_batch, chat_template, embedder, builtin,
                     quantize=quantize)
    if moderation:
        srv.moderation = Moderations(load_moderator(moderation, device=device))
    if watermark is not None and srv.tok is not None:
        srv.watermark = Watermark(watermark, srv.tok.vocab_size)
    return build_app(srv, allowed_hosts)


def _embedder(embeddings: str | None, embeddings_name: str | None, name: str, device: str) -> Embedder | None:
    if not embeddings:
        return None
    ename = embeddings_name or Path(embeddings).resolve().name
    if ename == name:
        raise UserError(f"the embeddings model needs a name other than the chat model's ({name!r}): "
                        f"--embeddings-name")
    return Embedder(EncoderEngine.load(embeddings, device=device), ename)


def build_app(srv: Server, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI app over a Server (tests build one over a scripted model)."""
    app = FastAPI(title="chatsmith", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    for method, path, handler, schema in ROUTES:
        methods = [method, "HEAD"] if method == "GET" else [method]
        app.add_api_route(path, handler, methods=methods, include_in_schema=schema)
    hosts = list(LOOPBACK) if allowed_hosts is None else allowed_hosts
    app.add_middleware(HostCheck, allowed=None if "*" in hosts else frozenset(h.lower().strip("[]") for h in hosts))
    return app


def default_hosts(host: str) -> list[str]:
    """Bound to loopback: loopback names; to one address: that one too; to every address
    (0.0.0.0, ::): any Host, since the names the machine is reached by are not known here."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return list(dict.fromkeys([*LOOPBACK, host.lower().strip("[]")]))


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_queue: int = 64, device: str = "cpu", max_batch: int = 32,
          threads: int | None = None, allowed_hosts: list[str] | None = None, embeddings: str | None = None,
          embeddings_name: str | None = None, tools: list[str] | None = None, quantize: str | None = None,
          moderation: str | None = None, watermark: WatermarkConfig | None = None, tgt: str | None = None,
          num_beams: int | None = None):
    sock = listen(host, port)  # before the model loads: a busy port is said at once, with nothing to undo
    torch.seed()  # requests without a seed should differ from one server start to the next
    set_threads(threads)
    app = create_app(model_dir, api_key, model_name, max_queue, device, max_batch,
                     allowed_hosts if allowed_hosts else default_hosts(host), embeddings, embeddings_name, tools,
                     quantize, moderation, watermark, tgt, num_beams)
    print(f"serving {model_dir} as '{app.state.server.model_name}' on http://{host}:{port}/v1 "
          f"(chat page: http://{host}:{port}/)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """The bound, listening socket uvicorn serves on; a port out of range, in use or not ours to take
    is a UserError (exit 2, one line) instead of uvicorn's tracebacks after "serving" was printed."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1-65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart past TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
