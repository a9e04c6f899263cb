"""Readers for supervised fine-tuning (SFT) dialogue files: every format people actually have,
turned into one normalised conversation per record.

A conversation is a ``list[dict]`` of ``{"role": "system"|"user"|"assistant", "content": str}``:
an optional leading system message, then user and assistant turns alternating, starting with
the user and ending with the assistant (the last assistant turn is what the model learns).

Formats, detected per record from its keys (``format=`` forces one for every record):

``messages``           OpenAI / TRL ``{"messages": [{"role", "content"}, ...]}``; content is a
                       string or a list of text parts ``[{"type": "text", "text": ...}]``
                       (joined with newlines); ``developer`` is read as ``system``.
``sharegpt``           ``{"conversations": [{"from": "human"|"gpt"|..., "value": ...}, ...]}``,
                       optional top-level ``"system"`` string.
``alpaca``             ``{"instruction", "input" (optional), "output"}``; user = instruction +
                       ``"\\n\\n" + input`` when input is not blank; optional ``"system"`` string
                       and ``"history": [[user, assistant], ...]`` of earlier turns.
``prompt_completion``  ``{"prompt": str, "completion": str}``, or TRL's conversational form
                       where both are message lists (concatenated).
``dialogue``           ``{"dialogue": ["user turn", "assistant turn", ...]}``, optional
                       ``"system"`` string.
``chatterbot``         a chatterbot-corpus file ``{categories: [...], conversations: [[...]]}``
                       (YAML, or JSON as ChatterBot exports it): each inner list is one
                       conversation, turns alternating user/assistant.

Turns inside ``messages``/``conversations``/``prompt``/``completion`` lists may use either
``role``/``content`` or ``from``/``value`` keys. Tool / function turns are rejected (chatsmith
trains on text turns only). Content is kept exactly as written; whitespace-only content counts
as empty.

Files: ``.jsonl`` (one record per line, blank lines skipped; ``.ndjson`` too), ``.json`` (an
array of records, one record, a chatterbot corpus, or JSON Lines under a ``.json`` name as
``datasets`` writes them), ``.yaml``/``.yml`` (a chatterbot corpus, a list of records or one
record). A leading UTF-8 byte order mark is ignored.

Each record is located as ``path:line`` (JSONL) or ``path:#index`` (JSON arrays, YAML items;
error messages add the line where it is known). A bad record raises :class:`UserError` naming
that location and the reason, unless ``skip_bad`` is set: then it is counted and skipped.
"""

from __future__ import annotations

import contextvars
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from chatsmith.data.corpus import check_file, json_line, lone_surrogate_at
from chatsmith.errors import UserError
from chatsmith.messages import ALIASES, ROLES, MessageError, check_messages
from chatsmith.tools.calls import check_tools

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "dialogue", "chatterbot")

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
YAML_SUFFIXES = (".yaml", ".yml")
SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + YAML_SUFFIXES

MAX_EXAMPLES = 5  # skipped-record messages kept in the report

# our roles, OpenAI's other names for them (messages.ALIASES) and ShareGPT's human / gpt
_ROLES = {**{r: r for r in ROLES}, **ALIASES, "human": "user", "gpt": "assistant"}
_TOOL_ROLES = {"tool", "function", "function_call", "observation", "ipython", "tool_call",
               "tool_response"}

_FORMAT_HELP = ('"messages" (OpenAI), "conversations" (ShareGPT), "instruction"/"output" '
                '(Alpaca), "prompt"/"completion" or "dialogue"')


@dataclass
class Record:
    messages: list[dict]  # normalised conversation
    source: str           # "path:line", or "path:#index" for JSON arrays / YAML items
    meta: dict            # extra top-level fields of the record (e.g. "family", "answers"), else {}


