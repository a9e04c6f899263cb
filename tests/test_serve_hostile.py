"""`chatsmith serve` against hostile input (issue 22) and requests that would stall it (issue 23):
the hand-written corpus (tests/hostile_corpus.py) replayed over raw sockets, each of the issue's
cases as a regression test through HTTP, the request limits, tokenising off the event loop,
cancelling a non-streaming request whose client left, and the browser-facing defaults (JSON only,
Host checked, Retry-After, HEAD). The schema-driven fuzzer is tests/test_serve_fuzz.py."""

import json
import logging
import threading
import time

import httpx
import pytest

import hostile_corpus
from openapi_schema import validate
from test_serve import free_port

KEY = hostile_corpus.KEY
H = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hi"}]


def start(app):
    """Serve app on a free loopback port in a thread -> (base url, port, uvicorn server)."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    for _ in range(400):
        if srv.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", port, srv


@pytest.fixture(scope="module")
def live(base_model, encoder_dir):
    from chatsmith.serve.app import create_app

    app = create_app(base_model, api_key=KEY, model_name="model", max_queue=32, embeddings=str(encoder_dir),
                     embeddings_name="embed")
    url, port, srv = start(app)
    yield url, port, app.state.server
    srv.should_exit = True


def post(url, path, body=None, raw=None, headers=None, **kw):
    h = {**H, "Content-Type": "application/json", **(headers or {})}
    kw.setdefault("timeout", 60)
    return httpx.post(url + path, content=raw if raw is not None else json.dumps(body), headers=h, **kw)


def error(r, status: int, param="any") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    validate(r.json(), "ErrorResponse")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param != "any":
        assert err["param"] == param, err
    return err


def still_serving(url):
    assert httpx.get(url + "/health").json()["status"] == "ok"
    r = post(url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 3})
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateChatCompletionResponse")


# --- the cases, one by one ----------------------------------------------------------------

@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "a\ud800b"}]}', "messages[0].content"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}', "stop[0]"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "model": "\udc00"}', "model"),
    ("/v1/completions", r'{"prompt": "\ud800"}', "prompt"),
    ("/v1/completions", r'{"prompt": ["ok", "\udfff"]}', "prompt[1]"),
    ("/tokenize", r'{"prompt": "x\ud800"}', "prompt"),
    ("/tokenize", r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}",
     "max_tokens"),
    ("/v1/completions", '{"prompt": [1, 2, ' + "7" * 5000 + "]}", "prompt[2]"),
    ("/v1/completions", '{"prompt": "x", "seed": -' + "1" * 4400 + "}", "seed"),
])
def test_surrogates_and_huge_integers_are_400s_naming_the_field(live, path, body, param):
    url, _, _ = live
    err = error(post(url, path, raw=body.encode()), 400, param)
    assert err["code"] == "invalid_value"


def test_nan_and_infinity_literals_are_invalid_json(live):
    url, _, _ = live
    for lit in ("NaN", "Infinity", "-Infinity"):
        err = error(post(url, "/v1/completions", raw=f'{{"prompt": "x", "temperature": {lit}}}'.encode()), 400)
        assert err["code"] == "invalid_json"


def test_static_names_outside_the_page_are_404_without_a_path(live):
    url, _, _ = live
    for name in ["a" * 300, "a" * 5000, "%2e%2e%2fapp.py", "..%2f..%2fetc%2fpasswd", "%00", "%C3%A9", "app.js%00",
                 ".hidden", "__init__.py", "APP.JS"]:
        r = httpx.get(url + "/static/" + name)
        err = error(r, 404)
        assert "/" not in err["message"] and "static" not in err["message"], err
    assert httpx.get(url + "/static/app.js").status_code == 200


def test_a_bug_gets_a_generic_500_with_a_request_id_and_the_log_gets_the_details(live, monkeypatch, caplog):
    from chatsmith.serve import protocol

    url, _, _ = live

    def broken(*a, **k):
        raise RuntimeError("secret detail at /home/someone/chatsmith/serve/protocol.py")

    monkeypatch.setattr(protocol, "response", broken)
    with caplog.at_level(logging.ERROR, logger="chatsmith.serve"):
        r = post(url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 2})
    err = error(r, 500)
    assert err["type"] == "server_error" and "request id req_" in err["message"]
    assert "secret" not in r.text and "/home" not in r.text and "RuntimeError" not in r.text
    rid = err["message"].split("request id ")[1].split(")")[0]
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    # a bug after a stream started: the stream still ends with a JSON error event
    monkeypatch.setattr(protocol.Chunks, "event", broken)
    with httpx.stream("POST", url + "/v1/completions", headers={**H, "Content-Type": "application/json"},
                      content=json.dumps({"prompt": "The", "max_tokens": 3, "stream": True})) as s:
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    last = json.loads(events[-1])
    assert "request id req_" in last["error"]["message"] and "secret" not in "".join(events)
    monkeypatch.undo()
    still_serving(url)


# --- the corpus -----------------------------------------------------------------------------------

def test_hostile_corpus_gets_a_response_to_every_request_and_no_5xx(live):
    url, port, _ = live
    cases = hostile_corpus.cases()
    results = hostile_corpus.replay("127.0.0.1", port, cases)
    no_response = [c.name for c, s, _ in results if s is None]
    server_errors = [(c.name, raw[:200]) for c, s, raw in results if s is not None and s >= 500]
    cut = [c.name for c, s, raw in results if s is not None and not hostile_corpus.complete(raw, c.method)]
    assert not no_response and not server_errors and not cut, (no_response[:5], server_errors[:5], cut[:5])
    for c, s, raw in results:
        head, _, body = raw.partition(b"\r\n\r\n")
        if s >= 400 and b"application/json" in head.lower() and c.method != "HEAD" and b"chunked" not in head:
            validate(json.loads(body), "ErrorResponse")
        assert b"/work/" not in raw and b"Traceback" not in raw and b"site-packages" not in raw, c.name
    hist = hostile_corpus.histogram(results)
    assert hist.get(400, 0) > len(cases) / 2  # most of it is refused, by field
    still_serving(url)


# --- issue 23: what one request may ask for --------------------------------------------------------

def test_request_limits_are_400s(live):
    from chatsmith.serve import protocol

    url, _, _ = live
    chat = "/v1/chat/completions"
    error(post(url, chat, {"messages": MSG, "stop": ["x"] * (protocol.MAX_STOPS + 1)}), 400, "stop")
    error(post(url, chat, {"messages": MSG, "stop": "x" * (protocol.MAX_STOP_CHARS + 1)}), 400, "stop")
    assert post(url, chat, {"messages": MSG, "max_tokens": 2, "stop": ["zz"] * protocol.MAX_STOPS,
                            }).status_code == 200
    error(post(url, chat, {"messages": MSG * (protocol.MAX_MESSAGES + 1)}), 400, "messages")
    error(post(url, chat, {"messages": MSG, "n": 17}), 400, "n")
    error(post(url, chat, {"messages": MSG, "logprobs": True, "top_logprobs": protocol.MAX_LOGPROBS + 1}), 400,
          "top_logprobs")
    error(post(url, "/v1/completions", {"prompt": "x", "logprobs": protocol.MAX_LOGPROBS + 1}), 400, "logprobs")
    error(post(url, "/v1/completions", {"prompt": ["x"] * (protocol.MAX_PROMPTS + 1)}), 400, "prompt")


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenising(live, monkeypatch):
    url, _, srv = live
    calls = []
    encode = srv.tok.encode
    monkeypatch.setattr(srv.tok, "encode", lambda text, **k: calls.append(len(text)) or encode(text, **k))
    long = "the king " * (srv.max_chars // 9 + 1)
    err = error(post(url, "/v1/completions", {"prompt": long, "max_tokens": 1}), 400, "prompt")
    assert err["code"] == "context_length_exceeded" and calls == []
    err = error(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}), 400, "messages")
    assert err["code"] == "context_length_exceeded"
    # a prompt just over the context (but under the character bound) is tokenised and refused by count
    error(post(url, "/v1/completions", {"prompt": "the king " * srv.ctx, "max_tokens": 1}), 400, "prompt")
    assert calls


def test_stop_matching_looks_only_at_the_end_of_the_text():
    """The stop check runs per token: it must not copy or scan the whole reply each time."""
    from chatsmith.engine import StopMatcher

    class Text(str):  # a reply that refuses to be sliced whole
        def __getitem__(self, k):
            if isinstance(k, slice) and len(range(*k.indices(len(self)))) > 1000:
                raise AssertionError("the stop check copied the whole text")
            return str.__getitem__(self, k)

    m = StopMatcher(["abc", "zzz"] * 8)
    text = Text("x" * 100_000 + "ab")
    assert m.safe_len(text) == 100_000
    assert m.find(text + "c", 100_002) == 100_000


def test_health_answers_while_a_prompt_is_tokenised(live, monkeypatch):
    """A tokenisation held open (standing in for a 4 MB prompt) does not hold the event loop."""
    url, _, srv = live
    entered, release = threading.Event(), threading.Event()
    encode = srv.tok.encode

    def held(text, **k):
        entered.set()
        release.wait(30)
        return encode(text, **k)

    monkeypatch.setattr(srv.tok, "encode", held)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", post(url, "/v1/completions", {"prompt": "The",
                                                                                          "max_tokens": 2})))
    t.start()
    try:
        assert entered.wait(30)
        h = httpx.get(url + "/health", timeout=20)  # answered while encode is still held
        assert h.status_code == 200 and not release.is_set()
    finally:
        release.set()
        t.join(60)
    assert box["r"].status_code == 200


def test_non_streaming_client_that_leaves_is_cancelled(live, monkeypatch):
    """A non-streaming request whose client hangs up is cancelled while tokens keep coming (the
    engine steps all the time, so 'no news for a second' never happens)."""
    url, _, srv = live
    step, stepped = srv.engine.step, []

    def slow_step():
        stepped.append(1)
        time.sleep(0.1)
        return step()

    body = {"prompt": "The", "max_tokens": 50, "temperature": 1.0, "seed": 7, "stop": None}
    monkeypatch.setattr(srv.engine, "step", slow_step)
    cancelled = srv.scheduler.cancelled
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", body, timeout=httpx.Timeout(60, read=0.5))
    for _ in range(300):
        if srv.scheduler.cancelled > cancelled and srv.engine.num_active == 0:
            break
        time.sleep(0.05)
    assert srv.scheduler.cancelled == cancelled + 1 and srv.engine.num_active == 0
    assert len(stepped) < 50
    monkeypatch.undo()
    still_serving(url)


# --- issue 23: browser-facing defaults ------------------------------------------------------------

def test_api_takes_json_only(live):
    url, _, _ = live
    body = json.dumps({"messages": MSG, "max_tokens": 2})
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        h = {**H, **({"Content-Type": ct} if ct else {})}
        r = httpx.post(url + "/v1/chat/completions", content=body, headers=h)
        assert error(r, 415)["code"] == "unsupported_media_type"
    assert post(url, "/v1/chat/completions", raw=body.encode(),
                headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def test_host_header_is_checked(live, base_model):
    from chatsmith.serve.app import create_app, default_hosts

    url, _, _ = live
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80"):
        r = httpx.get(url + "/v1/models", headers={**H, "Host": host})
        assert error(r, 400)["code"] == "invalid_host", host
    for host in ("localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:8000"):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
    assert default_hosts("0.0.0.0") == ["*"] and "10.1.2.3" in default_hosts("10.1.2.3")
    url2, _, srv2 = start(create_app(base_model, model_name="m", allowed_hosts=["chat.lan"]))
    try:
        assert httpx.get(url2 + "/health", headers={"Host": "chat.lan:80"}).status_code == 200
        assert httpx.get(url2 + "/health").status_code == 400  # 127.0.0.1 is not in the list given
    finally:
        srv2.should_exit = True


def test_429_says_when_to_retry_405_says_what_is_allowed_and_head_works(live, monkeypatch):
    url, _, srv = live
    monkeypatch.setattr(srv.scheduler, "waiting", lambda: srv.max_queue)
    r = post(url, "/v1/chat/completions", {"messages": MSG})
    error(r, 429)
    assert int(r.headers["retry-after"]) >= 1
    monkeypatch.undo()
    r = httpx.put(url + "/v1/models", headers=H)
    error(r, 405)
    assert "GET" in r.headers["allow"]
    for path in ("/", "/health", "/v1/models", "/v1/models/model", "/tokenizer_info", "/static/app.js"):
        r = httpx.head(url + path, headers=H)
        assert r.status_code == 200 and r.content == b"", path
