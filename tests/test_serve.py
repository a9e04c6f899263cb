"""`chatsmith serve` against the official openai client and raw HTTP: chat, completions, streaming,
stop strings, usage, tokenizer endpoints, and OpenAI-shaped 4xx errors that never stop the server."""

import json
import socket
import threading
import time

import httpx
import pytest

from conftest import cli


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
    app = create_app(chat_dir, api_key="sekrit", model_name="tiny-chat", max_queue=8)
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
    h = {"Authorization": "Bearer sekrit"}
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


def test_client_disconnect_cancels_and_server_keeps_going(server, client):
    h = {"Authorization": "Bearer sekrit"}
    with httpx.stream("POST", server + "/v1/completions", headers=h,
                      json={"prompt": "The", "max_tokens": 60, "stream": True, "temperature": 1.0}) as r:
        for _ in r.iter_lines():
            break  # read one event and hang up
    r = client.completions.create(model="tiny-chat", prompt="The", max_tokens=3)
    assert len(r.choices) == 1