@dataclass
class ReadReport:
    """What :func:`read_conversations` read. ``records`` counts the records returned (after
    weights), ``skipped`` the bad records skipped. ``per_file[path]`` has ``read`` (good records
    in the file), ``skipped``, ``weight``, ``records`` (how many it contributes after its weight)
    and ``formats`` (good records per detected format)."""
    records: int = 0
    skipped: int = 0
    per_file: dict[str, dict] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)  # first few "path:line: reason"

    def summary(self) -> str:
        lines = []
        for path, st in self.per_file.items():
            fmts = ", ".join(f"{k} {v}" for k, v in sorted(st["formats"].items()))
            w = f" x{st['weight']:g} -> {st['records']}" if st["weight"] != 1 else ""
            sk = f", {st['skipped']} skipped" if st["skipped"] else ""
            lines.append(f"{path}: {st['read']} conversations ({fmts}){w}{sk}")
        lines.append(f"total: {self.records} conversations, {self.skipped} bad records skipped")
        return "\n".join(lines)


# --------------------------------------------------------------------------- data specs

# A weight: digits with an optional fraction and exponent (no inf/nan: those stay part of a path).
_WEIGHT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_data_spec(spec: str) -> tuple[str, float]:
    """'file.jsonl' -> (path, 1.0); 'file.jsonl:2.5' -> (path, 2.5).

    The weight is how many times each record of the file is used: its integer part repeats
    the whole file, its fractional part adds a deterministic seeded subsample. A suffix after
    the last ':' that is not a number (``C:\\data\\x.jsonl``), a one-letter drive (``C:2``), or
    a spec that names an existing file as a whole, is just a path. Raises UserError for a
    weight <= 0.
    """
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if (not sep or not head or len(head) == 1 and head.isalpha()
            or not _WEIGHT.fullmatch(tail) or Path(spec).exists()):
        return spec, 1.0
    weight = float(tail)
    if not (weight > 0 and math.isfinite(weight)):
        raise UserError(f"{spec}: invalid weight {tail!r}; a weight must be a number > 0 "
                        f"(2 uses every record twice, 0.5 a seeded half of them).")
    return head, weight


# --------------------------------------------------------------------------- bad records

