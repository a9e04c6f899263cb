"""The task-file format of `chatsmith eval`: items, read and checked line by line.

A task file (``PATH.jsonl``) holds one item per line::

    {"prompt": "What is the capital of France?", "answer": "Paris"}
    {"prompt": "...", "answers": ["Nile", "the Nile river"], "family": "text"}
    {"messages": [{"role": "user", "content": "..."}], "reference": "..."}
    {"prompt": "2 + 2 =", "choices": ["3", "4", "5"], "label": 1}

``prompt`` (a string) or ``messages`` (OpenAI turns ending with the user's) plus exactly one of:
``answer``/``answers`` (generation, exact match after normalisation by
:func:`chatsmith.data.tasks.check_answer`, ``family`` defaulting to ``"text"``), ``reference`` (a
string or a list of them; generation scored with sacrebleu's corpus BLEU and chrF), or ``choices``
+ ``label`` (multiple choice by log-likelihood: the sum of the choice's token log-probabilities
given the prompt, and that sum per UTF-8 byte of the choice, like lm-eval-harness's acc /
acc_norm). An optional ``worked`` string is a worked solution, shown when the item is a
chain-of-thought example. All items of a file are of one kind. Bad lines are reported as
``file:line``.

The built-in dialogues (``data/chat/*.jsonl``) and prompt files of reward tasks are read into the
same :class:`Item`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from chatsmith.data.corpus import check_file, iter_jsonl
from chatsmith.data.tasks import normalise
from chatsmith.errors import UserError
from chatsmith.messages import MessageError, check_messages

KINDS = {"exact_match": "answer/answers", "reference": "reference", "choice": "choices + label"}


@dataclass
class Item:
    loc: str                      # "file:line"
    messages: list[dict]          # the conversation up to and including the user's last turn
    kind: str                     # "exact_match" | "reference" | "choice" | "reward"
    family: str = "text"
    answers: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    label: int = -1
    worked: str | None = None     # a worked solution (chain-of-thought examples)

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def key(self) -> str:
        """Identity of the item's question: its user turns, normalised."""
        return normalise("\n".join(m["content"] for m in self.messages if m["role"] == "user"))

    def target(self, worked: bool = False) -> str:
        """How the item is answered when it is shown as an example."""
        if self.kind == "choice":
            return self.choices[self.label]
        if self.kind == "reference":
            return self.references[0]
        if worked:
            return self.worked or f"The answer is {self.answers[0]}."
        return self.answers[0]


def _type_name(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def read_objects(path: Path, what: str):
    """(line number, object) for every non-blank line; UserError naming file:line otherwise."""
    for lineno, obj in iter_jsonl(path, what):
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: the line is {_type_name(obj)}, not a JSON object")
        yield lineno, obj


def _strings(v, loc: str, name: str, allow_numbers: bool = False) -> list[str]:
    vals = v if isinstance(v, list) else [v]
    if isinstance(v, list) and not v:
        raise UserError(f"{loc}: \"{name}\" is an empty list")
    out = []
    for x in vals:
        if allow_numbers and isinstance(x, (int, float)) and not isinstance(x, bool):
            if not math.isfinite(x):  # a NaN / Infinity literal: "nan" is no answer anyone means
                raise UserError(f"{loc}: \"{name}\" holds {x!r}, not a finite number")
            x = str(x)
        if not isinstance(x, str):
            want = "a string or a number" if allow_numbers else "a string"
            raise UserError(f"{loc}: \"{name}\" must be {want} or a list of them, not {_type_name(x)}")
        if not x.strip():
            raise UserError(f"{loc}: \"{name}\" holds an empty string")
        out.append(x)
    return out


def _messages(obj: dict, loc: str) -> list[dict]:
    if ("prompt" in obj) == ("messages" in obj):
        raise UserError(f"{loc}: give the question as \"prompt\" (a string) or \"messages\" (a list of "
                        f"{{\"role\", \"content\"}} turns ending with the user's), exactly one of them")
    if "prompt" in obj:
        p = obj["prompt"]
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"{loc}: \"prompt\" must be a non-empty string, not "
                            f"{'an empty string' if isinstance(p, str) else _type_name(p)}")
        return [{"role": "user", "content": p}]
    msgs = obj["messages"]
    try:
        # task files take our three roles and string contents only (no aliases, no text parts)
        return check_messages(msgs, "messages", aliases={}, parts=False, last_user=True)
    except MessageError as e:
        if e.field == "messages":
            raise UserError(f"{loc}: \"messages\" must be a non-empty list of turns, not "
                            f"{'an empty list' if isinstance(msgs, list) else _type_name(msgs)}") from None
        answered = isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"
        raise UserError(f"{loc}: {e.field} {e.problem}" + ("; the answer goes in \"answer\", \"reference\" "
                                                           "or \"choices\"" if answered else "")) from None


def _answers(obj: dict, loc: str) -> list[str]:
    if "answer" in obj and "answers" in obj:
        raise UserError(f"{loc}: give \"answer\" (one) or \"answers\" (accepted alternatives), not both")
    if "answer" in obj:
        if isinstance(obj["answer"], list):
            raise UserError(f"{loc}: \"answer\" is a list; name it \"answers\" for accepted alternatives")
        return _strings(obj["answer"], loc, "answer", allow_numbers=True)
    if not isinstance(obj["answers"], list):
        raise UserError(f"{loc}: \"answers\" must be a list of accepted answers, not {_type_name(obj['answers'])}")
    return _strings(obj["answers"], loc, "answers", allow_numbers=True)


