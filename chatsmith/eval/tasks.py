"""Task evaluation: `chatsmith eval MODEL_DIR --tasks NAME...` -> a table and ``metrics.json``.

Task names
==========

``lm:PATH``        loss, perplexity and bits-per-byte (:func:`chatsmith.eval.lm.score_documents`)
                   on .txt/.md/.jsonl files or folders; for a ``data build`` corpus folder, its
                   ``val.jsonl`` only.
``arithmetic``,    exact match on the held-out built-in dialogues of that family
``word_problem``,  (``data/chat/heldout.jsonl`` unless ``heldout=`` says otherwise).
``number_sense``,
``quiz``
``PATH.jsonl``     your own task file, one item per line::

                       {"prompt": "What is the capital of France?", "answer": "Paris"}
                       {"prompt": "...", "answers": ["Nile", "the Nile river"], "family": "text"}
                       {"messages": [{"role": "user", "content": "..."}], "reference": "..."}
                       {"prompt": "2 + 2 =", "choices": ["3", "4", "5"], "label": 1}

                   ``prompt`` (a string) or ``messages`` (OpenAI turns ending with the user's)
                   plus exactly one of: ``answer``/``answers`` (generation, exact match after
                   normalisation by :func:`chatsmith.data.tasks.check_answer`, ``family``
                   defaulting to ``"text"``), ``reference`` (a string or a list of them;
                   generation scored with sacrebleu's corpus BLEU and chrF), or ``choices`` +
                   ``label`` (multiple choice by log-likelihood: the sum of the choice's token
                   log-probabilities given the prompt, and that sum per UTF-8 byte of the choice,
                   like lm-eval-harness's acc / acc_norm). An optional ``worked`` string is a
                   worked solution, shown when the item is a chain-of-thought example. All items
                   of a file are of one kind. Bad lines are reported as ``file:line``.

Prompting (``mode``)
====================

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatsmith.data.tasks import check_answer, final_answer, normalise
from chatsmith.batching import continuation_logprobs
from chatsmith.errors import UserError

MODES = ("zero-shot", "k-shot", "cot")
BUILTIN_TASKS = ("arithmetic", "word_problem", "number_sense", "quiz")
DEFAULT_HELDOUT = "data/chat/heldout.jsonl"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
KINDS = {"exact_match": "answer/answers", "reference": "reference", "choice": "choices + label"}
_ROLES = ("system", "user", "assistant")
TASK_FORMS = ("lm:PATH (loss, perplexity and bits-per-byte on .txt/.md/.jsonl files or a corpus folder), "
              f"{', '.join(BUILTIN_TASKS)} (the built-in held-out dialogues), "
              "reward or reward:PATH.jsonl (replies scored by --reward-model, win rate with --compare), "
              "or PATH.jsonl (a task file: \"prompt\"/\"messages\" plus \"answer\"/\"answers\", "
              "\"reference\" or \"choices\" + \"label\")")


# --------------------------------------------------------------------------- items

@dataclass
class Item:
    loc: str                      # "file:line"
    messages: list[dict]          # the conversation up to and including the user's last turn
    kind: str                     # "exact_match" | "reference" | "choice"
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


def _read_jsonl(path: Path, what: str):
    """(line number, object) for every non-blank line; UserError naming file:line otherwise."""
    from chatsmith.data.corpus import iter_jsonl

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
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{loc}: \"messages\" must be a non-empty list of turns, not "
                        f"{'an empty list' if isinstance(msgs, list) else _type_name(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{loc}: messages[{i}] must be an object with \"role\" ({', '.join(_ROLES)}) "
                            f"and \"content\" (a string)")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise UserError(f"{loc}: the last of \"messages\" must be the user's question (a non-empty user "
                        f"turn); the answer goes in \"answer\", \"reference\" or \"choices\"")
    return out


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
        if "answer" in obj and "answers" in obj:
            raise UserError(f"{loc}: give \"answer\" (one) or \"answers\" (accepted alternatives), not both")
        if "answer" in obj:
            if isinstance(obj["answer"], list):
                raise UserError(f"{loc}: \"answer\" is a list; name it \"answers\" for accepted alternatives")
            item.answers = _strings(obj["answer"], loc, "answer", allow_numbers=True)
        else:
            if not isinstance(obj["answers"], list):
                raise UserError(f"{loc}: \"answers\" must be a list of accepted answers, not "
                                f"{_type_name(obj['answers'])}")
            item.answers = _strings(obj["answers"], loc, "answers", allow_numbers=True)
    elif kind == "reference":
        item.references = _strings(obj["reference"], loc, "reference")
    else:
        ch, label = obj.get("choices"), obj.get("label")
        if not isinstance(ch, list) or len(ch) < 2:
            raise UserError(f"{loc}: \"choices\" must be a list of at least two strings, not "
                            f"{_type_name(ch) if not isinstance(ch, list) else f'{len(ch)} item(s)'}")
        item.choices = _strings(ch, loc, "choices")
        if isinstance(label, bool) or not isinstance(label, int):
            raise UserError(f"{loc}: \"label\" must be the 0-based index of the right choice (an integer), "
                            f"not {_type_name(label) if 'label' in obj else 'missing'}")
        if not 0 <= label < len(ch):
            raise UserError(f"{loc}: \"label\" is {label}, but there are {len(ch)} choices (0..{len(ch) - 1})")
        item.label = label
    return item


def read_task_file(path: str | os.PathLike, what: str = "task file") -> list[Item]:
    """Every item of a user task file (or example pool), checked; all of one kind."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such {what}" + (" (it is a folder)" if p.is_dir() else ""))
    items: list[Item] = []
    for lineno, obj in _read_jsonl(p, what):
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
    if not p.is_file():
        raise UserError(f"{p}: no such file; the built-in tasks read the {what} of `chatsmith data build "
                        f"--out data` (data/chat/), or pass --heldout PATH")
    out = []
    for lineno, obj in _read_jsonl(p, "dialogue file"):
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
    if not p.is_file():
        raise UserError(f"{p}: no such {what}" + (" (it is a folder)" if p.is_dir() else
                                                  "; build the held-out dialogues with `chatsmith data build "
                                                  "--out data`, or pass --heldout PATH" if what.startswith("held")
                                                  else ""))
    items, seen = [], set()
    for lineno, obj in _read_jsonl(p, what):
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


