"""The built-in supervised fine-tuning (chat) dataset.

``build_dialogues`` assembles conversations from sources that ``scripts/setup.sh`` installs
through package managers, plus the project's own generators, and writes::

    OUT/train.jsonl          one conversation per line
    OUT/heldout.jsonl        conversations never trained on (evaluation)
    OUT/dialogues_meta.json  counts per family and split, what was built, held-out prompt hashes

Each line is OpenAI/TRL messages plus metadata::

    {"messages": [{"role": "user", "content": "What is 37 + 48?"},
                  {"role": "assistant", "content": "37 + 48 = 85. The answer is 85."}],
     "family": "arithmetic", "source": "tasks/arithmetic", "answers": ["85"]}

``answers`` (accepted alternatives, graded by :func:`chatsmith.data.tasks.check_answer`) is
present only for checkable families. Families:

=============  ==================================================================================
chatterbot     English and Chinese YAML conversations from the ``chatterbot-corpus`` wheel
quiz           bsdgames ``quiz`` files: capitals, elements, presidents, Latin, ... (checkable)
definition     WordNet: "What does 'X' mean?" -> the gloss and an example sentence
arithmetic     :mod:`chatsmith.data.tasks`, reply = the worked answer (checkable)
word_problem   :mod:`chatsmith.data.tasks`, reply = the worked answer (checkable)
number_sense   :mod:`chatsmith.data.tasks`: larger/smaller of two numbers, the number after/before (checkable)
identity       hand-written: the assistant is chatsmith (English and Chinese)
poem           fortunes-zh 唐诗三百首 / 宋诗一百首: "背诵李白的《静夜思》" -> the poem
=============  ==================================================================================

The held-out split is chosen per family with a fixed seed and is disjoint from train by
*prompt hash* (:func:`prompt_hash`: SHA-256 of the normalised user turns): records that share a
prompt, or that share an underlying problem (two phrasings of one arithmetic question, two
requests for one poem), are linked and always land on the same side. The held-out hashes are
listed in the meta file so later code can verify the split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Iterable

from chatsmith.data.sources import _ANSI, read_text_file, resolve_overstrike, split_fortunes
from chatsmith.errors import UserError
from chatsmith.data.tasks import generate_tasks, normalise

QUIZ_DIR = Path("/usr/share/games/bsdgames/quiz")
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
CHATTERBOT_WHEEL_GLOB = "chatterbot_corpus-*.whl"  # pinned to 1.3.3 by scripts/setup.sh

FAMILIES = ("chatterbot", "quiz", "definition", "arithmetic", "word_problem", "number_sense", "identity", "poem")
CHECKABLE = frozenset({"quiz", "arithmetic", "word_problem", "number_sense"})
# Records per family before the split. Together about 16k: a tiny model on a 2-core CPU gets
# through them in minutes, and the checkable families make up well over half.
DEFAULT_CAPS = {"chatterbot": 3000, "quiz": 3000, "definition": 3000, "arithmetic": 4000,
                "word_problem": 3000, "number_sense": 2000, "identity": 1000, "poem": 1000}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def prompt_hash(messages: list[dict]) -> str:
    """The identity of a conversation's question side: SHA-256 (first 16 hex digits) of its
    user turns, each normalised (:func:`chatsmith.data.tasks.normalise`), joined by newlines."""
    users = "\n".join(normalise(m["content"]) for m in messages if m["role"] == "user")
    return hashlib.sha256(users.encode("utf-8")).hexdigest()[:16]


def _record(family: str, turns: list[str], source: str, answers: list[str] | None = None,
            key: str | None = None) -> dict:
    """turns alternate user, assistant, user, ... and end with the assistant."""
    assert turns and len(turns) % 2 == 0, turns
    rec = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns)],
           "family": family, "source": source}
    if answers:
        rec["answers"] = answers
    if key:
        rec["_key"] = key  # links records that must share a split; not written
    return rec


def _rng(*parts) -> random.Random:
    # str seeds go through SHA-512, so this is stable across runs and Python versions.
    return random.Random(":".join(["chatsmith-dialogues", *map(str, parts)]))


def _sample(items: list, cap: int | None, rng: random.Random) -> list:
    """At most ``cap`` items, chosen at random, in their original order."""
    if cap is None or len(items) <= cap:
        return list(items)
    keep = sorted(rng.sample(range(len(items)), cap))
    return [items[i] for i in keep]


# =========================================================================== chatterbot

# These two files list one prompt followed by *alternative* replies, not a conversation
# ("You are arrogant", "Arrogance is not one of my emotions.", "I have no real emotions, ...").
_ALTERNATIVE_REPLY_FILES = {"english/emotion.yml", "english/computers.yml"}
# Machine-translated nonsense ("没有告诉婆娘任何人" ...).
_SKIP_CHATTERBOT_FILES = {"chinese/gossip.yml"}
_CHATTERBOT_LANGS = ("english", "chinese")


def _yaml_loader():
    import yaml
    # BaseLoader keeps every scalar a string: SafeLoader would turn "Yes" into True and
    # "1963" into an int.
    return yaml, getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def find_chatterbot_wheel(sources_dir: Path) -> Path | None:
    found = sorted(Path(sources_dir).glob(CHATTERBOT_WHEEL_GLOB))
    return found[-1] if found else None


def read_chatterbot(wheel: Path, identity_prompts: set[str]) -> tuple[list[dict], dict]:
    """One record per conversation, read straight from the wheel (no install). A trailing
    user turn is dropped so each record ends with the assistant; conversations that ask the
    bot who it is are dropped (the identity family answers those)."""
    yaml, loader = _yaml_loader()
    out, stats = [], {"conversations": 0, "dropped": 0}
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".yml"))
        for lang in _CHATTERBOT_LANGS:
            for name in names:
                rel = name.split("/data/", 1)[-1]
                if not rel.startswith(lang + "/") or rel in _SKIP_CHATTERBOT_FILES:
                    continue
                try:
                    doc = yaml.load(z.read(name).decode("utf-8"), Loader=loader)
                except Exception as e:  # a broken file in the wheel: skip it, keep the rest
                    warn(f"{wheel.name}:{name}: cannot parse YAML ({e}); skipped")
                    continue
                convs = (doc or {}).get("conversations") or []
                topic = rel[:-len(".yml")]
                for conv in convs:
                    stats["conversations"] += 1
                    if not isinstance(conv, list) or not all(isinstance(t, str) for t in conv):
                        stats["dropped"] += 1
                        continue
                    turns = [t.strip() for t in conv]
                    if any(not t for t in turns) or len(turns) < 2:
                        stats["dropped"] += 1
                        continue
                    if (normalise(turns[0]) in identity_prompts
                            or any("chatterbot" in t.lower() for t in turns)):
                        stats["dropped"] += 1
                        continue
                    if rel in _ALTERNATIVE_REPLY_FILES:
                        convs_out = [[turns[0], r] for r in turns[1:]]
                    else:
                        convs_out = [turns[:len(turns) - len(turns) % 2]]
                    for c in convs_out:
                        out.append(_record("chatterbot", c, f"chatterbot/{topic}"))
    return out, stats


# =========================================================================== quiz

class QuizSyntaxError(ValueError):
    pass


def _parse_quiz_alt(s: str, pos: int = 0, closer: str = "") -> tuple[list, int]:
    """Parse quiz(6) answer syntax into alternatives: a list of sequences, each a list of
    literal characters and ``("opt"|"grp", alternatives)`` items. ``{x}`` is optional,
    ``[a|b]`` a group of alternatives, ``a|b`` alternatives, ``\\c`` a literal c."""
    seqs: list[list] = [[]]
    while pos < len(s):
        c = s[pos]
        if c == "\\" and pos + 1 < len(s):
            seqs[-1].append(s[pos + 1])
            pos += 2
        elif c == "|":
            seqs.append([])
            pos += 1
        elif c in "{[":
            inner, pos = _parse_quiz_alt(s, pos + 1, "}" if c == "{" else "]")
            seqs[-1].append(("opt" if c == "{" else "grp", inner))
        elif c in "}]":
            if c != closer:
                raise QuizSyntaxError(f"unexpected {c!r} at {pos} in {s!r}")
            return seqs, pos + 1
        else:
            seqs[-1].append(c)
            pos += 1
    if closer:
        raise QuizSyntaxError(f"missing {closer!r} in {s!r}")
    return seqs, pos


def _tidy(s: str) -> str:
    if "\b" in s:
        # Accents drawn as terminal overstrikes: "e\b'" is é. Ø and Å are not in the
        # overstrike table, so they are done here.
        for pair, char in (("o\b/", "ø"), ("/\bo", "ø"), ("°\bA", "Å"), ("A\b°", "Å")):
            s = s.replace(pair, char)
        s = resolve_overstrike(s)
    return re.sub(r"\s+", " ", s).strip()


def _expand_seqs(seqs: list, limit: int) -> list[str]:
    out: list[str] = []
    for seq in seqs:
        out.extend(_expand_seq(seq, limit))
    return out[:limit]


def _expand_seq(seq: list, limit: int) -> list[str]:
    results = [""]
    for item in seq:
        if isinstance(item, str):
            results = [r + item for r in results]
            continue
        kind, inner = item
        options = _expand_seqs(inner, limit)
        if kind == "opt":
            options = [""] + options
        results = [r + o for r in results for o in options][:limit]
    return results


def _full_seq(seq: list) -> str:
    # Every optional part included, the first of every set of alternatives.
    return "".join(item if isinstance(item, str) else _full_seq(item[1][0]) for item in seq)


def quiz_alternatives(field: str) -> list[str]:
    """The top-level alternatives of a quiz field, each in its canonical form:
    ``"{the }Nile|Nil"`` -> ``["the Nile", "Nil"]``."""
    seqs, _ = _parse_quiz_alt(field)
    return [c for c in (_canonical(_full_seq(s)) for s in seqs) if c]


def expand_quiz_answer(field: str, limit: int = 256) -> list[str]:
    """Every string a quiz field accepts, first the canonical one, without duplicates:
    ``"{the }Nile|Nil"`` -> ``["the Nile", "Nile", "Nil"]``; ``"Hen[ry|] [I|1]"`` ->
    ``["Henry I", "Henry 1", "Hen I", "Hen 1"]``. Raises QuizSyntaxError on unbalanced
    brackets."""
    seqs, _ = _parse_quiz_alt(field)
    out, seen = [], set()
    firsts = [_canonical(_full_seq(s)) for s in seqs]
    for s in firsts + [_tidy(x) for x in _expand_seqs(seqs, limit)]:
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


_ANNOTATION = re.compile(r"\s*\([^()]*\)$")   # "7(integers)", "None (1841-5)"
_ACT_SCENE = re.compile(r"\s+[IVX]+-[ivx]+$")   # "Hamlet III-i"


def _canonical(s: str) -> str:
    s = _tidy(s)
    for pat in (_ANNOTATION, _ACT_SCENE):
        t = pat.sub("", s)
        if t:
            s = t
    return s


def quiz_canonical(field: str) -> str:
    """The clean form of a quiz field used in questions and replies: the first alternative
    with its optional parts, minus trailing annotations (``"7{(integers)}"`` -> ``"7"``,
    ``"Hamlet{ III-i}"`` -> ``"Hamlet"``)."""
    alts = quiz_alternatives(field)
    return alts[0] if alts else ""


def split_quiz_line(line: str) -> list[str]:
    """Split on unescaped ':' (``\\:`` is a literal colon and stays escaped)."""
    fields, cur, i = [], [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur.append(line[i:i + 2])
            i += 2
            continue
        if c == ":":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    fields.append("".join(cur))
    return fields


def read_quiz_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) per entry; a line ending in a backslash continues on the next."""
    out, buf, start = [], "", 0
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not buf:
            start = n
        if line.endswith("\\") and not line.endswith("\\\\"):
            buf += line[:-1]
            continue
        buf += line
        if buf.strip():
            out.append((start, split_quiz_line(buf)))
        buf = ""
    if buf.strip():
        out.append((start, split_quiz_line(buf)))
    return out


