"""SFT dialogue readers: every format into normalised conversations, and clear errors."""

import json
from pathlib import Path

import pytest

from chatsmith.data.chat_formats import FORMATS, parse_data_spec, read_conversations
from chatsmith.errors import UserError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                            + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_one(tmp_path, record, **kw):
    records, _ = read_conversations([write_jsonl(tmp_path / "one.jsonl", [record])], **kw)
    assert len(records) == 1
    return records[0]


def error_of(tmp_path, lines, name="bad.jsonl", **kw) -> str:
    path = write_jsonl(tmp_path / name, lines)
    with pytest.raises(UserError) as e:
        read_conversations([path], **kw)
    return str(e.value)


# --------------------------------------------------------------------------- each format

@pytest.mark.parametrize("record, messages, meta", [
    ({"messages": [S("Be brief."), U("Hi"), A(" Hello!\n")], "family": "greet"},
     [S("Be brief."), U("Hi"), A(" Hello!\n")], {"family": "greet"}),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                {"type": "text", "text": "two parts"}]},
                   A("ok")]},
     [U("Look:\ntwo parts"), A("ok")], {}),
    ({"messages": [{"role": "developer", "content": "Rules"}, U("q"), A("a")]},
     [S("Rules"), U("q"), A("a")], {}),
    ({"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "2+2?"},
                        {"from": "gpt", "value": "4"}, {"from": "user", "value": "and 3+3?"},
                        {"from": "assistant", "value": "6"}], "id": "x1"},
     [S("sys"), U("2+2?"), A("4"), U("and 3+3?"), A("6")], {"id": "x1"}),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "system": "You are kind."},
     [S("You are kind."), U("q"), A("a")], {}),
    ({"instruction": "Translate to French.", "input": "cat", "output": "chat", "answers": [1]},
     [U("Translate to French.\n\ncat"), A("chat")], {"answers": [1]}),
    ({"instruction": "Name a colour.", "input": "", "output": "Blue."},
     [U("Name a colour."), A("Blue.")], {}),
    ({"instruction": "Name a colour.", "output": "Blue."}, [U("Name a colour."), A("Blue.")], {}),
    ({"instruction": "And now?", "input": "", "output": "Two.", "system": "Count.",
      "history": [["Start", "One."]]},
     [S("Count."), U("Start"), A("One."), U("And now?"), A("Two.")], {}),
    ({"prompt": "The capital of France is", "completion": " Paris."},
     [U("The capital of France is"), A(" Paris.")], {}),
    ({"prompt": [S("s"), U("q")], "completion": [A("a")]}, [S("s"), U("q"), A("a")], {}),
    ({"dialogue": ["hi", "hello", "how are you?", "fine"], "family": "smalltalk"},
     [U("hi"), A("hello"), U("how are you?"), A("fine")], {"family": "smalltalk"}),
    # ultrachat has "prompt" and "messages": messages wins, prompt is meta
    ({"prompt": "q", "messages": [U("q"), A("a")], "prompt_id": "7"},
     [U("q"), A("a")], {"prompt": "q", "prompt_id": "7"}),
])
def test_each_format_round_trips(tmp_path, record, messages, meta):
    rec = read_one(tmp_path, record)
    assert rec.messages == messages
    assert rec.meta == meta
    assert rec.source == f"{tmp_path / 'one.jsonl'}:1"


def test_content_is_kept_exactly(tmp_path):
    text = "  indented\n\ttabbed  \u2028 line-separator, 中文, emoji 🙂  "
    rec = read_one(tmp_path, {"messages": [U(text), A(text)]})
    assert rec.messages == [U(text), A(text)]


def test_mixed_formats_in_one_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"messages": [U("a"), A("b")]},
        "",
        {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
        "   ",
        {"instruction": "e", "output": "f"},
        {"prompt": "g", "completion": "h"},
        {"dialogue": ["i", "j"]},
    ])
    records, report = read_conversations([path])
    assert [r.messages for r in records] == [[U("a"), A("b")], [U("c"), A("d")], [U("e"), A("f")],
                                             [U("g"), A("h")], [U("i"), A("j")]]
    # blank lines are skipped but line numbers stay those of the file
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "3", "5", "6", "7"]
    assert report.records == 5 and report.skipped == 0
    assert report.per_file[path]["formats"] == {
        "messages": 1, "sharegpt": 1, "alpaca": 1, "prompt_completion": 1, "dialogue": 1}


