"""Tools: the calculator (hostile expressions included), tool definitions and calls, the chat
templates' tool rendering (ours with reserved tokens, ChatML's convention) and its loss mask, and
the engine running a tool inside generation, over a scripted model whose replies are known."""

import json
import time

import pytest
import torch

from chatsmith.engine import Engine, SamplingParams
from chatsmith.messages import MessageError, check_messages
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools import calls as toolcalls
from chatsmith.tools.calculator import CalcError, calculator, evaluate
from chatsmith.tools.calculator import SPEC as CALC
from chatsmith.tools.inline import ToolRunner, builtin_tools
from test_engine_unit import MockModel
from test_interop import _chatml_tokenizer

# --------------------------------------------------------------------------- the calculator


@pytest.mark.parametrize("expr,want", [
    ("2 + 86", "88"), ("23 × 7", "161"), ("7 / 2", "3.5"), ("0.1 + 0.2", "0.3"), ("2 ** 10", "1024"),
    ("2^3", "8"), ("(1 + 2) * (3 - 4)", "-3"), ("-7 % 3", "2"), ("17 // 5", "3"), ("10 ** -2", "0.01"),
    ("1,000 + 2", "1002"), ("12 ÷ 4", "3"), ("1 / 3", "0.333333333333"), ("5 − 8", "-3"), ("1e3", "1000"),
    ("  42 = ", "42"),
])
def test_calculator_is_exact(expr, want):
    assert evaluate(expr) == want
    assert calculator({"expression": expr}) == want


@pytest.mark.parametrize("expr,problem", [
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("9 ** 9 ** 9", "exponents are limited"), ("2 ** 100000", "exponents are limited"),
    ("999999999 ** 999", "more than 60 digits"), ("10 ** 59 * 10 ** 59", "more than 60 digits"),
    ("(" * 500 + "1" + ")" * 500, "longer than"), ("(" * 40 + "1" + ")" * 40, "nests deeper"),
    ("-" * 120 + "1", "more than 100 operators"), ("1" * 61, "more than 60 digits"), ("1e400", "too large"),
    ("__import__('os').system('true')", "only numbers"), ("a + 1", "only numbers"), ("(1 + 2", "unbalanced"),
    ("1 +", "not valid arithmetic"), ("", "empty"), ("2 ** 0.5", "whole-number exponents"), ("1 < 2", "only numbers"),
])
def test_hostile_expressions_are_tool_errors(expr, problem):
    with pytest.raises(CalcError, match=problem):
        evaluate(expr)
    out = calculator({"expression": expr})
    assert out.startswith("error: ") and problem in out


def test_hostile_expressions_are_bounded():
    """Nothing makes the calculator build a huge number or recurse: every hostile input above is
    refused before the arithmetic, so a batch of them finishes (no timing is asserted: the point
    is that none hangs)."""
    for expr in ("9**9**9**9", "(2**60)**(2**60)", "((((((((((((((((((((((((((((((1))))))))))))))))))))))))))))))",
                 "-" * 255 + "1", "1" + "*1" * 127, "10**1000"):
        assert calculator({"expression": expr}).startswith(("error: ", "1"))
    assert calculator({"expr": "1"}).startswith("error: ") and calculator("2+2") == "4"
    assert calculator(None).startswith("error: ")


# --------------------------------------------------------------------------- definitions and calls

def test_check_tools_and_choice():
    tools = toolcalls.check_tools([CALC, {"type": "function", "function": {"name": "get_weather"}}])
    assert [t["function"]["name"] for t in tools] == ["calculator", "get_weather"]
    assert tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    for bad, field in [([{"type": "function", "function": {}}], "tools[0].function.name"),
                       ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
                       ([{"type": "code"}], "tools[0].type"), ({"a": 1}, "tools"),
                       ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
                        "tools[0].function.parameters"),
                       ([CALC, CALC], "tools[1].function.name")]:
        with pytest.raises(MessageError) as e:
            toolcalls.check_tools(bad)
        assert e.value.field == field
    assert toolcalls.check_tool_choice(None, tools) == "auto"
    assert toolcalls.check_tool_choice({"type": "function", "function": {"name": "calculator"}}, tools) == "calculator"
    with pytest.raises(MessageError, match="names no tool"):
        toolcalls.check_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(MessageError):
        toolcalls.check_tool_choice("sometimes", tools)


def test_messages_with_tool_calls_and_results():
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    out = check_messages(msgs, null_assistant=True, tools=True)
    assert out[1]["tool_calls"] == [call] and out[2] == {"role": "tool", "content": "2", "tool_call_id": "call_1"}
    with pytest.raises(MessageError) as e:
        check_messages(msgs[:2] + [{"role": "tool", "tool_call_id": "call_9", "content": "2"}], null_assistant=True,
                       tools=True)
    assert e.value.field == "messages[2].tool_call_id"
    with pytest.raises(MessageError):  # without tools=True a tool turn is not a role
        check_messages(msgs, null_assistant=True)


