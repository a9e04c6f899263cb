"""`chatsmith serve` against the official openai client and raw HTTP: chat, completions, streaming,
stop strings, usage, logprobs and echo scoring, tokenizer endpoints, concurrency (batched results
equal solo ones), disconnects, and OpenAI-shaped 4xx/503 errors that never stop the server. Every
response body is validated against OpenAI's official OpenAPI schemas."""

import asyncio
import json
import math
import socket
import threading
import time

import httpx
import pytest

from conftest import cli
from openapi_schema import validate

H = {"Authorization": "Bearer sekrit"}
APPS = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chat_dir(base_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("srvdata")
    data = d / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n"
                            for q, a in [("What is the capital of France?", "Paris"), ("Say hi.", "hi")]))
    out = d / "model"
    assert cli("sft", "--data", data, "--init", base_model, "--out", out, "--max-steps", 150, "--batch-size", 4,
               "--lr", "3e-3", "--warmup-steps", 5, "--log-every", 50) == 0
    return out


@pytest.fixture(scope="module")
def server(chat_dir):
    import uvicorn

    from chatsmith.serve.app import create_app

    port = free_port()
    app = create_app(chat_dir, api_key="sekrit", model_name="tiny-chat", max_queue=32)
    APPS["app"] = app
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(cfg)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(timeout=10)


@pytest.fixture
def srv(server):
    """The Server object behind the live app (its engine and scheduler)."""
    return APPS["app"].state.server


def sse(r) -> list[dict]:
    """The JSON events of a streamed response, checking the stream ends with [DONE]."""
    lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(x) for x in lines[:-1]]


def post(server, path, body, **kw):
    return httpx.post(server + path, json=body, headers=H, timeout=60, **kw)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="sekrit", max_retries=0)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny-chat", temperature=0, max_tokens=8,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == "Paris" and c.finish_reason == "stop"
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(model="tiny-chat", temperature=0, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Paris"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completions_tutorial_loop_and_stop(client):
    r = client.completions.create(model="tiny-chat", prompt="User: hello\nChatGPT: ", max_tokens=20, n=1,
                                  stop=None, temperature=0.7, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].text, str)
    free = client.completions.create(model="tiny-chat", prompt="The king", max_tokens=20, temperature=0)
    text = free.choices[0].text
    stop = text[3:6]
    if stop.strip():
        cut = client.completions.create(model="tiny-chat", prompt="The king", max_tokens=20, temperature=0,
                                        stop=[stop, "zz-never"])
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-chat", prompt="The king", max_tokens=20, temperature=0, stop=stop, stream=True) if c.choices)
        assert streamed == cut.choices[0].text
    n3 = client.completions.create(model="tiny-chat", prompt="The king", max_tokens=5, n=3, seed=3)
    assert sorted(c.index for c in n3.choices) == [0, 1, 2]


