"""The web chat page in real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium, offline): send a message and watch the reply stream in, regenerate, stop a reply midway,
conversations kept across reloads, new chat, HTML in messages shown as text and never run, and a
phone-width layout without horizontal scrolling.

Skips when Chromium is not installed, except under CI (CI=true), where scripts/setup.sh installs it
and a missing browser is a failure."""

import json
import os
import shutil
import threading
import time

import pytest
from test_serve_translation import mt_dir  # noqa: F401  (the fixture: a tiny translation model)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> **bold** `code`'


def _need_browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"headless Chromium is not available ({', '.join(missing)} missing; scripts/setup.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def web(base_model, tmp_path_factory):
    _need_browser()
    import uvicorn

    from chatsmith.serve.app import create_app
    from test_serve import free_port

    # the test model's context is 64 tokens: serve the same weights with a 256-token context (the
    # rotary positions extend; the replies are noise either way), so a few turns fit
    model_dir = tmp_path_factory.mktemp("web") / "model"
    shutil.copytree(base_model, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg["chatsmith"]["model"]["max_seq_len"] = 256
    (model_dir / "config.json").write_text(json.dumps(cfg))
    app = create_app(model_dir, model_name="web-model")
    srv = app.state.server
    step = srv.engine.step

    def slow_step():  # ~25 tokens/s, so a reply is visibly streamed and can be stopped midway
        time.sleep(0.04)
        return step()

    srv.engine.step = slow_step
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", srv
    server.should_exit = True
    t.join(timeout=10)


@pytest.fixture(scope="module")
def browser(web):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never go online for a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def wait(cond, timeout=30, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def replies(d):
    """The assistant replies' texts. The page re-renders a reply while it streams, so an element
    found here can be replaced before its text is read: read them all again then."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return [e.text for e in d.find_elements("css selector", ".message.assistant .body")]
        except StaleElementReferenceException:
            time.sleep(0.05)
    return [e.text for e in d.find_elements("css selector", ".message.assistant .body")]


def streaming(d):
    return bool(d.find_elements("css selector", ".message.streaming"))


def test_chat_page_streams_stops_regenerates_and_keeps_conversations(web, browser):
    url, srv = web
    d = browser
    d.get(url + "/")
    d.execute_script("localStorage.clear()")
    d.get(url + "/")
    wait(lambda: d.find_element("id", "model-name").text == "web-model", what="the model name from /v1/models")
    d.execute_script("document.getElementById('settings').open = true")
    mt = d.find_element("id", "max-tokens")
    mt.clear()
    mt.send_keys("24")
    # 1. a message with HTML in it: sent, shown as text, never run; the reply streams in
    box = d.find_element("id", "input")
    box.send_keys(XSS)
    d.find_element("id", "send").click()
    wait(lambda: streaming(d), what="the reply to start")
    lengths = set()
    while streaming(d):
        lengths.add(len("".join(replies(d))))
        time.sleep(0.02)
    assert len(lengths) >= 3, f"the reply did not arrive in pieces: {lengths}"
    first = replies(d)
    assert len(first) == 1 and first[0].strip()
    user = d.find_element("css selector", ".message.user .body")
    assert '<img src=x onerror="window.__xss=1">' in user.text and "<script>" in user.text
    assert not d.find_elements("css selector", "#messages img, #messages script")
    assert user.find_element("css selector", "strong").text == "bold"
    assert d.execute_script("return window.__xss") is None
    # 2. regenerate replaces the last reply (same conversation, still two messages)
    assert d.find_element("id", "regenerate").is_displayed()
    d.find_element("id", "regenerate").click()
    wait(lambda: streaming(d), what="the regenerated reply to start")
    wait(lambda: not streaming(d), what="the regenerated reply to finish")
    assert len(d.find_elements("css selector", ".message")) == 2
    # 3. stop a long reply midway: the partial text stays, the server frees the request's row
    mt.clear()  # no limit: up to the context
    box.send_keys("Tell me a long story")
    d.find_element("id", "send").click()
    wait(lambda: streaming(d) and len(replies(d)) == 2 and len(replies(d)[1]) >= 3, what="some streamed text")
    assert d.find_element("id", "stop").is_displayed() and not d.find_element("id", "send").is_displayed()
    d.find_element("id", "stop").click()
    wait(lambda: not streaming(d), 10, "the reply to stop")
    stopped = replies(d)[1]
    assert stopped and d.find_element("id", "send").is_displayed()
    wait(lambda: srv.engine.num_active == 0, 10, "the server to cancel the stopped generation")
    time.sleep(0.3)
    assert replies(d)[1] == stopped  # nothing more arrived after Stop
    # 4. conversations survive a reload (localStorage); a new chat starts empty
    d.get(url + "/")
    titles = [e.text for e in d.find_elements("css selector", "#conversations .open")]
    assert titles == [XSS[:40]]
    assert len(d.find_elements("css selector", ".message")) == 4 and replies(d)[1] == stopped
    d.find_element("id", "new-chat").click()
    assert d.find_elements("css selector", "#messages .empty")
    box = d.find_element("id", "input")
    box.send_keys("hello")
    d.find_element("id", "send").click()
    wait(lambda: len(d.find_elements("css selector", "#conversations li")) == 2, what="a second conversation")
    wait(lambda: not streaming(d) and replies(d), what="the second conversation's reply")
    assert d.find_element("css selector", "#conversations li.active .open").text == "hello"


def test_model_output_with_html_and_markdown_is_rendered_as_text(web, browser):
    """Model text containing HTML is shown, not run (stored replies use the same renderer as streamed
    ones); Markdown code blocks keep their content verbatim; javascript: links are not links."""
    url, _ = web
    d = browser
    reply = ("Here:\n\n```html\n<img src=x onerror=\"window.__xss=3\">\n<script>window.__xss=4</script>\n```\n\n"
             "<script>window.__xss=5</script> and <img src=x onerror=window.__xss=6> "
             "[click](javascript:window.__xss=7) [docs](https://example.org/x)\n\n- one **two**\n- `three`")
    d.get(url + "/")
    d.execute_script("localStorage.setItem('chatsmith.conversations', JSON.stringify(arguments[0]))",
                     [{"id": "c1", "title": "xss", "updated": 1,
                       "messages": [{"role": "user", "content": "show me html"},
                                    {"role": "assistant", "content": reply}]}])
    d.get(url + "/")
    body = d.find_elements("css selector", ".message.assistant .body")[0]
    code = body.find_element("css selector", "pre code")
    assert code.get_attribute("textContent") == '<img src=x onerror="window.__xss=3">\n<script>window.__xss=4</script>'
    assert "<script>window.__xss=5</script>" in body.text and "<img src=x onerror=window.__xss=6>" in body.text
    assert not d.find_elements("css selector", "#messages img, #messages script, #messages iframe")
    links = body.find_elements("css selector", "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/x"]
    assert [li.text for li in body.find_elements("css selector", "li")] == ["one two", "three"]
    time.sleep(0.2)
    assert d.execute_script("return window.__xss") is None


def test_phone_width_layout(web, browser):
    url, _ = web
    d = browser
    d.set_window_size(375, 740)
    try:
        d.get(url + "/")
        wait(lambda: d.find_element("id", "toggle-sidebar").is_displayed(), what="the menu button")
        assert d.execute_script("return document.documentElement.scrollWidth") <= 375 + 1
        assert not d.find_element("id", "new-chat").is_displayed() or \
            d.find_element("id", "new-chat").rect["x"] + d.find_element("id", "new-chat").rect["width"] <= 0
        for el in ("input", "send"):
            r = d.find_element("id", el).rect
            assert r["x"] >= 0 and r["x"] + r["width"] <= 376 and d.find_element("id", el).is_displayed()
        d.find_element("id", "toggle-sidebar").click()
        wait(lambda: d.find_element("id", "new-chat").rect["x"] >= 0, 5, "the drawer to open")
    finally:
        d.set_window_size(1200, 900)


@pytest.fixture(scope="module")
def calc_web(web, tokenizer_dir):
    """A second server over the scripted model (tests/test_tools.py) that runs the calculator itself."""
    from chatsmith.serve.app import Server, build_app
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.tools import calls as toolcalls
    from chatsmith.tools.inline import builtin_tools
    from test_serve_hostile import start
    from test_tools import Scripted, calc_script

    tok = Tokenizer.load(tokenizer_dir)
    model = Scripted(tok, calc_script(toolcalls.NATIVE, "<|assistant_end|>"), "<|assistant_start|>")
    url, _, server = start(build_app(Server(model, tok, "calc", max_batch=2, tools=builtin_tools(["calculator"]))))
    yield url
    server.should_exit = True


@pytest.fixture(scope="module")
def mt_web(web, mt_dir):
    """A server over the tiny zh<->en translation model of tests/test_serve_translation.py."""
    from chatsmith.serve.app import create_app
    from test_serve_hostile import start

    url, _, server = start(create_app(mt_dir, model_name="mt"))
    yield url
    server.should_exit = True


def translate(model_dir, text: str, tgt: str) -> str:
    """What `chatsmith translate MODEL --tgt TGT` says (greedy)."""
    from chatsmith.engine import SamplingParams
    from chatsmith.seq2seq_engine import Seq2SeqEngine

    (comps,), _ = Seq2SeqEngine.load(model_dir).translate([text], tgt, SamplingParams(temperature=0.0, max_new_tokens=63))
    return comps[0].text


def test_the_page_translates_with_a_translation_model(mt_web, mt_dir, browser):
    """Each message is translated (the card says seq2seq): into English from Chinese and back, the
    system prompt and temperature of the settings not sent, so the server's greedy default decodes."""
    d = browser
    d.get(mt_web + "/")
    d.execute_script("localStorage.clear()")
    d.get(mt_web + "/")
    wait(lambda: d.find_element("id", "model-name").text == "mt (translation)", what="the translator's card")
    assert "replies with its translation" in d.find_element("css selector", "#messages .empty").text
    d.execute_script("document.getElementById('settings').open = true")
    d.find_element("id", "system").send_keys("You are a pirate.")
    d.find_element("id", "input").send_keys("一二三")
    d.find_element("id", "send").click()
    want = [translate(mt_dir, "一二三", "en"), translate(mt_dir, "seven eight", "zh")]
    assert want[0].strip() and want[1].strip()
    wait(lambda: replies(d) == want[:1] and not streaming(d), what=f"the English translation {want[0]!r}")
    d.find_element("id", "input").send_keys("seven eight")
    d.find_element("id", "send").click()
    wait(lambda: replies(d) == want and not streaming(d), what=f"the Chinese translation {want[1]!r}")
    assert not d.find_element("id", "status").text


def test_tool_calls_are_shown_collapsible_and_as_text(calc_web, browser):
    d = browser
    d.get(calc_web + "/")
    d.execute_script("localStorage.clear()")
    d.get(calc_web + "/")
    d.find_element("id", "input").send_keys("What is 2 + 86?")
    d.find_element("id", "send").click()
    wait(lambda: replies(d) == ["The answer is 88."] and not streaming(d), what="the answer after the tool call")
    (call,) = d.find_elements("css selector", ".message.assistant details.tool-call")
    assert call.get_attribute("open") is None  # collapsed: the summary names the call
    assert 'calculator({"expression": "2 + 86"})' in call.find_element("css selector", "summary").text
    call.find_element("css selector", "summary").click()
    assert call.find_element("css selector", ".tool-result").text == "\u2192 88"
    # kept with the conversation, and rendered as text: markup in a tool call is never run
    d.execute_script("localStorage.setItem('chatsmith.conversations', JSON.stringify(arguments[0]))",
                     [{"id": "c1", "title": "t", "updated": 1, "messages": [
                         {"role": "user", "content": "x"},
                         {"role": "assistant", "content": "ok", "tools": [
                             {"name": "<img src=x onerror=window.__xss=8>", "arguments": "<script>window.__xss=9</script>",
                              "result": "<b>r</b>"}]}]}])
    d.get(calc_web + "/")
    summary = d.find_element("css selector", "details.tool-call summary")
    assert "<img src=x onerror=window.__xss=8>" in summary.text
    assert not d.find_elements("css selector", "#messages img, #messages script, #messages b")
    time.sleep(0.2)
    assert d.execute_script("return window.__xss") is None


def test_the_page_marks_refused_and_filtered_replies(web, browser):
    from chatsmith.moderation import REFUSAL, Moderator, load_moderator
    from chatsmith.moderation.lexicon import Lexicon
    from chatsmith.serve.moderations import Moderations

    url, srv = web
    d = browser
    saved = srv.moderation
    srv.moderation = Moderations(load_moderator("lexicon"))
    try:
        d.get(url + "/")
        d.execute_script("localStorage.clear()")
        d.get(url + "/")
        wait(lambda: d.find_element("id", "model-name").text == "web-model", what="the model name")
        d.find_element("id", "input").send_keys("you f.u.c.k.i.n.g idiot")
        d.find_element("id", "send").click()
        wait(lambda: REFUSAL in replies(d), what="the refusal")
        notes = wait(lambda: d.find_elements("css selector", ".message.assistant .filter-note"), what="the note")
        assert "not sent to the model" in notes[0].text
        # a reply the filter stops: every reply contains a space-separated word; flag the letter "e" words
        lex = Lexicon()
        lex.single, lex.phrases, lex.zh, lex._zh_re = {w for w in ("the", "and", "a", "of", "to", "in", "is", "he",
                                                                   "she", "it", "was", "said", "king")}, set(), [], None
        srv.moderation = Moderations(Moderator(lex))
        d.find_element("id", "input").send_keys("Tell me more")
        d.find_element("id", "send").click()
        wait(lambda: len(d.find_elements("css selector", ".message.assistant .filter-note")) == 2 and not streaming(d),
             what="the reply stopped by the filter", timeout=60)
        assert "stopped" in d.find_elements("css selector", ".message.assistant .filter-note")[1].text
    finally:
        srv.moderation = saved