def check_never_trained(items: list[Item], heldout: str | os.PathLike, cache: dict | None = None) -> dict:
    """Held-out items are never trained on: none of their prompt hashes
    (:func:`chatsmith.data.dialogues.prompt_hash`, the hash the split itself uses) may occur in
    the ``train.jsonl`` beside the held-out file. A leak is a UserError (the figures would be
    meaningless); without a train file beside it the check is recorded as not done."""
    from chatsmith.data.dialogues import prompt_hash

    train = Path(heldout).with_name("train.jsonl")
    if not train.is_file():
        return {"checked": False, "reason": f"no {train} beside the held-out file"}
    key = str(train)
    if cache is None or key not in cache:
        hashes = set()
        for _, obj in _read_jsonl(train, "training dialogues"):
            msgs = obj.get("messages")
            if isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              for m in msgs):
                hashes.add(prompt_hash(msgs))
        if cache is not None:
            cache[key] = hashes
    hashes = cache[key] if cache is not None else hashes
    leaked = [it.loc for it in items if prompt_hash(it.messages) in hashes]
    if leaked:
        raise UserError(f"{len(leaked)} held-out item(s) have the same prompt as a conversation in {train} "
                        f"(first: {leaked[0]}): scores on them would measure memorisation; rebuild the split "
                        f"with `chatsmith data build` or remove them")
    return {"checked": True, "against": key, "items": len(items), "train_prompts": len(hashes), "overlap": 0}


def win_rate(scores_a: list[float], scores_b: list[float]) -> dict:
    """A vs B judged per prompt by the reward model: a win when A's reply scores higher, a tie
    (counted as half a win) when equal. ``ci95`` is the normal-approximation half-width."""
    if len(scores_a) != len(scores_b):
        raise ValueError("one score per prompt for each model")
    n = len(scores_a)
    wins = sum(a > b for a, b in zip(scores_a, scores_b))
    ties = sum(a == b for a, b in zip(scores_a, scores_b))
    rate = (wins + 0.5 * ties) / n if n else 0.0
    return {"win_rate": rate, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate_ci95": 1.96 * (rate * (1 - rate) / n) ** 0.5 if n else 0.0,
            "mean_margin": sum(a - b for a, b in zip(scores_a, scores_b)) / n if n else 0.0}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


# --------------------------------------------------------------------------- templates

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


