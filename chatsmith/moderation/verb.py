"""`chatsmith moderate TEXT | --file F`: the moderation verdict of each text (one per line of F).

Prints, per text, FLAGGED / ok, the categories set and the lexicon entries hit; `--json` prints
OpenAI's result objects. `--derive-ambiguous CORPUS_DIR` lists the lexicon entries that are
ordinary words in a corpus's train split (how chatsmith/moderation/ambiguous.txt was made).
`--calibrate DEV.jsonl --moderation MODEL_DIR` sets the classifier's operating threshold on a dev
split (see chatsmith.moderation.calibrate) and stores it in MODEL_DIR/moderation.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatsmith.data.moderation import corpus_paragraphs
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.moderation import DEFAULT_MAX_LEN, calibrate, load_moderator, save_calibration
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
    p.add_argument("--threshold", type=float, default=None, help="offensive when the classifier's probability is at "
                   "least this (default: the one calibrated with the classifier, else 0.5)")
    p.add_argument("--calibrate", metavar="DEV_JSONL", default=None,
                   help="set the classifier's threshold on this dev split (data build --what moderation's dev.jsonl), "
                        "store it in MODEL_DIR/moderation.json, and stop")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="--calibrate: the most of the dev split's ordinary text the classifier may flag "
                        "beyond what the lexicon already flags")
    p.add_argument("--max-len", type=int, default=None, help="classifier input tokens (default: the calibrated "
                   "length; --calibrate: 128, classify train's default: give the --max-len it was trained at)")
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
    if a.calibrate:
        run_calibration(a)
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
    mod = load_moderator(a.moderation, threshold=a.threshold, max_len=a.max_len)
    for t, v in zip(texts, mod.check(texts)):
        if a.json:
            print(json.dumps(v.result(), ensure_ascii=False))
            continue
        cats = [c for c, on in v.categories.items() if on]
        extra = f" [{', '.join(cats)}]" if cats else ""
        hits = f" (hit: {', '.join(dict.fromkeys(v.hits))})" if v.hits else ""
        print(f"{'FLAGGED' if v.flagged else 'ok':7} offensive={v.scores['offensive']:.3f}{extra}{hits}  {t[:80]}")


def run_calibration(a):
    if a.moderation == "lexicon":
        raise UserError("--calibrate needs --moderation MODEL_DIR (a classifier); the lexicon has no threshold")
    rows = []
    try:
        with open(a.calibrate, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                        rows.append({"text": str(r["text"]), "label": str(r["label"]), "source": r.get("source")})
                    except (ValueError, KeyError, TypeError, AttributeError):
                        raise UserError(f"{a.calibrate}:{i}: not a labelled record ({{\"text\", \"label\"}})") from None
    except OSError as e:
        raise UserError(f"cannot read {a.calibrate}: {e}") from None
    mod = load_moderator(a.moderation, threshold=1.0, max_len=a.max_len or DEFAULT_MAX_LEN)
    cal = calibrate(mod, rows, a.target_fpr)
    cal["calibrated_on"] = str(Path(a.calibrate).resolve())
    save_calibration(a.moderation, cal)
    d = cal["dev"]
    print(f"threshold {cal['threshold']:.4f} (max_len {cal['max_len']}) written to {Path(a.moderation) / 'moderation.json'}")
    print(f"dev: {d['records']} records, {d['offensive']} offensive; at it: precision {d['precision']:.3f} recall "
          f"{d['recall']:.3f} F1 {d['f1']:.3f}; flags {d['fpr_ordinary']:.2%} of {d['ordinary']} ordinary texts: "
          f"the lexicon {d['fpr_ordinary_lexicon']:.2%}, the classifier {d['fpr_ordinary_added']:.2%} more "
          f"(target {a.target_fpr:.2%}); {d['fpr_clean']:.2%} of all clean ones")


VERB = Verb("moderate", "check texts for offensive content and crisis language", add_arguments, main)
