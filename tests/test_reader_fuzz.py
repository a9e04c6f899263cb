"""Property-based fuzzing of the CLI's file readers (issue 22, item 3).

Hypothesis builds hostile files: records that look valid but carry wrong types, missing fields, odd
Unicode (lone surrogates written as JSON escapes, NULs, BOMs, U+2028, combining marks), CRLF line
ends, huge lines, random bytes, deep nesting and integers past Python's 4300-digit limit, as JSONL,
JSON, YAML, CSV/TSV and plain text. Each reader is called through the entry point the CLI uses, and
the property is the same for all of them: it returns records whose every string is valid Unicode
(the tokenizer takes them), or it raises `UserError` with one line naming the file, and `file:LINE`
(or a JSON path for one-document formats) when a record is at fault. Any other exception, a crash
or a record the tokenizer would choke on later, fails the test. A few CLI runs then check that a
hostile file is exit 2 with no traceback and no --out left behind.

Bounded: a fixed number of examples per reader, a deadline, derandomised, no example database, so
the default suite stays fast and repeatable; `-m slow` runs many more, randomised.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from chatsmith.data.chat_formats import FORMATS, read_conversations
from chatsmith.data.corpus import build_corpus, iter_input_documents
from chatsmith.data.labelled import read_eval, read_train
from chatsmith.data.preferences import read_pairs
from chatsmith.data.squad import read_squad
from chatsmith.embed import read_lines
from chatsmith.errors import UserError
from chatsmith.eval.taskfile import read_dialogue_items, read_prompt_items, read_task_file
from conftest import cli

FAST = dict(max_examples=60, deadline=10_000, derandomize=True, database=None)
SLOW = dict(max_examples=1500, deadline=None, derandomize=False, database=None)
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.filter_too_much]


# --------------------------------------------------------------------------- hostile JSON

class Raw(str):
    """JSON text written verbatim: what json.dumps cannot produce (5000-digit integers, NaN,
    1e999, 100k-deep nesting)."""


def dump(v, ascii_: bool) -> str:
    """JSON text of v. With ascii_ non-ASCII (and lone surrogates) are \\u escapes; without, they
    are written raw (a raw surrogate then becomes invalid UTF-8 when the file is encoded)."""
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{dump(str(k), ascii_)}: {dump(x, ascii_)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dump(x, ascii_) for x in v) + "]"
    return json.dumps(v, ensure_ascii=ascii_)


ODD_CHARS = ["\ud800", "\udc00", "\udfff", "\x00", "\ufeff", "\u2028", "\u2029", "\x85", "\r", "\n",
             "\r\n", "\t", "\x0b", "\x0c", "\x1c", "\u0301", "\u200b", "\U0001f600", "\U0010ffff", "\ufffd",
             "ß", "春", " ", '"', "\\", ",", ":", "[MASK]", "<|eos|>", "#", "- ", "&a", "*a", "!!"]
odd_text = st.lists(st.one_of(st.characters(), st.sampled_from(ODD_CHARS)), max_size=12).map("".join)
plain_text = st.sampled_from(["hello", "What is 2 + 2?", "4", "Paris", "the sea", "yes", "no", "a", "b"])
text = st.one_of(plain_text, plain_text, odd_text, st.just(""), st.just("   \n"),
                 st.sampled_from([10_000, 200_000]).map(lambda n: "x" * n))  # huge lines
huge_int = st.integers(4290, 4400).map(lambda n: Raw("9" * n))
deep = st.sampled_from([50, 999, 5_000, 100_000]).flatmap(
    lambda n: st.sampled_from([Raw("[" * n + "]" * n), Raw('{"a": ' * n + "1" + "}" * n)]))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text, huge_int,
                   st.sampled_from([Raw("NaN"), Raw("-Infinity"), Raw("1e999"), Raw("-0.0"), Raw("1" * 4300)]))
hostile = st.recursive(st.one_of(scalar, deep), lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.one_of(plain_text, odd_text), kids, max_size=4)),
    max_leaves=10)


def maybe(valid):
    """Mostly a valid value, sometimes a hostile one: records get past the first checks."""
    return st.one_of(valid, valid, valid, hostile)


def record(required: dict, optional: dict | None = None):
    """An object with the required fields (each one occasionally dropped or hostile), the optional
    ones sometimes, and sometimes a stray key."""
    fields = {k: maybe(v) for k, v in required.items()}
    opt = {k: maybe(v) for k, v in (optional or {}).items()}
    full = st.fixed_dictionaries(fields, optional={**opt, "id": hostile, "\ud800": hostile})
    return st.one_of(full, full, full, st.fixed_dictionaries({}, optional={**fields, **opt}), hostile)


role = st.sampled_from(["user", "assistant", "system", "developer", "human", "gpt", "tool", "User ", ""])
turn = st.fixed_dictionaries({"role": maybe(role), "content": maybe(text)})
turn_fv = st.fixed_dictionaries({"from": maybe(role), "value": maybe(text)})
turns = st.one_of(
    st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=4).flatmap(
        lambda rs: st.tuples(*[st.fixed_dictionaries({"role": st.just(r), "content": maybe(text)}) for r in rs])
        .map(list)),
    st.lists(st.one_of(turn, turn_fv), max_size=4))
parts = st.lists(st.fixed_dictionaries({"type": maybe(st.just("text")), "text": maybe(text)}), max_size=3)

# Valid records, any Unicode text in them (hypothesis' text() has no lone surrogates).
good = st.one_of(st.text(min_size=1, max_size=20).filter(str.strip), plain_text)
good_turns = st.lists(good, min_size=1, max_size=3).map(
    lambda ts: [m for t in ts for m in ({"role": "user", "content": t}, {"role": "assistant", "content": t + "!"})])
VALID = {
    "sft": st.one_of(st.fixed_dictionaries({"messages": good_turns}),
                     st.fixed_dictionaries({"prompt": good, "completion": good}),
                     st.fixed_dictionaries({"instruction": good, "output": good}, optional={"input": good}),
                     st.fixed_dictionaries({"conversations": good_turns.map(
                         lambda ms: [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                     for m in ms])})),
    "pairs": st.fixed_dictionaries({"prompt": good, "chosen": good, "rejected": good.map(lambda t: t + " no")}),
    "task": st.fixed_dictionaries({"prompt": good, "answer": st.one_of(good, st.integers())}),
    "prompt": st.fixed_dictionaries({"prompt": good}, optional={"family": good}),
    "dialogue": good_turns.map(lambda ms: {"family": "arithmetic", "answers": ["4"], "messages": ms}),
    "labelled": st.fixed_dictionaries({"text": good, "label": st.sampled_from(["a", "b", 0, 1])}),
    "text": st.fixed_dictionaries({"text": good}),
}

SFT_RECORDS = st.one_of(
    record({"messages": turns}),
    record({"conversations": turns}, {"system": text}),
    record({"instruction": text, "output": text}, {"input": text, "system": text,
                                                   "history": st.lists(st.lists(text, min_size=2, max_size=2))}),
    record({"prompt": st.one_of(text, turns), "completion": st.one_of(text, turns)}),
    record({"dialogue": st.lists(text, max_size=4)}, {"system": text}),
    record({"messages": st.lists(st.fixed_dictionaries({"role": role, "content": st.one_of(text, parts)}),
                                 max_size=4)}),
    hostile)
PAIR_RECORDS = st.one_of(
    record({"prompt": text, "chosen": text, "rejected": text}),
    record({"prompt": turns, "chosen": turns, "rejected": turns}),
    record({"chosen": turns, "rejected": turns}),
    hostile)
TASK_RECORDS = st.one_of(
    record({"prompt": text, "answer": st.one_of(text, st.integers(), st.floats())},
           {"family": text, "worked": text, "answers": st.lists(text)}),
    record({"messages": turns, "reference": st.one_of(text, st.lists(text))}),
    record({"prompt": text, "choices": st.lists(text, max_size=4), "label": st.integers(-2, 5)}),
    hostile)
PROMPT_RECORDS = st.one_of(record({"prompt": st.one_of(text, turns)}, {"family": text}),
                           record({"messages": turns}), hostile)
DIALOGUE_RECORDS = record({"messages": turns, "family": st.just("arithmetic"),
                           "answers": st.lists(st.one_of(text, st.integers()), max_size=2)})
LABELLED_RECORDS = st.one_of(record({"text": text, "label": st.one_of(plain_text, st.integers(0, 3))},
                                    {"text_pair": text}), hostile)
TEXT_RECORDS = st.one_of(record({"text": text}), hostile)


# --------------------------------------------------------------------------- hostile files

class Clean(bytes):
    """A file of valid records with only harmless oddities (a BOM, CRLF, blank lines, any Unicode):
    the reader must read it, not refuse it."""


def encode(s: str) -> bytes:
    """UTF-8, except that raw surrogates become their (invalid) 3-byte forms."""
    return s.encode("utf-8", "surrogatepass")


@st.composite
def jsonl_file(draw, records, valid=None) -> bytes:
    ascii_ = draw(st.booleans())
    if valid is not None and draw(st.integers(0, 2)) == 0:
        # a third of the files hold only valid records, with the harmless oddities (a BOM, CRLF,
        # blank lines, any Unicode): these must be read, so the happy path is fuzzed too
        lines = draw(st.lists(valid.map(lambda r: dump(r, ascii_)), min_size=1, max_size=5))
        lines = [x for line in lines for x in ([line, ""] if draw(st.booleans()) else [line])]
        body = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + "\n"
        return Clean(encode("\ufeff" * draw(st.booleans()) + body))
    lines = draw(st.lists(st.one_of(
        records.map(lambda r: dump(r, ascii_)), records.map(lambda r: dump(r, ascii_)),
        records.map(lambda r: dump(r, ascii_)[:-1]),                       # cut short
        records.map(lambda r: dump(r, ascii_) + " " + dump(r, ascii_)),    # two on a line
        st.sampled_from(["", "   ", "[", "{", "\ufeff{}", "// comment", "\x00", "null", '"\ud800"'])),
        min_size=0, max_size=6))
    body = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(lines) + draw(st.sampled_from(["", "\n"]))
    if draw(st.booleans()):
        body = "\ufeff" + body
    data = encode(body)
    return draw(mangle(data))


@st.composite
def mangle(draw, data: bytes) -> bytes:
    """Sometimes random binary spliced in, a NUL, or the file cut mid-character."""
    how = draw(st.sampled_from(["none", "none", "none", "binary", "nul", "cut", "all-binary"]))
    if how == "none" or not data and how != "all-binary":
        return data
    if how == "all-binary":
        return draw(st.binary(max_size=64))
    at = draw(st.integers(0, len(data)))
    if how == "binary":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if how == "nul":
        return data[:at] + b"\x00" + data[at:]
    return data[:at]


@st.composite
def json_file(draw, records, valid) -> bytes:
    """A .json chat file: an array of records, one record, or JSON Lines under a .json name."""
    ascii_ = draw(st.booleans())
    clean = draw(st.integers(0, 2)) == 0  # as in jsonl_file: only valid records, which must be read
    recs = draw(st.lists(valid if clean else records, min_size=clean, max_size=4))
    shape = draw(st.sampled_from(["array", "one", "lines", "pretty"]))
    if shape == "array":
        body = "[" + ",\n ".join(dump(r, ascii_) for r in recs) + "]"
    elif shape == "one":
        body = dump(recs[0] if recs else {}, ascii_)
    elif shape == "lines":
        body = "\n".join(dump(r, ascii_) for r in recs)
    else:
        body = "[\n" + ",\n".join("  " + dump(r, ascii_) for r in recs) + "\n]\n"
    if draw(st.booleans()):
        body = "\ufeff" + body
    return Clean(encode(body)) if clean else draw(mangle(encode(body)))


YAML_SNIPPETS = ["- !!python/object:os.system x\n", "- ? [a]\n  : b\n", "- prompt: 2001-02-30\n  completion: x\n",
                 "- prompt: !!binary aGVsbG8=\n  completion: x\n", "[" * 100_000, "- " + "[" * 3000 + "]" * 3000 + "\n",
                 "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nprompt: *b\ncompletion: x\n", "--- a\n--- b\n",
                 "%YAML 9.9\n--- []\n", "- prompt: \"\\ud800\"\n  completion: x\n", "- {prompt: a, completion: b}\n",
                 "categories: [x]\nconversations:\n- [hi, hello]\n- - yes\n  - 4\n", "- prompt: a\x00\n  completion: b\n",
                 "- prompt: *undefined\n", "- {prompt: a, prompt: b, completion: c}\n", "- !!set {a, b}\n",
                 "conversations:\n- [" + "9" * 5000 + ", x]\n", "x: " + "9" * 5000 + "\n", "- 'unterminated\n",
                 "- prompt: 1970-01-01 00:00:00\n  completion: .nan\n", "- ? !!python/name:os.system\n  : x\n"]


def _yaml_dumpable(v):
    """A value yaml.safe_dump can write: Raw JSON text stays a string (YAML has no 5000-digit
    integer type worth the name; the snippets above cover those)."""
    if isinstance(v, dict):
        return {str(k): _yaml_dumpable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_yaml_dumpable(x) for x in v]
    return str(v)[:200] if isinstance(v, Raw) else v


@st.composite
def yaml_file(draw, records, valid) -> bytes:
    clean = draw(st.integers(0, 2)) == 0  # as in jsonl_file: only valid records, which must be read
    recs = [_yaml_dumpable(r) for r in draw(st.lists(valid if clean else records, min_size=clean, max_size=4))]
    shape = draw(st.sampled_from(["list", "one"] if clean else ["list", "one", "corpus", "snippet", "snippet"]))
    if shape == "snippet":
        return draw(mangle(encode(draw(st.sampled_from(YAML_SNIPPETS)))))
    if shape == "corpus":
        doc = {"categories": ["x"], "conversations": draw(st.lists(st.lists(text, max_size=4), max_size=3))}
    else:
        doc = recs if shape == "list" else (recs[0] if recs else None)
    try:
        body = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.booleans()))
    except (yaml.YAMLError, UnicodeError):
        body = "- x\n"
    return Clean(encode(body)) if clean else draw(mangle(encode(body)))


@st.composite
def csv_file(draw, delimiter: str) -> bytes:
    if draw(st.integers(0, 2)) == 0:  # valid rows: quoting, embedded newlines, any Unicode
        rows = draw(st.lists(st.tuples(good, st.sampled_from(["a", "b"])), min_size=1, max_size=5))
        buf = io.StringIO()
        # csv.writer leaves a lone "\r" unquoted when the line terminator is "\n": an ambiguous file
        # (a raw CR ends a CSV line for every reader), so such rows are written all quoted
        quoting = csv.QUOTE_ALL if any("\r" in t for t, _ in rows) else csv.QUOTE_MINIMAL
        csv.writer(buf, delimiter=delimiter, quoting=quoting,
                   lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows([("text", "label"), *rows])
        return Clean(encode("\ufeff" * draw(st.booleans()) + buf.getvalue()))
    header = draw(st.one_of(st.just(["text", "label"]), st.just(["label", "text_pair", "text"]),
                            st.permutations(["text", "label", "id"]), st.lists(st.one_of(plain_text, odd_text),
                                                                               max_size=3)))
    rows = draw(st.lists(st.lists(st.one_of(text, st.integers().map(str)), min_size=max(0, len(header) - 1),
                                  max_size=len(header) + 1), max_size=5))
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(
        [header, *rows])
    body = buf.getvalue()
    if draw(st.booleans()):
        body = "\ufeff" + body
    if draw(st.booleans()):  # an unbalanced quote
        body += '"' + draw(text)
    return draw(mangle(encode(body)))


@st.composite
def squad_file(draw) -> bytes:
    if draw(st.integers(0, 2)) == 0:  # valid: answers at their offsets in any Unicode context
        before, ans, after = draw(good), draw(good), draw(st.text(max_size=10))
        qa = {"id": "q1", "question": draw(good), "answers": [{"text": ans, "answer_start": len(before)}]}
        doc = {"version": "v1.1", "data": [{"title": draw(st.text(max_size=5)),
                                             "paragraphs": [{"context": before + ans + after, "qas": [qa]}]}]}
        return Clean(encode("\ufeff" * draw(st.booleans()) + dump(doc, draw(st.booleans()))))
    ctx = draw(maybe(st.sampled_from(["Paris is in France.", "ab"])))
    answer = st.fixed_dictionaries({"text": maybe(st.sampled_from(["Paris", "France", "x"])),
                                    "answer_start": maybe(st.sampled_from([0, 9, -1, 10 ** 30]))})
    qa = st.fixed_dictionaries({"id": maybe(st.sampled_from(["q1", "q2", ""])), "question": maybe(text)},
                               optional={"answers": maybe(st.lists(answer, max_size=2)),
                                         "is_impossible": maybe(st.booleans())})
    para = st.fixed_dictionaries({"context": st.just(ctx), "qas": maybe(st.lists(qa, max_size=3))})
    doc = draw(st.fixed_dictionaries({"data": maybe(st.lists(st.fixed_dictionaries(
        {"paragraphs": maybe(st.lists(para, max_size=2))}, optional={"title": maybe(text)}), max_size=2))},
        optional={"version": maybe(st.just("v2.0"))}))
    return draw(mangle(encode("\ufeff" * draw(st.booleans()) + dump(doc, draw(st.booleans())))))


@st.composite
def text_file(draw) -> bytes:
    body = draw(st.sampled_from(["\n", "\r\n"])).join(draw(st.lists(text, max_size=5)))
    return draw(mangle(encode("\ufeff" * draw(st.booleans()) + body)))


# --------------------------------------------------------------------------- the property

# file:LINE, file:#INDEX, or (SQuAD, one JSON document) a question id or a JSON path
WHERE = r"(?::(?:\d+|#\d+)|: (?:question id|data\b|.+ holds a lone surrogate))"


def strings(v, seen=None):
    """Every string inside a returned value (dataclasses, dicts, lists), keys included."""
    seen = set() if seen is None else seen
    if id(v) in seen:
        return
    seen.add(id(v))
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from strings(k, seen)
            yield from strings(x, seen)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from strings(x, seen)
    elif hasattr(v, "__dataclass_fields__"):
        for name in v.__dataclass_fields__:
            yield from strings(getattr(v, name), seen)


def holds(read, data: bytes, suffix: str, file_level: tuple[str, ...] = (), clean_refusals: tuple[str, ...] = ()):
    """Write data to a fresh file and read it: records that are valid Unicode, or a UserError of one
    line naming the file and the line (or JSON path); file_level lists the reasons that concern the
    whole file, which name only the file. A Clean file must be read (but for clean_refusals).
    Anything else escapes and fails the test."""
    note(f"file{suffix}: {data[:400]!r}{' ...' if len(data) > 400 else ''} ({len(data)} bytes)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(data)
        try:
            out = read(path)
        except UserError as e:
            msg = str(e)
            assert str(path) in msg, msg
            assert "\n" not in msg, msg
            if not re.search(re.escape(str(path)) + WHERE, msg):
                assert any(r in msg for r in file_level), f"no file:line in {msg!r}"
            m = re.search(re.escape(str(path)) + r":(\d+)", msg)
            if m:  # the line named exists in the file
                assert 1 <= int(m.group(1)) <= data.count(b"\n") + 1, msg
            assert not isinstance(data, Clean) or any(r in msg for r in clean_refusals), \
                f"a valid file was refused: {msg}"
            event("UserError")
            return
        for s in strings(out):
            s.encode("utf-8")  # a lone surrogate here would be a traceback in the tokenizer later
        event("read")


EMPTY = ("no usable conversations", "no preference pairs", "is empty", "no records", "no text",
         "holds no", "no such", "no questions", "no arithmetic conversations")


# --------------------------------------------------------------------------- per reader

def fuzz(examples: list[dict] = (), fast: int = FAST["max_examples"], **strategies):
    """body as two tests: bounded and derandomised for the default suite, and SLOW's many
    randomised examples under -m slow. examples: the inputs that were bugs (regression cases, run
    first by both)."""
    def wrap(body):
        def make(cfg):
            t = settings(**{**cfg, "max_examples": fast if cfg is FAST else cfg["max_examples"]},
                         suppress_health_check=HEALTH)(given(**strategies)(body))
            for ex in reversed(examples):
                t = example(**ex)(t)
            return t
        slow = make(SLOW)
        slow.pytestmark = [pytest.mark.slow.mark]  # (pytest.mark.slow(f) refuses a lambda)
        return make(FAST), slow
    return wrap


def _sft(kind, fmt, prompts, skip_bad, data):
    read = lambda p: read_conversations([str(p)], format=fmt, skip_bad=skip_bad, prompts=prompts)  # noqa: E731
    if fmt is not None:  # a forced format may rightly refuse records of another
        data = bytes(data)
    holds(read, data, "." + kind, EMPTY + ("the YAML file holds a single value",))


SFT_ARGS = dict(fmt=st.sampled_from([None, None, None, *FORMATS]), prompts=st.booleans(), skip_bad=st.booleans())
NO_FLAGS = dict(fmt=None, prompts=False, skip_bad=False)
PC = '{"prompt": "hi", "completion": "hello"%s}'
LONE = r"\ud800"  # a lone surrogate as JSON writes it: valid JSON, not Unicode text

test_sft_jsonl, test_sft_jsonl_slow = fuzz(
    [dict(data=(PC % f', "{LONE}": 1').encode(), **NO_FLAGS),       # was: read, the key kept in meta
     dict(data=(PC % f', "system": "{LONE}"').encode(), **NO_FLAGS),  # was: read, kept in meta
     dict(data=("\n" + PC % "").encode(), fmt="chatterbot", prompts=True, skip_bad=True)],
    data=jsonl_file(SFT_RECORDS, VALID['sft']), **SFT_ARGS)(lambda data, fmt, prompts, skip_bad: _sft("jsonl", fmt, prompts, skip_bad, data))

test_sft_json, test_sft_json_slow = fuzz(
    [dict(data=f'[{PC % ""},\n {{"categories": ["{LONE}"]}}]'.encode(), **NO_FLAGS),
     dict(data=f'{{"categories": ["{LONE}"], "conversations": [["hi", "hello"]]}}'.encode(), **NO_FLAGS)],
    data=json_file(SFT_RECORDS, VALID['sft']), **SFT_ARGS)(lambda data, fmt, prompts, skip_bad: _sft("json", fmt, prompts, skip_bad, data))

test_sft_yaml, test_sft_yaml_slow = fuzz(
    [dict(data=b"[" * 100_000, **NO_FLAGS),                      # was: a segfault inside libyaml
     dict(data=b"- !!python/object:os.system x\n", **NO_FLAGS),  # was: a ConstructorError traceback
     dict(data=b"- ? [a]\n  : b\n", **NO_FLAGS),                 # was: a ConstructorError traceback
     dict(data=b"- prompt: 2001-02-30\n  completion: x\n", **NO_FLAGS),  # was: "a number of 4300 digits"
     dict(data=b"\x00[]\n", **NO_FLAGS),                         # was: no line number
     dict(data=b"{", **NO_FLAGS),                                # was: line 2 of a one-line file
     dict(data=b"- ?", **NO_FLAGS)],                             # a null key (-m slow found it)
    data=yaml_file(SFT_RECORDS, VALID['sft']), **SFT_ARGS)(lambda data, fmt, prompts, skip_bad: _sft("yaml", fmt, prompts, skip_bad, data))

test_preference_pairs, test_preference_pairs_slow = fuzz(
    [dict(data=f'{{"prompt": "a{LONE}", "chosen": "b", "rejected": "c"}}'.encode(), skip_bad=False)],  # was: read
    data=jsonl_file(PAIR_RECORDS, VALID['pairs']), skip_bad=st.booleans())(
    lambda data, skip_bad: holds(lambda p: read_pairs([str(p)], skip_bad), data, ".jsonl", EMPTY))

test_eval_task_file, test_eval_task_file_slow = fuzz(
    [dict(data=f'{{"prompt": "a{LONE}", "answer": "b"}}'.encode()),  # was: read
     dict(data=b'{"prompt": "a", "answer": NaN}')],                   # was: read, the answer "nan"
    data=jsonl_file(TASK_RECORDS, VALID['task']))(lambda data: holds(read_task_file, data, ".jsonl", EMPTY))

test_eval_prompt_file, test_eval_prompt_file_slow = fuzz(
    [dict(data=f'{{"prompt": [{{"role": "user", "content": "{LONE}"}}]}}'.encode())],  # was: read
    data=jsonl_file(PROMPT_RECORDS, VALID['prompt']))(
    lambda data: holds(lambda p: read_prompt_items(p, "prompt file"), data, ".jsonl", EMPTY))

test_eval_dialogue_file, test_eval_dialogue_file_slow = fuzz(
    [dict(data=('{"family": "arithmetic", "answers": ["4"], "messages": [{"role": "user", "content": "2+2"}, '
                f'{{"role": "assistant", "content": "4{LONE}"}}]}}').encode())],  # was: read
    data=jsonl_file(DIALOGUE_RECORDS, VALID['dialogue']))(
    lambda data: holds(lambda p: read_dialogue_items(p, "arithmetic", "held-out dialogues"), data, ".jsonl", EMPTY))

test_corpus_inputs, test_corpus_inputs_slow = fuzz(
    [dict(data=f'{{"text": "abc {LONE}"}}'.encode(), suffix=".jsonl")],  # was: read; `tokenizer train` crashed
    data=jsonl_file(TEXT_RECORDS, VALID['text']), suffix=st.sampled_from([".jsonl", ".txt", ".md"]))(
    lambda data, suffix: holds(lambda p: list(iter_input_documents([p])), data, suffix, EMPTY))


def _build(data):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "built"

        def build(p):
            try:
                return build_corpus(out, inputs=[p], sources=[], min_doc_chars=1)
            except UserError:  # a failed build writes nothing
                assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
                raise
        # a valid file may still clean to nothing ({"text": "\b"}: control characters are removed)
        holds(build, data, ".jsonl", EMPTY + ("the corpus is empty",), clean_refusals=("the corpus is empty",))


test_corpus_build, test_corpus_build_slow = fuzz(fast=30, data=jsonl_file(TEXT_RECORDS, VALID['text']))(_build)

LABELS = ["0", "1", "a", "b", "hello", "yes"]
LABELLED_FILE_LEVEL = EMPTY + ("every record has the label", "the records are", "file is empty")


def _labelled(data, suffix, train):
    holds(read_train if train else (lambda p: read_eval(p, LABELS)), data, suffix, LABELLED_FILE_LEVEL,
          clean_refusals=("every record has the label",))


test_labelled_jsonl, test_labelled_jsonl_slow = fuzz(
    [dict(data=f'{{"text": "a{LONE}", "label": "a"}}\n{{"text": "b", "label": "b"}}'.encode(), suffix=".jsonl",
          train=True)],  # was: read
    data=jsonl_file(LABELLED_RECORDS, VALID['labelled']), suffix=st.sampled_from([".jsonl", ".json"]), train=st.booleans())(_labelled)

test_labelled_csv, test_labelled_csv_slow = fuzz(
    delimiter=st.sampled_from([",", "\t"]), data=st.data(), train=st.booleans())(
    lambda delimiter, data, train: _labelled(data.draw(csv_file(delimiter)), ".csv" if delimiter == "," else ".tsv",
                                             train))

SQUAD = '{"data": [{"paragraphs": [{"context": "%s", "qas": [{"id": "q", "question": "q", "answers": []}]}]}]}'
test_squad, test_squad_slow = fuzz(
    [dict(data=b'{"data": ' + b"[" * 100_000),       # was: a RecursionError traceback
     dict(data=b'{"data": [%s]}' % (b"9" * 5000)),   # was: no line, Python's own message
     dict(data=(SQUAD % f"ab{LONE}").encode()),       # was: read
     dict(data=b"\xef\xbb\xbf{\n\xff}"),              # was: no line, the offset counted after the BOM
     dict(data=f'{{"data": [], "version": [["{LONE}"]]}}'.encode()),  # named by its JSON path
     dict(data=f'{{"data": [{{"\\n": "{LONE}"}}]}}'.encode())],       # a key with a newline: was two lines
    data=squad_file())(lambda data: holds(read_squad, data, ".json", EMPTY + ("not SQuAD JSON",)))

test_embed_inputs, test_embed_inputs_slow = fuzz(
    [dict(data=b"[" * 100_000, suffix=".jsonl"),            # was: a RecursionError traceback
     dict(data=f'{{"text": "a{LONE}"}}'.encode(), suffix=".jsonl"),  # was: read
     dict(data=b"ok\n\xef\xbb\xbf\x80", suffix=".txt")],     # was: no line number
    data=st.one_of(jsonl_file(TEXT_RECORDS, VALID['text']), text_file()), suffix=st.sampled_from([".jsonl", ".txt"]))(
    lambda data, suffix: holds(read_lines, data, suffix, EMPTY))


def test_embed_reads_json_strings_with_line_separators(tmp_path):
    """U+2028 may stand unescaped inside a JSON string; read_lines split lines at it (str.splitlines)
    and called the record invalid JSON. Lines end at \\n only, numbered as an editor shows them."""
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a\u2028b"}\r\n\n{"text": "c\x85d"}\n', encoding="utf-8")
    assert read_lines(f) == ["a\u2028b", "c\x85d"]
    t = tmp_path / "t.txt"
    t.write_bytes("\ufeffone\u2028still one\r\ntwo\n".encode())
    assert read_lines(t) == ["one\u2028still one", "two"]


# --------------------------------------------------------------------------- through the CLI

# One good record, then a hostile one on line 3 (after a blank line): exit 2 naming data:3.
GOOD = {"sft": PC % "", "reward": '{"prompt": "hi", "chosen": "a", "rejected": "b"}',
        "eval": '{"prompt": "What is 2 + 2?", "answer": "4"}', "classify": '{"text": "good", "label": "pos"}',
        "tokenizer": '{"text": "a long enough document about the sea"}', "embed": '{"text": "the sea"}',
        "qa": None}
GOOD["dpo"] = GOOD["reward"]
HOSTILE = {
    "lone surrogate": lambda good: good[:-1] + f', "x": "{LONE}"}}',
    "binary": lambda good: "\udcff\udcfe\x00\x01",  # written with surrogatepass: bytes no UTF-8 decoder takes
    "deep nesting": lambda good: "[" * 100_000 + "]" * 100_000,
    "wrong type": lambda good: re.sub(r'"[^"]*"}$', "[1, {}]}", good),
}


def _verbs(tmp_path, data, base_model, encoder_dir):
    out = tmp_path / "out"
    return {"sft": ("sft", "--data", data, "--init", base_model, "--out", out, "--max-steps", 1),
            "reward": ("reward", "--data", data, "--init", base_model, "--out", out, "--max-steps", 1),
            "dpo": ("dpo", "--data", data, "--init", base_model, "--out", out, "--max-steps", 1),
            "eval": ("eval", base_model, "--tasks", data, "--out", out),
            "classify": ("classify", "train", "--data", data, "--init", encoder_dir, "--out", out, "--max-steps", 1),
            "tokenizer": ("tokenizer", "train", "--input", data, "--vocab-size", 300, "--out", out),
            "embed": ("embed", encoder_dir, "--input", data, "--out", out / "v.npy")}


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("verb", ["sft", "reward", "dpo", "eval", "classify", "tokenizer", "embed"])
def test_cli_refuses_a_hostile_file_with_exit_2_and_leaves_no_output(verb, hostile, base_model, encoder_dir, tmp_path,
                                                                     capsys):
    good = GOOD[verb]
    if verb == "classify":
        good += "\n" + good.replace("good", "bad").replace("pos", "neg")
    data = tmp_path / "data.jsonl"
    data.write_bytes(encode(f"{good}\n\n{HOSTILE[hostile](GOOD[verb])}\n"))
    line = good.count("\n") + 3
    code = cli(*_verbs(tmp_path, data, base_model, encoder_dir)[verb])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and f"{data}:{line}: " in err, err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_cli_refuses_hostile_sft_yaml_and_squad(base_model, encoder_dir, tmp_path, capsys):
    y = tmp_path / "chat.yaml"
    for body in ("- prompt: hi\n  completion: hello\n- !!python/object:os.system x\n", "- " + "[" * 100_000):
        y.write_text(body)
        assert cli("sft", "--data", y, "--init", base_model, "--out", tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(rf"{re.escape(str(y))}:\d+: ", err), err
    q = tmp_path / "squad.json"
    q.write_text('{"data": ' + "[" * 100_000)
    assert cli("qa", "train", "--data", q, "--init", encoder_dir, "--out", tmp_path / "out", "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{q}:1: JSON nested too deeply" in err, err
    assert not (tmp_path / "out").exists()