def test_errors_are_openai_shaped_4xx(client, server):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="x " * 10, max_tokens=10_000)
    assert e.value.body["code"] == "context_length_exceeded"
    h = {"Authorization": "Bearer sekrit", "Content-Type": "application/json"}
    bad = [b"{not json", b"[1, 2]", json.dumps({"messages": "hi"}).encode(),
           json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 0}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [1]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}).encode()]
    for body in bad:
        r = httpx.post(server + "/v1/chat/completions", content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert httpx.post(server + "/v1/chat/completions", content=b"x" * (5 << 20), headers=h).status_code == 413
    # still serving
    assert httpx.get(server + "/health").status_code == 200


def test_tokenize_detokenize(server):
    h = {"Authorization": "Bearer sekrit"}
    ids = httpx.post(server + "/tokenize", json={"prompt": "hello 你好"}, headers=h).json()["tokens"]
    assert httpx.post(server + "/detokenize", json={"tokens": ids}, headers=h).json()["prompt"] == "<|bos|>hello 你好"
    info = httpx.get(server + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "<|eos|>" and "assistant_start" in info["chat_template"]
    assert httpx.post(server + "/detokenize", json={"tokens": [-1]}, headers=h).status_code == 400


def test_client_disconnect_cancels_and_server_keeps_going(server, client, srv, monkeypatch):
    """A streaming client that hangs up after one event cancels its generation: the scheduler
    counts it cancelled (not finished) and frees its rows. The engine's steps after the first wait
    until the client is gone, so the reply cannot simply end by itself first."""
    body = {"prompt": "The", "max_tokens": 40, "temperature": 0}
    solo = post(server, "/v1/completions", body).json()["usage"]["completion_tokens"]  # steps, left alone
    assert solo > 2
    step, stepped, go = srv.engine.step, [], threading.Event()

    def held_step():
        if stepped:
            go.wait(10)
        stepped.append(1)
        return step()

    monkeypatch.setattr(srv.engine, "step", held_step)
    cancelled = srv.scheduler.cancelled
    with httpx.stream("POST", server + "/v1/completions", headers=H, json={**body, "stream": True}) as r:
        for _ in r.iter_lines():
            break  # read one event and hang up
    time.sleep(0.5)  # the server notices while its second step is held
    go.set()
    for _ in range(250):
        if srv.scheduler.cancelled > cancelled and srv.engine.num_active == 0:
            break
        time.sleep(0.02)
    assert srv.scheduler.cancelled == cancelled + 1 and srv.engine.num_active == 0
    assert len(stepped) < solo  # the engine dropped it before the reply's end
    monkeypatch.undo()
    r = client.completions.create(model="tiny-chat", prompt="The", max_tokens=3)
    assert len(r.choices) == 1


# --- schemas: every kind of response body against the official OpenAPI document -----------------

def test_schemas_of_models_chat_and_completions(server):
    validate(httpx.get(server + "/v1/models", headers=H).json(), "ListModelsResponse")
    validate(httpx.get(server + "/v1/models/tiny-chat", headers=H).json(), "Model")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "n": 2, "seed": 1,
                                              "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        content = c["logprobs"]["content"]
        assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
        assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace").startswith(
            c["message"]["content"])
    u = body["usage"]
    assert u["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in body["choices"])
    r = post(server, "/v1/completions", {"prompt": ["The king", "Love is"], "max_tokens": 5, "n": 2,
                                         "logprobs": 3, "temperature": 0})
    body = r.json()
    validate(body, "CreateCompletionResponse")
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: both samples agree
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert body["usage"]["prompt_tokens"] == sum(len(httpx.post(server + "/tokenize", json={"prompt": p},
                                                                headers=H).json()["tokens"])
                                                 for p in ["The king", "Love is"])
    err = post(server, "/v1/chat/completions", {"messages": []})
    assert err.status_code == 400
    validate(err.json(), "ErrorResponse")


def test_streamed_chunks_match_schemas(server):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
            "temperature": 0, "n": 2, "stream": True, "stream_options": {"include_usage": True},
            "logprobs": True, "top_logprobs": 1}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=H, timeout=60) as r:
        chunks = sse(r)
    for ch in chunks:
        validate(ch, "CreateChatCompletionStreamResponse")
    roles = [c["choices"][0]["index"] for c in chunks[:2]]
    assert roles == [0, 1] and all(c["choices"][0]["delta"].get("role") == "assistant" for c in chunks[:2])
    texts = {0: "", 1: ""}
    reasons = {}
    for ch in chunks[:-1]:
        for c in ch["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    assert texts[0] == texts[1] == "Paris" and reasons == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 2
    body = {"prompt": "The king", "max_tokens": 6, "stream": True, "echo": True, "logprobs": 1,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=H, timeout=60) as r:
        chunks = sse(r)
    for ch in chunks:
        validate(ch, "CreateCompletionStreamChunk")
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.startswith("The king")
    assert chunks[-1]["usage"]["completion_tokens"] <= 6


def test_echo_logprobs_score_the_prompt_like_lm_eval_harness(server, srv):
    """lm-evaluation-harness `local-completions` loglikelihood: token-id prompts, echo, max_tokens
    1, logprobs 1, summing token_logprobs[ctxlen:-1]; the numbers equal the model's own."""
    import torch

    tok = srv.tok
    ctx, cont = tok.encode("The king said", bos=True), tok.encode(" to the queen")
    r = post(server, "/v1/completions", {"prompt": [ctx + cont], "max_tokens": 1, "logprobs": 1, "echo": True,
                                         "temperature": 0, "seed": 1234})
    body = r.json()
    validate(body, "CreateCompletionResponse")
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ctx + cont) + 1
    with torch.no_grad():
        ref = srv.engine.model(torch.tensor([ctx + cont]))[0].float().log_softmax(-1)
    want = sum(float(ref[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert math.isclose(sum(lp["token_logprobs"][len(ctx):-1]), want, abs_tol=1e-3)
    # is_greedy as the harness computes it: each token's logprob equals the best alternative's
    greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx):-1],
                                                           lp["top_logprobs"][len(ctx):-1]))
    assert greedy == all(int(ref[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    # max_tokens 0: the prompt scored, nothing generated
    r = post(server, "/v1/completions", {"prompt": "The king said", "max_tokens": 0, "echo": True, "logprobs": 0})
    c = r.json()["choices"][0]
    assert c["text"] == "The king said" and c["finish_reason"] == "length"
    # a text prompt: its <|bos|> is not echoed, so the first token of the text has a logprob
    assert r.json()["usage"]["completion_tokens"] == 0 and c["logprobs"]["tokens"][0] != "<|bos|>"
    assert "".join(c["logprobs"]["tokens"]) == c["text"] and c["logprobs"]["token_logprobs"][0] is not None


def test_concurrent_requests_batch_and_match_solo_results(server, srv):
    """Different prompt lengths and settings at once: greedy ones give their solo answers."""
    prompts = ["The", "The king said to the queen", "Love", "In the night the river", "She was", "A"]
    solo = [post(server, "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0}).json()
            ["choices"][0]["text"] for p in prompts]
    steps0 = srv.scheduler.steps

    async def main():
        async with httpx.AsyncClient(base_url=server, headers=H, timeout=60) as c:
            greedy = [c.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0})
                      for p in prompts]
            noisy = [c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": p}],
                                                          "max_tokens": 12, "temperature": 1.2, "top_p": 0.9})
                     for p in prompts]
            return await asyncio.gather(*greedy, *noisy)

    rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [200] * len(rs), [r.text for r in rs if r.status_code != 200]
    assert [r.json()["choices"][0]["text"] for r in rs[:len(prompts)]] == solo
    # 12 requests of <= 12 tokens in far fewer than 12 * 12 steps: they shared forward passes
    assert srv.scheduler.steps - steps0 < 12 * 12 / 2