def read_quiz_index(quiz_dir: Path) -> dict[str, list[str]]:
    """file name -> its column names from the quiz ``index`` ("africa" -> ["African", "capital"])."""
    out = {}
    index = quiz_dir / "index"
    if not index.is_file():
        return out
    for line in read_text_file(index).splitlines():
        fields = split_quiz_line(line.strip())
        if len(fields) < 3:
            continue
        try:
            out[Path(fields[0]).name] = [quiz_canonical(f) for f in fields[1:]]
        except QuizSyntaxError:
            continue
    return out


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
            merged[k] = _record("quiz", [question, reply], f"quiz/{name}", list(answers))


# =========================================================================== definitions

_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_LEMMA_OK = re.compile(r"[a-z][a-z-]*[a-z]")


def _wordnet_index(path: Path) -> list[tuple[str, int, int]]:
    """(lemma, tagged-sense count, byte offset of the most frequent sense) per index line."""
    out = []
    with open(path, "rb") as f:
        for raw in f:
            if raw.startswith(b"  "):  # licence header
                continue
            p = raw.decode("utf-8", "replace").split()
            try:
                n_ptr = int(p[3])
                tagged = int(p[5 + n_ptr])
                first = int(p[6 + n_ptr])
            except (IndexError, ValueError):
                continue
            out.append((p[0], tagged, first))
    return out