class _Bad(Exception):
    """A bad record: the reason, and whether forcing a format might be the fix."""

    def __init__(self, reason: str, format_hint: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.format_hint = format_hint


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({json.dumps(v)})"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return f"a {type(v).__name__}"


def _wrong_type(where: str, want: str, v: Any, from_yaml: bool) -> _Bad:
    hint = ""
    if from_yaml and want.endswith("string") and (
            isinstance(v, (bool, int, float)) or type(v).__name__ in ("date", "datetime")):
        hint = " (YAML reads unquoted yes/no/numbers/dates as such; put the text in quotes)"
    return _Bad(f"{where} must be {want}, got {_type_name(v)}{hint}")


# --------------------------------------------------------------------------- turns

def _text(v: Any, where: str, from_yaml: bool, turn: dict | None = None) -> str:
    """A turn's content as a string: a string as is, or OpenAI text parts joined by newlines."""
    if isinstance(v, str):
        text = v
    elif isinstance(v, list):
        parts = []
        for j, p in enumerate(v):
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text":
                if not isinstance(p.get("text"), str):
                    raise _wrong_type(f'{where}[{j}]["text"]', "a string", p.get("text"),
                                      from_yaml)
                parts.append(p["text"])
            elif isinstance(p, dict):
                raise _Bad(f"{where}[{j}] is a {p.get('type')!r} content part; only text parts "
                           f"are supported (remove images/audio/files, or drop the record)")
            else:
                raise _wrong_type(f"{where}[{j}]", 'a text part {"type": "text", "text": ...}',
                                  p, from_yaml)
        text = "\n".join(parts)
    elif v is None and turn is not None and (turn.get("tool_calls") or turn.get("function_call")):
        raise _Bad(f"{where} is null and the turn makes tool calls; tool calling is not "
                   f"supported (chatsmith trains on text turns only): drop the record")
    else:
        raise _wrong_type(where, "a string", v, from_yaml)
    if not text.strip():
        raise _Bad(f"{where} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(f"{where} contains a lone surrogate (an invalid \\ud800-\\udfff escape)") \
            from None
    return text


def _turn(t: Any, where: str, from_yaml: bool) -> dict:
    """One turn object -> {"role", "content"}. Accepts role/content or from/value keys."""
    if not isinstance(t, dict):
        raise _wrong_type(where, 'an object with "role" and "content"', t, from_yaml)
    rkey = "role" if "role" in t else "from" if "from" in t else None
    ckey = "content" if "content" in t else "value" if "value" in t else None
    if rkey is None:
        raise _Bad(f'{where} has no "role" (or "from") field')
    role = t[rkey]
    if not isinstance(role, str):
        raise _wrong_type(f"{where}.{rkey}", "a string", role, from_yaml)
    norm = role.strip().lower()
    if norm in _TOOL_ROLES:
        raise _Bad(f"{where} is a {role!r} turn; tool/function turns are not supported "
                   f"(chatsmith trains on system/user/assistant text only): drop the record")
    if norm not in _ROLES:
        raise _Bad(f"{where} has unknown role {role!r}; expected one of system, user, "
                   f"assistant (or ShareGPT's human, gpt)")
    if ckey is None:
        raise _Bad(f'{where} has no "content" (or "value") field')
    return {"role": _ROLES[norm], "content": _text(t[ckey], f"{where}.{ckey}", from_yaml, t)}


def _turn_list(v: Any, name: str, from_yaml: bool) -> tuple[list[dict], list[str]]:
    if not isinstance(v, list):
        raise _wrong_type(f'"{name}"', "a list of turns", v, from_yaml)
    msgs, wheres = [], []
    for i, t in enumerate(v):
        wheres.append(f"{name}[{i}]")
        msgs.append(_turn(t, wheres[-1], from_yaml))
    return msgs, wheres


def _string_turns(v: Any, name: str, from_yaml: bool) -> tuple[list[dict], list[str]]:
    """A list of plain strings alternating user/assistant, starting with the user."""
    if not isinstance(v, list):
        raise _wrong_type(f'"{name}"', "a list of strings", v, from_yaml)
    msgs, wheres = [], []
    for i, t in enumerate(v):
        wheres.append(f"{name}[{i}]")
        if t is None:
            raise _Bad(f"{wheres[-1]} is empty (null)")
        msgs.append({"role": "user" if i % 2 == 0 else "assistant",
                     "content": _text_strict(t, wheres[-1], from_yaml)})
    return msgs, wheres


def _text_strict(v: Any, where: str, from_yaml: bool) -> str:
    """A plain string field (no content-part lists)."""
    if not isinstance(v, str):
        raise _wrong_type(where, "a string", v, from_yaml)
    return _text(v, where, from_yaml)


def _with_system(rec: dict, msgs: list[dict], wheres: list[str], from_yaml: bool) -> None:
    """Prepend an optional top-level "system" string (blank or null means none)."""
    s = rec.get("system")
    if s is None or isinstance(s, str) and not s.strip():
        return
    if not isinstance(s, str):
        raise _wrong_type('"system"', "a string", s, from_yaml)
    if msgs and msgs[0]["role"] == "system":
        raise _Bad(f'the record has both a "system" field and a system message in {wheres[0]}; '
                   f"keep one")
    msgs.insert(0, {"role": "system", "content": s})
    wheres.insert(0, '"system"')


# Set while reading prompts for RL (read_conversations(..., prompts=True)): a conversation may then
# end with the user turn the policy is to answer, with or without earlier assistant turns.
_PROMPTS_OK = contextvars.ContextVar("prompts_ok", default=False)


def _check(msgs: list[dict], wheres: list[str]) -> list[dict]:
    """[system] user assistant user assistant ... : the structure SFT needs."""
    if not msgs:
        raise _Bad("the conversation has no turns")
    for k in range(1, len(msgs)):
        if msgs[k]["role"] == "system":
            raise _Bad(f"{wheres[k]} is a system message; only the first turn may be one")
    start = 1 if msgs[0]["role"] == "system" else 0
    if start == len(msgs):
        raise _Bad("the conversation has only a system message, no user or assistant turns")
    prompts_ok = _PROMPTS_OK.get()
    if not prompts_ok and not any(m["role"] == "assistant" for m in msgs):
        raise _Bad("the conversation has no assistant turn: nothing for the model to learn")
    if msgs[start]["role"] != "user":
        raise _Bad(f"{wheres[start]} is an assistant turn, but a conversation must start with "
                   f"a user turn (after an optional system message)")
    for k in range(start + 1, len(msgs)):
        if msgs[k]["role"] == msgs[k - 1]["role"]:
            raise _Bad(f"{wheres[k - 1]} and {wheres[k]} are consecutive {msgs[k]['role']} "
                       f"turns; turns must alternate user/assistant (merge them or fix the "
                       f"roles)")
    if msgs[-1]["role"] != "assistant" and not prompts_ok:
        raise _Bad(f"the last turn, {wheres[-1]}, is a user turn: nothing for the model to "
                   f"learn after it (drop it or add the assistant's reply)")
    return msgs


# --------------------------------------------------------------------------- formats

def _need(rec: dict, key: str, fmt: str) -> Any:
    if key not in rec:
        hint = ""
        if fmt == "prompt_completion" and key == "completion" and "chosen" in rec:
            hint = (' (it has "chosen"/"rejected": a preference pair, which trains the reward '
                    "model or DPO, not SFT)")
        raise _Bad(f'the record has no "{key}" field, which the {fmt} format needs{hint}',
                   format_hint=True)
    return rec[key]


def _meta(rec: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in rec.items() if k not in used}


def _read_messages(rec: dict, y: bool) -> tuple[list[dict], dict]:
    raw = _need(rec, "messages", "messages")
    if "tools" in rec or isinstance(raw, list) and any(
            isinstance(t, dict) and (t.get("role") == "tool" or t.get("tool_calls")) for t in raw):
        return _read_tool_messages(rec, raw)
    msgs, wheres = _turn_list(raw, "messages", y)
    return _check(msgs, wheres), _meta(rec, ("messages",))


def _read_tool_messages(rec: dict, raw) -> tuple[list[dict], dict]:
    """OpenAI's fine-tuning format for function calling: "tools" beside "messages", assistant
    turns with "tool_calls", "tool" turns with the results. Each tool turn answers a call made
    before it; without the calls and their results the turns alternate as `_check` wants."""
    try:
        msgs = check_messages(raw, "messages", null_assistant=True, tools=True)
        meta = _meta(rec, ("messages",))
        if rec.get("tools") is not None:
            meta["tools"] = check_tools(rec["tools"])
    except MessageError as e:
        raise _Bad(str(e)) from None
    for i, m in enumerate(msgs):
        if m["role"] == "tool" and msgs[i - 1]["role"] not in ("tool", "assistant") or \
                m["role"] == "tool" and msgs[i - 1]["role"] == "assistant" and not msgs[i - 1].get("tool_calls"):
            raise _Bad(f"messages[{i}] is a tool turn that does not follow the assistant's tool calls")
    keep = [i for i, m in enumerate(msgs) if m["role"] != "tool" and not m.get("tool_calls")]
    _check([msgs[i] for i in keep], [f"messages[{i}]" for i in keep])
    if msgs[-1]["role"] != "assistant" and not _PROMPTS_OK.get():
        raise _Bad(f"the last turn, messages[{len(msgs) - 1}], is not the assistant's: nothing to learn after it")
    return msgs, meta


def _read_sharegpt(rec: dict, y: bool) -> tuple[list[dict], dict]:
    msgs, wheres = _turn_list(_need(rec, "conversations", "sharegpt"), "conversations", y)
    _with_system(rec, msgs, wheres, y)
    return _check(msgs, wheres), _meta(rec, ("conversations", "system"))


def _read_alpaca(rec: dict, y: bool) -> tuple[list[dict], dict]:
    instruction = _text_strict(_need(rec, "instruction", "alpaca"), '"instruction"', y)
    output = _text_strict(_need(rec, "output", "alpaca"), '"output"', y)
    inp = rec.get("input")
    if inp is not None and not isinstance(inp, str):
        raise _wrong_type('"input"', "a string", inp, y)
    msgs, wheres = [], []
    history = rec.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _wrong_type('"history"', "a list of [user, assistant] pairs", history, y)
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _wrong_type(f'"history"[{i}]', "a [user, assistant] pair", pair, y)
            for j, role in enumerate(("user", "assistant")):
                wheres.append(f'"history"[{i}][{j}]')
                msgs.append({"role": role, "content": _text_strict(pair[j], wheres[-1], y)})
    user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    wheres += ['"instruction"', '"output"']
    _with_system(rec, msgs, wheres, y)
    return _check(msgs, wheres), _meta(rec, ("instruction", "input", "output", "system",
                                             "history"))


def _read_prompt_completion(rec: dict, y: bool) -> tuple[list[dict], dict]:
    msgs, wheres = [], []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        v = _need(rec, key, "prompt_completion")
        if isinstance(v, list):  # TRL conversational: a list of messages
            m, w = _turn_list(v, key, y)
        else:
            m, w = [{"role": role, "content": _text_strict(v, f'"{key}"', y)}], [f'"{key}"']
        msgs += m
        wheres += w
    return _check(msgs, wheres), _meta(rec, ("prompt", "completion"))


def _read_dialogue(rec: dict, y: bool) -> tuple[list[dict], dict]:
    msgs, wheres = _string_turns(_need(rec, "dialogue", "dialogue"), "dialogue", y)
    _with_system(rec, msgs, wheres, y)
    return _check(msgs, wheres), _meta(rec, ("dialogue", "system"))


_READERS: dict[str, Callable[[dict, bool], tuple[list[dict], dict]]] = {
    "messages": _read_messages, "sharegpt": _read_sharegpt, "alpaca": _read_alpaca,
    "prompt_completion": _read_prompt_completion, "dialogue": _read_dialogue}

# Detection order: the first format whose key the record has wins; the other keys become meta
# (ultrachat has both "prompt" and "messages").
_DETECT = (("messages", ("messages",)), ("sharegpt", ("conversations",)),
           ("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion")),
           ("dialogue", ("dialogue",)))


def _detect(rec: dict) -> str:
    for fmt, keys in _DETECT:
        if any(k in rec for k in keys):
            return fmt
    if not rec:
        raise _Bad("the record is an empty object", format_hint=True)
    keys = ", ".join(json.dumps(str(k)) for k in list(rec)[:8]) + (", ..." if len(rec) > 8 else "")
    if set(rec) & {"chosen", "rejected"}:
        what = ("it looks like a preference pair (chosen/rejected), which trains the reward "
                "model or DPO, not SFT")
    elif "text" in rec:
        what = ('a bare "text" field is pretraining text (chatsmith pretrain), not a '
                "conversation")
    else:
        what = f"expected {_FORMAT_HELP}"
    raise _Bad(f"its keys ({keys}) match no known chat format: {what}", format_hint=True)


# --------------------------------------------------------------------------- files

@dataclass
class _Item:
    source: str                  # "path:line" or "path:#index"
    loc: str                     # source, plus "(line N)" where that helps
    value: Any = None
    from_yaml: bool = False
    corpus_meta: dict | None = None  # set for a conversation of a chatterbot corpus file
    error: str | None = None     # the record could not even be parsed (a bad JSONL line)


def _read_text(name: str, path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{name}: cannot read the file ({e.strerror or e}).") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{name}:{line}: the file is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at byte "
            f"offset {e.start}). Chat data files must be UTF-8; convert it first, e.g. "
            f"`iconv -f latin1 -t utf-8 {name} > fixed{path.suffix}`.") from None
    return text[1:] if text.startswith("\ufeff") else text


def _jsonl_items(name: str, text: str) -> Iterator[_Item]:
    # Split on "\n" only: str.splitlines() would also split at U+2028 etc., which JSON
    # strings may hold unescaped.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        src = f"{name}:{lineno}"
        try:
            yield _Item(src, src, json_line(line))
        except ValueError as e:
            hint = ""
            if line.strip() in ("[", "{"):
                hint = ("; the file looks like pretty-printed JSON: name it .json, or write one "
                        "record per line")
            yield _Item(src, src, error=f"{e}{hint}")


def _is_corpus(obj: Any) -> bool:
    """A chatterbot corpus: {categories: [...], conversations: [[turn, ...], ...]}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        return False
    convs = obj["conversations"]
    return "categories" in obj or bool(convs) and all(isinstance(c, list) for c in convs)


def _json_items(name: str, text: str, forced: str | None) -> Iterator[_Item]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON Lines under a .json name
            yield from _jsonl_items(name, text)
            return
        raise UserError(f"{name}:{e.lineno}: not valid JSON ({e.msg} at line {e.lineno} column "
                        f"{e.colno}). A .json chat file holds one JSON array of records (or "
                        f"one record); use .jsonl for one record per line.") from None
    except (ValueError, RecursionError):  # a number of more than 4300 digits, or nesting too deep
        m = re.search(r"\d{4301,}", text)
        if m is None:
            raise UserError(f"{name}:1: JSON nested too deeply to read") from None
        raise UserError(f"{name}:{text.count(chr(10), 0, m.start()) + 1}: a number of more than 4300 digits, "
                        f"which chatsmith does not read") from None
    if forced in (None, "chatterbot") and _is_corpus(obj):
        meta = _meta(obj, ("conversations",))
        for i, conv in enumerate(obj["conversations"]):
            yield _Item(f"{name}:#{i}", f"{name}:#{i}", conv, corpus_meta=meta)
    elif isinstance(obj, list):
        # Lines of the items, for messages: re-scan the (valid) array with raw_decode.
        dec, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
        pos = ws.match(text, ws.match(text, 0).end() + 1).end()  # past "[" and blanks
        line, counted = 1, 0
        for i, item in enumerate(obj):
            line += text.count("\n", counted, pos)
            counted = pos
            src = f"{name}:#{i}"
            yield _Item(src, f"{src} (line {line})", item)
            _, end = dec.raw_decode(text, pos)
            pos = ws.match(text, end).end() + 1  # past ","
            pos = ws.match(text, pos).end()
    else:
        yield _Item(f"{name}:#0", f"{name}:#0", obj)


def _yaml_line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


# Deeper than any record needs. libyaml composes nodes by C recursion, so a file of 100,000 "["
# overflows the C stack (a segfault, no exception to catch); the event stream it parses first is
# flat, so the depth is checked on it before any node is built.
MAX_YAML_DEPTH = 100
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_yaml_depth(name: str, text: str) -> None:
    depth = 0
    for ev in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise UserError(f"{name}:{ev.start_mark.line + 1}: YAML nested more than {MAX_YAML_DEPTH} "
                                f"levels deep, which chatsmith does not read")
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1


def _yaml_error(name: str, text: str, e: yaml.YAMLError) -> UserError:
    """A YAML error as a UserError at its line (clamped to the file: libyaml may point one past
    the end for a file cut short)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(getattr(e, "position", None), int):  # a ReaderError: a control character
        line = text.count("\n", 0, e.position) + 1
    else:
        line = None
    if line is not None:
        line = min(line, max(1, text.count("\n") + (not text.endswith("\n"))))
    what = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
    return UserError(f"{name}{f':{line}' if line else ''}: not valid YAML ({what}). A .yaml chat file holds "
                     f"a chatterbot corpus (categories:, conversations:) or a list of records.")


def _yaml_items(name: str, text: str, forced: str | None) -> Iterator[_Item]:
    try:
        _check_yaml_depth(name, text)
        loader = _YAML_LOADER(text)
    except yaml.YAMLError as e:
        raise _yaml_error(name, text, e) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as e:
            raise _yaml_error(name, text, e) from None

        def build(node: yaml.Node) -> Any:
            try:
                return loader.construct_document(node)
            except yaml.YAMLError as e:  # an unknown tag (!!python/object), an unhashable key
                raise _yaml_error(name, text, e) from None
            except RecursionError:
                raise UserError(f"{name}:{_yaml_line(node)}: YAML nested too deeply to read") from None
            except ValueError as e:
                if "digits" in str(e):
                    raise UserError(f"{name}:{_yaml_line(node)}: a number of more than 4300 digits, which "
                                    f"chatsmith does not read") from None
                # a timestamp that is no date (2001-02-30), an !!int or !!float that is no number
                raise UserError(f"{name}:{_yaml_line(node)}: a YAML value chatsmith cannot read ({e}); "
                                f"put text in quotes") from None

        def turns(node: yaml.Node) -> Any:
            # Chatterbot turns keep the text as written: PyYAML would read `yes` as True and
            # `4` as an int, and a reply of "yes" is text.
            if not isinstance(node, yaml.SequenceNode):
                return build(node)
            return [None if isinstance(n, yaml.ScalarNode) and n.tag.endswith(":null")
                    else n.value if isinstance(n, yaml.ScalarNode) else build(n)
                    for n in node.value]

        if root is None:
            return
        if isinstance(root, yaml.MappingNode):
            keys = {k.value: v for k, v in root.value if isinstance(k, yaml.ScalarNode)}
            convs = keys.get("conversations")
            corpus = forced in (None, "chatterbot") and isinstance(convs, yaml.SequenceNode) and (
                "categories" in keys
                or bool(convs.value) and all(isinstance(c, yaml.SequenceNode) for c in convs.value))
            if corpus:
                meta = {k: build(v) for k, v in keys.items() if k != "conversations"}
                for i, conv in enumerate(convs.value):
                    yield _Item(f"{name}:#{i}", f"{name}:#{i} (line {_yaml_line(conv)})",
                                turns(conv), True, meta)
            else:
                yield _Item(f"{name}:#0", f"{name}:#0 (line {_yaml_line(root)})", build(root),
                            True)
        elif isinstance(root, yaml.SequenceNode):
            for i, node in enumerate(root.value):
                value = turns(node) if forced == "chatterbot" else build(node)
                yield _Item(f"{name}:#{i}", f"{name}:#{i} (line {_yaml_line(node)})", value, True)
        else:
            raise UserError(f"{name}: the YAML file holds a single value, not records. A .yaml "
                            f"chat file holds a chatterbot corpus (categories:, conversations:) "
                            f"or a list of records.")
    finally:
        loader.dispose()


def _convert(item: _Item, forced: str | None) -> tuple[str, list[dict], dict]:
    """(format, messages, meta) of one record, or _Bad."""
    if item.error is not None:
        raise _Bad(item.error)
    v, y = item.value, item.from_yaml
    bad = lone_surrogate_at(v) or lone_surrogate_at(item.corpus_meta)  # a .json file's record (JSONL lines are checked as they are parsed)
    if bad is not None:
        raise _Bad(f"{bad} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                   f"Unicode text")
    if item.corpus_meta is not None or forced == "chatterbot":
        if not isinstance(v, list):
            raise _wrong_type("a chatterbot conversation", "a list of turns (strings)", v, y)
        msgs, wheres = _string_turns(v, "conversation", y)
        return "chatterbot", _check(msgs, wheres), dict(item.corpus_meta or {})
    if not isinstance(v, dict):
        hint = " (a bare list of turns is the chatterbot format: --format chatterbot)" \
            if isinstance(v, list) else ""
        raise _Bad(f"the record is {_type_name(v)}, not an object{hint}")
    fmt = forced or _detect(v)
    msgs, meta = _READERS[fmt](v, y)
    return fmt, msgs, meta


def _check_paths(weighted: list[tuple[str, float]]) -> None:
    """Every file must exist and have a known type before any is read."""
    for name, _ in weighted:
        p = Path(name)
        if not p.exists():
            raise UserError(f"{name}: no such file. Pass chat data files "
                            f"({', '.join(SUFFIXES)}), optionally with a weight: FILE:2.")
        if p.is_dir():
            raise UserError(f"{name}: is a folder; pass the chat data files in it instead "
                            f"({', '.join(SUFFIXES)}).")
        check_file(p, "chat data file")
        if p.suffix.lower() not in SUFFIXES:
            raise UserError(f"{name}: unsupported file type {p.suffix or '(no extension)'!r}. "
                            f"Chat data is .jsonl (one record per line), .json (an array of "
                            f"records) or .yaml/.yml (a chatterbot corpus or a list of records).")


def _copy(r: Record) -> Record:
    return Record([dict(m) for m in r.messages], r.source, dict(r.meta))


def _weighted(records: list[Record], weight: float, seed: int, name: str) -> list[Record]:
    """Each record int(weight) times, plus a seeded sample of round(frac(weight) * n) of them
    (at least one when the weight is below 1, so a weighted file never silently vanishes).
    Repeats are copies, so a caller may edit one without touching the others."""
    whole, frac = int(weight), weight - int(weight)
    out = [r if rep == 0 else _copy(r) for rep in range(whole) for r in records]
    k = math.floor(frac * len(records) + 0.5)
    if whole == 0:
        k = max(k, 1)
    if k:
        rng = random.Random(f"chatsmith-sft-sample:{seed}:{name}")
        pick = sorted(rng.sample(range(len(records)), k))
        out += [records[i] if whole == 0 else _copy(records[i]) for i in pick]
    return out


def read_conversations(specs: list[str], format: str | None = None, skip_bad: bool = False,
                       seed: int = 0, prompts: bool = False) -> tuple[list[Record], ReadReport]:
    """Read SFT conversations from files given as ``path`` or ``path:weight``.

    ``format`` forces one of :data:`FORMATS` for every record of every file (default: detected
    per record). A bad record raises UserError naming ``path:line`` and the reason; with
    ``skip_bad`` it is counted and skipped instead (the report keeps the first few reasons).
    A file without a single good record is a UserError either way. Records come back in file
    order, each file's records repeated/subsampled by its weight (``seed`` picks the sample).
    With ``prompts`` a conversation may end with a user turn (prompts for RL rollouts).
    """
    token = _PROMPTS_OK.set(prompts)
    try:
        return _read_conversations(specs, format, skip_bad, seed)
    finally:
        _PROMPTS_OK.reset(token)


def _read_conversations(specs: list[str], format: str | None, skip_bad: bool,
                        seed: int) -> tuple[list[Record], ReadReport]:
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown chat data format {format!r}; choose one of "
                        f"{', '.join(FORMATS)} (or leave it out to detect each record's format).")
    if isinstance(specs, (str, Path)):
        specs = [specs]
    if not specs:
        raise UserError("no chat data files given; pass one or more .jsonl/.json/.yaml files.")
    weighted = [parse_data_spec(s) for s in specs]
    _check_paths(weighted)

    records: list[Record] = []
    report = ReadReport()
    for name, weight in weighted:
        path = Path(name)
        text = _read_text(name, path)
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            items = _jsonl_items(name, text)
        elif suffix in JSON_SUFFIXES:
            items = _json_items(name, text, format)
        else:
            items = _yaml_items(name, text, format)

        good: list[Record] = []
        formats: dict[str, int] = {}
        skipped, first_bad = 0, None
        for item in items:
            try:
                fmt, msgs, meta = _convert(item, format)
            except _Bad as bad:
                msg = f"{item.loc}: {bad.reason}"
                if not skip_bad:
                    fix = "Fix the record, or pass --skip-bad to skip bad records"
                    if bad.format_hint and format:
                        fix += f", or check --format {format}"
                    elif bad.format_hint:
                        fix += (f", or --format NAME to read every record as one format "
                                f"({', '.join(FORMATS)})")
                    raise UserError(f"{msg}. {fix}.") from None
                skipped += 1
                first_bad = first_bad or msg
                if len(report.skipped_examples) < MAX_EXAMPLES:
                    report.skipped_examples.append(msg)
                continue
            formats[fmt] = formats.get(fmt, 0) + 1
            good.append(Record(msgs, item.source, meta))

        if not good:
            why = (f"all {skipped} records are bad (first: {first_bad})" if skipped
                   else "the file holds no records")
            raise UserError(f"{name}: no usable conversations: {why}.")
        used = _weighted(good, weight, seed, name)
        key = name
        n = 2
        while key in report.per_file:  # the same file listed twice
            key, n = f"{name} [{n}]", n + 1
        report.per_file[key] = {"read": len(good), "skipped": skipped, "weight": weight,
                                "records": len(used), "formats": formats}
        report.records += len(used)
        report.skipped += skipped
        records += used
    return records, report