def test_json_array_single_object_and_json_lines(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"messages": [U("a"), A("b")]}, {"dialogue": ["c", "d"]}],
                              indent=2), encoding="utf-8")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"instruction": "e", "output": "f"}), encoding="utf-8")
    lines = tmp_path / "lines.json"  # what datasets' to_json writes: JSON Lines, .json name
    write_jsonl(lines, [{"prompt": "g", "completion": "h"}, {"prompt": "i", "completion": "j"}])
    records, report = read_conversations([str(arr), str(one), str(lines)])
    assert [r.messages for r in records] == [[U("a"), A("b")], [U("c"), A("d")], [U("e"), A("f")],
                                             [U("g"), A("h")], [U("i"), A("j")]]
    assert [r.source for r in records] == [f"{arr}:#0", f"{arr}:#1", f"{one}:#0",
                                           f"{lines}:1", f"{lines}:2"]
    assert report.records == 5


def test_yaml_list_of_records(tmp_path):
    path = tmp_path / "recs.yaml"
    path.write_text(
        "- messages:\n"
        "    - {role: user, content: 'Is it on?'}\n"
        "    - {role: assistant, content: 'yes'}\n"
        "- instruction: Say hi\n"
        "  output: Hi\n"
        "  family: greet\n", encoding="utf-8")
    records, _ = read_conversations([str(path)])
    assert [r.messages for r in records] == [[U("Is it on?"), A("yes")], [U("Say hi"), A("Hi")]]
    assert records[1].meta == {"family": "greet"}
    assert [r.source for r in records] == [f"{path}:#0", f"{path}:#1"]


CHATTERBOT = """\
categories:
- greetings
conversations:
- - Hello
  - Hi there!
- - How are you doing?
  - I am doing well, how about you?
  - I am also good.
  - That's good to hear.
- - Is it raining?
  - yes
- - What is 2 + 2?
  - 4
"""


def test_chatterbot_yaml(tmp_path):
    path = tmp_path / "greetings.yml"
    path.write_text(CHATTERBOT, encoding="utf-8")
    records, report = read_conversations([str(path)])
    assert [r.messages for r in records] == [
        [U("Hello"), A("Hi there!")],
        [U("How are you doing?"), A("I am doing well, how about you?"), U("I am also good."),
         A("That's good to hear.")],
        # unquoted YAML scalars stay text as written (PyYAML would read True and 4)
        [U("Is it raining?"), A("yes")],
        [U("What is 2 + 2?"), A("4")],
    ]
    assert all(r.meta == {"categories": ["greetings"]} for r in records)
    assert records[2].source == f"{path}:#2"
    assert report.per_file[str(path)]["formats"] == {"chatterbot": 4}


def test_chatterbot_json_export(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"conversations": [["a", "b"], ["c", "d", "e", "f"]]}))
    records, _ = read_conversations([str(path)])
    assert [r.messages for r in records] == [[U("a"), A("b")], [U("c"), A("d"), U("e"), A("f")]]


def test_chatterbot_odd_conversation_is_bad(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CHATTERBOT + "- - one\n  - two\n  - three\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.yaml:#4 \(line 14\): .*last turn.*user turn"):
        read_conversations([str(path)])
    records, report = read_conversations([str(path)], skip_bad=True)
    assert len(records) == 4 and report.skipped == 1


# --------------------------------------------------------------------------- weights

def test_parse_data_spec():
    assert parse_data_spec("data/chat.jsonl") == ("data/chat.jsonl", 1.0)
    assert parse_data_spec("data/chat.jsonl:2.5") == ("data/chat.jsonl", 2.5)
    assert parse_data_spec("chat.jsonl:3") == ("chat.jsonl", 3.0)
    assert parse_data_spec("C:\\data\\chat.jsonl") == ("C:\\data\\chat.jsonl", 1.0)
    assert parse_data_spec("C:\\data\\chat.jsonl:0.5") == ("C:\\data\\chat.jsonl", 0.5)
    assert parse_data_spec("odd:name.jsonl") == ("odd:name.jsonl", 1.0)
    for bad in ("chat.jsonl:0", "chat.jsonl:-1", "chat.jsonl:0.0"):
        with pytest.raises(UserError, match="invalid weight"):
            parse_data_spec(bad)