def _fill(template: str, values: dict) -> str:
    # one pass, so braces inside questions and answers are never read as placeholders
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def parse_template(text: str, name: str = "template", path: str = "") -> Template:
    """A template file: optional '#' comment lines, then [chat] / [plain] / [example] sections
    (or no headers at all: the whole text serves chat and plain prompts alike)."""
    where = path or name
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


# --------------------------------------------------------------------------- pieces

def draw_examples(item: Item, pool: list[Item], k: int, seed: int, exclude: set[str] | frozenset = frozenset()) -> list[Item]:
    """``k`` examples for ``item`` from ``pool``: never the item itself nor any question in
    ``exclude`` (the evaluated items), drawn by a generator seeded with ``seed`` and the item's
    text, so the draw does not depend on which other items are evaluated."""
    banned = set(exclude) | {item.key}
    cands = [p for p in pool if p.key not in banned]
    rng = random.Random(f"chatsmith-eval:{seed}:{item.key}")
    return rng.sample(cands, min(k, len(cands)))


def extract_cot_answer(reply: str) -> str:
    """The answer of a chain-of-thought reply: its last non-empty line, after the last answer
    marker ("The answer is X." -> "X") when there is one."""
    lines = [ln.strip() for ln in reply.split("\n") if ln.strip()]
    if not lines:
        return ""
    return final_answer(lines[-1]).strip()


def score_references(hyps: list[str], refs: list[list[str]]) -> dict:
    """Corpus BLEU and chrF of ``hyps`` against one or more references per hypothesis, exactly
    as sacrebleu computes them (default settings: 13a tokenisation, exp smoothing, chrF β=2, char
    order 6). Items with fewer references are padded with None, which sacrebleu skips."""
    import sacrebleu

    m = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(m)]
    bleu = sacrebleu.corpus_bleu(hyps, streams)
    chrf = sacrebleu.corpus_chrf(hyps, streams)
    return {"bleu": bleu.score, "chrf": chrf.score, "bleu_detail": str(bleu), "chrf_detail": str(chrf),
            "brevity_penalty": bleu.bp, "sacrebleu": sacrebleu.__version__}


def pick_choices(items: list[Item], logprobs: list[list[float]]) -> dict:
    """Accuracy by the highest summed log-likelihood, and by the highest per-byte log-likelihood
    of the choice text (acc_norm); ties go to the first choice."""
    correct = correct_norm = 0
    picks = []
    for it, lps in zip(items, logprobs):
        best = max(range(len(lps)), key=lambda j: (lps[j], -j))
        norm = [lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(lps, it.choices)]
        best_n = max(range(len(norm)), key=lambda j: (norm[j], -j))
        correct += best == it.label
        correct_norm += best_n == it.label
        picks.append((best, best_n))
    n = max(len(items), 1)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "correct": correct,
            "correct_norm": correct_norm, "picks": picks}


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


# --------------------------------------------------------------------------- prompts

class Prompter:
    """Renders an item's prompt (ids and text) for a template, in chat or plain form, with
    few-shot examples dropped from the end until the prompt leaves ``room`` tokens."""

    def __init__(self, tok, template: Template, chat: bool, ctx: int, worked_examples: bool):
        self.tok, self.t, self.chat, self.ctx, self.worked = tok, template, chat, ctx, worked_examples

    def text(self, item: Item, examples: list[Item]) -> str:
        ex = "\n\n".join(_fill(self.t.example, {"question": e.question, "answer": e.target(self.worked)})
                         for e in examples)
        tmpl = self.t.chat if self.chat else self.t.plain
        if not examples:  # no examples (zero shots fit): no blank lines where they would have been
            tmpl = re.sub(r"\n*\{examples\}\n*", "\n\n", tmpl).strip("\n")
        body = _fill(tmpl, {"question": item.question, "examples": ex})
        if self.chat:
            return body
        earlier = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in item.messages[:-1])
        return earlier + body

    def ids(self, item: Item, text: str) -> list[int]:
        if self.chat:
            return self.tok.render_chat(item.messages[:-1] + [{"role": "user", "content": text}],
                                        add_generation_prompt=True)[0]
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


# --------------------------------------------------------------------------- tasks

def _lm_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir() and (p / "val.jsonl").is_file() and (p / "train.jsonl").is_file():
        return [str(p / "val.jsonl")]  # a `data build` corpus: its held-out split only
    return [path]


@dataclass
class Task:
    name: str
    kind: str                     # "lm" | "exact_match" | "reference" | "choice"
    items: list[Item] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    pool_source: str | None = None
    pool: list[Item] | None = None
    never_trained: dict | None = None  # the held-out check by prompt hash (built-in tasks)