def test_every_error_code_and_no_500s(server, srv, monkeypatch):
    def status(path, body=None, headers=H, raw=None):
        r = httpx.post(server + path, headers={**headers, "Content-Type": "application/json"}, timeout=30,
                       **({"content": raw} if raw is not None else {"json": body}))
        if r.status_code != 200:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            validate(r.json(), "ErrorResponse")
        return r.status_code

    msg = [{"role": "user", "content": "x"}]
    assert status("/v1/chat/completions", {"messages": msg}, headers={}) == 401
    assert status("/v1/chat/completions", {"messages": msg, "model": "gpt-9"}) == 404
    assert httpx.get(server + "/v1/models/gpt-9", headers=H).status_code == 404
    assert httpx.get(server + "/no/such/path").status_code == 404
    assert status("/v1/completions", raw=b"[" * (5 << 20)) == 413
    malformed = [
        {"messages": msg, "max_tokens": "5"}, {"messages": msg, "max_completion_tokens": 0},
        {"messages": msg, "top_p": 0}, {"messages": msg, "temperature": True}, {"messages": msg, "seed": 1.5},
        {"messages": msg, "n": 17}, {"messages": msg, "logprobs": "yes"}, {"messages": msg, "top_logprobs": 3},
        {"messages": msg, "logprobs": True, "top_logprobs": 99}, {"messages": msg, "stream": "true"},
        {"messages": msg, "stream_options": {"include_usage": True}},
        {"messages": msg, "stream": True, "stream_options": [1]}, {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {"messages": [1]},
        {"messages": msg, "tools": [{"type": "function"}]}, {"messages": msg, "stop": "x" * 10 + "\x00", "n": 0},
        {"messages": [{"role": "user", "content": "word " * 200}]},
    ]
    for body in malformed:
        assert status("/v1/chat/completions", body) == 400, body
    for body in [{}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [1, "a"]}, {"prompt": [10 ** 9]},
                 {"prompt": [-1]}, {"prompt": "x", "echo": "yes"}, {"prompt": "x", "max_tokens": 0},
                 {"prompt": "x", "logprobs": -1}, {"prompt": "x", "best_of": 3}, {"prompt": "x", "suffix": "y"},
                 {"prompt": ["x"] * 65}, {"prompt": ["x"] * 3, "n": 16, "max_tokens": 1}]:
        assert status("/v1/completions", body) in (400,), body
    for raw in [b"", b"\xff\xfe", b"nul", b'{"prompt": "x", "max_tokens": 1e999}', b"[" * 100_000]:
        assert status("/v1/completions", raw=raw) == 400, raw
    assert status("/tokenize", {"messages": "x"}) == 400
    assert status("/tokenize", {"prompt": 5}) == 400
    # 429: the queue is full (made full by pretending requests wait)
    monkeypatch.setattr(srv.scheduler, "waiting", lambda: srv.max_queue)
    assert status("/v1/chat/completions", {"messages": msg}) == 429
    monkeypatch.undo()
    # 503: the engine is not running
    monkeypatch.setattr(type(srv.scheduler), "alive", property(lambda s: False))
    assert status("/v1/chat/completions", {"messages": msg}) == 503
    assert httpx.get(server + "/health").status_code == 503
    monkeypatch.undo()
    assert httpx.get(server + "/health").json()["status"] == "ok"
    assert status("/v1/chat/completions", {"messages": msg, "max_tokens": 2}) == 200


