"""`chatsmith serve` over a translation (encoder-decoder) model, through raw HTTP and the official
openai client: completions and chat translate, the target chosen by model id (NAME:LANG) or by the
source's script, greedy / beams / sampling / n / stop / max_tokens as the engine decodes them,
streaming, tokenize, batching of waiting requests on the one worker thread, 429, disconnects, and
a 400 naming the field for everything a translator does not do. Response bodies are validated
against OpenAI's official OpenAPI schemas."""

import json
import random
import threading
import time

import httpx
import pytest

from conftest import cli
from openapi_schema import validate
from test_serve import free_port, sse

from chatsmith.engine import SamplingParams
from chatsmith.errors import UserError
from chatsmith.seq2seq_engine import Seq2SeqEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread

NUM_ZH = "零 一 二 三 四 五 六 七 八 九".split()
NUM_EN = "zero one two three four five six seven eight nine".split()
APPS = {}


def _pairs(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        d = [rng.randrange(10) for _ in range(rng.randint(1, 5))]
        yield "".join(NUM_ZH[i] for i in d), " ".join(NUM_EN[i] for i in d)


@pytest.fixture(scope="module")
def mt_dir(tmp_path_factory):
    """A micro zh<->en model (one model, both directions) trained for ~8 s on digit names: it translates them."""
    d = tmp_path_factory.mktemp("mtserve")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"translation": {"zh": z, "en": e}}, ensure_ascii=False) + "\n"
                            for z, e in _pairs(300)), encoding="utf-8")
    out = d / "model"
    assert cli("translate", "train", "--data", data, "--src", "zh", "--tgt", "en", "--both", "--out", out,
               "--preset", "micro", "--vocab-size", 300, "--max-steps", 600, "--batch-size", 16, "--lr", "3e-3",
               "--warmup-steps", 5, "--eval-every", 1000, "--save-every", 1000, "--log-every", 20) == 0
    return out


def _live(app):
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    return srv, t, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(mt_dir):
    from chatsmith.serve.app import create_app

    app = create_app(mt_dir, model_name="mt", max_queue=16, max_batch=16)
    APPS["app"] = app
    srv, t, url = _live(app)
    yield url
    srv.should_exit = True
    t.join(timeout=10)


@pytest.fixture
def srv(server):
    return APPS["app"].state.server


@pytest.fixture(scope="module")
def engine(mt_dir):
    """The same model in the engine `chatsmith translate` uses: what the server must answer."""
    return Seq2SeqEngine.load(mt_dir)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def post(server, path, body):
    return httpx.post(server + path, json=body, timeout=60)


def solo(engine, texts, tgt, **kw):
    """[[texts of the completions] per source] as `chatsmith translate` decodes them."""
    p = SamplingParams(**{"temperature": 0.0, "max_new_tokens": engine.cfg.max_seq_len - 1, **kw})
    return [[c.text for c in comps] for comps in engine.translate(texts, tgt, p)[0]]


def test_models_say_what_the_model_is(client, server):
    cards = httpx.get(server + "/v1/models").json()
    validate(cards, "ListModelsResponse")
    assert [m["id"] for m in cards["data"]] == ["mt", "mt:en", "mt:zh"]
    info = cards["data"][1]["chatsmith"]
    assert info["family"] == "seq2seq" and info["languages"] == ["en", "zh"] and info["target"] == "en"
    assert info["directions"] == ["zh->en", "en->zh"]
    assert client.models.retrieve("mt:zh").id == "mt:zh"
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_completions_translate_each_prompt_into_the_named_or_the_other_language(client, server, engine):
    texts = ["一二三", "四五", "seven eight"]
    r = client.completions.create(model="mt:en", prompt=texts[:2], temperature=0)
    assert [c.text for c in r.choices] == [t[0] for t in solo(engine, texts[:2], "en")]
    assert r.model == "mt:en" and r.object == "text_completion"
    # usage: the encoder's ids (tag, text, end token)
    ids = [post(server, "/tokenize", {"prompt": t, "model": "mt:en"}).json()["tokens"] for t in texts[:2]]
    assert ids[0][0] != ids[0][1] and r.usage.prompt_tokens == sum(map(len, ids))
    # plain "mt": Chinese sources go to English, the others to Chinese
    body = post(server, "/v1/completions", {"model": "mt", "prompt": texts}).json()
    validate(body, "CreateCompletionResponse")
    want = solo(engine, texts[:2], "en") + solo(engine, texts[2:], "zh")
    assert [c["text"] for c in body["choices"]] == [w[0] for w in want]
    assert want[0][0] == "one two three" and want[2][0] == "七八"  # the test model did learn its digits


