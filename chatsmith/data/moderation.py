"""`chatsmith data build --what moderation`: labelled text for the learned moderation classifier.

    OUT/moderation/{train,dev,test}.jsonl   {"text", "label": "offensive" | "clean", "source"}
    OUT/moderation/meta.json                counts per source and split

Offensive: Debian's fortunes-es-off and fortunes-it-off (the fortunes their maintainers judged
offensive: crude, sexist, racist, obscene jokes), one fortune per record. Clean: fortunes-es and
fortunes-it (the same authors' and genre's inoffensive fortunes, so the classifier learns
offensiveness, not "is a Spanish joke"), plus ordinary text: English and Chinese paragraphs from
the built-in corpus's *train* split and, when given, the messages of the built-in dialogues' train
split (the corpus val split and the held-out dialogues stay unseen for the false-positive
measurement). The one label the data supports is "offensive"; nothing here says hate, sexual or
violence apart.

Split: texts are cleaned (NFC, whitespace runs to one space), deduplicated on their case-folded
form (a text under both labels is dropped), and within each label ranked by a keyed BLAKE2b hash
of that form: the first 20% go to test, the next 10% to dev (where `moderate --calibrate` sets the
classifier's operating threshold; never on test). The split depends on the text alone, not on
order or seed. Corpus paragraphs and dialogue messages are each capped at twice as many as the
offensive fortunes, picked by a hash under another key: picked by the split's own rank they would
be the lowest-ranked clean texts and all land in test, leaving none of them to train on.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

from chatsmith.atomic import atomic_dir, write_json, write_jsonl
from chatsmith.errors import UserError

FORTUNES = Path("/usr/share/games/fortunes")
OFFENSIVE_DIRS = ("off/es/off", "off/it")
CLEAN_DIRS = ("es", "it")
SPLIT_KEY = b"chatsmith-moderation-v1"  # changing it changes every split: don't
TEST_FRACTION, DEV_FRACTION = 0.2, 0.1
PICK_KEY = b"chatsmith-moderation-pick"  # which paragraphs / messages are used: independent of the split
ORDINARY_PER_OFFENSIVE = 2
LABELS = ("clean", "offensive")
MIN_CHARS, MAX_CHARS = 12, 600


def clean(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def _rank(key: str, salt: bytes = SPLIT_KEY) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16, key=salt).digest()


def dialogue_messages(path: Path) -> list[str]:
    """Every non-empty message of a dialogues JSONL ({"messages": [...]}) as one unit."""
    if not path.is_file():
        raise UserError(f"{path} not found: build the dialogues first (chatsmith data build --what chat)")
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            try:
                msgs = json.loads(line)["messages"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: not a dialogue record ({{\"messages\": [...]}})") from None
            out += [t for t in (clean(str(m.get("content") or "")) for m in msgs if isinstance(m, dict))
                    if MIN_CHARS <= len(t) <= MAX_CHARS]
    return out


def read_fortunes(path: Path) -> list[str]:
    """The fortunes of one strfile source: records separated by lines holding '%' alone."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # the Spanish files are ISO-8859-1
        text = raw.decode("latin-1")
    return [f for f in (clean(x) for x in re.split(r"\n%\n", text.replace("\r\n", "\n"))) if f and f != "%"]


def fortune_files(root: Path, sub: str) -> list[Path]:
    d = root / sub
    if not d.is_dir():
        return []
    return sorted(f for f in d.iterdir() if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"))


def corpus_paragraphs(corpus_dir: Path, split: str = "train") -> list[str]:
    """Paragraphs (blank-line separated, else lines) of a built corpus split, as moderation units."""
    f = corpus_dir / f"{split}.jsonl"
    if not f.is_file():
        raise UserError(f"{f} not found: build the corpus first (chatsmith data build --what corpus) or give "
                        f"--corpus DIR")
    out = []
    with open(f, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            parts = re.split(r"\n\s*\n", text)
            if len(parts) == 1:
                parts = text.split("\n")
            out += [p for p in (clean(x) for x in parts) if MIN_CHARS <= len(p) <= MAX_CHARS]
    return out


def build_moderation(out: Path, corpus_dir: Path, fortunes: Path = FORTUNES, dialogues: Path | None = None) -> dict:
    offensive = [(t, "offensive", f"fortunes-{sub.split('/')[1]}-off") for sub in OFFENSIVE_DIRS
                 for f in fortune_files(fortunes, sub) for t in read_fortunes(f)]
    if not offensive:
        raise UserError(f"no offensive fortunes under {fortunes}/off: install fortunes-es-off and fortunes-it-off "
                        f"(scripts/setup.sh)")
    clean_f = [(t, "clean", f"fortunes-{sub}") for sub in CLEAN_DIRS for f in fortune_files(fortunes, sub)
               for t in read_fortunes(f)]
    cap = ORDINARY_PER_OFFENSIVE * len(offensive)
    ordinary = [(p, "clean", "corpus") for p in sorted(set(corpus_paragraphs(corpus_dir)),
                                                       key=lambda p: _rank(p.casefold(), PICK_KEY))[:cap]]
    if dialogues is not None:
        ordinary += [(m, "clean", "dialogues") for m in sorted(set(dialogue_messages(dialogues)),
                                                                key=lambda m: _rank(m.casefold(), PICK_KEY))[:cap]]
    records = offensive + clean_f + ordinary
    by_key: dict[str, list] = {}
    for text, label, source in records:
        if MIN_CHARS <= len(text) <= MAX_CHARS * 4:
            by_key.setdefault(text.casefold(), [text, set(), source])[1].add(label)
    train, dev, test = [], [], []
    for label in LABELS:
        keys = sorted((k for k, v in by_key.items() if v[1] == {label}), key=_rank)
        n_test, n_dev = round(TEST_FRACTION * len(keys)), round(DEV_FRACTION * len(keys))
        test += [(k, label) for k in keys[:n_test]]
        dev += [(k, label) for k in keys[n_test:n_test + n_dev]]
        train += [(k, label) for k in keys[n_test + n_dev:]]

    def rows(items):
        return [{"text": by_key[k][0], "label": lab, "source": by_key[k][2]}
                for k, lab in sorted(items, key=lambda kl: _rank(kl[0]))]

    splits = {"train": rows(train), "dev": rows(dev), "test": rows(test)}
    meta = {"labels": list(LABELS), "test_fraction": TEST_FRACTION, "dev_fraction": DEV_FRACTION,
            "split_key": SPLIT_KEY.decode(), "conflicting_dropped": sum(len(v[1]) > 1 for v in by_key.values()),
            "counts": {name: {s: sum(r["source"] == s for r in rs) for s in sorted({r["source"] for r in rs})}
                       for name, rs in splits.items()}}
    with atomic_dir(out / "moderation") as d:
        for name, rs in splits.items():
            write_jsonl(d / f"{name}.jsonl", rs)
        write_json(d / "meta.json", meta)
    return meta
