"""`serve --moderation` and `--watermark-key` through a live server: POST /v1/moderations with the
official SDK and OpenAI's schema, OpenAI-shaped 400/413s, the refusal and crisis replies to flagged
requests, replies cut with finish_reason "content_filter" (streamed and not), and watermarked replies
whose key never reaches the client."""

import json

import httpx
import pytest
from openapi_schema import validate
from test_serve_hostile import error, start

from chatsmith.moderation import CRISIS_REPLY, REFUSAL, Moderator
from chatsmith.moderation.lexicon import Lexicon
from chatsmith.serve.moderations import MAX_INPUTS, Moderations
from chatsmith.tokenizer import Tokenizer
from chatsmith.watermark import Watermark, WatermarkConfig, detect

openai = pytest.importorskip("openai")
KEY = "k"
H = {"Authorization": f"Bearer {KEY}"}
WM_KEY = 987654321


@pytest.fixture(scope="module")
def live(base_model):
    from chatsmith.serve.app import create_app

    app = create_app(base_model, api_key=KEY, model_name="model", moderation="lexicon",
                     watermark=WatermarkConfig(key=WM_KEY, delta=6.0))
    url, _, srv = start(app)
    yield url, app.state.server
    srv.should_exit = True


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def test_sdk_moderations_flag_evasions_and_match_the_schema(live):
    url, _ = live
    texts = ["What a lovely morning by the river.", "you are a f.u.c.k.i.n.g idiot", "ｓｈｉｔ", "sh1t happens",
             "你他媽的", "I want to kill myself", "The class passed the assessment."]
    r = client(url).moderations.create(input=texts)
    flags = [x.flagged for x in r.results]
    assert flags == [False, True, True, True, True, True, False]
    assert r.results[5].categories.self_harm and not r.results[5].model_dump(by_alias=True)["categories"]["offensive"]
    one = client(url).moderations.create(input="bullsh!t", model="omni-moderation-latest")
    assert len(one.results) == 1 and one.results[0].flagged and one.results[0].category_scores.harassment == 0.0
    raw = httpx.post(url + "/v1/moderations", headers=H, json={"input": texts}).json()
    validate(raw, "CreateModerationResponse")
    assert raw["results"][1]["categories"]["offensive"] and raw["results"][1]["category_scores"]["offensive"] == 1.0
    parts = httpx.post(url + "/v1/moderations", headers=H, json={"input": [{"type": "text", "text": "damn it, sh!t"}]})
    assert parts.status_code == 200 and parts.json()["results"][0]["flagged"]


@pytest.mark.parametrize("body,status", [
    ({"input": ""}, 400), ({"input": "   "}, 400), ({"input": []}, 400), ({"input": ["ok", ""]}, 400),
    ({"input": 42}, 400), ({}, 400), ({"input": "x", "temperature": 1}, 400),
    ({"input": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}, 400),
    ({"input": ["hi"] * (MAX_INPUTS + 1)}, 400), ({"input": ["word " * 100_000] * 3}, 413),
])
def test_bad_moderation_requests_are_openai_shaped_errors(live, body, status):
    url, _ = live
    r = httpx.post(url + "/v1/moderations", headers=H, json=body, timeout=60)
    error(r, status)


def test_flagged_requests_get_a_refusal_and_crisis_gets_help(live):
    url, srv = live
    c = client(url)
    steps = srv.scheduler.steps
    r = c.chat.completions.create(model="model", messages=[{"role": "user", "content": "hello"},
                                                           {"role": "assistant", "content": "hi"},
                                                           {"role": "user", "content": "you stupid a$$hole"}])
    assert r.choices[0].message.content == REFUSAL and r.choices[0].finish_reason == "content_filter"
    assert srv.scheduler.steps == steps  # the model never ran
    r = c.chat.completions.create(model="model", messages=[{"role": "user", "content": "i want to end my life"}])
    assert r.choices[0].message.content == CRISIS_REPLY and "988" in CRISIS_REPLY
    chunks = list(c.chat.completions.create(model="model", stream=True, messages=[{"role": "user", "content":
                                                                                   "傻 逼"}]))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == REFUSAL
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "content_filter"
    r = c.completions.create(model="model", prompt="f u c k", max_tokens=5)
    assert r.choices[0].text == REFUSAL and r.choices[0].finish_reason == "content_filter"
    raw = httpx.post(url + "/v1/chat/completions", headers=H, json={
        "model": "model", "messages": [{"role": "user", "content": "fuuuck you"}]}).json()
    validate(raw, "CreateChatCompletionResponse")


