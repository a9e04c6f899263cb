"""`chatsmith moderate TEXT | --file F`: the moderation verdict of each text (one per line of F).

Prints, per text, FLAGGED / ok, the categories set and the lexicon entries hit; `--json` prints
OpenAI's result objects. `--derive-ambiguous CORPUS_DIR` lists the lexicon entries that are
ordinary words in a corpus's train split (how chatsmith/moderation/ambiguous.txt was made).
"""

from __future__ import annotations

import json
from pathlib import Path

from chatsmith.data.moderation import corpus_paragraphs
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.moderation import load_moderator
from chatsmith.moderation.lexicon import Lexicon


def derive_ambiguous(paragraphs: list[str], min_docs: int = 20) -> list[str]:
    """Entries found in at least `min_docs` clean paragraphs (about 0.02% of the built-in corpus's 85k):
    ordinary words there (god, hell, kill, murder), while slurs and obscenities stay below it."""
    lex, counts = Lexicon(), {}
    for p in paragraphs:
        for h in set(lex.hits(p)):
            counts[h] = counts.get(h, 0) + 1
    return sorted(w for w, n in counts.items() if n >= min_docs)


def add_arguments(p):
    p.add_argument("text", nargs="*", help="texts to check (or --file)")
    p.add_argument("--file", help="check each non-empty line of this file")
    p.add_argument("--moderation", default="lexicon", help="'lexicon', or a classifier directory (lexicon + "
                   "classifier, trained on data build --what moderation)")
    p.add_argument("--threshold", type=float, default=0.5, help="offensive when the classifier's probability is at least this")
    p.add_argument("--json", action="store_true", help="print OpenAI-shaped result objects, one per line")
    p.add_argument("--derive-ambiguous", metavar="CORPUS_DIR", default=None,
                   help="print the lexicon entries found in 20+ paragraphs of CORPUS_DIR/train.jsonl, and stop")


def main(a):
    if a.derive_ambiguous:
        print("# lexicon entries found in 20+ paragraphs of the corpus's train split (chatsmith moderate "
              "--derive-ambiguous): ordinary words there, left out of the lexicon")
        for w in derive_ambiguous(corpus_paragraphs(Path(a.derive_ambiguous))):
            print(w)
        return
    if bool(a.text) == bool(a.file):
        raise UserError("give the texts to check, or --file F (one of them)")
    if a.file:
        try:
            texts = [ln for ln in Path(a.file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {a.file}: {e}") from None
        if not texts:
            raise UserError(f"{a.file} has no text to check")
    else:
        texts = a.text
    if not all(t.strip() for t in texts):
        raise UserError("an empty text has nothing to check")
    mod = load_moderator(a.moderation, threshold=a.threshold)
    for t, v in zip(texts, mod.check(texts)):
        if a.json:
            print(json.dumps(v.result(), ensure_ascii=False))
            continue
        cats = [c for c, on in v.categories.items() if on]
        extra = f" [{', '.join(cats)}]" if cats else ""
        hits = f" (hit: {', '.join(dict.fromkeys(v.hits))})" if v.hits else ""
        print(f"{'FLAGGED' if v.flagged else 'ok':7} offensive={v.scores['offensive']:.3f}{extra}{hits}  {t[:80]}")


VERB = Verb("moderate", "check texts for offensive content and crisis language", add_arguments, main)
