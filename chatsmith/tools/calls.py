"""Tool definitions, tool choices and tool calls: validated from OpenAI's shapes, rendered into a
model's text and parsed back out of it.

A call is written inside the assistant's turn between two markers, as one JSON object
{"name": ..., "arguments": {...}}. chatsmith's own template uses reserved special tokens as the
markers (single tokens a user's text can never produce); an imported ChatML model (SmolLM2) has
no tool support in its template, so it gets the convention Hermes / Qwen2.5 popularised:
<tool_call>…</tool_call> in the assistant's text, definitions in <tools>…</tools> in the system
turn, results in a turn of role "tool".

Arguments that are not valid JSON, or do not match the function's schema, are passed through as
the model wrote them (a string in `function.arguments`), as OpenAI's API does: the caller checks
them. `check_arguments` is there for callers that execute tools themselves.
"""

from __future__ import annotations

import json
import re

import jsonschema

from chatsmith.messages import MessageError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128


class Markers:
    """Where a model's tool calls and results sit in its text: a call between call_start and
    call_end; a result run inside generation between result_open (the assistant's turn ends, a
    tool turn begins) and result_close (the tool turn ends, the assistant's next turn begins)."""

    def __init__(self, call_start: str, call_end: str, result_open: str, result_close: str):
        self.call_start, self.call_end = call_start, call_end
        self.result_open, self.result_close = result_open, result_close


# chatsmith's template: <|reserved_0|> / <|reserved_1|> around a call; <|reserved_2|> / <|reserved_3|>
# around a tool result (a turn of its own); <|reserved_4|> / <|reserved_5|> around the definitions
RESULT_START, RESULT_END, TOOLS_START, TOOLS_END = "<|reserved_2|>", "<|reserved_3|>", "<|reserved_4|>", "<|reserved_5|>"
NATIVE = Markers("<|reserved_0|>", "<|reserved_1|>", "<|assistant_end|>" + RESULT_START,
                 RESULT_END + "<|assistant_start|>")
CHATML = Markers("<tool_call>", "</tool_call>", "<|im_end|>\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")