def resolve_tasks(names: list[str], heldout: str | None, pool: str | None, need_pool: bool,
                  limit: int | None) -> list[Task]:
    """Check every task name and read its items (and example pool) before the model is loaded."""
    from chatsmith.data.corpus import collect_input_files

    tasks = []
    heldout = heldout or DEFAULT_HELDOUT
    train_cache: dict[tuple[str, str], list[Item]] = {}
    hash_cache: dict[str, set[str]] = {}
    for name in dict.fromkeys(names):
        if name.startswith("lm:"):
            path = name[3:]
            if not path:
                raise UserError(f"task {name!r}: give a path after 'lm:', e.g. lm:data/corpus")
            files = _lm_files(path)
            collect_input_files(files)  # checks existence and file types now
            tasks.append(Task(name, "lm", files=files))
        elif name in BUILTIN_TASKS:
            items = read_dialogue_items(heldout, name, "held-out dialogues")[:limit]
            t = Task(name, "exact_match", items, [str(heldout)])
            t.never_trained = check_never_trained(items, heldout, hash_cache)
            if need_pool:
                train = str(Path(heldout).with_name("train.jsonl"))
                if (train, name) not in train_cache:
                    train_cache[(train, name)] = read_dialogue_items(train, name, "training dialogues")
                t.pool, t.pool_source = train_cache[(train, name)], train
            tasks.append(t)
        elif name == "reward" or name.startswith("reward:"):
            if name == "reward":
                items = read_prompt_items(heldout, "held-out dialogues")[:limit]
                t = Task(name, "reward", items, [str(heldout)])
                t.never_trained = check_never_trained(items, heldout, hash_cache)
            else:
                if not name[7:]:
                    raise UserError(f"task {name!r}: give a prompt file after 'reward:', e.g. reward:prompts.jsonl")
                items = read_prompt_items(name[7:], "prompt file")[:limit]
                t = Task(name, "reward", items, [name[7:]])
            tasks.append(t)
        elif name.lower().endswith((".jsonl", ".ndjson")):
            items = read_task_file(name)[:limit]
            t = Task(name, items[0].kind, items, [name])
            if need_pool:
                src = pool
                if src is None:
                    p = Path(name)
                    sibling = p.with_name(p.name[:-len(p.suffix)] + ".pool" + p.suffix)
                    if not sibling.is_file():
                        raise UserError(f"task {name}: few-shot examples need a pool of worked examples "
                                        f"(the same format): pass --pool PATH or create {sibling}")
                    src = str(sibling)
                t.pool, t.pool_source = read_task_file(src, "example pool"), src
                if t.pool[0].kind != t.kind:
                    raise UserError(f"{src}: the example pool holds {t.pool[0].kind.replace('_', ' ')} items but "
                                    f"task {name} is {t.kind.replace('_', ' ')}")
            tasks.append(t)
        else:
            raise UserError(f"unknown task {name!r}; a task is {TASK_FORMS}")
    if not tasks:
        raise UserError(f"no tasks given; a task is {TASK_FORMS}")
    return tasks


def _examples_for(task: Task, prompter: Prompter, k: int, seed: int) -> list[list[Item]]:
    if not prompter.t.uses_examples:
        return [[] for _ in task.items]
    exclude = {it.key for it in task.items}
    usable = [p for p in task.pool if p.key not in exclude]
    if not usable:
        raise UserError(f"task {task.name}: the example pool {task.pool_source} has no item that is not "
                        f"also evaluated; few-shot examples must come from other questions")
    return [draw_examples(it, task.pool, k, seed, exclude) for it in task.items]


