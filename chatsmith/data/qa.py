"""`chatsmith data build --what qa`: a built-in extractive QA set in SQuAD v2.0 format.

No package ships SQuAD, so the set is made from sources already on the machine. Every answer is
a span of its context, placed there by the builder (offsets are recorded as the context is
assembled, never searched for afterwards), and every paragraph also gets an unanswerable
question that looks like its answerable ones (SQuAD v2.0's ``is_impossible``):

- ``wordnet`` (``/usr/share/wordnet/data.noun``): a paragraph is the glosses of several
  hyponyms of one synset ("A wolf is any of various wild canines ..."), one sentence each;
  "What is a wolf?" -> the gloss. The unanswerable question asks for a sibling whose gloss was
  left out, so the paragraph's topic matches but its answer is absent.
- ``quiz`` (bsdgames ``quiz`` files: capitals, US states, chemical elements, presidents): a few
  rows of one file written out as sentences ("The capital of Chad is N'Djamena."), one fact
  asked per row; the unanswerable one asks the same kind of fact about a row not in the paragraph.
- ``sotu``, ``brown`` (the corpus tarballs in ``.sources``): paragraphs of State of the Union
  addresses and the Brown corpus; a sentence holding a year, a number, or a titled name
  ("President Lincoln") becomes a fill-in-the-blank question quoting the words around it
  ('Which year fills the blank in "... the treaty of ____ was signed ..."?'). The unanswerable
  one quotes a sentence from another paragraph of the same document.

Held out by source document (a WordNet parent synset, a group of quiz rows, an address, a
Brown sample): a document's questions are all in ``train.json`` or all in ``test.json``,
chosen by a keyed hash of its id, so the split does not move when other documents come or go.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterator

from chatsmith.atomic import atomic_dir, write_json
from chatsmith.data.dialogues.quiz_syntax import QuizSyntaxError, quiz_canonical, read_quiz_lines
from chatsmith.data.sources import SOURCES, read_brown, read_sotu, warn
from chatsmith.data.squad import write_squad
from chatsmith.errors import UserError

WORDNET_DIR = Path("/usr/share/wordnet")
QUIZ_DIR = Path("/usr/share/games/bsdgames/quiz")
HELDOUT_FRACTION = 0.1
SPLIT_KEY = b"chatsmith-qa-v1"
WORDNET_GROUPS = 1000      # parent synsets used (of several thousand with enough hyponyms)
WORDNET_PER_GROUP = 5      # glosses per paragraph
WORDNET_ASKED = 3          # answerable questions per paragraph
QUIZ_ROWS_PER_PARA = 3
CORPUS_PARAS_PER_DOC = 3
CORPUS_ASKED = 2
PARA_CHARS = (300, 900)    # corpus paragraphs: at least / at most this many characters


def _rank(doc_id: str) -> float:
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, key=SPLIT_KEY).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def is_heldout(doc_id: str) -> bool:
    return _rank(doc_id) < HELDOUT_FRACTION


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest())


class Paragraph:
    """A context assembled piece by piece; ``add`` returns where a piece starts, so answer
    offsets are exact by construction."""

    def __init__(self):
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> int:
        start = self.size
        self.parts.append(text)
        self.size += len(text)
        return start

    @property
    def text(self) -> str:
        return "".join(self.parts)


def answerable(qid: str, question: str, text: str, start: int) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}],
            "is_impossible": False}


def unanswerable(qid: str, question: str) -> dict:
    return {"id": qid, "question": question, "answers": [], "is_impossible": True}


# --------------------------------------------------------------------------- wordnet

_ARTICLE_START = re.compile(r"(a|an|the|any|one|someone|something|a person|an area)\b", re.I)
_LEMMA = re.compile(r"[a-z][a-z -]*[a-z]")
_WN_QUESTIONS = ("What is {a}{w}?", "What is meant by {a}{w}?", "How is {a}{w} defined?",
                 "What does the word \"{w}\" mean?")


def _wn_question(rng: random.Random, word: str, definition: str) -> str:
    # "What is a wolf?" for a count noun (its gloss starts "a"/"an"), "What is driving?" for
    # the rest, so mass nouns and gerunds do not get an article.
    a = ("an " if word[0] in "aeiou" else "a ") if re.match(r"an? ", definition) else ""
    return rng.choice(_WN_QUESTIONS).format(a=a, w=word)


def read_wordnet_nouns(wordnet_dir: Path) -> dict[str, tuple[str, str, str | None]]:
    """offset -> (first lemma, definition, first hypernym offset or None) for noun synsets
    whose first lemma is a lower-case common noun and whose gloss has a usable definition."""
    out = {}
    path = wordnet_dir / "data.noun"
    with open(path, "rb") as f:
        for raw in f:
            if raw.startswith(b"  "):  # licence header
                continue
            head, sep, gloss = raw.decode("utf-8", "replace").partition(" | ")
            p = head.split()
            if not sep or len(p) < 5:
                continue
            try:
                n_words = int(p[3], 16)
                n_ptr = int(p[4 + 2 * n_words])
            except (IndexError, ValueError):
                continue
            word = re.sub(r"\(.*\)$", "", p[4]).replace("_", " ")
            ptrs = p[5 + 2 * n_words:5 + 2 * n_words + 4 * n_ptr]
            hyper = next((ptrs[i + 1] for i in range(0, len(ptrs), 4) if ptrs[i] == "@"), None)
            definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
            if not _LEMMA.fullmatch(word) or not 10 <= len(definition) <= 200:
                continue
            out[p[0]] = (word, definition, hyper)
    return out


def _gloss_sentence(word: str, definition: str) -> tuple[str, int]:
    """("Wolf is any of various wild canines.", offset of the definition)."""
    lead = word[0].upper() + word[1:] + (" is " if _ARTICLE_START.match(definition) else ": ")
    return f"{lead}{definition}.", len(lead)


def wordnet_articles(wordnet_dir: Path, groups: int = WORDNET_GROUPS) -> list[dict]:
    synsets = read_wordnet_nouns(wordnet_dir)
    children: dict[str, list[str]] = {}
    for off, (_, _, hyper) in synsets.items():
        if hyper is not None:
            children.setdefault(hyper, []).append(off)
    need = WORDNET_PER_GROUP + 1  # one more than the paragraph holds: the unanswerable one
    parents = sorted(h for h, cs in children.items()
                     if len({synsets[c][0] for c in cs}) >= need)
    _rng("wordnet-parents").shuffle(parents)
    articles = []
    for parent in parents[:groups]:
        rng = _rng("wordnet", parent)
        kids, seen = [], set()
        for c in sorted(children[parent]):
            w = synsets[c][0]
            if w not in seen:  # two senses with one first lemma would make "What is X?" ambiguous
                seen.add(w)
                kids.append(c)
        rng.shuffle(kids)
        shown, absent = kids[:WORDNET_PER_GROUP], kids[WORDNET_PER_GROUP]
        para, spans = Paragraph(), {}
        for i, c in enumerate(shown):
            word, definition, _ = synsets[c]
            sentence, at = _gloss_sentence(word, definition)
            spans[c] = para.add(("" if i == 0 else " ") + sentence) + (0 if i == 0 else 1) + at
        context = para.text
        doc = f"wordnet:{parent}"
        qas = []
        for k, c in enumerate(rng.sample(shown, WORDNET_ASKED)):
            word, definition, _ = synsets[c]
            q = _wn_question(rng, word, definition)
            qas.append(answerable(f"{doc}:{k}", q, definition, spans[c]))
        word, definition, _ = synsets[absent]
        if word.lower() not in context.lower():
            q = _wn_question(rng, word, definition)
            qas.append(unanswerable(f"{doc}:x", q))
        articles.append({"title": doc, "paragraphs": [{"context": context, "qas": qas}]})
    return articles


# --------------------------------------------------------------------------- quiz

def _capital(where: str) -> tuple[str, list[tuple[str, int]]]:
    return ("The capital of {0} is {1}.", [("What is the capital of {0}?", 1),
                                           ("Which " + where + " has the capital {1}?", 0)])


# file -> (statement template over the row's canonical fields, [(question, answer field)])
QUIZ_FACTS: dict[str, tuple[str, list[tuple[str, int]]]] = {
    "africa": _capital("African country"),
    "america": _capital("country or territory in the Americas"),
    "asia": _capital("Asian country"),
    "europe": _capital("European country"),
    "province": ("The capital of the Canadian province of {0} is {1}.",
                 [("What is the capital of the Canadian province of {0}?", 1)]),
    "state": ("The capital of {0} is {1}, its postal abbreviation is {2} and its state flower "
              "is the {3}.", [("What is the capital of {0}?", 1),
                              ("What is the postal abbreviation of {0}?", 2),
                              ("What is the state flower of {0}?", 3)]),
    "elements": ("{3} has the chemical symbol {0} and the atomic number {1}.",
                 [("What is the chemical symbol for {3}?", 0),
                  ("What is the atomic number of {3}?", 1),
                  ("Which chemical element has the symbol {0}?", 3)]),
    "pres": ("{0} was President of the United States in {1} and was succeeded by {3}.",
             [("In which years was {0} President of the United States?", 1),
              ("Who succeeded {0} as President of the United States?", 3)]),
}
_FIELD = re.compile(r"\{(\d+)\}")


def fill(template: str, fields: list[str]) -> tuple[str, dict[int, int]]:
    """The template with its ``{n}`` filled in, and where each field landed."""
    out, at, pos = [], {}, 0
    for m in _FIELD.finditer(template):
        out.append(template[pos:m.start()])
        at[int(m.group(1))] = sum(map(len, out))
        out.append(fields[int(m.group(1))])
        pos = m.end()
    out.append(template[pos:])
    return "".join(out), at


def _quiz_rows(path: Path, used: set[int]) -> list[list[str]]:
    rows = []
    for _, raw in read_quiz_lines(path):
        try:
            fields = [quiz_canonical(f).strip() for f in raw]
        except QuizSyntaxError:
            continue
        if len(fields) > max(used) and all(fields[i] and fields[i].lower() != "gok" for i in used):
            rows.append(fields)
    return rows


def quiz_articles(quiz_dir: Path) -> list[dict]:
    articles = []
    for name, (statement, questions) in QUIZ_FACTS.items():
        path = quiz_dir / name
        if not path.is_file():
            continue
        used = {int(i) for i in _FIELD.findall(statement)}
        rows = _quiz_rows(path, used)
        rng = _rng("quiz", name)
        rng.shuffle(rows)
        groups = [rows[i:i + QUIZ_ROWS_PER_PARA] for i in range(0, len(rows), QUIZ_ROWS_PER_PARA)]
        for g, group in enumerate(groups):
            para, qas, doc = Paragraph(), [], f"quiz:{name}:{g}"
            for i, fields in enumerate(group):
                sentence, at = fill(statement, fields)
                start = para.add(("" if i == 0 else " ") + sentence) + (0 if i == 0 else 1)
                q, ans = rng.choice(questions)
                qas.append(answerable(f"{doc}:{i}", fill(q, fields)[0], fields[ans], start + at[ans]))
            context = para.text
            others = [r for j, gr in enumerate(groups) if j != g for r in gr]
            rng.shuffle(others)
            for fields in others:
                q, ans = rng.choice(questions)
                asked = [fields[i] for i in map(int, _FIELD.findall(q))]
                if not any(a.lower() in context.lower() for a in asked):
                    qas.append(unanswerable(f"{doc}:x", fill(q, fields)[0]))
                    break
            articles.append({"title": doc, "paragraphs": [{"context": context, "qas": qas}]})
    return articles


# --------------------------------------------------------------------------- corpus clozes

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z])")
_YEAR = re.compile(r"(?<![\d,.$])(1[6-9]\d\d|20[0-2]\d)(?![\d,]|\.\d)")
_NUMBER = re.compile(r"(?<![\d,.$])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?= (?:percent|[a-z]{3,}))")
_NAME = re.compile(r"\b(?:Mr|Mrs|Dr|President|General|Governor|Senator|Secretary)\.? "
                   r"([A-Z][a-z]+(?: [A-Z][a-z]+)?)")
_KINDS = (("year", _YEAR, "Which year fills the blank in \"{c}\"?"),
          ("number", _NUMBER, "What number fills the blank in \"{c}\"?"),
          ("name", _NAME, "Which name fills the blank in \"{c}\"?"))
CLOZE_WORDS = 10  # words quoted on each side of the blank


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def corpus_paragraphs(text: str) -> list[str]:
    """Runs of whole sentences of PARA_CHARS[0]..PARA_CHARS[1] characters, paragraph breaks
    kept where the text has them."""
    out, cur = [], ""
    for block in re.split(r"\n\s*\n", text):
        for s in sentences(block):
            if len(cur) + 1 + len(s) > PARA_CHARS[1]:
                if len(cur) >= PARA_CHARS[0]:
                    out.append(cur)
                cur = ""
            cur = f"{cur} {s}" if cur else s
            if len(cur) > PARA_CHARS[1]:
                cur = ""  # one overlong sentence: no paragraph
        if len(cur) >= PARA_CHARS[0]:
            out.append(cur)
            cur = ""
    return out


def clozes(context: str) -> Iterator[tuple[str, str, int, str, str]]:
    """(kind, answer, offset, quoted left words, quoted right words) for each candidate blank
    whose quoted window occurs exactly once in the context."""
    for kind, rx, _ in _KINDS:
        for m in rx.finditer(context):
            g = 1 if rx.groups else 0
            start, end = m.start(g), m.end(g)
            left = context[:start].split(" ")[-CLOZE_WORDS - 1:]
            right = context[end:].split(" ")[:CLOZE_WORDS + 1]
            lw, rw = " ".join(left[1:] if len(left) > CLOZE_WORDS else left), " ".join(right[:CLOZE_WORDS])
            if context.count(lw + m.group(g) + rw) == 1 and len(lw + rw) >= 20:
                yield kind, m.group(g), start, lw, rw


def _cloze_question(kind: str, lw: str, rw: str) -> str:
    template = next(t for k, _, t in _KINDS if k == kind)
    return template.format(c=f"... {lw}____{rw} ...".replace('"', "'"))


def corpus_articles(docs: list[tuple[str, str]]) -> list[dict]:
    """``docs``: (document id, text)."""
    articles = []
    for doc, text in docs:
        rng = _rng("corpus", doc)
        paras = [(p, list(clozes(p))) for p in corpus_paragraphs(text)]
        paras = [(p, c) for p, c in paras if c]
        rng.shuffle(paras)
        chosen = paras[:CORPUS_PARAS_PER_DOC]
        out = []
        for n, (context, cands) in enumerate(chosen):
            qas = []
            by_kind: dict[str, list] = {}
            for c in cands:
                by_kind.setdefault(c[0], []).append(c)
            picks = [rng.choice(v) for _, v in sorted(by_kind.items())]  # distinct kinds first
            rng.shuffle(picks)
            for k, (kind, ans, start, lw, rw) in enumerate(picks[:CORPUS_ASKED]):
                qas.append(answerable(f"{doc}:{n}:{k}", _cloze_question(kind, lw, rw), ans, start))
            elsewhere = [c for p, cs in paras if p != context for c in cs]
            rng.shuffle(elsewhere)
            for kind, _, _, lw, rw in elsewhere:
                if lw.strip() not in context and rw.strip() not in context:
                    qas.append(unanswerable(f"{doc}:{n}:x", _cloze_question(kind, lw, rw)))
                    break
            out.append({"context": context, "qas": qas})
        if out:
            articles.append({"title": doc, "paragraphs": out})
    return articles


# --------------------------------------------------------------------------- build

def _corpus_docs(name: str, read: Callable, sources_dir: Path) -> list[tuple[str, str]]:
    return [(f"{name}:{i}", text) for i, (_, text) in enumerate(read(sources_dir))]


def _count(articles: list[dict]) -> dict:
    qas = [q for a in articles for p in a["paragraphs"] for q in p["qas"]]
    return {"documents": len(articles), "paragraphs": sum(len(a["paragraphs"]) for a in articles),
            "questions": len(qas), "unanswerable": sum(q["is_impossible"] for q in qas)}


def build_qa(out_dir: str | os.PathLike, sources_dir: str | os.PathLike = ".sources",
             wordnet_dir: Path | None = None, quiz_dir: Path | None = None,
             wordnet_groups: int = WORDNET_GROUPS) -> dict:
    """Write OUT/qa/{train,test}.json (SQuAD v2.0) and OUT/qa/meta.json, all at once."""
    src = Path(sources_dir)
    wordnet_dir = Path(WORDNET_DIR if wordnet_dir is None else wordnet_dir)
    quiz_dir = Path(QUIZ_DIR if quiz_dir is None else quiz_dir)
    by_source: dict[str, list[dict]] = {}
    if (Path(wordnet_dir) / "data.noun").is_file():
        by_source["wordnet"] = wordnet_articles(Path(wordnet_dir), wordnet_groups)
    else:
        warn(f"{wordnet_dir}/data.noun not found: no WordNet questions (apt-get install wordnet-base)")
    if Path(quiz_dir).is_dir():
        by_source["quiz"] = quiz_articles(Path(quiz_dir))
    else:
        warn(f"{quiz_dir} not found: no quiz questions (apt-get install bsdgames)")
    for name, read in (("sotu", read_sotu), ("brown", read_brown)):
        if SOURCES[name].present(src):
            by_source[name] = corpus_articles(_corpus_docs(name, read, src))
        else:
            warn(f"built-in source {name!r} not installed: no {name} questions; {SOURCES[name].hint}")
    by_source = {k: v for k, v in by_source.items() if v}
    if not by_source:
        raise UserError("no QA source found: install wordnet-base and bsdgames, or run scripts/setup.sh")
    split = {"train": [], "test": []}
    meta = {"format": "SQuAD v2.0", "heldout": f"by source document, {HELDOUT_FRACTION:.0%} of "
            "documents by keyed BLAKE2b hash of the document id", "sources": {}}
    for name, articles in by_source.items():
        parts = {"train": [a for a in articles if not is_heldout(a["title"])],
                 "test": [a for a in articles if is_heldout(a["title"])]}
        meta["sources"][name] = {s: _count(v) for s, v in parts.items()}
        for s, v in parts.items():
            split[s] += v
    meta.update({s: _count(v) for s, v in split.items()})
    with atomic_dir(Path(out_dir) / "qa") as tmp:
        for s, articles in split.items():
            write_squad(tmp / f"{s}.json", articles)
        write_json(tmp / "meta.json", meta)
    return meta


__all__ = ["build_qa", "wordnet_articles", "quiz_articles", "corpus_articles", "is_heldout",
           "Paragraph", "fill", "corpus_paragraphs", "clozes"]