def check_tools(tools, field: str = "tools") -> list[dict]:
    """OpenAI `tools` -> the list of {"type": "function", "function": {name, description?,
    parameters}}; MessageError names the bad field (a missing name, a schema that is not one)."""
    if not isinstance(tools, list):
        raise MessageError(field, "must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise MessageError(field, f"holds more than {MAX_TOOLS} tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise MessageError(f"{where}.type", "must be 'function'")
        f = t.get("function")
        if not isinstance(f, dict):
            raise MessageError(f"{where}.function", "must be an object")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise MessageError(f"{where}.function.name", "must be a string of 1-64 letters, digits, _ or -")
        if name in names:
            raise MessageError(f"{where}.function.name", f"repeats the tool name {name!r}")
        names.add(name)
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise MessageError(f"{where}.function.description", "must be a string")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise MessageError(f"{where}.function.parameters", "must be a JSON Schema object")
        try:
            jsonschema.validators.validator_for(params).check_schema(params)
        except jsonschema.SchemaError as e:
            raise MessageError(f"{where}.function.parameters", f"is not a valid JSON Schema: {e.message[:200]}") \
                from None
        except RecursionError:  # a schema nested as deep as JSON allows
            raise MessageError(f"{where}.function.parameters", "nests too deep") from None
        fn = {"name": name, **({"description": desc} if desc else {}), "parameters": params}
        out.append({"type": "function", "function": fn})
    return out


def check_tool_choice(choice, tools: list[dict], field: str = "tool_choice") -> str:
    """-> "none" | "auto" | "required" | a function's name (which must be one of `tools`)."""
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise MessageError(field, "'required' needs 'tools'")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise MessageError(f"{field}.function.name", f"names no tool in 'tools': {name!r}")
        return name
    raise MessageError(field, "must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                              "\"function\": {\"name\": ...}}")


def call_body(name: str, arguments: str) -> str:
    """A call as the model writes it. `arguments` is OpenAI's JSON string; when it parses, it is
    nested as an object (what the model learns to write), else kept as the string it is."""
    try:
        args = json.loads(arguments)
    except (TypeError, ValueError):
        args = arguments
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def normal_arguments(arguments: str) -> str:
    """OpenAI arguments as `parse_calls` gives them back after `call_body` (JSON re-serialised)."""
    args = json.loads(call_body("x", arguments))["arguments"]
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def parse_call(body: str) -> tuple[str, str]:
    """What the model wrote between the markers -> (name, arguments as a JSON string). A body that
    is not {"name", "arguments"} JSON still is a call: name "" and the raw text as arguments, so
    the caller sees what was emitted instead of losing it."""
    try:
        d = json.loads(body)
    except ValueError:
        name = re.search(r'"name"\s*:\s*"([^"]*)"', body)
        if name is None:
            return "", body.strip()
        args = re.search(r'"arguments"\s*:\s*(.*)', body, re.S)
        a = args.group(1).strip() if args else ""
        if a.endswith("}") and a.count("{") < a.count("}"):  # the call object's own closing brace
            a = a[:-1].rstrip()
        return name.group(1), a
    if not isinstance(d, dict):
        return "", body.strip()
    name = d.get("name") if isinstance(d.get("name"), str) else ""
    args = d.get("arguments", d.get("parameters", {}))
    return name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def parse_calls(text: str, m: Markers) -> tuple[str, list[tuple[str, str]]]:
    """A reply -> (its content before the first call, [(name, arguments)]). A call whose end marker
    never came (the reply ran out of tokens) is still returned, with what was written of it."""
    first = text.find(m.call_start)
    if first < 0:
        return text, []
    content, calls, pos = text[:first], [], first
    while pos >= 0:
        a = pos + len(m.call_start)
        b = text.find(m.call_end, a)
        calls.append(parse_call(text[a:] if b < 0 else text[a:b]))
        if b < 0:
            break
        pos = text.find(m.call_start, b)
    return content.rstrip() if calls else content, calls


def split_reply(text: str, m: Markers) -> tuple[str, list[tuple[str, str, str]], list[tuple[str, str]], bool]:
    """A reply as generated (tools run inside generation leave their results in it) -> (content:
    the text outside calls and results, steps: (name, arguments, result) of the calls that were
    run inside generation, calls: (name, arguments) of those left for the client, open: the text
    ends inside a call or a result, so more of it may still change what it means)."""
    content, steps, calls, pos = [], [], [], 0
    while True:
        a = text.find(m.call_start, pos)
        if a < 0:
            content.append(text[pos:])
            return "".join(content), steps, calls, False
        content.append(text[pos:a])
        b = text.find(m.call_end, a)
        if b < 0:
            calls.append(parse_call(text[a + len(m.call_start):]))
            return "".join(content), steps, calls, True
        call, pos = parse_call(text[a + len(m.call_start):b]), b + len(m.call_end)
        if text.startswith(m.result_open, pos):
            c = text.find(m.result_close, pos + len(m.result_open))
            if c < 0:
                steps.append((*call, text[pos + len(m.result_open):]))
                return "".join(content), steps, calls, True
            steps.append((*call, text[pos + len(m.result_open):c]))
            pos = c + len(m.result_close)
        else:
            calls.append(call)
            if not text[pos:] or m.result_open.startswith(text[pos:]):  # a result may still be on its way
                return "".join(content), steps, calls, True


def reply_messages(text: str, m: Markers) -> list[dict]:
    """A reply with calls run inside generation -> the OpenAI messages it stands for: per call an
    assistant turn with `tool_calls` and a tool turn with the result, then the final assistant
    turn (calls left unanswered stay on the last assistant turn)."""
    out, n = [], 0
    segments = text.split(m.result_close)
    for seg in segments[:-1]:
        head, _, result = seg.rpartition(m.result_open)
        content, calls = parse_calls(head, m)
        ids = [f"call_{n + i}" for i in range(len(calls))]
        n += len(calls)
        out.append({"role": "assistant", "content": content, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": a, "arguments": b}} for i, (a, b) in zip(ids, calls)]})
        out.append({"role": "tool", "tool_call_id": ids[-1] if ids else "", "content": result})
    content, calls = parse_calls(segments[-1], m)
    last = {"role": "assistant", "content": content}
    if calls:
        last["tool_calls"] = [{"id": f"call_{n + i}", "type": "function", "function": {"name": a, "arguments": b}}
                              for i, (a, b) in enumerate(calls)]
    return out + [last]


def check_arguments(tool: dict, arguments: str) -> str | None:
    """None when `arguments` is JSON matching the tool's parameters, else what is wrong."""
    try:
        args = json.loads(arguments)
    except ValueError as e:
        return f"arguments are not valid JSON: {e}"
    err = jsonschema.validators.validator_for(tool["function"]["parameters"])(tool["function"]["parameters"])
    problems = [e.message for e in err.iter_errors(args)]
    return f"arguments do not match the schema: {problems[0][:200]}" if problems else None


__all__ = ["Markers", "NATIVE", "CHATML", "RESULT_START", "RESULT_END", "TOOLS_START", "TOOLS_END", "check_tools",
           "check_tool_choice", "call_body", "normal_arguments", "parse_call", "parse_calls", "split_reply", "reply_messages", "check_arguments"]