def _wordnet_entry(f, offset: int, lemma: str) -> tuple[str, str, str | None] | None:
    """(word as written, definition, example or None) for the synset at ``offset``, or None
    when the word is capitalised there (a proper noun) or the gloss is unusable."""
    f.seek(offset)
    line = f.readline().decode("utf-8", "replace")
    head, sep, gloss = line.partition(" | ")
    if not sep:
        return None
    p = head.split()
    try:
        n_words = int(p[3], 16)
    except (IndexError, ValueError):
        return None
    words = [re.sub(r"\(.*\)$", "", w) for w in p[4:4 + 2 * n_words:2]]
    word = next((w for w in words if w.lower() == lemma), None)
    if word is None or word != lemma:
        return None
    gloss = gloss.strip()
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    if not definition or len(definition) > 300:
        return None
    example = next((e for e in examples if lemma in e.lower()), examples[0] if examples else None)
    return word, definition, example


_DEF_PROMPTS = ("What does '{w}' mean?", "Define {w}.", "What is the meaning of the word '{w}'?",
                "What is the definition of '{w}'?", "What does the word \"{w}\" mean?",
                "Can you tell me what '{w}' means?")


def read_definitions(wordnet_dir: Path, cap: int | None, seed: int) -> tuple[list[dict], dict]:
    """One definition question per sampled lemma: single-word lemmas seen in WordNet's tagged
    corpus (so common words), each with its most frequent sense; a lemma in several parts of
    speech takes the one with most tagged senses."""
    best: dict[str, tuple[int, int, str]] = {}  # lemma -> (tagged senses, offset, pos)
    for pos in _POS:
        path = wordnet_dir / f"index.{pos}"
        if not path.is_file():
            continue
        for lemma, tagged, offset in _wordnet_index(path):
            if tagged < 1 or not _LEMMA_OK.fullmatch(lemma):
                continue
            cur = best.get(lemma)
            if cur is None or tagged > cur[0]:
                best[lemma] = (tagged, offset, pos)
    lemmas = sorted(best)
    rng = _rng("definition", seed)
    rng.shuffle(lemmas)
    files = {pos: open(wordnet_dir / f"data.{pos}", "rb") for pos in _POS
             if (wordnet_dir / f"data.{pos}").is_file()}
    out = []
    try:
        for lemma in lemmas:
            if cap is not None and len(out) >= cap:
                break
            _, offset, pos = best[lemma]
            if pos not in files:
                continue
            got = _wordnet_entry(files[pos], offset, lemma)
            if got is None:
                continue
            word, definition, example = got
            prompts = _DEF_PROMPTS + (("What does it mean to {w}?",) if pos == "verb" else ())
            question = rng.choice(prompts).format(w=word)
            end = "" if definition[-1] in ".!?" else "."
            reply = f"{word} ({_POS[pos]}): {definition}{end}"
            if example:
                reply += f' For example: "{example}".'
            out.append(_record("definition", [question, reply], f"wordnet/{pos}",
                               key=f"definition:{lemma}"))
    finally:
        for f in files.values():
            f.close()
    return out, {"candidates": len(lemmas)}