def _run_generation(task: Task, model, tok, engine, prompter: Prompter, mode: str, k: int, seed: int,
                    max_new_tokens: int, n_samples: int) -> dict:
    from chatsmith.engine import SamplingParams

    cot = mode == "cot"
    stop = [] if prompter.chat else (["\n\n"] if cot else ["\n"])
    shots = _examples_for(task, prompter, k, seed)
    ctx = model.cfg.max_seq_len
    prompts, texts, kept, fewer, too_long = [], [], [], 0, 0
    for it, ex in zip(task.items, shots):
        ids, text, n = prompter.fit(it, ex, max_new_tokens)
        fewer += n < len(ex)
        kept.append(n)
        texts.append(text)
        if len(ids) >= ctx:
            too_long += 1
            prompts.append(None)
        else:
            prompts.append(ids)
    todo = [i for i, p in enumerate(prompts) if p is not None]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=stop, seed=seed)
    outs = engine.generate_many([prompts[i] for i in todo], params) if todo else []
    replies = [""] * len(task.items)
    for i, c in zip(todo, outs):
        replies[i] = c.text
    extracted = [extract_cot_answer(r) if cot else r.strip() for r in replies]
    res = {"n": len(task.items)}
    if task.kind == "exact_match":
        ok = [check_answer(it.family, e, it.answers) for it, e in zip(task.items, extracted)]
        res.update(accuracy=sum(ok) / len(ok), correct=sum(ok))
    else:
        ok = None
        res.update(score_references(extracted, [it.references for it in task.items]))
    res.update(too_long=too_long, stop=stop)
    if prompter.t.uses_examples:
        res.update(shots_mean=sum(kept) / len(kept), fewer_shots=fewer)
    samples = []
    for i, it in enumerate(task.items[:n_samples]):
        s = {"loc": it.loc, "prompt": texts[i], "reply": replies[i], "extracted": extracted[i]}
        if ok is not None:
            s.update(answers=it.answers, correct=bool(ok[i]))
        else:
            s["references"] = it.references
        samples.append(s)
    res["samples"] = samples
    return res


def _run_choice(task: Task, model, tok, prompter: Prompter, k: int, seed: int, n_samples: int) -> dict:
    shots = _examples_for(task, prompter, k, seed)
    pairs, spans, texts, fewer = [], [], [], 0
    for it, ex in zip(task.items, shots):
        conts = []
        for ch in it.choices:
            conts.append(tok.encode(ch if prompter.chat else " " + ch))
        ids, text, n = prompter.fit(it, ex, max(len(c) for c in conts) - 1)
        fewer += n < len(ex)
        texts.append(text)
        spans.append((len(pairs), len(pairs) + len(conts)))
        pairs += [(ids, c) for c in conts]
    lps, truncated = continuation_logprobs(model, pairs, tok.pad_id)
    per_item = [lps[a:b] for a, b in spans]
    picked = pick_choices(task.items, per_item)
    res = {"n": len(task.items), "accuracy": picked["accuracy"], "accuracy_norm": picked["accuracy_norm"],
           "correct": picked["correct"], "correct_norm": picked["correct_norm"], "truncated": truncated}
    if prompter.t.uses_examples:
        res["fewer_shots"] = fewer
    res["samples"] = [{"loc": it.loc, "prompt": texts[i], "choices": it.choices, "label": it.label,
                       "logprobs": per_item[i], "picked": picked["picks"][i][0],
                       "picked_norm": picked["picks"][i][1]}
                      for i, it in enumerate(task.items[:n_samples])]
    return res


def _generate_replies(engine, items: list[Item], max_new_tokens: int, seed: int) -> list[str | None]:
    """Greedy chat-template replies; None where the prompt leaves no room in the context."""
    from chatsmith.engine import SamplingParams

    ctx = engine.model.cfg.max_seq_len
    prompts = [engine.tok.render_chat(it.messages, add_generation_prompt=True)[0] for it in items]
    todo = [i for i, p in enumerate(prompts) if len(p) < ctx]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=seed)
    outs = engine.generate_many([prompts[i] for i in todo], params) if todo else []
    replies: list[str | None] = [None] * len(items)
    for i, c in zip(todo, outs):
        replies[i] = c.text
    return replies