def test_completions_usage_counts_decoded_tokens(client, engine):
    r = client.completions.create(model="mt:zh", prompt="three four", temperature=0)
    p = SamplingParams(temperature=0.0, max_new_tokens=engine.cfg.max_seq_len - 1)
    (comps,), _ = engine.translate(["three four"], "zh", p)
    assert r.choices[0].text == comps[0].text and r.usage.completion_tokens == len(comps[0].token_ids)


def test_no_model_field_means_the_plain_name(server):
    with_name = post(server, "/v1/completions", {"model": "mt", "prompt": ["一二", "one"]}).json()
    without = post(server, "/v1/completions", {"prompt": ["一二", "one"]}).json()
    assert [c["text"] for c in with_name["choices"]] == [c["text"] for c in without["choices"]]
    assert without["model"] == "mt"


def test_chat_translates_the_last_user_turn_only(client, engine):
    msgs = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "九九"},
            {"role": "assistant", "content": "nine nine"}, {"role": "user", "content": "六七八"}]
    r = client.chat.completions.create(model="mt", messages=msgs)
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert r.choices[0].message.content == solo(engine, ["六七八"], "en")[0][0]
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"


def test_beams_by_field_by_best_of_and_by_server_default(client, server, engine, mt_dir):
    want = solo(engine, ["一二三四"], "en", num_beams=3, num_return_sequences=2)[0]
    r = client.chat.completions.create(model="mt:en", n=2, messages=[{"role": "user", "content": "一二三四"}],
                                       extra_body={"num_beams": 3})
    assert [c.message.content for c in r.choices] == want
    r = client.completions.create(model="mt:en", prompt="一二三四", n=2, best_of=3)
    assert [c.text for c in r.choices] == want
    # n > 1 without a decoding setting: an n-best list, not n copies
    r = client.completions.create(model="mt:en", prompt="一二三四", n=2)
    assert [c.text for c in r.choices] == solo(engine, ["一二三四"], "en", num_beams=2, num_return_sequences=2)[0]
    # temperature 0 asks for greedy: n copies of the greedy translation
    r = client.completions.create(model="mt:en", prompt="一二三四", n=2, temperature=0)
    assert [c.text for c in r.choices] == solo(engine, ["一二三四"], "en")[0] * 2
    # serve --num-beams 3: the default of a request that sets no temperature
    from chatsmith.serve.app import create_app
    from fastapi.testclient import TestClient

    with TestClient(create_app(mt_dir, model_name="mt", num_beams=3), base_url="http://localhost") as c:
        got = c.post("/v1/completions", json={"prompt": "一二三四", "model": "mt:en"}).json()
        assert got["choices"][0]["text"] == solo(engine, ["一二三四"], "en", num_beams=3)[0][0]


def test_sampling_follows_seed_and_n(client):
    kw = dict(model="mt:en", prompt="一二三", temperature=1.0, n=3, seed=7, max_tokens=8)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert a.usage.completion_tokens <= 3 * 8


