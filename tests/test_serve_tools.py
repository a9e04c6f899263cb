"""Function calling through `chatsmith serve`, with the official OpenAI SDK: the whole loop (tools
-> tool_calls -> tool results -> the answer), plain and streamed, every response and chunk
validated against OpenAI's OpenAPI document; tool_choice, parallel_tool_calls; the 400s for bad
tools; and the server running the calculator itself (serve --tools calculator).

The model is scripted (tests/test_tools.py `Scripted`): a real tokenizer and the real engine,
with logits that follow a known reply, so what the API does with a call is tested, not whether a
tiny model learned to make one (that is measured, see the README's tools section)."""

import json

import httpx
import openai
import pytest

from chatsmith.serve.app import Server, build_app
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools import calls as toolcalls
from chatsmith.tools.calculator import SPEC as CALC
from chatsmith.tools.calculator import calculator
from chatsmith.tools.inline import builtin_tools
from openapi_schema import validate
from test_serve import sse
from test_serve_hostile import start
from test_tools import Scripted, calc_script

ASK = [{"role": "user", "content": "What is 2 + 86?"}]


def _serve(tokenizer_dir, tools=None):
    tok = Tokenizer.load(tokenizer_dir)
    model = Scripted(tok, calc_script(toolcalls.NATIVE, "<|assistant_end|>"), "<|assistant_start|>")
    app = build_app(Server(model, tok, "model", max_batch=4, tools=builtin_tools(tools)))
    url, _, srv = start(app)
    return url, srv


@pytest.fixture(scope="module")
def live(tokenizer_dir):
    url, srv = _serve(tokenizer_dir)
    yield url
    srv.should_exit = True


@pytest.fixture(scope="module")
def live_calc(tokenizer_dir):
    url, srv = _serve(tokenizer_dir, ["calculator"])
    yield url
    srv.should_exit = True


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def post(url, body):
    return httpx.post(url + "/v1/chat/completions", json={"model": "model", **body}, timeout=60)


def run_calculator(call) -> str:
    assert call.type == "function" and call.function.name == "calculator"
    return toolcalls.check_arguments(CALC, call.function.arguments) or calculator(json.loads(call.function.arguments))


def test_sdk_full_loop(live):
    c = client(live)
    r = c.chat.completions.create(model="model", messages=ASK, tools=[CALC])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and json.loads(call.function.arguments) == {"expression": "2 + 86"}
    msgs = ASK + [choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": run_calculator(call)}]
    r2 = c.chat.completions.create(model="model", messages=msgs, tools=[CALC])
    assert r2.choices[0].message.content == "The answer is 88." and r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.tool_calls is None
    # the same shapes, raw, against OpenAI's document
    raw = post(live, {"messages": ASK, "tools": [CALC]})
    validate(raw.json(), "CreateChatCompletionResponse")
    validate(post(live, {"messages": msgs, "tools": [CALC]}).json(), "CreateChatCompletionResponse")


def test_sdk_streamed_loop(live):
    c = client(live)
    calls: dict[int, dict] = {}
    deltas, finish = [], None
    for ch in c.chat.completions.create(model="model", messages=ASK, tools=[CALC], stream=True):
        d = ch.choices[0].delta
        for tc in d.tool_calls or ():
            deltas.append(tc)
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    # OpenAI's order: index, id, type and name first (arguments ""), then argument fragments only
    assert deltas[0].id and deltas[0].function.name == "calculator" and deltas[0].function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:]) and len(deltas) >= 2
    (call,) = calls.values()
    assert json.loads(call["arguments"]) == {"expression": "2 + 86"}
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "88"}]
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(model="model", messages=msgs, tools=[CALC], stream=True) if ch.choices)
    assert text == "The answer is 88."
    for body in ({"messages": ASK, "tools": [CALC]}, {"messages": msgs, "tools": [CALC]}):
        with httpx.stream("POST", live + "/v1/chat/completions", json={"model": "model", "stream": True, **body},
                          timeout=60) as r:
            events = sse(r)
        for e in events:
            validate(e, "CreateChatCompletionStreamResponse")


