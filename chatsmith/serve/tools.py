"""Function calling in /v1/chat/completions: the request's `tools`, `tool_choice` and
`parallel_tool_calls` checked (MessageError, which `protocol` turns into a 400 naming the field),
and a reply's text turned into OpenAI's message (`content` + `tool_calls`) or streamed deltas.

Decisions where OpenAI's API leaves room:
- `tool_choice` "required" and a named function are enforced by starting the assistant's reply
  with the call marker (and, for a name, `{"name": NAME, "arguments": `), so the model's first
  tokens are a call; "none" bans the call marker when it is one token (chatsmith's template) and
  otherwise returns whatever the model wrote as content. Arguments are not constrained to the
  schema: as with OpenAI's API, `function.arguments` is the model's text, which may not parse.
- Tools the server runs itself (`serve --tools calculator`) are offered to the model beside the
  client's (a client tool of the same name wins, and is returned to the client). Their calls run
  inside generation; the reply carries them in the extra field `server_tool_calls`
  ([{"name", "arguments", "result"}], ignored by OpenAI clients), and `content` is the text the
  model wrote around them.
- Streaming: content streams as it is decoded (held back while it could be the start of a call
  marker); each tool call is sent when the reply ends, as OpenAI's API does it: a first delta
  with index, id, type and name and empty arguments, then the arguments in fragments.
"""

from __future__ import annotations

import dataclasses
import secrets

from chatsmith.messages import MessageError
from chatsmith.tools import calls as toolcalls
from chatsmith.tools.inline import ToolRunner
from chatsmith.tools.stream import ReplyStream

FRAGMENT = 32  # characters of arguments per streamed delta


@dataclasses.dataclass
class Tools:
    """A request's tool setup."""

    defs: list[dict]  # every tool the model is shown (the client's, then the server's)
    choice: str  # none | auto | required | a function's name
    parallel: bool
    markers: toolcalls.Markers
    prefix: str  # text that starts the assistant's reply (required / named choice)
    runner: ToolRunner | None  # the server's tools, run inside generation

    def hook(self):
        """SamplingParams.tool_hook: a fresh runner per sampled sequence."""
        return self.runner.fork if self.runner is not None else None

    def ban(self, tok) -> dict[int, float] | None:
        """tool_choice none: the call marker's logit at -100 when the marker is one token."""
        ids = tok.encode(self.markers.call_start, special=True) if self.choice == "none" else []
        return {ids[0]: -100.0} if len(ids) == 1 else None


def parse_tools(body: dict, tok, builtin: dict) -> Tools | None:
    """None when the request has no tools and the server runs none."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise MessageError("functions", "(the deprecated function calling) is not supported: send 'tools'")
    raw = body.get("tools")
    client = toolcalls.check_tools(raw) if raw is not None else []
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise MessageError("parallel_tool_calls", "must be a boolean")
    names = {t["function"]["name"] for t in client}
    server = {n: v for n, v in builtin.items() if n not in names}
    defs = client + [spec for spec, _ in server.values()]
    choice = toolcalls.check_tool_choice(body.get("tool_choice"), defs)
    if not defs:
        return None
    markers = tok.tool_markers
    if markers is None:
        raise MessageError("tools", "are not supported by this model's chat template")
    prefix = ""
    if choice == "required":
        prefix = markers.call_start
    elif choice not in ("none", "auto"):
        prefix = markers.call_start + '{"name": "' + choice + '", "arguments": '
    runner = ToolRunner(tok, server, prefix) if server and choice != "none" else None
    return Tools(defs, choice, parallel, markers, prefix, runner)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _tool_call(name: str, arguments: str) -> dict:
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def reply(t: Tools, text: str) -> tuple[dict, bool]:
    """A finished reply's text -> (message fields: content, tool_calls, server_tool_calls; whether it
    ended in calls for the client)."""
    content, steps, calls, _ = toolcalls.split_reply(t.prefix + text, t.markers)
    calls = calls if t.parallel else calls[:1]
    msg: dict = {"content": content if content or not calls else None}
    if calls:
        msg["tool_calls"] = [_tool_call(n, a) for n, a in calls]
    if steps:
        msg["server_tool_calls"] = [{"name": n, "arguments": a, "result": r} for n, a, r in steps]
    return msg, bool(calls)


class ToolStream:
    """One streamed choice's text -> the deltas to send. `feed(text)` while decoding -> deltas;
    `finish()` once -> (deltas, whether the reply ended in calls for the client)."""

    def __init__(self, t: Tools):
        self.t, self.reply = t, ReplyStream(t.markers, t.prefix)

    @staticmethod
    def _delta(ev) -> dict:
        if ev[0] == "content":
            return {"content": ev[1]}
        return {"server_tool_calls": [{"name": ev[1], "arguments": ev[2], "result": ev[3]}]}

    def feed(self, text: str) -> list[dict]:
        return [self._delta(ev) for ev in self.reply.feed(text)]

    def finish(self) -> tuple[list[dict], bool]:
        evs = self.reply.finish()
        out = [self._delta(ev) for ev in evs if ev[0] != "call"]
        calls = [ev[1:] for ev in evs if ev[0] == "call"]
        calls = calls if self.t.parallel else calls[:1]
        for i, (n, a) in enumerate(calls):
            out.append({"tool_calls": [{"index": i, "id": call_id(), "type": "function",
                                        "function": {"name": n, "arguments": ""}}]})
            for j in range(0, len(a), FRAGMENT):
                out.append({"tool_calls": [{"index": i, "function": {"arguments": a[j:j + FRAGMENT]}}]})
        return out, bool(calls)