def test_max_tokens_and_stop(client, engine):
    full = solo(engine, ["一二三四五"], "en")[0][0]
    assert full.strip(), "the test model should say something"
    r = client.completions.create(model="mt:en", prompt="一二三四五", max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"
    stop = full.strip()[1:3]
    r = client.completions.create(model="mt:en", prompt="一二三四五", stop=[stop], temperature=0)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_streaming_chat_and_completions(server, engine):
    want = solo(engine, ["五六"], "en")[0][0]
    body = {"model": "mt:en", "messages": [{"role": "user", "content": "五六"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = sse(r)
    for ch in chunks:
        validate(ch, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == want
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] > 0 and chunks[-1]["choices"] == []
    body = {"model": "mt:en", "prompt": ["五六", "七"], "n": 2, "stream": True, "best_of": 2}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        chunks = sse(r)
    for ch in chunks:
        validate(ch, "CreateCompletionStreamChunk")
    texts = {}
    for ch in chunks:
        for c in ch["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    beams = solo(engine, ["五六", "七"], "en", num_beams=2, num_return_sequences=2)
    assert [texts[i] for i in range(4)] == beams[0] + beams[1]


def test_sdk_stream(client, engine):
    stream = client.chat.completions.create(model="mt:zh", messages=[{"role": "user", "content": "one two"}],
                                            stream=True, temperature=0)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == \
        solo(engine, ["one two"], "zh")[0][0]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "一", "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "一"}], "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "一", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "一", "suffix": "x"}, "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "一"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/completions", {"prompt": "一", "logit_bias": {"5": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/v1/completions", {"prompt": "   "}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "only a system turn"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " "}]}, "messages"),
    ("/v1/completions", {"prompt": "一", "model": "mt:fr"}, "model"),
    ("/v1/completions", {"prompt": "一", "num_beams": 2, "temperature": 0.7}, "temperature"),
    ("/v1/completions", {"prompt": "一", "num_beams": 2, "n": 3}, "n"),
    ("/v1/completions", {"prompt": "一", "num_beams": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "一", "num_beams": 99}, "num_beams"),
    ("/v1/completions", {"prompt": "一", "max_tokens": 10_000}, "max_tokens"),
    ("/v1/completions", {"prompt": "一", "repetition_penalty": 1.3}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "一" * 200}, "prompt"),
    ("/v1/completions", {"prompt": "一", "temperature": 3}, "temperature"),
    ("/v1/completions", {"prompt": "一", "n": 0}, "n"),
])
def test_what_a_translator_cannot_do_is_a_400_naming_the_field(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param, r.json()


def test_unknown_model_and_other_routes(server):
    r = post(server, "/v1/completions", {"prompt": "一", "model": "gpt-4"})
    assert r.status_code == 404 and "mt:en" in r.json()["error"]["message"]
    r = post(server, "/v1/embeddings", {"model": "mt", "input": "一"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    tok = post(server, "/tokenize", {"messages": [{"role": "user", "content": "一二"}], "model": "mt:zh",
                                     "return_token_strs": True}).json()
    assert tok["token_strs"][0] == "<2zh>" and tok["max_model_len"] == 64
    assert post(server, "/detokenize", {"tokens": tok["tokens"][1:-1]}).json()["prompt"] == "一二"
    assert httpx.get(server + "/tokenizer_info").status_code == 200


@pytest.mark.parametrize("decoding", [{"temperature": 0}, {"num_beams": 2}])
def test_waiting_requests_are_batched_429_and_health_meanwhile(server, srv, engine, monkeypatch, decoding):
    """The worker is held inside its first batch; the requests that arrive meanwhile wait (health
    says so, one more than the queue holds is a 429) and are then decoded in one batch, each with
    the answer it gets alone."""
    worker = srv.scheduler
    gen, go, calls = worker.engine.generate_ids, threading.Event(), []

    def held(srcs, p):
        calls.append(len(srcs))
        if len(calls) == 1:
            go.wait(20)
        return gen(srcs, p)

    monkeypatch.setattr(worker.engine, "generate_ids", held)
    texts = ["一", "二三", "四五六", "seven", "eight nine"]
    results = {}

    def ask(i, text):
        results[i] = post(server, "/v1/completions", {"prompt": text, **decoding})

    threads = [threading.Thread(target=ask, args=(0, "九"))]
    threads[0].start()
    for _ in range(200):
        if calls:
            break
        time.sleep(0.02)
    threads += [threading.Thread(target=ask, args=(i + 1, t)) for i, t in enumerate(texts)]
    for t in threads[1:]:
        t.start()
    for _ in range(200):
        if worker.waiting() == len(texts):
            break
        time.sleep(0.02)
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["waiting"] == len(texts) and health["running"] == 1
    monkeypatch.setattr(srv, "max_queue", len(texts))
    full = post(server, "/v1/completions", {"prompt": "一"})
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    validate(full.json(), "ErrorResponse")
    go.set()
    for t in threads:
        t.join(30)
    assert calls == [1, len(texts)]  # the five waiting ones in one engine call
    kw = {"num_beams": decoding.get("num_beams", 1)}
    want = solo(engine, texts[:3], "en", **kw) + solo(engine, texts[3:], "zh", **kw)
    assert [results[i + 1].json()["choices"][0]["text"] for i in range(len(texts))] == [w[0] for w in want]


def test_a_client_that_leaves_before_its_batch_is_dropped(server, srv, monkeypatch):
    worker = srv.scheduler
    gen, go, calls = worker.engine.generate_ids, threading.Event(), []

    def held(srcs, p):
        calls.append(len(srcs))
        if len(calls) == 1:
            go.wait(20)
        return gen(srcs, p)

    monkeypatch.setattr(worker.engine, "generate_ids", held)
    first = threading.Thread(target=post, args=(server, "/v1/completions", {"prompt": "九"}))
    first.start()
    for _ in range(200):
        if calls:
            break
        time.sleep(0.02)
    cancelled = worker.cancelled
    body = {"messages": [{"role": "user", "content": "一二"}], "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        for _ in r.iter_lines():
            break  # the role chunk; hang up before the translation
    time.sleep(0.5)
    go.set()
    first.join(30)
    for _ in range(250):
        if worker.cancelled > cancelled:
            break
        time.sleep(0.02)
    assert worker.cancelled == cancelled + 1 and calls == [1]  # never decoded
    monkeypatch.undo()
    assert post(server, "/v1/completions", {"prompt": "九"}).status_code == 200


def test_serve_flags_for_translation(mt_dir, encoder_dir):
    from chatsmith.serve.app import create_app

    with pytest.raises(UserError, match="does not translate into 'fr'"):
        create_app(mt_dir, tgt="fr")
    with pytest.raises(UserError, match="--tools"):
        create_app(mt_dir, tools=["calculator"])
    with pytest.raises(UserError, match="for translation models"):
        create_app(encoder_dir, tgt="en")
    from fastapi.testclient import TestClient

    with TestClient(create_app(mt_dir, model_name="mt", tgt="zh"), base_url="http://localhost") as c:
        got = c.post("/tokenize", json={"prompt": "一二", "return_token_strs": True}).json()
        assert got["token_strs"][0] == "<2zh>"  # serve --tgt wins over the source's script
        cards = c.get("/v1/models").json()["data"]
        assert cards[0]["id"] == "mt" and cards[0]["chatsmith"]["target"] == "zh"


def test_cli_serve_refuses_bad_flags_with_exit_2(mt_dir, capsys):
    assert cli("serve", mt_dir, "--num-beams", 0, "--port", free_port()) == 2
    assert "--num-beams must be in [1, 16]" in capsys.readouterr().err


def test_moderation_checks_sources_as_for_a_decoder(mt_dir):
    """serve --moderation: a flagged source gets the refusal and is never translated."""
    from fastapi.testclient import TestClient

    from chatsmith.moderation import REFUSAL
    from chatsmith.serve.app import create_app

    with TestClient(create_app(mt_dir, model_name="mt", moderation="lexicon"), base_url="http://localhost") as c:
        worker = c.app.state.server.scheduler
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "you stupid a$$hole"}]})
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == REFUSAL and choice["finish_reason"] == "content_filter"
        assert worker.batches == 0
        r = c.post("/v1/completions", json={"prompt": "一二", "model": "mt:en"})
        assert r.status_code == 200 and worker.batches == 1
