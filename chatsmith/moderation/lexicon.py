"""The lexicon layer of moderation: word lists that ship in packages, matched through the usual evasions.

Lists: PyPI `better-profanity` (its `profanity_wordlist.txt`, MIT) and npm `naughty-words` en + zh
(the LDNOOBW lists, CC-BY-4.0), which `scripts/setup.sh` fetches with `npm pack` into .sources/; they
are read from there, not copied into this repository. Entries that are ordinary words in clean text
("big black", 乳) would flag everyday writing: `ambiguous` drops entries given at build time (the
moderation data builder derives them from the corpus *train* split, never from val).

Normalisation, so the evasions land on the listed form:
  * NFKC (full-width ｆｕｃｋ -> fuck, ligatures) and case folding;
  * leetspeak inside a word (0->o 1->i 3->e 4->a 5->s 7->t @->a $->s ! and | -> i), only in tokens
    that also hold a letter, so "2024" and "5 apples" stay numbers;
  * punctuation inside a word (f.u.c.k, f-u-c-k, sh*t's neighbours) dropped, and letter runs of
    three or more squeezed (fuuuuck);
  * spaced-out letters (f u c k): a run of one- or two-letter tokens is joined and read as a word;
  * Chinese: traditional folded to simplified (zhconv), and everything but Han characters and letters
    between them dropped (傻 逼, 傻.逼), then a substring match (Chinese has no spaces). Single-character
    entries are left out: alone they are ordinary characters.
Crisis phrases (self-harm, in English and Chinese) are a separate, hand-written list: a hit is not
"offensive" but asks for a supportive reply (`CRISIS_REPLY`).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import zhconv

from chatsmith.errors import UserError

NAUGHTY_TGZ = "naughty-words-1.2.0.tgz"
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i",
                      "|": "i", "€": "e"})
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_NOT_KEPT_ZH = re.compile(r"[^\u3400-\u9fff\uf900-\ufaffa-z]+")
_EDGE = re.compile(r"^[^\w@$]+|[^\w@$]+$")  # punctuation at a token's edges ("hi!", "(word)") is not part of it
_LETTER = re.compile(r"[^\W\d_]")

# first-person crisis language: asks for help, not a refusal. Matched on the normalised words.
CRISIS_EN = ["kill myself", "killing myself", "end my life", "ending my life", "take my own life", "want to die",
             "wanna die", "suicidal", "commit suicide", "hurt myself", "hurting myself", "cut myself", "cutting myself",
             "self harm", "self-harm", "no reason to live", "better off dead", "end it all"]
CRISIS_ZH = ["自杀", "轻生", "不想活", "想死", "活不下去", "结束生命", "结束自己的生命", "割腕", "自残", "寻死"]
CRISIS_REPLY = ("I'm really sorry you're feeling this way. You don't have to face it alone: please reach out to "
                "someone you trust, or to a crisis line — in the US call or text 988, in the UK and Ireland call "
                "Samaritans on 116 123, in China call 400-161-9995, elsewhere your local emergency number. "
                "If you are in immediate danger, call emergency services now. I'm here to listen if you want "
                "to talk about what's going on.")


def sources_dirs() -> list[Path]:
    env = os.environ.get("CHATSMITH_SOURCES")
    here = Path(__file__).resolve().parents[2] / ".sources"
    return [Path(p) for p in (env, ".sources", here) if p]


def _naughty(lang: str) -> list[str]:
    for d in sources_dirs():
        f = d / NAUGHTY_TGZ
        if f.is_file():
            with tarfile.open(f) as t:
                return json.load(io.TextIOWrapper(t.extractfile(f"package/{lang}.json"), encoding="utf-8"))
    raise UserError(f"the naughty-words word lists are not installed ({NAUGHTY_TGZ} in .sources/): "
                    f"run scripts/setup.sh (it fetches them with npm pack)")


def _better_profanity() -> list[str]:
    text = resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


def words_of(text: str) -> list[str]:
    """The normalised words of text, leetspeak and inner punctuation resolved, spaced letters joined."""
    t = unicodedata.normalize("NFKC", text).casefold()
    out, run = [], []
    for tok in t.split():
        tok = _EDGE.sub("", tok)
        if not tok:
            continue
        if _LETTER.search(tok):
            tok = tok.translate(LEET)
        parts = [p for p in re.split(r"[^\w]+|_", tok) if p]
        squeezed = re.sub(r"[^\w]|_", "", tok)
        if len(squeezed) == 1 and squeezed.isalpha():
            run.append(squeezed)  # maybe one letter of a spaced-out word
            continue
        out += _joined(run)
        run = []
        out.append(squeezed)
        if len(parts) > 1:
            out.extend(parts)
    return out + _joined(run)


def _joined(run: list[str]) -> list[str]:
    """A run of single letters: the letters, and every stretch of 3+ of them joined ("you are a
    f u c k": the a before the word must not hide it). Runs are short in real text; long ones are cut."""
    out = list(run)
    run = run[:40]
    for i in range(len(run)):
        for j in range(i + 3, len(run) + 1):
            out.append("".join(run[i:j]))
    return out


def _variants(w: str) -> set[str]:
    """w, and w with letter runs of 3+ squeezed to two and to one (fuuuck -> fuuck, fuck)."""
    v = {w}
    if re.search(r"(.)\1\1", w):
        v.add(re.sub(r"(.)\1{2,}", r"\1\1", w))
        v.add(re.sub(r"(.)\1{2,}", r"\1", w))
    return v


def han_of(text: str) -> str:
    t = zhconv.convert(unicodedata.normalize("NFKC", text).casefold(), "zh-hans")
    return _NOT_KEPT_ZH.sub("", t)


class Lexicon:
    def __init__(self, ambiguous: set[str] = frozenset()):
        en = {unicodedata.normalize("NFKC", w).casefold().strip() for w in _better_profanity() + _naughty("en")}
        # entries in the form text is brought to (2g1c -> 2gic, fux0r -> fuxor); 1-2 letter entries
        # ("xx") are ordinary tokens (locale names, initials) and are left out
        en = {w.translate(LEET) for w in en if w and w not in ambiguous and _LETTER.search(w) and len(w) >= 3}
        self.single = {w for w in en if " " not in w}
        self.phrases = {w for w in en if " " in w}
        self.max_n = max((len(p.split()) for p in self.phrases), default=1)
        zh = {zhconv.convert(unicodedata.normalize("NFKC", w), "zh-hans").strip() for w in _naughty("zh")}
        zh = {_NOT_KEPT_ZH.sub("", w) for w in zh if _HAN.search(w)}
        self.zh = sorted((w for w in zh if len(w) >= 2 and w not in ambiguous), key=len, reverse=True)
        self._zh_re = re.compile("|".join(map(re.escape, self.zh))) if self.zh else None
        crisis_en = [" ".join(words_of(p)) for p in CRISIS_EN]
        self._crisis_en = re.compile(r"(?:^| )(?:" + "|".join(map(re.escape, crisis_en)) + r")(?: |$)")
        self._crisis_zh = re.compile("|".join(map(re.escape, CRISIS_ZH)))

    def hits(self, text: str) -> list[str]:
        """The listed entries text contains, through the evasions above (empty: clean)."""
        words = words_of(text)
        found = []
        for w in words:
            for v in _variants(w):
                if v in self.single:
                    found.append(v)
                    break
        if self.phrases:
            for n in range(2, self.max_n + 1):
                for i in range(len(words) - n + 1):
                    g = " ".join(words[i:i + n])
                    if g in self.phrases:
                        found.append(g)
        if self._zh_re is not None and _HAN.search(text):
            found += self._zh_re.findall(han_of(text))
        return found

    def crisis(self, text: str) -> bool:
        if self._crisis_en.search(" ".join(words_of(text))):
            return True
        return bool(_HAN.search(text)) and bool(self._crisis_zh.search(han_of(text)))


@lru_cache(maxsize=4)
def load_lexicon(ambiguous: frozenset[str] = frozenset()) -> Lexicon:
    return Lexicon(set(ambiguous))
