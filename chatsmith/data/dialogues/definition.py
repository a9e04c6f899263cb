"""definition: WordNet questions, "What does 'X' mean?" -> the gloss and an example sentence."""

from __future__ import annotations

import re
from pathlib import Path

from chatsmith.data.dialogues.base import Family, Inputs, record, seeded_rng

WORDNET_DIR = Path("/usr/share/wordnet")
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
    rng = seeded_rng("definition", seed)
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
            out.append(record("definition", [question, reply], f"wordnet/{pos}",
                              key=f"definition:{lemma}"))
    finally:
        for f in files.values():
            f.close()
    return out, {"candidates": len(lemmas)}


class Definition(Family):
    name, default_cap = "definition", 3000

    def missing(self, inputs: Inputs) -> str | None:
        if not (inputs.wordnet_dir / "index.noun").is_file():
            return f"{inputs.wordnet_dir}/index.noun not found (apt-get install wordnet-base)"
        return None

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], dict]:
        return read_definitions(inputs.wordnet_dir, cap, inputs.seed)