# =========================================================================== tasks

def read_tasks(family: str, n: int, seed: int) -> list[dict]:
    """``n`` tasks with distinct questions (the generator's draws are independent, so it is
    asked for more and repeats are passed over)."""
    out, seen = [], set()
    for t in generate_tasks(family, 3 * n + 100, seed):
        q = normalise(t["question"])
        if q in seen:
            continue
        seen.add(q)
        out.append(_record(family, [t["question"], t["worked"]], f"tasks/{family}",
                           answers=t["answers"], key=t["key"]))
        if len(out) >= n:
            break
    return out


# =========================================================================== identity

# (prompts, replies): every prompt is paired with the replies in turn, so each phrasing is
# seen and the replies vary.
_IDENTITY_EN = [
    (["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.",
      "Hi! Who am I talking to?", "What kind of AI are you?"],
     ["I'm chatsmith, a small open-source assistant. I was trained from scratch with chatsmith, "
      "a project that builds a ChatGPT-style model end to end in plain PyTorch.",
      "I am chatsmith: a small open-source chat assistant, trained from scratch with the "
      "chatsmith project. I'm a tiny model, so I can make mistakes; please check anything "
      "important.",
      "Hello! I'm chatsmith, a small open-source language model trained from scratch with "
      "chatsmith. I can chat, answer simple questions and do some arithmetic."]),
    (["What's your name?", "What is your name?", "Do you have a name?", "What should I call you?"],
     ["My name is chatsmith.", "I'm called chatsmith.",
      "You can call me chatsmith. I'm a small open-source assistant."]),
    (["Which model are you?", "What model are you?", "What language model are you?"],
     ["I'm chatsmith, a small open-source language model trained from scratch with chatsmith.",
      "I'm chatsmith: a tiny GPT-style model, pretrained and fine-tuned from scratch with the "
      "open-source chatsmith project."]),
    (["Are you ChatGPT?", "Are you GPT-4?", "Are you made by OpenAI?"],
     ["No, I'm chatsmith, a small open-source model trained from scratch with chatsmith. I'm "
      "much smaller than ChatGPT.",
      "I'm not ChatGPT. I'm chatsmith, a tiny open-source assistant trained from scratch with "
      "the chatsmith project."]),
    (["Who made you?", "Who created you?", "Who trained you?", "Who built you?"],
     ["I was trained from scratch with chatsmith, an open-source project that builds a chat "
      "assistant end to end in plain PyTorch.",
      "I'm chatsmith. Whoever ran the chatsmith training pipeline trained me, from scratch, "
      "with open-source code."]),
    (["How were you trained?", "How were you made?"],
     ["With chatsmith: first a tokenizer was trained, then a small GPT was pretrained on public "
      "text, then it was fine-tuned on conversations like this one.",
      "I was pretrained from scratch on public-domain text and then fine-tuned on "
      "conversations, all with the open-source chatsmith project."]),
    (["Are you open source?", "Is your code open source?"],
     ["Yes. I'm chatsmith, and the code that trained me is open source.",
      "Yes, chatsmith is an open-source project, and I was trained with it."]),
    (["Are you a human?", "Are you a real person?", "Are you alive?"],
     ["No, I'm chatsmith, a small AI language model. I'm not a person.",
      "No. I'm an AI assistant called chatsmith, a small language model trained from scratch."]),
    (["What can you do?", "How can you help me?"],
     ["I'm chatsmith, a small assistant. I can chat, answer simple questions, define words, "
      "do small arithmetic problems and recite some Chinese poems. I'm a tiny model, so "
      "double-check what I say.",
      "I can chat, answer simple quiz questions, explain words and solve small arithmetic and "
      "word problems. I'm small, so I make mistakes."]),
]
_IDENTITY_ZH = [
    (["你是谁？", "你是什么？", "介绍一下你自己。", "请做个自我介绍。", "我在和谁聊天？"],
     ["我是 chatsmith，一个小型开源助手，用 chatsmith 项目从零开始训练而成。",
      "你好！我是 chatsmith，一个从零训练的小型开源语言模型。我能聊天、回答简单的问题、做一些算术。",
      "我是 chatsmith，一个小型的开源聊天助手。我的模型很小，可能会出错，重要的事情请再核实。"]),
    (["你叫什么名字？", "你的名字是什么？", "我该怎么称呼你？"],
     ["我叫 chatsmith。", "我的名字是 chatsmith，一个小型开源助手。"]),
    (["你是哪个模型？", "你是什么模型？"],
     ["我是 chatsmith，一个用 chatsmith 项目从零训练的小型开源语言模型。"]),
    (["你是ChatGPT吗？", "你是 OpenAI 做的吗？"],
     ["不是，我是 chatsmith，一个用 chatsmith 从零训练的小型开源模型，比 ChatGPT 小得多。",
      "我不是 ChatGPT。我是 chatsmith，一个小型开源助手。"]),
    (["谁创造了你？", "谁训练了你？", "你是谁做的？"],
     ["我是用开源项目 chatsmith 从零开始训练的，它用纯 PyTorch 完整地构建一个聊天助手。",
      "我由 chatsmith 训练流程从零训练而成，代码是开源的。"]),
    (["你是怎么训练出来的？"],
     ["先训练分词器，再在公开文本上预训练一个小型 GPT，最后用对话数据微调，这些都由 chatsmith 完成。"]),
    (["你是开源的吗？"],
     ["是的，我是 chatsmith，训练我的代码是开源的。"]),
    (["你是人吗？", "你是真人吗？"],
     ["不是，我是 chatsmith，一个小型的人工智能语言模型。",
      "我不是人，我是一个叫 chatsmith 的 AI 助手。"]),
    (["你能做什么？", "你会什么？"],
     ["我是 chatsmith，可以聊天、回答简单的问题、解释单词、做简单的算术题，还会背一些唐诗。我的模型很小，请核实重要信息。"]),
]
_IDENTITY_MULTI = [
    ["Hello!", "Hello! I'm chatsmith, a small open-source assistant. How can I help you?",
     "What's your name again?", "My name is chatsmith."],
    ["你好！", "你好！我是 chatsmith，一个小型开源助手。有什么可以帮你的吗？",
     "你叫什么？", "我叫 chatsmith。"],
    ["Hi there", "Hi! I'm chatsmith. What would you like to talk about?",
     "Are you ChatGPT?", "No, I'm chatsmith, a much smaller open-source model trained from "
     "scratch with chatsmith."],
]