def test_disconnect_frees_the_batch_rows(server, srv):
    body = {"prompt": "The", "max_tokens": 50, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", server + "/v1/completions", headers=H, json=body) as r:
        for _ in r.iter_lines():
            break
    for _ in range(200):  # the scheduler notices at its next step
        if srv.engine.num_active == 0 and httpx.get(server + "/health").json()["running"] == 0:
            break
        time.sleep(0.02)
    assert srv.engine.num_active == 0


def test_openai_sdk_tutorial_loop(client, server):
    """The classic tutorial: a growing "User: ...\\nChatGPT: " transcript sent through completions."""
    turns = []
    for question in ["hello", "What is the capital of France?", "Say hi."]:
        # the test model's context is 64 tokens: like the tutorial, keep only the latest turns
        prompt = "".join(turns[-1:]) + f"User: {question}\nChatGPT: "
        r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=8, n=1, stop=None,
                                      temperature=0.7)
        answer = r.choices[0].text
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8
        assert r.usage.prompt_tokens == len(post(server, "/tokenize", {"prompt": prompt}).json()["tokens"])
        turns.append(prompt[len("".join(turns[-1:])):] + answer.strip() + "\n")
    assert len(turns) == 3 and all(t.startswith("User: ") and "\nChatGPT: " in t for t in turns)


def test_web_page_is_served(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and "chatsmith" in r.text and "/static/app.js" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN
    for f in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(server + "/static/" + f).status_code == 200
    assert httpx.get(server + "/static/nope.js").status_code == 404
    js = httpx.get(server + "/static/app.js").text + httpx.get(server + "/static/markdown.js").text
    assert not any(sink in js for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("))
