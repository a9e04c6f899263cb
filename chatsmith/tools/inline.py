"""Running built-in tools inside generation (as nanochat's engine runs its calculator).

`ToolRunner` is the engine's per-request tool hook (`SamplingParams.tool_hook`): after each token
the model samples, the engine asks it whether the reply now ends a tool call; when it does and
the call names one of the runner's tools, the runner evaluates it and returns the tokens that
close the assistant's turn, carry the result in a tool turn and reopen the assistant's turn. The
engine feeds those tokens to the model one per step instead of sampling (they are the same tokens
SFT trained on, see `Tokenizer.render_chat`), and the model goes on to state its answer.

A call to a tool the runner does not have is left alone: the reply ends there, and the server
returns it as a `tool_calls` entry for the client to run. A tool never raises into generation: a
bad call gets "error: ..." as its result, and the model reads that.
"""

from __future__ import annotations

import json
from typing import Callable

from chatsmith.tools import calls as toolcalls
from chatsmith.tools.calculator import SPEC as CALCULATOR_SPEC
from chatsmith.tools.calculator import calculator

BUILTIN: dict[str, tuple[dict, Callable[[dict], str]]] = {"calculator": (CALCULATOR_SPEC, calculator)}
MAX_CALLS = 8  # per reply: a model that loops on calls still finishes


def builtin_tools(names) -> dict[str, tuple[dict, Callable[[dict], str]]]:
    """--tools NAME… -> {name: (OpenAI definition, function)}; ValueError names an unknown one."""
    out = {}
    for n in names or ():
        if n not in BUILTIN:
            raise ValueError(f"unknown tool {n!r}; built-in tools: {', '.join(BUILTIN)}")
        out[n] = BUILTIN[n]
    return out


def run_tool(fn: Callable[[dict], str], arguments: str) -> str:
    try:
        args = json.loads(arguments)
    except ValueError:
        return "error: the arguments are not valid JSON"
    try:
        return str(fn(args))
    except Exception as e:  # a tool's bug is the model's error message, never the user's traceback
        return f"error: {type(e).__name__}"


class ToolRunner:
    """One reply's hook: `__call__(text)` -> tokens to force after a finished call to one of
    `tools`, else None. `trace` records (name, arguments, result) of every call it ran."""

    def __init__(self, tok, tools: dict[str, tuple[dict, Callable[[dict], str]]], prefix: str = ""):
        # prefix: what the prompt already put in the reply (a call forced by tool_choice)
        self.tok, self.tools, self.prefix = tok, tools, prefix
        self.markers = tok.tool_markers
        self.trace: list[tuple[str, str, str]] = []
        self.seen = 0  # text before this offset holds no unanswered call

    def __call__(self, text: str) -> list[int] | None:
        m, text = self.markers, self.prefix + text
        if m is None or len(self.trace) >= MAX_CALLS or not text.endswith(m.call_end):
            return None
        start = text.rfind(m.call_start, self.seen)
        if start < 0:
            return None
        self.seen = len(text)
        name, arguments = toolcalls.parse_call(text[start + len(m.call_start):-len(m.call_end)])
        if name not in self.tools:
            return None
        result = run_tool(self.tools[name][1], arguments)
        self.trace.append((name, arguments, result))
        return self.tok.tool_result_ids(result)

    def fork(self) -> "ToolRunner":
        """A fresh runner for another sequence (SamplingParams.tool_hook makes one per sample)."""
        return ToolRunner(self.tok, self.tools, self.prefix)