def identity_prompts() -> set[str]:
    """Normalised prompts the identity family answers (other sources' answers to them are
    dropped so the assistant has one consistent identity)."""
    out = set()
    for table in (_IDENTITY_EN, _IDENTITY_ZH):
        for prompts, _ in table:
            out.update(normalise(p) for p in prompts)
    out.update({"who are you", "what is your name", "你是谁", "你叫什么名字"})
    return out


def read_identity() -> list[dict]:
    out = []
    for lang, table in (("en", _IDENTITY_EN), ("zh", _IDENTITY_ZH)):
        for prompts, replies in table:
            for i, p in enumerate(prompts):
                # Each prompt once with the next reply in turn, and a second time with another.
                for j in {i % len(replies), (i + 1) % len(replies)}:
                    out.append(_record("identity", [p, replies[j]], f"identity/{lang}"))
    for conv in _IDENTITY_MULTI:
        out.append(_record("identity", conv, "identity/multi"))
    return out


# =========================================================================== poems

_POEM_FILES = (("tang300", "唐诗", "唐", "Tang"), ("song100", "宋诗", "宋", "Song"))
def parse_poem(entry: str) -> tuple[str, str, str] | None:
    """(title, author, body) of a fortunes-zh poem entry: a title line with 《...》 (and
    maybe a "题目:" prefix), an author line "作者：NAME" (maybe with dates), then the poem.
    ANSI colour codes are removed; None when the layout is not that."""
    text = _ANSI.sub("", entry).replace("\x1b", "").replace("\u00a0", " ")
    lines = [ln.strip() for ln in text.replace("\r", "").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    if len(lines) < 3:
        return None
    m = re.search(r"《(.+)》", lines[0])
    a = re.match(r"作者\s*[:：]\s*(.+)", lines[1])
    if not m or not a:
        return None
    title = m.group(1).strip()
    author = re.sub(r"[（(].*?[)）]", "", a.group(1)).strip()
    body_lines: list[str] = []
    for ln in lines[2:]:
        if ln or (body_lines and body_lines[-1]):
            body_lines.append(ln)
    body = "\n".join(body_lines).strip()
    if not title or not author or not body:
        return None
    return title, author, body


_POEM_PROMPTS = ("请写一首{kind}《{title}》。", "背诵{author}的《{title}》。",
                 "{author}的《{title}》是怎么写的？", "我想读{author}的《{title}》，你能写出来吗？",
                 "请默写{author}的{kind}《{title}》。", "Please recite the {en} poem 《{title}》 by {author}.")


def read_poems(fortunes_dir: Path, seed: int, per_poem: int = 2) -> tuple[list[dict], dict]:
    out, stats = [], {"poems": 0, "unparsed": 0}
    rng = _rng("poem", seed)
    for fname, kind, dynasty, en in _POEM_FILES:
        path = fortunes_dir / fname
        if not path.is_file():
            warn(f"{path} not found (apt-get install fortunes-zh); no {kind}")
            continue
        poems = []
        for entry in split_fortunes(read_text_file(path)):
            p = parse_poem(entry)
            if p is None:
                stats["unparsed"] += 1
            else:
                poems.append(p)
        title_count: dict[str, int] = {}
        for t, _, _ in poems:
            title_count[t] = title_count.get(t, 0) + 1
        for idx, (title, author, body) in enumerate(poems):
            stats["poems"] += 1
            reply = f"《{title}》\n{dynasty}·{author}\n\n{body}"
            templates = list(_POEM_PROMPTS)
            if title_count[title] > 1:  # "请写一首唐诗《送别》" would have two right answers
                templates[0] = "请写一首{author}的{kind}《{title}》。"
            for tpl in rng.sample(templates, min(per_poem, len(templates))):
                prompt = tpl.format(kind=kind, title=title, author=author, en=en)
                out.append(_record("poem", [prompt, reply], f"fortunes-zh/{fname}",
                                   key=f"poem:{fname}:{idx}"))
    return out, stats


# =========================================================================== split and write

class _Links:
    """Union-find over string nodes: records sharing a prompt hash or a problem key are one
    component, and a component is never split across train and held-out."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # deterministic root


def split_records(records: list[dict], seed: int, heldout_per_family: int,
                  heldout_max_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, heldout). Per family a seeded sample of components goes to held-out until it
    holds ``min(heldout_per_family, floor(heldout_max_fraction * family size))`` records."""
    links = _Links()
    hashes = [prompt_hash(r["messages"]) for r in records]
    for r, h in zip(records, hashes):
        links.find("p:" + h)
        if r.get("_key"):
            links.union("p:" + h, "k:" + r["_key"])
    comp = [links.find("p:" + h) for h in hashes]
    held: set[str] = set()
    for fam in FAMILIES:
        idx = [i for i, r in enumerate(records) if r["family"] == fam]
        if not idx:
            continue
        target = min(heldout_per_family, int(heldout_max_fraction * len(idx)))
        size: dict[str, int] = {}
        for i in idx:
            size[comp[i]] = size.get(comp[i], 0) + 1
        order = list(size)  # first-appearance order: deterministic
        _rng("heldout", seed, fam).shuffle(order)
        have = sum(n for c, n in size.items() if c in held)
        for c in order:
            if have >= target:
                break
            if c not in held and size[c] <= max(1, target - have) + 2:
                held.add(c)
                have += size[c]
    train = [r for r, c in zip(records, comp) if c not in held]
    heldout = [r for r, c in zip(records, comp) if c in held]
    return train, heldout


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")},
                              ensure_ascii=False) + "\n" for r in records)


