"""Prompt templates and prompting modes of `chatsmith eval`.

Each mode is a template file in ``chatsmith/eval/prompts/`` (``zero-shot.txt``, ``k-shot.txt``,
``cot.txt``); ``templates_dir`` points at edited copies. A template has a ``[chat]`` section (the
user message, rendered through the model's chat template) and a ``[plain]`` section (the text a
base model continues: a model without a chat template, a pretrain-stage checkpoint, or
``chat=False``), plus an ``[example]`` section when it uses ``{examples}``.

- zero-shot: the question alone.
- k-shot: ``k`` worked examples per item, drawn with ``seed`` from a pool that never holds an
  evaluated item: the *train* split of the same family for the built-in tasks
  (``train.jsonl`` beside the held-out file), ``pool=`` or ``NAME.pool.jsonl`` beside a task file
  ``NAME.jsonl`` for your own tasks. Each item gets its own draw, seeded by the seed and the item's
  text, so an item sees the same examples whatever ``limit`` or order. Examples are dropped from
  the end of the draw when the prompt would not leave ``max_new_tokens`` of context.
- cot: a step-by-step instruction; the answer is read from the last non-empty line of the reply
  (after "The answer is", when it is there).

Generation is greedy. In plain mode generation stops at a line break (at a blank line for cot).
Multiple-choice items are scored on the prompt of the mode; the cot instruction does not apply to
them (nothing is generated), so cot scores them on the zero-shot template.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from chatsmith.errors import UserError
from chatsmith.eval.taskfile import Item
from chatsmith.eval.taskset import Task

MODES = ("zero-shot", "k-shot", "cot")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"

_SECTION = re.compile(r"^\[(chat|plain|example)\]\s*$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_ALLOWED = {"chat": {"question", "examples"}, "plain": {"question", "examples"}, "example": {"question", "answer"}}


@dataclass
class Template:
    name: str
    path: str
    chat: str
    plain: str
    example: str = "Question: {question}\nAnswer: {answer}"
    text: str = ""

    @property
    def uses_examples(self) -> bool:
        return "{examples}" in self.chat or "{examples}" in self.plain


def fill(template: str, values: dict) -> str:
    """The template with its ``{name}`` placeholders replaced by ``values`` (unknown ones kept)."""
    # one pass, so braces inside questions and answers are never read as placeholders
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _sections(text: str, where: str) -> dict[str, str]:
    """The bodies of a template's sections (the whole text as chat and plain when it has none)."""
    sections: dict[str, list[str]] = {}
    cur = None
    preamble = []
    for lineno, line in enumerate(text.split("\n"), 1):
        m = _SECTION.match(line)
        if m:
            cur = m.group(1)
            if cur in sections:
                raise UserError(f"{where}:{lineno}: section [{cur}] appears twice")
            sections[cur] = []
        elif cur is None:
            preamble.append(line)
        else:
            sections[cur].append(line)
    body = {k: "\n".join(v).strip("\n") for k, v in sections.items()}
    while preamble and preamble[0].startswith("#"):  # the leading comment block
        preamble.pop(0)
    if not sections:
        whole = "\n".join(preamble).strip("\n")
        body = {"chat": whole, "plain": whole}
    elif any(ln.strip() and not ln.startswith("#") for ln in preamble):
        raise UserError(f"{where}: text before the first section header; start lines with '#' to make "
                        f"them comments, or put the text in [chat] or [plain]")
    return body


def parse_template(text: str, name: str = "template", path: str = "") -> Template:
    """A template file: optional '#' comment lines, then [chat] / [plain] / [example] sections
    (or no headers at all: the whole text serves chat and plain prompts alike)."""
    where = path or name
    body = _sections(text, where)
    if "plain" not in body and "chat" not in body:
        raise UserError(f"{where}: the template needs a [chat] or a [plain] section")
    body.setdefault("chat", body.get("plain", ""))
    body.setdefault("plain", body["chat"])
    for sec, allowed in _ALLOWED.items():
        if sec not in body:
            continue
        for m in _PLACEHOLDER.finditer(body[sec]):
            if m.group(1) not in allowed:
                raise UserError(f"{where}: unknown placeholder {{{m.group(1)}}} in [{sec}]; it may use "
                                f"{', '.join('{' + a + '}' for a in sorted(allowed))}")
    for sec in ("chat", "plain"):
        if "{question}" not in body[sec]:
            raise UserError(f"{where}: the [{sec}] prompt has no {{question}} placeholder")
    t = Template(name, path, body["chat"], body["plain"], text=text)
    if "example" in body:
        t.example = body["example"]
    if t.uses_examples and "{question}" not in t.example:
        raise UserError(f"{where}: the [example] section has no {{question}} placeholder")
    return t


