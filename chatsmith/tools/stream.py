"""A reply with tools, read as it streams: the text the model writes around its calls (held back
while it could still be the start of a call marker), each call run inside generation once its
result is in, and at the end the calls left for the client. The server's streamed chunks and the
terminal chat both read a reply through this."""

from __future__ import annotations

from chatsmith.tools import calls as toolcalls


class ReplyStream:
    """`feed(text)` while decoding and `finish()` once -> lists of events: ("content", text),
    ("step", name, arguments, result) for a call the engine ran, ("call", name, arguments) for a
    call left to the caller (finish only). prefix: text the prompt put at the reply's start."""

    def __init__(self, markers: toolcalls.Markers, prefix: str = ""):
        self.m, self.raw, self.sent, self.steps = markers, prefix, 0, 0

    def feed(self, text: str) -> list[tuple]:
        self.raw += text
        content, steps, calls, _ = toolcalls.split_reply(self.raw, self.m)
        out = []
        if not calls:  # content stops at the first call for the client
            start = self.m.call_start
            keep = next((k for k in range(min(len(start) - 1, len(content)), 0, -1) if content.endswith(start[:k])), 0)
            safe = content[:len(content) - keep]
            if len(safe) > self.sent:
                out.append(("content", safe[self.sent:]))
                self.sent = len(safe)
        # a step whose result is still being fed is not settled yet
        in_result = self.raw.rfind(self.m.result_open) > self.raw.rfind(self.m.result_close)
        settled = steps[:-1] if steps and in_result else steps
        for step in settled[self.steps:]:
            out.append(("step", *step))
            self.steps += 1
        return out

    def finish(self) -> list[tuple]:
        content, steps, calls, _ = toolcalls.split_reply(self.raw, self.m)
        out = []
        if not calls and len(content) > self.sent:
            out.append(("content", content[self.sent:]))
            self.sent = len(content)
        out += [("step", *s) for s in steps[self.steps:]]
        self.steps = len(steps)
        return out + [("call", *c) for c in calls]