def _choices(obj: dict, loc: str) -> tuple[list[str], int]:
    ch, label = obj.get("choices"), obj.get("label")
    if not isinstance(ch, list) or len(ch) < 2:
        raise UserError(f"{loc}: \"choices\" must be a list of at least two strings, not "
                        f"{_type_name(ch) if not isinstance(ch, list) else f'{len(ch)} item(s)'}")
    choices = _strings(ch, loc, "choices")
    if isinstance(label, bool) or not isinstance(label, int):
        raise UserError(f"{loc}: \"label\" must be the 0-based index of the right choice (an integer), "
                        f"not {_type_name(label) if 'label' in obj else 'missing'}")
    if not 0 <= label < len(ch):
        raise UserError(f"{loc}: \"label\" is {label}, but there are {len(ch)} choices (0..{len(ch) - 1})")
    return choices, label


def parse_item(obj: dict, loc: str) -> Item:
    """One line of a task file as an :class:`Item`; UserError naming ``loc`` when it is wrong."""
    msgs = _messages(obj, loc)
    given = [k for k, names in (("exact_match", ("answer", "answers")), ("reference", ("reference",)),
                                ("choice", ("choices", "label"))) if any(n in obj for n in names)]
    if len(given) != 1:
        raise UserError(f"{loc}: give exactly one kind of target: \"answer\"/\"answers\" (exact match), "
                        f"\"reference\" (BLEU/chrF) or \"choices\" + \"label\" (multiple choice)"
                        + (f"; this line has {' and '.join(KINDS[g] for g in given)}" if given else ""))
    kind = given[0]
    item = Item(loc, msgs, kind)
    if "family" in obj:
        if not isinstance(obj["family"], str) or not obj["family"].strip():
            raise UserError(f"{loc}: \"family\" must be a non-empty string, not {_type_name(obj['family'])}")
        item.family = obj["family"]
    if "worked" in obj:
        if not isinstance(obj["worked"], str):
            raise UserError(f"{loc}: \"worked\" must be a string, not {_type_name(obj['worked'])}")
        item.worked = obj["worked"]
    if kind == "exact_match":
        item.answers = _answers(obj, loc)
    elif kind == "reference":
        item.references = _strings(obj["reference"], loc, "reference")
    else:
        item.choices, item.label = _choices(obj, loc)
    return item


def read_task_file(path: str | os.PathLike, what: str = "task file") -> list[Item]:
    """Every item of a user task file (or example pool), checked; all of one kind."""
    p = Path(path)
    check_file(p, what)
    items: list[Item] = []
    for lineno, obj in read_objects(p, what):
        it = parse_item(obj, f"{p}:{lineno}")
        if items and it.kind != items[0].kind:
            raise UserError(f"{it.loc}: this item is {it.kind.replace('_', ' ')} ({KINDS[it.kind]}) but the "
                            f"file's first item ({items[0].loc}) is {items[0].kind.replace('_', ' ')}; put "
                            f"each kind of task in its own file")
        items.append(it)
    if not items:
        raise UserError(f"{p}: the {what} is empty; write one JSON object per line, e.g. "
                        f"{{\"prompt\": \"What is 2 + 2?\", \"answer\": \"4\"}}")
    return items


def read_dialogue_items(path: str | os.PathLike, family: str, what: str) -> list[Item]:
    """Checkable built-in dialogues of one family (records with ``answers``) as exact-match items."""
    p = Path(path)
    check_file(p, what, f"; the built-in tasks read the {what} of `chatsmith data build --out data` "
                        f"(data/chat/), or pass --heldout PATH")
    out = []
    for lineno, obj in read_objects(p, "dialogue file"):
        if obj.get("family") != family or not obj.get("answers"):
            continue
        loc = f"{p}:{lineno}"
        msgs = obj.get("messages")
        if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs)
                or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str)):
            raise UserError(f"{loc}: a built-in dialogue must have \"messages\" ending with the assistant's reply")
        it = parse_item({"messages": msgs[:-1], "answers": obj["answers"]}, loc)
        it.family, it.worked = family, msgs[-1]["content"]
        out.append(it)
    if not out:
        raise UserError(f"{p}: no {family} conversations with answers in the {what} (build the dialogues "
                        f"with `chatsmith data build --out data`, or pass --heldout PATH)")
    return out


def read_prompt_items(path: str | os.PathLike, what: str) -> list[Item]:
    """Prompts to generate replies for (reward tasks): one JSON object per line with ``prompt``
    (a string, or a list of turns as in preference-pair files) or ``messages``; a trailing
    assistant turn (a reference reply, a dialogue's answer) is dropped, other keys are ignored.
    Repeated prompts are kept once (pair files repeat a prompt for each recipe)."""
    p = Path(path)
    check_file(p, what, "; build the held-out dialogues with `chatsmith data build --out data`, or pass "
                        "--heldout PATH" if what.startswith("held") else "")
    items, seen = [], set()
    for lineno, obj in read_objects(p, what):
        loc = f"{p}:{lineno}"
        msgs = obj.get("messages", obj.get("prompt"))
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if isinstance(msgs, str):
            msgs = [{"role": "user", "content": msgs}]
        if "messages" not in obj and "prompt" not in obj:
            raise UserError(f"{loc}: a prompt line needs \"prompt\" (a string or a list of turns) or "
                            f"\"messages\" (turns ending with the user's)")
        it = Item(loc, _messages({"messages": msgs}, loc), "reward")
        fam = obj.get("family")
        it.family = fam if isinstance(fam, str) and fam.strip() else "text"
        if it.key not in seen:
            seen.add(it.key)
            items.append(it)
    if not items:
        raise UserError(f"{p}: the {what} is empty; write one JSON object per line, e.g. "
                        f"{{\"prompt\": \"Tell me about the sea.\"}}")
    return items