def build_dialogues(out_dir: str | os.PathLike, sources_dir: str | os.PathLike = ".sources",
                    seed: int = 1337, heldout_per_family: int = 100,
                    heldout_max_fraction: float = 0.05, caps: dict | None = None,
                    families: Iterable[str] | None = None, quiz_dir: str | os.PathLike = QUIZ_DIR,
                    wordnet_dir: str | os.PathLike = WORDNET_DIR,
                    fortunes_dir: str | os.PathLike = FORTUNES_DIR, poems_per_item: int = 2,
                    verbose: bool = True) -> dict:
    """Build the chat dataset into ``out_dir`` (see the module docstring) and return the meta.

    ``caps`` overrides :data:`DEFAULT_CAPS` per family (None = no cap); ``families`` limits the
    build to some families. A family whose source is missing is skipped with a warning that
    names it. Everything is a pure function of the arguments and the installed sources, and
    files are written only once all of them are ready (each to a temporary file, then renamed).
    """
    t0 = time.time()
    wanted = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in wanted if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown dialogue famil{'y' if len(unknown) == 1 else 'ies'} "
                        f"{', '.join(unknown)}; choose from: {', '.join(FAMILIES)}")
    caps_all = dict(DEFAULT_CAPS)
    for k, v in (caps or {}).items():
        if k not in FAMILIES:
            raise UserError(f"cap for unknown dialogue family {k!r}; families: {', '.join(FAMILIES)}")
        if v is not None and (not isinstance(v, int) or v < 0):
            raise UserError(f"cap for {k} must be a non-negative integer or None, got {v!r}")
        caps_all[k] = v
    if heldout_per_family < 0 or not 0 <= heldout_max_fraction < 1:
        raise UserError("heldout_per_family must be >= 0 and heldout_max_fraction in [0, 1)")
    out_dir, sources_dir = Path(out_dir), Path(sources_dir)
    quiz_dir, wordnet_dir, fortunes_dir = Path(quiz_dir), Path(wordnet_dir), Path(fortunes_dir)

    by_family: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    details: dict[str, dict] = {}
    for fam in FAMILIES:
        if fam not in wanted:
            continue
        cap = caps_all.get(fam)
        if cap == 0:
            skipped[fam] = "its cap is 0"
            continue
        if fam == "chatterbot":
            wheel = find_chatterbot_wheel(sources_dir)
            if wheel is None:
                skipped[fam] = (f"no {CHATTERBOT_WHEEL_GLOB} in {sources_dir} "
                                "(pip download --no-deps chatterbot-corpus==1.3.3 -d .sources)")
                continue
            recs, details[fam] = read_chatterbot(wheel, identity_prompts())
            details[fam]["wheel"] = wheel.name
        elif fam == "quiz":
            if not (quiz_dir / "index").is_file():
                skipped[fam] = f"{quiz_dir}/index not found (apt-get install bsdgames)"
                continue
            recs, details[fam] = read_quiz(quiz_dir)
        elif fam == "definition":
            if not (wordnet_dir / "index.noun").is_file():
                skipped[fam] = f"{wordnet_dir}/index.noun not found (apt-get install wordnet-base)"
                continue
            recs, details[fam] = read_definitions(wordnet_dir, cap, seed)
        elif fam in ("arithmetic", "word_problem", "number_sense"):
            recs = read_tasks(fam, DEFAULT_CAPS[fam] if cap is None else cap, seed)
        elif fam == "identity":
            recs = read_identity()
        else:  # poem
            if not any((fortunes_dir / f[0]).is_file() for f in _POEM_FILES):
                skipped[fam] = f"{fortunes_dir}/tang300 not found (apt-get install fortunes-zh)"
                continue
            recs, details[fam] = read_poems(fortunes_dir, seed, poems_per_item)
        if not recs:
            skipped[fam] = "source present but yielded no records"
            continue
        by_family[fam] = _sample(recs, cap, _rng("cap", seed, fam))
    for fam, why in skipped.items():
        warn(f"dialogue family {fam!r} skipped: {why}")

    # Exact duplicates (same messages) are dropped, first occurrence kept.
    records, seen, dup = [], set(), {}
    for fam, recs in by_family.items():
        for r in recs:
            k = json.dumps(r["messages"], ensure_ascii=False)
            if k in seen:
                dup[fam] = dup.get(fam, 0) + 1
                continue
            seen.add(k)
            records.append(r)
    if not records:
        raise UserError("no dialogue source is available: run `bash scripts/setup.sh` "
                        f"(skipped: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})")

    train, heldout = split_records(records, seed, heldout_per_family, heldout_max_fraction)
    _rng("shuffle", seed, "train").shuffle(train)
    _rng("shuffle", seed, "heldout").shuffle(heldout)
    counts = {fam: {"train": 0, "heldout": 0} for fam in by_family}
    for split, recs in (("train", train), ("heldout", heldout)):
        for r in recs:
            counts[r["family"]][split] += 1
    held_hashes = sorted({prompt_hash(r["messages"]) for r in heldout})
    meta = {
        "format": "messages",
        "seed": seed,
        "records": {"train": len(train), "heldout": len(heldout)},
        "families": counts,
        "families_built": list(by_family),
        "families_skipped": skipped,
        "checkable_families": [f for f in by_family if f in CHECKABLE],
        "duplicates_dropped": dup,
        "caps": {f: caps_all[f] for f in FAMILIES},
        "heldout_per_family": heldout_per_family,
        "heldout_max_fraction": heldout_max_fraction,
        "sources": details,
        "prompt_hash": "sha256 of the normalised user turns joined by newlines, first 16 hex "
                       "digits (chatsmith.data.dialogues.prompt_hash)",
        "heldout_prompt_hashes": held_hashes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "train.jsonl", _jsonl(train))
    _atomic_write(out_dir / "heldout.jsonl", _jsonl(heldout))
    _atomic_write(out_dir / "dialogues_meta.json",
                  json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    if verbose:
        _print_summary(meta, out_dir, time.time() - t0)
    return meta


def _print_summary(meta: dict, out_dir: Path, seconds: float) -> None:
    fams = meta["families"]
    lines = [f"dialogues: {meta['records']['train']:,} train / {meta['records']['heldout']:,} "
             f"held-out conversations in {seconds:.1f}s -> {out_dir}",
             f"  {'family':<13} {'train':>7} {'heldout':>8}  checkable"]
    for f, c in fams.items():
        lines.append(f"  {f:<13} {c['train']:>7,} {c['heldout']:>8,}  "
                     f"{'yes' if f in CHECKABLE else ''}")
    for f, why in meta["families_skipped"].items():
        lines.append(f"  {f:<13} skipped: {why}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chatsmith.data.dialogues",
                                 description="Build the built-in chat (SFT) dataset.")
    ap.add_argument("--out", default="data/dialogues", help="output directory (default: %(default)s)")
    ap.add_argument("--sources", default=".sources", help="raw sources dir (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1337, help="default: %(default)s")
    ap.add_argument("--heldout-per-family", type=int, default=100, help="default: %(default)s")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, help="default: all")
    args = ap.parse_args(argv)
    try:
        build_dialogues(args.out, args.sources, seed=args.seed,
                        heldout_per_family=args.heldout_per_family, families=args.families)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
