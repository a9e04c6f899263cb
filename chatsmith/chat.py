"""`chatsmith chat`: a conversation in the terminal.

Replies stream as they are decoded. Commands: /reset, /system TEXT, /temp X, /save FILE, /help;
quit, exit or Ctrl-D leave; Ctrl-C stops the reply being written and keeps the conversation.
With piped input (`echo hi | chatsmith chat DIR`) every input line is one user turn and only the
replies are printed. `--moderation lexicon|MODEL_DIR` checks each message (a flagged one gets a
refusal, crisis language a supportive reply with help lines, and the model is not asked) and each
reply as it streams (a flagged reply stops there and is marked); `--watermark` watermarks replies.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from chatsmith.checkpoint import load_model
from chatsmith.config import DEVICES
from chatsmith.engine import QUANTIZE, Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.moderation import CRISIS_REPLY, REFUSAL, load_moderator
from chatsmith.runtime import resolve_device
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools import calls as toolcalls
from chatsmith.tools.inline import ToolRunner, builtin_tools
from chatsmith.tools.stream import ReplyStream
from chatsmith.watermark import Watermark, add_flags as add_watermark_flags, config_from_args as watermark_config

HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /temp X         sampling temperature (0 = greedy)
  /save FILE      write the conversation as JSON messages
  /help           this text
  quit, exit, Ctrl-D   leave        Ctrl-C   stop the current reply"""