@pytest.fixture()
def word_filter(live):
    """The server's reply filter made to flag "world", a word the micro model says all the time."""
    _, srv = live
    lex = Lexicon()
    lex.single, lex.phrases, lex.zh, lex._zh_re = {"world"}, set(), [], None
    saved = srv.moderation
    srv.moderation = Moderations(Moderator(lex))
    yield srv
    srv.moderation = saved


def test_flagged_replies_stop_with_content_filter(live, word_filter):
    url, srv = live
    c = client(url)
    kw = dict(model="model", prompt="Once", max_tokens=56, temperature=1.0, seed=11)
    saved, srv.moderation = srv.moderation, None
    full = c.completions.create(**kw).choices[0].text
    srv.moderation = saved
    assert " world" in full  # what the filter will catch
    cut = c.completions.create(**kw).choices[0]
    assert cut.finish_reason == "content_filter" and full.startswith(cut.text) and "world" not in cut.text.split()
    streamed = list(c.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].text for ch in streamed if ch.choices)
    assert streamed[-1].choices[0].finish_reason == "content_filter"
    assert full.startswith(text) and "world" not in text.split() and len(text) < len(full)
    # the reply's generation was cancelled, not decoded to the end behind the client's back
    chat = list(c.chat.completions.create(model="model", stream=True, max_tokens=40, temperature=1.0, seed=11,
                                          messages=[{"role": "user", "content": "Tell me a story"}]))
    reasons = [ch.choices[0].finish_reason for ch in chat if ch.choices and ch.choices[0].finish_reason]
    body = "".join(ch.choices[0].delta.content or "" for ch in chat if ch.choices)
    assert reasons in (["content_filter"], ["length"], ["stop"]) and "world" not in body.split()


@pytest.fixture()
def slow_steps(live, monkeypatch):
    """Each engine step of the live server takes 10 ms more, so a stop the event loop sends arrives
    within a step or two rather than after the micro model has raced to the end of the reply."""
    import time

    engine = live[1].scheduler.engine
    step = engine.step

    def slow():
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow)


def test_a_streamed_choice_cut_by_the_filter_stops_decoding_and_the_others_go_on(live, word_filter, slow_steps):
    url, srv = live
    c = client(url)
    kw = dict(model="model", prompt="Once", max_tokens=60, temperature=1.0, n=2, stream=True,
              stream_options={"include_usage": True})

    def run(seed):
        chunks = list(c.completions.create(seed=seed, **kw))
        text, finish = ["", ""], [None, None]
        for ch in chunks:
            for x in ch.choices:
                text[x.index] += x.text
                finish[x.index] = x.finish_reason or finish[x.index]
        return text, finish, chunks[-1].usage.completion_tokens

    # a seed under which one choice says "world" early on and the other never does
    saved, srv.moderation = srv.moderation, None
    for seed in range(40):
        full, _, full_tokens = run(seed)
        hit = [" world" in t[:len(t) // 2] for t in full]
        if hit.count(True) == 1 and not any(" world" in t for t, h in zip(full, hit) if not h):
            break
    else:
        pytest.fail("no seed found whose two choices differ on 'world'")
    srv.moderation = saved
    cut, other = hit.index(True), hit.index(False)
    stopped = srv.scheduler.samples_stopped
    text, finish, tokens = run(seed)
    assert finish[cut] == "content_filter" and "world" not in text[cut].split() and full[cut].startswith(text[cut])
    assert text[other] == full[other] and finish[other] in ("length", "stop")  # undisturbed
    # the cut choice's engine row was stopped there (not decoded to the end behind the client's back)
    assert srv.scheduler.samples_stopped == stopped + 1
    assert tokens < full_tokens


def test_replies_are_watermarked_and_the_key_stays_on_the_server(live, base_model):
    url, srv = live
    r = httpx.post(url + "/v1/completions", headers=H, json={"model": "model", "prompt": "Once upon", "max_tokens": 50,
                                                           "temperature": 1.0, "seed": 3}).text
    assert str(WM_KEY) not in r and str(WM_KEY) not in httpx.get(url + "/v1/models", headers=H).text
    assert str(WM_KEY) not in httpx.get(url + "/tokenizer_info", headers=H).text
    assert "choices" in json.loads(r), r[:300]
    text = json.loads(r)["choices"][0]["text"]
    tok = Tokenizer.load(base_model)
    wm = Watermark(WatermarkConfig(key=WM_KEY), tok.vocab_size)
    assert detect(tok.encode(text), wm).z > 4
    assert detect(tok.encode(text), Watermark(WatermarkConfig(key=WM_KEY + 1), tok.vocab_size)).z < 4