def load_template(mode: str, templates_dir: str | os.PathLike | None = None) -> Template:
    d = Path(templates_dir) if templates_dir is not None else PROMPTS_DIR
    if templates_dir is not None and not d.is_dir():
        raise UserError(f"--templates {d}: no such folder (copy {PROMPTS_DIR} and edit the copies)")
    f = d / f"{mode}.txt"
    if not f.is_file():
        raise UserError(f"{f}: no such template; a templates folder holds {', '.join(m + '.txt' for m in MODES)} "
                        f"(copy them from {PROMPTS_DIR})")
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: cannot read the template ({e})") from None
    return parse_template(text, f.name, str(f))


def model_has_chat_template(model_dir: str | os.PathLike) -> bool:
    """Whether prompts go through the chat template: the tokenizer has one and the checkpoint is
    not a pretraining-stage (base) model."""
    d = Path(model_dir)
    try:
        stage = (json.loads((d / "config.json").read_text()).get("chatsmith") or {}).get("stage")
    except (OSError, json.JSONDecodeError):
        stage = None
    if stage == "pretrain":
        return False
    try:
        return bool(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------- few-shot examples

def draw_examples(item: Item, pool: list[Item], k: int, seed: int, exclude: set[str] | frozenset = frozenset()) -> list[Item]:
    """``k`` examples for ``item`` from ``pool``: never the item itself nor any question in
    ``exclude`` (the evaluated items), drawn by a generator seeded with ``seed`` and the item's
    text, so the draw does not depend on which other items are evaluated."""
    banned = set(exclude) | {item.key}
    cands = [p for p in pool if p.key not in banned]
    rng = random.Random(f"chatsmith-eval:{seed}:{item.key}")
    return rng.sample(cands, min(k, len(cands)))


def examples_for(task: Task, template: Template, k: int, seed: int) -> list[list[Item]]:
    """The examples of each of a task's items (none when the template shows none)."""
    if not template.uses_examples:
        return [[] for _ in task.items]
    exclude = {it.key for it in task.items}
    usable = [p for p in task.pool if p.key not in exclude]
    if not usable:
        raise UserError(f"task {task.name}: the example pool {task.pool_source} has no item that is not "
                        f"also evaluated; few-shot examples must come from other questions")
    return [draw_examples(it, task.pool, k, seed, exclude) for it in task.items]


# --------------------------------------------------------------------------- rendering

class Prompter:
    """Renders an item's prompt (ids and text) for a template, in chat or plain form, with
    few-shot examples dropped from the end until the prompt leaves ``room`` tokens."""

    def __init__(self, tok, template: Template, chat: bool, ctx: int, worked_examples: bool,
                 tools: list[dict] | None = None):
        self.tok, self.t, self.chat, self.ctx, self.worked = tok, template, chat, ctx, worked_examples
        self.tools = tools  # tool definitions rendered before a chat prompt (eval --tools)

    def text(self, item: Item, examples: list[Item]) -> str:
        ex = "\n\n".join(fill(self.t.example, {"question": e.question, "answer": e.target(self.worked)})
                         for e in examples)
        tmpl = self.t.chat if self.chat else self.t.plain
        if not examples:  # no examples (zero shots fit): no blank lines where they would have been
            tmpl = re.sub(r"\n*\{examples\}\n*", "\n\n", tmpl).strip("\n")
        body = fill(tmpl, {"question": item.question, "examples": ex})
        if self.chat:
            return body
        earlier = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in item.messages[:-1])
        return earlier + body

    def ids(self, item: Item, text: str) -> list[int]:
        if self.chat:
            return self.tok.render_chat(item.messages[:-1] + [{"role": "user", "content": text}],
                                        add_generation_prompt=True, tools=self.tools)[0]
        return self.tok.encode(text, bos=True)

    def fit(self, item: Item, examples: list[Item], room: int) -> tuple[list[int], str, int]:
        """(ids, text, number of examples kept)."""
        n = len(examples)
        while True:
            text = self.text(item, examples[:n])
            ids = self.ids(item, text)
            if n == 0 or len(ids) + room <= self.ctx:
                return ids, text, n
            n -= 1