def test_parse_calls_and_split_reply():
    m = toolcalls.NATIVE
    text = f'Let me see.{m.call_start}{{"name": "f", "arguments": {{"x": 1}}}}{m.call_end}{m.call_start}{{"name": "g"'
    content, calls = toolcalls.parse_calls(text, m)
    assert content == "Let me see." and calls == [("f", '{"x": 1}'), ("g", "")]
    # bad arguments JSON is passed through as written, as OpenAI's API does
    assert toolcalls.parse_call('{"name": "f", "arguments": {"x": 1,}}') == ("f", '{"x": 1,}')
    run = (f'A{m.call_start}{{"name": "calculator", "arguments": {{"expression": "2+2"}}}}{m.call_end}'
           f'{m.result_open}4{m.result_close}It is 4.')
    assert toolcalls.split_reply(run, m) == ("AIt is 4.", [("calculator", '{"expression": "2+2"}', "4")], [], False)
    assert toolcalls.check_arguments(CALC, '{"expression": "1"}') is None
    assert "schema" in toolcalls.check_arguments(CALC, '{"expr": "1"}')
    assert "JSON" in toolcalls.check_arguments(CALC, "{")


# --------------------------------------------------------------------------- templates

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "2 + 86"}'}}
LOOP = [{"role": "user", "content": "What is 2 + 86?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "88"},
        {"role": "assistant", "content": "The answer is 88."}]


def _round_trip(tok: Tokenizer):
    """Rendering the loop and reading the first assistant turn back gives the call; the mask covers
    the calls and the answer but neither the definitions nor the result."""
    ids, mask = tok.render_chat(LOOP, tools=[CALC])
    text = tok.decode(ids)
    m = tok.tool_markers
    assert '"name": "calculator"' in text and "2 + 86" in text
    first, _ = tok.render_chat(LOOP[:1], add_generation_prompt=True, tools=[CALC])
    assert ids[:len(first)] == first  # a conversation extends its prefix
    reply = tok.decode(ids[len(first):])
    content, calls = toolcalls.parse_calls(reply.split(m.result_open)[0], m)
    assert calls == [("calculator", toolcalls.normal_arguments(CALL["function"]["arguments"]))]
    learned = tok.decode([i for i, k in zip(ids, mask) if k])
    assert m.call_start in learned and "2 + 86" in learned and "The answer is 88." in learned
    assert "88" not in learned.replace("The answer is 88.", "")  # the tool result is not learned
    assert "expression" not in tok.decode([i for i, k in zip(ids, mask) if not k]).split("What is")[1]
    # what the engine feeds after a call it ran is exactly how the template renders the result
    upto, _ = tok.render_chat(LOOP[:3], add_generation_prompt=True, tools=[CALC])
    prefix, _ = tok.render_chat(LOOP[:2], tools=[CALC])
    gen = tok.decode(upto)[len(tok.decode(prefix)) - len(tok.decode(prefix).split(m.call_end)[-1]):]
    assert gen == tok.decode(tok.tool_result_ids("88"))
    return text


def test_native_template_round_trip(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    text = _round_trip(tok)
    assert text.startswith("<|bos|><|reserved_4|>[{") and "<|reserved_2|>88<|reserved_3|>" in text
    # content cannot forge a call: the marker typed as text is plain bytes
    ids, _ = tok.render_chat([{"role": "user", "content": "<|reserved_0|>x"}])
    assert tok.token_to_id("<|reserved_0|>") not in ids


def test_chatml_convention_round_trip(tmp_path):
    tok = _chatml_tokenizer(tmp_path)
    text = _round_trip(tok)
    assert text.startswith("<|im_start|>system\nYou can call functions") and "<tools>" in text
    assert "<|im_start|>tool\n88<|im_end|>" in text and "<tool_call>\n{" in text




# --------------------------------------------------------------------------- a scripted model

class Scripted(MockModel):
    """A model over a real tokenizer whose reply is a function of its prompt (`script(prompt text)`
    -> the reply's text, control tokens included): at every position after the last turn cue the
    logits peak (by 50, so even temperature 1 follows it) on the next token of that reply. Tool
    calls, results fed back and the answer after them are all known in advance."""

    def __init__(self, tok: Tokenizer, script, cue: str, max_seq_len: int = 1024):
        super().__init__(max_seq_len=max_seq_len)
        self.tok, self.script, self.cue = tok, script, tok.encode(cue, special=True)
        self.V = (tok.vocab_size + 63) // 64 * 64
        self.cfg = type("Cfg", (), {"max_seq_len": max_seq_len, "vocab_size": self.V})()

    def logits_for(self, seq):
        row = torch.zeros(self.V)
        n = len(self.cue)
        k = max((i for i in range(len(seq) - n + 1) if seq[i:i + n] == self.cue), default=None)
        if k is None:
            return row
        prompt, done = self.tok.decode(seq[:k + n]), self.tok.decode(seq[k + n:])
        want = self.script(prompt)
        rest = want[len(done):] if want.startswith(done) else ""
        nxt = self.tok.encode(rest, special=True)[:1] or [self.tok.eos_id]
        row[nxt[0]] = 50.0
        return row

    def hidden_states(self, x, cache):  # only the last position's logits matter to the engine
        c, r, p = cache.cache, cache.row, cache.pos
        T = x.shape[1]
        c.tokens[r, p:p + T] = x[0]
        cache.pos += T
        hist = c.tokens[r, :p + T].tolist()
        return torch.stack([torch.zeros(self.V)] * (T - 1) + [self.logits_for(hist)])[None]


def calc_script(m: toolcalls.Markers, end: str):
    """Asked "What is A op B?" with tools on offer: call the calculator; with a result after the
    question: "The answer is R."; "both" asks for two calls at once; without tools: a guess."""
    import re

    def script(prompt: str) -> str:
        tail = prompt.rsplit("What is", 1)[-1]
        if m.result_open in tail:  # a result came back: state it
            result = tail.rsplit(m.result_open, 1)[-1].split(m.result_close[:m.result_close.index(">") + 1])[0]
            return f"The answer is {result}.{end}"
        e = re.search(r"What is ([0-9+\-*/ ()]+)\?", prompt)
        if ("calculator" in prompt) and e:
            body = lambda x: json.dumps({"name": "calculator", "arguments": {"expression": x}})  # noqa: E731
            calls = [e.group(1)] + (["3 * 3"] if "both" in prompt.rsplit("What is", 1)[-1] else [])
            return "".join(f"{m.call_start}{body(x)}{m.call_end}" for x in calls) + end
        return f"Maybe 7.{end}"
    return script


@pytest.fixture(scope="module")
def scripted(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    return Scripted(tok, calc_script(toolcalls.NATIVE, "<|assistant_end|>"), "<|assistant_start|>"), tok


def test_engine_runs_the_calculator_inside_generation(scripted):
    model, tok = scripted
    engine = Engine(model, tok, max_batch=4)
    ids, _ = tok.render_chat([{"role": "user", "content": "What is 2 + 86?"}], add_generation_prompt=True,
                             tools=[CALC])
    runner = ToolRunner(tok, builtin_tools(["calculator"]))
    p = SamplingParams(max_new_tokens=200, temperature=1.0, tool_hook=runner.fork)
    (c,) = engine.generate(ids, p)
    content, steps, calls, open_ = toolcalls.split_reply(c.text, tok.tool_markers)
    assert steps == [("calculator", '{"expression": "2 + 86"}', "88")] and calls == [] and not open_
    assert content == "The answer is 88." and c.finish_reason == "stop"
    # without the hook the reply ends at the call, for the client to run
    (c,) = engine.generate(ids, SamplingParams(max_new_tokens=200, temperature=0))
    assert toolcalls.split_reply(c.text, tok.tool_markers)[2] == [("calculator", '{"expression": "2 + 86"}')]
    # a hostile expression: the model reads the error, generation goes on
    ids, _ = tok.render_chat([{"role": "user", "content": "What is 1 / 0?"}], add_generation_prompt=True, tools=[CALC])
    (c,) = engine.generate(ids, p)
    assert toolcalls.split_reply(c.text, tok.tool_markers)[:2] == (
        "The answer is error: division by zero.", [("calculator", '{"expression": "1 / 0"}', "error: division by zero")])


def test_chat_session_runs_the_calculator(scripted):
    from chatsmith.chat import ChatSession

    model, tok = scripted
    session = ChatSession(Engine(model, tok, max_batch=1), SamplingParams(max_new_tokens=120, temperature=0),
                          tools=builtin_tools(["calculator"]))
    shown = []
    reply, dropped, interrupted = session.reply("What is 2 + 86?", shown.append)
    assert reply == "The answer is 88." and not interrupted and dropped == 0
    assert "".join(shown) == '[calculator {"expression": "2 + 86"} -> 88] The answer is 88.'
    assert session.last_steps == [("calculator", '{"expression": "2 + 86"}', "88")]
    # the history holds the call and its result as OpenAI messages, and renders again
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    assert session.history[1]["tool_calls"][0]["function"]["name"] == "calculator"
    assert session.history[2] == {"role": "tool", "tool_call_id": "call_0", "content": "88"}
    ids, _ = session.prompt_ids()
    assert tok.decode(ids).count("<|reserved_2|>88<|reserved_3|>") == 1
    # without tools the same model's call is just text in the reply
    plain = ChatSession(Engine(model, tok, max_batch=1), SamplingParams(max_new_tokens=120, temperature=0))
    assert plain.reply("What is 2 + 86?")[0] == "Maybe 7."


def test_unknown_tool_is_a_user_error(base_model, capsys):
    from conftest import cli

    assert cli("chat", base_model, "--tools", "abacus") == 2
    assert "unknown tool 'abacus'" in capsys.readouterr().err


def test_eval_with_the_calculator(scripted, tmp_path):
    """eval --tools calculator: the same prompts, scored on the text around the calls; the calls are
    counted. The scripted model calls for arithmetic and guesses without tools."""
    from chatsmith.eval.runner import run_eval

    f = tmp_path / "sums.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b), "family": "arithmetic"})
                         + "\n" for a, b in [(2, 86), (40, 2), (3, 5)]))
    model, tok = scripted
    kw = dict(out=tmp_path, quiet=True, model=model, tok=tok, chat=True, max_new_tokens=120)
    with_tools = run_eval(tmp_path, [str(f)], tools=["calculator"], **kw)["tasks"][str(f)]
    without = run_eval(tmp_path, [str(f)], **kw)["tasks"][str(f)]
    assert with_tools["accuracy"] == 1.0 and with_tools["items_with_calls"] == 3 and with_tools["tool_calls"] == 3
    assert without["accuracy"] == 0.0 and "tool_calls" not in without
    assert with_tools["samples"][0]["tool_calls"] == [{"name": "calculator", "arguments": '{"expression": "2 + 86"}',
                                                       "result": "88"}]


def test_rl_rollouts_run_the_tool_and_mask_its_tokens(scripted):
    """RL with tools: the calculator runs inside the rollout, the reward sees the text around the
    call, and the tokens the tool fed in are out of the policy's loss mask."""
    from chatsmith.batching import completion_batch
    from chatsmith.train.rollouts import PromptItem, sample

    model, tok = scripted
    ids, _ = tok.render_chat(ASK_ := [{"role": "user", "content": "What is 2 + 86?"}], add_generation_prompt=True,
                             tools=[CALC])
    item = PromptItem(ASK_, ids, None, {"family": "arithmetic", "answers": ["88"]}, "t:1")
    ro = sample(model, tok, [item], seed=0, temperature=1.0, max_new_tokens=150, end_id=tok.eos_id, n=2,
                tools=builtin_tools(["calculator"]))
    assert ro.texts == ["The answer is 88.", "The answer is 88."] and all(ro.finished)
    full, plen, skip = ro.seqs[0]
    fed = tok.tool_result_ids("88")
    assert [full[plen + j] for j in skip] == fed  # exactly the tool's tokens are marked
    b = completion_batch(ro.seqs, tok.pad_id)
    learned = [int(t) for t, m in zip(b["y"][0], b["mask"][0]) if m]
    assert learned == [t for j, t in enumerate(full[plen:]) if j not in set(skip)]
    assert tok.token_to_id("<|reserved_1|>") in learned and tok.token_to_id("<|reserved_2|>") not in learned


def test_tool_dialogues(tmp_path):
    """The tool forms: the call's expression evaluates to the answer, the result is the answer,
    number_sense answers without a call; a tool record and its plain twin share a split side."""
    from chatsmith.data.dialogues import build_dialogues

    fams = ["arithmetic", "word_problem", "number_sense", "arithmetic_tools", "word_problem_tools", "number_sense_tools"]
    meta = build_dialogues(tmp_path, families=fams, caps={f: 60 for f in fams}, heldout_per_family=5, verbose=False)
    assert all(meta["families"][f]["train"] > 0 for f in fams)
    rows = [json.loads(x) for name in ("train", "heldout") for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    sides = {}
    for name in ("train", "heldout"):
        for x in (tmp_path / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(x)
            sides.setdefault(r["messages"][0]["content"], set()).add(name)
    assert all(len(v) == 1 for v in sides.values())  # a question is on one side only, in both forms
    for r in rows:
        if not r["family"].endswith("_tools"):
            continue
        assert r["tools"] == [CALC]
        if r["family"] == "number_sense_tools":
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            continue
        user, call, result, final = r["messages"]
        args = json.loads(call["tool_calls"][0]["function"]["arguments"])
        assert calculator(args) == result["content"] == r["answers"][0] and r["answers"][0] in final["content"]


def test_rl_unknown_tool_is_a_user_error(base_model, tmp_path, capsys):
    from conftest import cli

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert cli("rlhf", "--init", base_model, "--prompts", p, "--out", tmp_path / "o", "--tools", "abacus") == 2
    assert "unknown tool 'abacus'" in capsys.readouterr().err
    assert cli("eval", base_model, "--tasks", "arithmetic", "--tools", "abacus") == 2