def test_parallel_tool_calls(live):
    both = [{"role": "user", "content": "What is 2 + 86? And both?"}]
    r = post(live, {"messages": both, "tools": [CALC]}).json()
    validate(r, "CreateChatCompletionResponse")
    calls = r["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["expression"] for c in calls] == ["2 + 86", "3 * 3"]
    assert len({c["id"] for c in calls}) == 2
    r = post(live, {"messages": both, "tools": [CALC], "parallel_tool_calls": False}).json()
    assert len(r["choices"][0]["message"]["tool_calls"]) == 1


def test_tool_choice(live):
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    # none: the call marker is banned, so whatever comes back is content
    r = post(live, {"messages": ASK, "tools": [CALC], "tool_choice": "none", "temperature": 0, "max_tokens": 8}).json()
    validate(r, "CreateChatCompletionResponse")
    assert "tool_calls" not in r["choices"][0]["message"] and r["choices"][0]["finish_reason"] != "tool_calls"
    # named: the reply starts as a call to that function, whatever the model would have done
    r = post(live, {"messages": [{"role": "user", "content": "hello"}], "tools": [CALC, weather],
                    "tool_choice": {"type": "function", "function": {"name": "weather"}}, "max_tokens": 8}).json()
    validate(r, "CreateChatCompletionResponse")
    assert r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "weather"
    # required: a call, and the model picks which (here the calculator, as scripted)
    r = post(live, {"messages": ASK, "tools": [CALC, weather], "tool_choice": "required"}).json()
    assert r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "calculator"
    assert r["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": "calculator"}, "tools"),
    ({"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [CALC], "tool_choice": "maybe"}, "tool_choice"),
    ({"tools": [CALC], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[1].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                                 "function": {"name": "f"}}]},
                         {"role": "tool", "tool_call_id": "c2", "content": "1"}]}, "messages[2].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
     "messages[1].tool_calls[0].id"),
])
def test_bad_tools_are_400s(live, body, param):
    r = post(live, {"messages": ASK, **body})
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        client(live).chat.completions.create(model="model", **{"messages": ASK, **body})


def test_completions_refuse_tools(live):
    r = httpx.post(live + "/v1/completions", json={"model": "model", "prompt": "x", "tools": [CALC]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_server_runs_the_calculator(live_calc):
    """serve --tools calculator: the call runs inside generation; the client gets the answer, and
    the call in the extra field server_tool_calls."""
    r = post(live_calc, {"messages": ASK}).json()
    validate(r, "CreateChatCompletionResponse")
    msg = r["choices"][0]["message"]
    assert msg["content"] == "The answer is 88." and r["choices"][0]["finish_reason"] == "stop"
    assert msg["server_tool_calls"] == [{"name": "calculator", "arguments": '{"expression": "2 + 86"}', "result": "88"}]
    assert "tool_calls" not in msg
    # hostile: an error message for the model, a normal answer for the client
    r = post(live_calc, {"messages": [{"role": "user", "content": "What is 1 / 0?"}]}).json()
    assert r["choices"][0]["message"]["server_tool_calls"][0]["result"] == "error: division by zero"
    with httpx.stream("POST", live_calc + "/v1/chat/completions",
                      json={"model": "model", "messages": ASK, "stream": True}, timeout=60) as s:
        events = sse(s)
    for e in events:
        validate(e, "CreateChatCompletionStreamResponse")
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 88."
    assert [x for d in deltas for x in d.get("server_tool_calls", [])] == msg["server_tool_calls"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # a client tool of the same name wins: it is returned to the client instead of run
    r = post(live_calc, {"messages": ASK, "tools": [CALC]}).json()
    assert r["choices"][0]["finish_reason"] == "tool_calls" and "server_tool_calls" not in r["choices"][0]["message"]
    sdk = client(live_calc).chat.completions.create(model="model", messages=ASK)
    assert sdk.choices[0].message.content == "The answer is 88."


def test_hostile_tools_are_400s_not_500s(live):
    deep = {"type": "object"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"x": deep}}
    r = post(live, {"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]})
    assert r.status_code in (200, 400), r.text  # a deep but valid schema may be accepted; never a 500
    huge = [{"type": "function", "function": {"name": f"f{i}", "description": "x" * 20000}} for i in range(100)]
    r = post(live, {"messages": ASK, "tools": huge})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(live, {"messages": ASK, "tools": [{"type": "function", "function": {"name": "x" * 65}}]})
    assert r.status_code == 400
    r = post(live, {"messages": ASK, "tools": [CALC], "tool_choice": {"type": "function",
                                                                   "function": {"name": 'calculator", "x'}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name"


def test_serve_tools_flag(base_model):
    from chatsmith.errors import UserError
    from chatsmith.serve.app import create_app

    with pytest.raises(UserError, match="unknown tool 'abacus'"):
        create_app(base_model, tools=["abacus"])
    assert create_app(base_model, tools=["calculator"]).state.server.tools.keys() == {"calculator"}
