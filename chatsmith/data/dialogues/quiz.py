"""quiz: questions from the bsdgames ``quiz`` files (capitals, elements, presidents, Latin, ...),
each with every answer the file accepts (checkable)."""

from __future__ import annotations

import re
from pathlib import Path

from chatsmith.data.dialogues.base import Family, Inputs, record
from chatsmith.data.dialogues.quiz_syntax import (QuizSyntaxError, expand_quiz_answer,
                                                  quiz_alternatives, quiz_canonical,
                                                  read_quiz_index, read_quiz_lines)
from chatsmith.data.sources import warn
from chatsmith.data.tasks import normalise

QUIZ_DIR = Path("/usr/share/games/bsdgames/quiz")


class Q:
    """One question template over a quiz file: ``text`` formats the canonical fields
    (``{0}``, ``{1}``, ...) and the answer is field ``ans``. ``each`` asks once per top-level
    alternative of field ``each`` ("What is a young {1} called?" for lion, tiger and bear),
    ``join`` lists every alternative in the reply ("Aaron Burr and George Clinton"), ``skip``
    rejects rows whose canonical answer is in it, ``title`` title-cases subject and reply."""

    def __init__(self, text: str, ans: int, each: int | None = None, join: str | None = None,
                 skip: tuple[str, ...] = (), title: bool = False, fix=None):
        self.text, self.ans, self.each, self.join = text, ans, each, join
        self.skip, self.title, self.fix = skip, title, fix


def _fix_arith(fields: list[str]) -> list[str] | None:
    """'63 - ... = 55' -> 'Fill in ...'; the one line missing its '=' gets it back; rows whose
    arithmetic does not check out are dropped."""
    expr = fields[0]
    if "=" not in expr:
        expr = expr.replace(" ...", " = ...")
    m = re.fullmatch(r"\s*(\d+|\.\.\.)\s*([-+x*])\s*(\d+|\.\.\.)\s*=\s*(\d+|\.\.\.)\s*", expr)
    if not m or not fields[1].strip().isdigit():
        return None
    a, op, b, c = m.groups()
    vals = [fields[1].strip() if v == "..." else v for v in (a, b, c)]
    x, y, z = map(int, vals)
    ok = {"-": x - y, "+": x + y, "x": x * y, "*": x * y}[op] == z
    return [expr.replace("...", "___"), fields[1]] if ok else None


def _fix_seq(fields: list[str]) -> list[str]:
    # "1,2,3" reads better as "1, 2, 3"; "seq{ence}" is a typo in the file for "seq{uence}".
    return [", ".join(fields[0].split(","))] + [f.replace("seq{ence}", "seq{uence}")
                                                for f in fields[1:]]


_CAPITAL_QS = lambda where: [Q("What is the capital of {0}?", 1),  # noqa: E731
                             Q("{1} is the capital of which " + where + "?", 0)]
# file -> question templates. Files not listed are skipped: areas (area codes), ed (editor
# commands), greek (transliterated), morse (dots trip the punctuation rules), spell (two
# lines), ucc (legal sections), seq-hard (needs the reasoning a tiny model cannot do).
QUIZ_TEMPLATES: dict[str, list[Q]] = {
    "africa": _CAPITAL_QS("African country"),
    "america": _CAPITAL_QS("country or territory in the Americas"),
    "asia": _CAPITAL_QS("Asian country"),
    "europe": _CAPITAL_QS("European country"),
    "province": [Q("What is the capital of the Canadian province of {0}?", 1),
                 Q("{1} is the capital of which Canadian province?", 0)],
    "midearth": [Q("In Tolkien's Middle-earth, what is the capital of {0}?", 1)],
    "state": [Q("What is the capital of the US state of {0}?", 1),
              Q("{1} is the capital of which US state?", 0),
              Q("What is the two-letter postal abbreviation of {0}?", 2),
              Q("What is the state flower of {0}?", 3, skip=("gok",))],
    "elements": [Q("What is the chemical symbol for {3}?", 0),
                 Q("Which chemical element has the symbol {0}?", 3),
                 Q("What is the atomic number of {3}?", 1),
                 Q("Which chemical element has atomic number {1}?", 3)],
    "pres": [Q("Who became President of the United States after {0}?", 3),
             Q("Who was Vice President of the United States under {0}?", 2, join=" and "),
             Q("In which years was {0} President of the United States?", 1)],
    "sov": [Q("Who succeeded {0} on the English throne?", 2)],
    "inca": [Q("Who succeeded the Inca ruler {0}?", 1, title=True)],
    "chinese": [Q("In the Chinese zodiac, which animal's year follows the year of the {0}?", 1)],
    "latin": [Q("What does the Latin word '{0}' mean in English?", 1)],
    "collectives": [Q("What is the collective noun for a group of {0}?", 1, each=0)],
    "babies": [Q("What is a young {1} called?", 0, each=1),
               Q("A {0} is the young of which animal?", 1, each=0)],
    "sexes": [Q("What is the female counterpart of '{0}'?", 1),
              Q("What is the male counterpart of '{1}'?", 0)],
    "posneg": [Q("What is the opposite of '{0}'?", 1, each=0)],
    "flowers": [Q("In the language of flowers, what does the {0} symbolise?", 1)],
    "murders": [Q("Who killed {0}?", 1, each=0)],
    "locomotive": [Q("What is the name of the {0} locomotive wheel arrangement?", 1)],
    "mult": [Q("What is {0}?", 1)],
    "arith": [Q("Fill in the missing number: {0}", 1, fix=_fix_arith)],
    "seq-easy": [Q("What number comes next in the sequence {0}, ...?", 1, fix=_fix_seq),
                 Q("What is the name of the sequence {0}, ...?", 2, fix=_fix_seq)],
    "trek": [Q("In the original Star Trek, what is the {0}?", 1)],
    "bard": [Q('Which Shakespeare play has the line "{0}"?', 2),
             Q('In Shakespeare, which character says "{0}"?', 3),
             Q('In Shakespeare, what line comes after "{0}"?', 1)],
    "poetry": [Q('Which poem has the line "{0}"?', 2),
               Q('Who wrote the poem "{2}"?', 3),
               Q('In the poem "{2}", what line comes after "{0}"?', 1)],
}