class ChatSession:
    """History, context management and one reply at a time; the terminal loop sits on top."""

    def __init__(self, engine, params, system: str | None = None, tools: dict | None = None, moderator=None):
        """tools: built-in tools (chatsmith.tools.inline.builtin_tools) the model may call; they run
        inside generation and the reply shows each call and its result. moderator: checks each
        message before the model sees it and each reply as it streams (chatsmith.moderation)."""
        self.engine, self.params, self.system = engine, params, system
        self.tools = tools or {}
        self.moderator = moderator
        self.history: list[dict] = []
        self.last_steps: list[tuple[str, str, str]] = []  # the tool calls of the last reply
        self.filtered = False  # the last reply: refused, or stopped by the content filter

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self) -> tuple[list[int], int]:
        """The rendered conversation + generation cue; drops the oldest exchanges until the prompt
        leaves room for a reply. Returns (ids, number of turns dropped)."""
        ctx = self.engine.model.cfg.max_seq_len
        room = min(self.params.max_new_tokens, ctx // 2)
        dropped = 0
        while True:
            ids, _ = self.engine.tok.render_chat(self.messages, add_generation_prompt=True,
                                                 tools=[spec for spec, _ in self.tools.values()] or None)
            if len(ids) + room <= ctx or len(self.history) <= 1:
                break
            # drop the oldest user turn and what answered it (the reply, tool calls and results)
            n = next((i for i in range(1, len(self.history)) if self.history[i]["role"] == "user"), 1)
            del self.history[:n]
            dropped += n
        if len(ids) >= ctx:
            raise UserError(f"this message alone is {len(ids)} tokens, the model's context is {ctx}: "
                            f"send something shorter")
        return ids, dropped

    def reply(self, user_text: str, write=None) -> tuple[str, int, bool]:
        """Add a user turn, stream the reply through `write`. -> (reply, turns dropped, interrupted)."""
        self.history.append({"role": "user", "content": user_text})
        try:
            ids, dropped = self.prompt_ids()
        except UserError:
            self.history.pop()
            raise
        parts, interrupted, self.filtered = [], False, False
        if self.moderator is not None:
            (v,) = self.moderator.check([user_text])
            if v.flagged:  # the model is not asked
                text = CRISIS_REPLY if v.crisis else REFUSAL
                self.filtered = True
                if write:
                    write(text)
                self.history.append({"role": "assistant", "content": text})
                return text, dropped, False
        markers = self.engine.tok.tool_markers if self.tools else None
        params = self.params
        if markers is not None:
            params = dataclasses.replace(params, tool_hook=ToolRunner(self.engine.tok, self.tools).fork)
        reader = ReplyStream(markers) if markers is not None else None
        self.last_steps = []

        def show(events):
            for ev in events:
                if ev[0] == "content":
                    write and write(ev[1])
                elif ev[0] == "step":
                    self.last_steps.append(ev[1:])
                    write and write(f"[{ev[1]} {ev[2]} -> {ev[3]}] ")
        stream = self.engine.stream(ids, params)
        try:
            for _, piece in stream:
                if self.moderator is not None:
                    so_far = "".join(parts)
                    if self.moderator.lexicon.hits(so_far[-64:] + piece):
                        self.filtered = True
                        stream.close()  # cancels the request
                        break
                parts.append(piece)
                if reader is not None:
                    show(reader.feed(piece))
                elif write:
                    write(piece)
        except KeyboardInterrupt:
            interrupted = True
        text = "".join(parts)
        if reader is None:
            self.history.append({"role": "assistant", "content": text})
            return text, dropped, interrupted
        show(reader.finish())
        turns = toolcalls.reply_messages(text, markers)
        self.history.extend(turns)
        return turns[-1]["content"], dropped, interrupted


def run(a):
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, seed=a.seed)
    params.validate()
    cfg = watermark_config(a) if a.watermark else None
    model = load_model(a.model, device=resolve_device(a.device))
    tok = Tokenizer.load(a.model)
    if cfg is not None:
        params.watermark = Watermark(cfg, tok.vocab_size)
    if not tok.has_chat:  # our chat tokens, or an imported model's own chat template
        raise UserError(f"{a.model} has no chat tokens in its tokenizer: it cannot chat")
    # one conversation: one row of the KV cache (max_batch=1)
    try:
        tools = builtin_tools(a.tools)
    except ValueError as e:
        raise UserError(f"--tools: {e}") from None
    if tools and tok.tool_markers is None:
        raise UserError(f"--tools: the chat template of {a.model} has no tool support")
    moderator = load_moderator(a.moderation, device=resolve_device(a.device)) if a.moderation else None
    session = ChatSession(Engine(model, tok, max_batch=1, quantize=a.quantize), params, a.system, tools, moderator)
    interactive = sys.stdin.isatty()
    out = sys.stdout

    def write(piece):
        out.write(piece)
        out.flush()

    if not interactive or a.jsonl:  # piped: each line is a user turn; print replies only
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if a.jsonl:  # one JSON object per input line, so a multi-line reply stays with its question
                reply, dropped, _ = session.reply(line)
                row = {"user": line, "assistant": reply, "turns_dropped": dropped, "content_filter": session.filtered}
                if session.tools:
                    row["tool_calls"] = [{"name": n, "arguments": x, "result": r} for n, x, r in session.last_steps]
                write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                session.reply(line, write)
                write("\n")
        return

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"chatsmith chat — {a.model} ({model.num_params() / 1e6:.1f}M parameters). /help for commands, "
          f"quit or Ctrl-D to leave.")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print("\n(quit, exit or Ctrl-D to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("quit", "exit", "/quit", "/exit"):
            break
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd == "/help":
                print(HELP)
            elif cmd == "/reset":
                session.history.clear()
                print("(new conversation)")
            elif cmd == "/system":
                session.system = arg or None
                session.history.clear()
                print(f"(system prompt {'set' if arg else 'removed'}; new conversation)")
            elif cmd == "/temp":
                try:
                    t = float(arg)
                    if t < 0:
                        raise ValueError
                    params.temperature = t
                    print(f"(temperature {t:g})")
                except ValueError:
                    print("usage: /temp X   with X >= 0, e.g. /temp 0.7")
            elif cmd == "/save":
                if not arg:
                    print("usage: /save FILE")
                    continue
                try:
                    with open(arg, "w") as f:
                        json.dump(session.messages, f, indent=2, ensure_ascii=False)
                    print(f"(saved {len(session.messages)} messages to {arg})")
                except OSError as e:
                    print(f"cannot write {arg}: {e.strerror}")
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        write("bot> ")
        try:
            _, dropped, interrupted = session.reply(text, write)
        except UserError as e:
            print(f"({e})")
            continue
        write("\n")
        if session.filtered:
            print("(content filter)")
        if interrupted:
            print("(stopped)")
        if dropped:
            print(f"(context full: the {dropped} oldest turns were dropped)")


def add_arguments(p):
    p.add_argument("model", help="model directory (an SFT/aligned model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the likeliest tokens up to this mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the K likeliest tokens (0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (tokens)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampling (default: a fresh seed)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (auto: cuda, else mps, else cpu)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="decode weights: none (fp32 as trained), int8 (CPU; a quarter of the bytes per token) "
                   "or bf16 (half the bytes; a CPU with native bf16 or a GPU)")
    p.add_argument("--tools", nargs="+", default=None, metavar="TOOL",
                   help="built-in tools the model may call, run inside generation (calculator)")
    p.add_argument("--jsonl", action="store_true", help="read a user turn per input line and print one JSON "
                   "object per reply: {\"user\", \"assistant\", \"turns_dropped\"}")
    add_watermark_flags(p)
    p.add_argument("--moderation", default=None, metavar="lexicon|MODEL_DIR",
                   help="check messages and replies: 'lexicon' or a moderation classifier directory (default: off)")


VERB = Verb("chat", "talk to a chat model in the terminal", add_arguments, run)