def _run_reward(task: Task, engine, scorer, engine_b, compare: str | None, max_new_tokens: int, seed: int,
                n_samples: int) -> dict:
    """Mean reward-model score of the model's replies; with a second model, both models' replies to
    the same prompts are scored and A's win rate is reported. Replies are greedy, through the chat
    template (a reward model scores chat conversations)."""
    replies = _generate_replies(engine, task.items, max_new_tokens, seed)
    replies_b = _generate_replies(engine_b, task.items, max_new_tokens, seed) if engine_b is not None else None
    keep = [i for i in range(len(task.items))
            if replies[i] is not None and (replies_b is None or replies_b[i] is not None)]
    if not keep:
        raise UserError(f"task {task.name}: no prompt fits the model's context with room to reply")
    conv = lambda i, r: task.items[i].messages + [{"role": "assistant", "content": r[i]}]  # noqa: E731
    scores = scorer.score([conv(i, replies) for i in keep])
    mean, std = _mean_std(scores)
    res = {"n": len(keep), "too_long": len(task.items) - len(keep), "mean_reward": mean, "reward_std": std}
    fams: dict[str, list[float]] = {}
    for i, sc in zip(keep, scores):
        fams.setdefault(task.items[i].family, []).append(sc)
    if len(fams) > 1:
        res["reward_by_family"] = {f: sum(v) / len(v) for f, v in sorted(fams.items())}
    scores_b = None
    if replies_b is not None:
        scores_b = scorer.score([conv(i, replies_b) for i in keep])
        res.update(compare=compare, mean_reward_b=_mean_std(scores_b)[0], **win_rate(scores, scores_b))
    samples = []
    for j, i in enumerate(keep[:n_samples]):
        s = {"loc": task.items[i].loc, "prompt": task.items[i].question, "reply": replies[i], "reward": scores[j]}
        if scores_b is not None:
            s.update(reply_b=replies_b[i], reward_b=scores_b[j])
        samples.append(s)
    res["samples"] = samples
    return res


def _run_lm(task: Task, model, tok, limit: int | None) -> dict:
    from chatsmith.data.corpus import iter_input_documents
    from chatsmith.eval.lm import score_documents

    texts = []
    for _, text in iter_input_documents(task.files):
        if limit is not None and len(texts) >= limit:
            break
        if text.strip():
            texts.append(text)
    if not texts:
        raise UserError(f"task {task.name}: {', '.join(task.files)} holds no text")
    return {"n": len(texts), "files": task.files, **score_documents(model, tok, texts)}


# --------------------------------------------------------------------------- the run