def _subjects(field: str, each: bool) -> list[str]:
    alts = quiz_alternatives(field)
    return alts if each else alts[:1]


def read_quiz(quiz_dir: Path) -> tuple[list[dict], dict]:
    """Question/answer records from the quiz files. A question asked by several rows (a young
    fox is a kitten and a pup) becomes one record whose answers are all of theirs."""
    index = read_quiz_index(quiz_dir)
    stats = {"files_used": [], "files_skipped": [], "rows_skipped": 0}
    merged: dict[str, dict] = {}  # normalised question -> record
    for path in sorted(quiz_dir.iterdir()) if quiz_dir.is_dir() else []:
        name = path.name
        if name == "index" or not path.is_file():
            continue
        templates = QUIZ_TEMPLATES.get(name)
        cols = index.get(name)
        if templates is None or (index and cols is None):
            stats["files_skipped"].append(name)
            continue
        stats["files_used"].append(name)
        for lineno, fields in read_quiz_lines(path):
            if cols is not None and len(fields) != len(cols):
                stats["rows_skipped"] += 1
                continue
            for q in templates:
                fs = q.fix(fields) if q.fix else fields
                if fs is None:
                    stats["rows_skipped"] += 1
                    break
                try:
                    _add_quiz_question(merged, q, fs, name)
                except QuizSyntaxError as e:
                    warn(f"{path}:{lineno}: {e}; row skipped")
                    stats["rows_skipped"] += 1
                    break
    return list(merged.values()), stats


def _add_quiz_question(merged: dict, q: Q, fs: list[str], name: str) -> None:
    used = [int(i) for i in re.findall(r"\{(\d+)\}", q.text)]
    if any(i >= len(fs) or not fs[i].strip() for i in used + [q.ans]):
        return
    answer_field = fs[q.ans]
    answers = expand_quiz_answer(answer_field)
    alts = quiz_alternatives(answer_field)
    if not answers or not alts or normalise(alts[0]) in q.skip or alts[0].endswith("-"):
        return  # no answer, an unknown one ("gok"), or an open term ("2009-")
    reply = q.join.join(alts) if q.join and len(alts) > 1 else alts[0]
    if q.join and len(alts) > 1:
        answers = [reply] + answers
    if q.title:
        reply = reply.title()
    base = {i: quiz_canonical(fs[i]) for i in used}
    if q.title:
        base = {i: v.title() for i, v in base.items()}
    variants = _subjects(fs[q.each], True) if q.each is not None else [None]
    for v in variants:
        vals = dict(base)
        if v is not None:
            vals[q.each] = v
        question = re.sub(r"\{(\d+)\}", lambda m: vals[int(m.group(1))], q.text)
        k = normalise(question)
        if k in merged:
            rec = merged[k]
            rec["answers"] += [a for a in answers if a not in rec["answers"]]
        else:
            merged[k] = record("quiz", [question, reply], f"quiz/{name}", list(answers))



class Quiz(Family):
    name, checkable, default_cap = "quiz", True, 3000

    def missing(self, inputs: Inputs) -> str | None:
        if not (inputs.quiz_dir / "index").is_file():
            return f"{inputs.quiz_dir}/index not found (apt-get install bsdgames)"
        return None

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], dict]:
        return read_quiz(inputs.quiz_dir)