def test_weights(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl",
                       [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])
    one, _ = read_conversations([path])
    two, report = read_conversations([f"{path}:2"])
    assert [r.messages for r in two] == [r.messages for r in one] * 2
    assert report.records == 20 and report.per_file[path]["read"] == 10
    two[0].messages[0]["content"] = "edited"  # repeats are copies
    assert two[10].messages[0]["content"] == "q0"

    half, report = read_conversations([f"{path}:0.5"], seed=1)
    again, _ = read_conversations([f"{path}:0.5"], seed=1)
    assert len(half) == 5 and report.records == 5
    assert [r.source for r in half] == [r.source for r in again]  # deterministic
    assert len({r.source for r in half}) == 5  # distinct records, in file order
    assert [r.source for r in half] == sorted((r.source for r in half),
                                              key=lambda s: int(s.rsplit(":", 1)[1]))
    others = {tuple(r.source for r in read_conversations([f"{path}:0.5"], seed=s)[0])
              for s in range(2, 8)}
    assert len(others | {tuple(r.source for r in half)}) > 1  # the seed picks the sample

    mix, report = read_conversations([f"{path}:1.5"], seed=0)
    assert len(mix) == 15 and mix[:10] == one


def test_invalid_weight_in_read(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(UserError, match="invalid weight"):
        read_conversations([f"{path}:0"])


# --------------------------------------------------------------------------- bad records

GOOD = {"messages": [U("q"), A("a")]}

BROKEN = [
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", "not an object"),
    ({"text": "just prose"}, "pretraining text"),
    ({"chosen": "a", "rejected": "b"}, "preference pair"),
    ({"question": "q", "answer": "a"}, "match no known chat format"),
    ({"instruction": "do it"}, 'no "output" field'),
    ({"prompt": "q"}, 'no "completion" field'),
    ({"messages": "hello"}, '"messages" must be a list of turns'),
    ({"messages": [U("q"), {"role": "assistant", "content": 42}]}, "must be a string"),
    ({"messages": [U("q"), {"role": "assistant"}]}, 'no "content"'),
    ({"messages": [U("q"), {"role": "robot", "content": "beep"}]}, "unknown role 'robot'"),
    # function calling (OpenAI's fine-tuning format) is read, and its mistakes named
    ({"messages": [U("q"), {"role": "tool", "content": "42"}, A("a")]}, "messages[1].tool_call_id must be the id"),
    ({"messages": [U("q"), {"role": "assistant", "content": None,
                            "tool_calls": [{"id": "1"}]}]}, "messages[1].tool_calls[0] must be"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "42"}]}, "tool/function turns"),
    ({"messages": [U("q"), A("a")], "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"messages": [U("q"), {"role": "assistant",
                            "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text parts"),
    ({"messages": [U("q"), A("  \n\t ")]}, "messages[1].content is empty"),
    ({"messages": [U("q"), U("again")]}, "no assistant turn"),
    ({"messages": [S("only system")]}, "only a system message"),
    ({"messages": []}, "no turns"),
    ({"messages": [A("hi"), U("q"), A("a")]}, "must start with a user turn"),
    ({"messages": [U("q"), A("a"), A("b")]}, "messages[1] and messages[2] are consecutive "
                                             "assistant turns"),
    ({"messages": [U("q"), A("a"), S("late")]}, "only the first turn may be one"),
    ({"messages": [U("q"), A("a"), U("more?")]}, "is a user turn: nothing for the model to learn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "unknown role 'bot'"),
    ({"instruction": "", "output": "x"}, '"instruction" is empty'),
    ({"instruction": "q", "input": 3, "output": "x"}, '"input" must be a string'),
    ({"prompt": "q", "completion": ""}, '"completion" is empty'),
    ({"dialogue": ["q", "a", "q2"]}, "last turn, dialogue[2], is a user turn"),
    ({"dialogue": ["q", 5]}, "dialogue[1] must be a string"),
    ('{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", '
     '"content": "a"}]}', "lone surrogate"),
]


def test_function_calling_records(tmp_path):
    """OpenAI's fine-tuning format for tools: "tools" and the calls' turns are kept; SFT's mask
    learns the call and the answer, not the result."""
    from chatsmith.data.chat_formats import read_conversations
    from chatsmith.tools.calculator import SPEC

    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}
    rec = {"messages": [U("1+1?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "content": "2"}, A("2")], "tools": [SPEC]}
    f = tmp_path / "tools.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    (r,), _ = read_conversations([str(f)])
    assert r.meta["tools"][0]["function"]["name"] == "calculator"
    assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "assistant"]
    assert r.messages[1]["tool_calls"] == [call]


@pytest.mark.parametrize("bad, reason", BROKEN, ids=[r for _, r in BROKEN])
def test_broken_record_names_file_line_and_reason(tmp_path, bad, reason):
    msg = error_of(tmp_path, [GOOD, GOOD, bad, GOOD])
    assert f"bad.jsonl:3: " in msg
    assert reason in msg
    assert "--skip-bad" in msg


def test_detection_errors_suggest_format(tmp_path):
    assert "--format" in error_of(tmp_path, [{"question": "q", "answer": "a"}])
    assert "check --format alpaca" in error_of(tmp_path, [GOOD], format="alpaca")


def test_skip_bad_skips_and_counts(tmp_path):
    lines = [GOOD] + [bad for bad, _ in BROKEN] + [GOOD]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    records, report = read_conversations([path], skip_bad=True)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:{len(lines)}"]
    assert report.records == 2 and report.skipped == len(BROKEN)
    assert report.per_file[path]["skipped"] == len(BROKEN)
    assert len(report.skipped_examples) == 5
    assert report.skipped_examples[0].startswith(f"{path}:2: not valid JSON")
    assert report.skipped_examples[1].startswith(f"{path}:3: ")


def test_json_array_errors_name_the_item(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"dialogue": ["q", "a"]},\n  {"dialogue": ["q", "a", "q"]}\n]\n')
    with pytest.raises(UserError, match=r"arr\.json:#1 \(line 3\): .*user turn"):
        read_conversations([str(path)])
    path.write_text('[\n  {"dialogue": ["q", "a"]},\n  {"dialogue": ["q"],}\n]\n')
    with pytest.raises(UserError, match=r"arr\.json:3: not valid JSON"):
        read_conversations([str(path)])


def test_yaml_errors_name_the_item_and_line(tmp_path):
    path = tmp_path / "recs.yaml"
    path.write_text("- dialogue: [q, a]\n- dialogue:\n  - q\n  - yes\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"recs\.yaml:#1 \(line 2\): dialogue\[1\] must be a "
                                        r"string, got a boolean .*quotes"):
        read_conversations([str(path)])
    path.write_text("- dialogue: [q, a]\n- dialogue: [q\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"recs\.yaml:\d+: not valid YAML"):
        read_conversations([str(path)])


def test_format_override(tmp_path):
    # A record with both "instruction" and "dialogue": detection picks alpaca, --format dialogue
    path = write_jsonl(tmp_path / "f.jsonl", [
        {"instruction": "i", "output": "o", "dialogue": ["q", "a"]}])
    detected, _ = read_conversations([path])
    assert detected[0].messages == [U("i"), A("o")]
    forced, report = read_conversations([path], format="dialogue")
    assert forced[0].messages == [U("q"), A("a")]
    assert forced[0].meta == {"instruction": "i", "output": "o"}
    assert report.per_file[path]["formats"] == {"dialogue": 1}
    # a bare list of turns is chatterbot only when forced
    lists = write_jsonl(tmp_path / "lists.jsonl", [["q", "a"], ["q2", "a2"]])
    with pytest.raises(UserError, match="--format chatterbot"):
        read_conversations([lists])
    records, _ = read_conversations([lists], format="chatterbot")
    assert records[1].messages == [U("q2"), A("a2")]
    with pytest.raises(UserError, match="unknown chat data format"):
        read_conversations([path], format="csv")
    assert set(FORMATS) == {"messages", "sharegpt", "alpaca", "prompt_completion", "dialogue",
                            "chatterbot"}


# --------------------------------------------------------------------------- file errors

def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" +
                     '{"dialogue": ["café", "oui"]}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.jsonl:2: the file is not valid UTF-8"):
        read_conversations([str(path)])


def test_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    records, _ = read_conversations([str(path)])
    assert records[0].messages == [U("q"), A("a")]


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_conversations([str(tmp_path / "missing.jsonl")])
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        read_conversations([str(txt)])
    with pytest.raises(UserError, match="is a folder"):
        read_conversations([str(tmp_path)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl: no usable conversations: the file holds "
                                        "no records"):
        read_conversations([str(empty)])
    allbad = write_jsonl(tmp_path / "allbad.jsonl", [{"dialogue": ["q"]}, {"x": 1}])
    with pytest.raises(UserError, match=r"all 2 records are bad \(first: .*allbad\.jsonl:1: "):
        read_conversations([allbad], skip_bad=True)
    with pytest.raises(UserError, match="no chat data files"):
        read_conversations([])


def test_several_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"dialogue": ["a1", "b1"]}])
    b = tmp_path / "b.yaml"
    b.write_text("conversations:\n- [c1, d1]\n", encoding="utf-8")
    records, report = read_conversations([a, f"{b}:2"])
    assert [r.messages[0]["content"] for r in records] == ["a1", "c1", "c1"]
    assert list(report.per_file) == [a, str(b)]
    assert report.per_file[str(b)] == {"read": 1, "skipped": 0, "weight": 2.0, "records": 2,
                                       "formats": {"chatterbot": 1}}