def format_table(metrics: dict) -> str:
    rows = [("task", "kind", "n", "metrics")]
    for name, r in metrics["tasks"].items():
        kind = r["kind"]
        if kind == "lm":
            m = f"loss {r['loss']:.4f}  ppl {r['perplexity']:.2f}  bpb {r['bits_per_byte']:.4f}"
        elif kind == "exact_match":
            m = f"accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']})"
        elif kind == "reference":
            m = f"BLEU {r['bleu']:.2f}  chrF {r['chrf']:.2f}"
        elif kind == "reward":
            m = f"reward {r['mean_reward']:.3f} ± {r['reward_std']:.3f}"
            if "win_rate" in r:
                m += (f"  vs {Path(r['compare']).name} {r['mean_reward_b']:.3f}: win rate {r['win_rate']:.1%} "
                      f"± {r['win_rate_ci95']:.1%} ({r['wins']}-{r['ties']}-{r['losses']})")
        else:
            m = f"acc {r['accuracy']:.3f}  acc_norm {r['accuracy_norm']:.3f}"
        rows.append((name, kind, str(r["n"]), m))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * max(len(x) for x in lines))
    head = (f"mode {metrics['mode']}" + (f", k={metrics['k']}" if metrics["k"] else "")
            + f", {'chat' if metrics['chat'] else 'plain'} prompts, seed {metrics['seed']}"
            + ("; reward tasks: chat-template prompts, greedy replies" if any(
                r["kind"] == "reward" for r in metrics["tasks"].values()) else ""))
    return head + "\n" + "\n".join(lines)


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_eval(model_dir: str | os.PathLike, tasks: list[str], out: str | os.PathLike | None = None,
             mode: str = "zero-shot", k: int = 3, limit: int | None = None, max_new_tokens: int = 64,
             seed: int = 0, templates_dir: str | os.PathLike | None = None, pool: str | None = None,
             heldout: str | None = None, chat: bool | None = None, device: str = "cpu",
             n_samples: int = 3, quiet: bool = False, model=None, tok=None, reward_model=None,
             compare: str | os.PathLike | None = None) -> dict:
    """Evaluate a model on ``tasks`` and write ``metrics.json`` into ``out`` (default
    ``MODEL_DIR/eval``); returns the metrics and prints a table unless ``quiet``.

    ``chat``: None decides from the checkpoint (chat template present and not a pretraining-stage
    model), False forces plain prompts (--no-chat), True the chat template. ``model``/``tok``
    may be passed already loaded (tests); otherwise they are loaded from ``model_dir``.
    ``reward_model``: a directory with a reward head (or an object with ``.score(conversations)``),
    needed by reward tasks; ``compare``: a second model directory whose replies the reward tasks
    score too, giving the win rate of ``model_dir`` against it.
    """
    t0 = time.time()
    if isinstance(tasks, (str, os.PathLike)):
        tasks = [tasks]
    tasks = [str(t) for t in tasks]
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"--k must be a positive integer, got {k!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"--limit must be a positive integer, got {limit!r}")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    template = load_template(mode, templates_dir)
    if mode == "k-shot" and not template.uses_examples:
        raise UserError(f"{template.path}: a k-shot template needs an {{examples}} placeholder")
    mc_template = load_template("zero-shot", templates_dir) if mode == "cot" else template
    need_pool = template.uses_examples or mc_template.uses_examples
    task_list = resolve_tasks(list(tasks), heldout, pool, need_pool, limit)
    has_reward = any(t.kind == "reward" for t in task_list)
    if has_reward and reward_model is None:
        raise UserError("reward tasks need a reward model: pass --reward-model DIR (a model trained with "
                        "`chatsmith reward`)")
    if compare is not None and not has_reward:
        raise UserError("--compare MODEL_B gives a win rate judged by the reward model: add a reward task "
                        "(--tasks reward, or reward:PROMPTS.jsonl) and --reward-model DIR")
    scorer = engine_b = None
    if has_reward:  # load the judge (and model B) before anything is generated: bad paths fail fast
        from chatsmith.runtime import resolve_device

        if isinstance(reward_model, (str, os.PathLike)):
            from chatsmith.train.reward import load_reward_model

            scorer = load_reward_model(reward_model, device=resolve_device(device))
        else:
            scorer = reward_model
        if compare is not None:
            from chatsmith.checkpoint import load_model
            from chatsmith.engine import Engine
            from chatsmith.tokenizer import Tokenizer

            engine_b = Engine(load_model(compare, device=resolve_device(device)), Tokenizer.load(compare))

    if model is None:
        from chatsmith.checkpoint import load_model
        from chatsmith.runtime import resolve_device

        model = load_model(model_dir, device=resolve_device(device))
    if tok is None:
        from chatsmith.tokenizer import Tokenizer

        tok = Tokenizer.load(model_dir)
    use_chat = model_has_chat_template(model_dir) if chat is None else bool(chat)
    ctx = model.cfg.max_seq_len
    engine = None

    results = {}
    for task in task_list:
        if not quiet:
            print(f"evaluating {task.name} ({task.kind}"
                  + (f", {len(task.items)} items" if task.items else "") + ")", file=sys.stderr, flush=True)
        if task.kind == "lm":
            r = _run_lm(task, model, tok, limit)
        elif task.kind == "reward":
            if engine is None:
                from chatsmith.engine import Engine

                engine = Engine(model, tok)
            r = _run_reward(task, engine, scorer, engine_b, None if compare is None else str(compare),
                            max_new_tokens, seed, n_samples)
        elif task.kind == "choice":
            p = Prompter(tok, mc_template, use_chat, ctx, worked_examples=False)
            r = _run_choice(task, model, tok, p, k, seed, n_samples)
            r["template"] = mc_template.path
        else:
            if engine is None:
                from chatsmith.engine import Engine

                engine = Engine(model, tok)
            p = Prompter(tok, template, use_chat, ctx, worked_examples=mode == "cot")
            r = _run_generation(task, model, tok, engine, p, mode, k, seed, max_new_tokens, n_samples)
            r["template"] = template.path
        if task.pool_source is not None and task.kind != "lm":
            r["pool"] = task.pool_source
        if task.kind != "lm":
            r["files"] = task.files
        if task.never_trained is not None:
            r["never_trained"] = task.never_trained
        results[task.name] = {"kind": task.kind, **r}

    metrics = {
        "model": str(model_dir),
        "mode": mode,
        "template": {"path": template.path, "text": template.text},
        "k": k if template.uses_examples else 0,  # examples per prompt (0: none)
        "seed": seed,
        "chat": use_chat,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "tasks": results,
        **({"reward_model": str(reward_model)} if isinstance(reward_model, (str, os.PathLike)) else {}),
        **({"compare": str(compare)} if compare is not None else {}),
        "seconds": round(time.time() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out_dir = Path(out) if out is not None else Path(model_dir) / "eval"
    path = out_dir / "metrics.json"
    _write_json_atomic(path, metrics)
    metrics["path"] = str(path)
    if not quiet:
        print(format_table(metrics))
        print(f"metrics written to {path}")
    return metrics
