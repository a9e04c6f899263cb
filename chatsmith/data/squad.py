"""Reader and writer for extractive question answering data in SQuAD's JSON format.

One JSON document::

    {"version": "v2.0",
     "data": [{"title": "...",
               "paragraphs": [{"context": "...",
                               "qas": [{"id": "...", "question": "...",
                                        "answers": [{"text": "...", "answer_start": 17}],
                                        "is_impossible": false}]}]}]}

v1.1 has no ``is_impossible`` (every question has an answer); v2.0 adds unanswerable
questions with ``is_impossible: true`` and an empty ``answers`` list (their
``plausible_answers`` are ignored). Each answer must occur in its context at its offset
(``context[answer_start : answer_start + len(text)] == text``): a model learns the span from
the offset, so an offset that is off by a few characters silently teaches it the wrong
tokens. Every bad record raises a UserError naming the file and the question id (or the
JSON path when there is no usable id).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from chatsmith.atomic import write_json
from chatsmith.data.corpus import lone_surrogate_at
from chatsmith.errors import UserError


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset in the context


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: list[Answer] = field(default_factory=list)  # empty: unanswerable (v2.0)
    title: str = ""

    @property
    def is_impossible(self) -> bool:
        return not self.answers


@dataclass(frozen=True)
class SquadData:
    examples: list[QAExample]
    version: str  # "v1.1" (every question answerable) or "v2.0"


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{where}: {msg}")


def _parse_qa(qa, context: str, title: str, path: Path, jpath: str, seen: set[str]) -> QAExample:
    _need(isinstance(qa, dict), f"{path}: {jpath}", "a question must be a JSON object")
    qid = qa.get("id")
    _need(isinstance(qid, str) and qid.strip() != "", f"{path}: {jpath}",
          "the question has no \"id\" string")
    where = f"{path}: question id {qid!r}"
    _need(qid not in seen, where, "the id is used by another question; ids must be unique")
    seen.add(qid)
    question = qa.get("question")
    _need(isinstance(question, str) and question.strip() != "", where,
          "\"question\" must be a non-empty string")
    impossible = qa.get("is_impossible", False)
    _need(isinstance(impossible, bool), where, "\"is_impossible\" must be true or false")
    raw = qa.get("answers", [])
    _need(isinstance(raw, list), where, "\"answers\" must be a list")
    if impossible:
        _need(not raw, where, "is marked is_impossible but lists answers")
        return QAExample(qid, question, context, [], title)
    _need(bool(raw), where, "has no answers and is not marked \"is_impossible\": true (SQuAD v2.0 "
          "marks unanswerable questions that way)")
    answers = []
    for k, a in enumerate(raw):
        w = f"{where}, answer {k}"
        _need(isinstance(a, dict), w, "an answer must be an object {\"text\", \"answer_start\"}")
        text, start = a.get("text"), a.get("answer_start")
        _need(isinstance(text, str) and text != "", w, "\"text\" must be a non-empty string")
        _need(isinstance(start, int) and not isinstance(start, bool) and start >= 0, w,
              "\"answer_start\" must be a non-negative integer")
        found = context[start:start + len(text)]
        if found != text:
            at = context.find(text)
            hint = (f"the text occurs at offset {at}" if at >= 0 else "the text does not occur in "
                    "the context at all")
            raise UserError(f"{w}: the answer {text!r} is not at offset {start} of its context "
                            f"(found {found!r}); {hint}")
        answers.append(Answer(text, start))
    return QAExample(qid, question, context, answers, title)


def read_squad(path: str | os.PathLike) -> SquadData:
    """Every question of a SQuAD v1.1 or v2.0 file, checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected SQuAD JSON: {{\"data\": [...]}})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + 3 * raw.startswith(b"\xef\xbb\xbf")  # utf-8-sig counts after the BOM
        line = raw.count(b"\n", 0, at) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte offset {at})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError:  # an integer past Python's digit limit
        m = re.search(r"\d{4301,}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else 1
        raise UserError(f"{path}:{line}: a number of more than 4300 digits, which chatsmith does not read") from None
    except RecursionError:
        raise UserError(f"{path}:1: JSON nested too deeply to read") from None
    bad = lone_surrogate_at(doc)
    if bad is not None:
        raise UserError(f"{path}: {bad} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which "
                        f"is not Unicode text")
    _need(isinstance(doc, dict) and isinstance(doc.get("data"), list), str(path),
          "not SQuAD JSON: expected an object with a \"data\" list")
    examples: list[QAExample] = []
    seen: set[str] = set()
    v2 = doc.get("version") == "v2.0"
    for i, article in enumerate(doc["data"]):
        jp = f"data[{i}]"
        _need(isinstance(article, dict) and isinstance(article.get("paragraphs"), list),
              f"{path}: {jp}", "an article must be an object with a \"paragraphs\" list")
        title = article.get("title", "")
        _need(isinstance(title, str), f"{path}: {jp}", "\"title\" must be a string")
        for j, para in enumerate(article["paragraphs"]):
            pj = f"{jp}.paragraphs[{j}]"
            _need(isinstance(para, dict), f"{path}: {pj}", "a paragraph must be a JSON object")
            context = para.get("context")
            _need(isinstance(context, str) and context.strip() != "", f"{path}: {pj}",
                  "\"context\" must be a non-empty string")
            qas = para.get("qas")
            _need(isinstance(qas, list), f"{path}: {pj}", "\"qas\" must be a list")
            for k, qa in enumerate(qas):
                ex = _parse_qa(qa, context, title, path, f"{pj}.qas[{k}]", seen)
                v2 = v2 or ex.is_impossible or "is_impossible" in qa
                examples.append(ex)
    _need(bool(examples), str(path), "the file holds no questions")
    return SquadData(examples, "v2.0" if v2 else "v1.1")


def write_squad(path: str | os.PathLike, articles: list[dict], version: str = "v2.0") -> None:
    """Write articles (already in SQuAD's ``{"title", "paragraphs"}`` shape) atomically."""
    write_json(path, {"version": version, "data": articles}, indent=None)


def gold_answers(data: SquadData) -> dict[str, list[str]]:
    """id -> gold answer texts (``[]`` for unanswerable), the shape :mod:`chatsmith.eval.squad`
    scores against."""
    return {ex.id: [a.text for a in ex.answers] for ex in data.examples}


__all__ = ["Answer", "QAExample", "SquadData", "read_squad", "write_squad", "gold_answers"]
