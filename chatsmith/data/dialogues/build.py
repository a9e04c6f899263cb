"""``build_dialogues``: read every wanted family, cap, deduplicate, split and write."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from chatsmith.atomic import write_json, write_jsonl
from chatsmith.data.dialogues.base import Inputs, sample_in_order, seeded_rng
from chatsmith.data.dialogues.definition import WORDNET_DIR
from chatsmith.data.dialogues.families import CHECKABLE, DEFAULT_CAPS, DEFAULT_FAMILIES, FAMILIES, REGISTRY
from chatsmith.data.dialogues.quiz import QUIZ_DIR
from chatsmith.data.dialogues.split import prompt_hash, split_records
from chatsmith.data.sources import FORTUNES_DIR, warn
from chatsmith.errors import UserError


def build_dialogues(out_dir: str | os.PathLike, sources_dir: str | os.PathLike = ".sources",
                    seed: int = 1337, heldout_per_family: int = 100,
                    heldout_max_fraction: float = 0.05, caps: dict | None = None,
                    families: Iterable[str] | None = None, quiz_dir: str | os.PathLike = QUIZ_DIR,
                    wordnet_dir: str | os.PathLike = WORDNET_DIR,
                    fortunes_dir: str | os.PathLike = FORTUNES_DIR, poems_per_item: int = 2,
                    verbose: bool = True, heldout_sizes: dict[str, int] | None = None) -> dict:
    """Build the chat dataset into ``out_dir`` (see :mod:`chatsmith.data.dialogues`) and return
    the meta. ``heldout_sizes``: families that hold out that many records instead of
    ``heldout_per_family`` (at most half the family; see split_records).

    ``caps`` overrides :data:`DEFAULT_CAPS` per family (None = no cap); ``families`` limits the
    build to some families. A family whose source is missing is skipped with a warning that
    names it. Everything is a pure function of the arguments and the installed sources, and
    files are written only once all of them are ready (each to a temporary file, then renamed).
    """
    t0 = time.time()
    wanted, caps_all = _check_arguments(families, caps, heldout_per_family, heldout_max_fraction)
    out_dir = Path(out_dir)
    inputs = Inputs(seed=seed, sources_dir=Path(sources_dir), quiz_dir=Path(quiz_dir),
                    wordnet_dir=Path(wordnet_dir), fortunes_dir=Path(fortunes_dir),
                    poems_per_item=poems_per_item)

    by_family, skipped, details = _read_families(wanted, caps_all, inputs)
    for fam, why in skipped.items():
        warn(f"dialogue family {fam!r} skipped: {why}")
    records, dup = _drop_duplicates(by_family)
    if not records:
        raise UserError("no dialogue source is available: run `bash scripts/setup.sh` "
                        f"(skipped: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})")

    for fam, n in (heldout_sizes or {}).items():
        if fam not in FAMILIES or not isinstance(n, int) or n < 0:
            raise UserError(f"heldout_sizes: {fam!r}: {n!r} (a family and a number of records >= 0)")
    train, heldout = split_records(records, seed, heldout_per_family, heldout_max_fraction, heldout_sizes)
    seeded_rng("shuffle", seed, "train").shuffle(train)
    seeded_rng("shuffle", seed, "heldout").shuffle(heldout)
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
        "heldout_sizes": heldout_sizes or {},
        "sources": details,
        "prompt_hash": "sha256 of the normalised user turns joined by newlines, first 16 hex "
                       "digits (chatsmith.data.dialogues.prompt_hash)",
        "heldout_prompt_hashes": held_hashes,
        # the generated problems held out (tasks.py keys, e.g. "arithmetic:37+48"): text made for
        # training elsewhere (pretrain --mix task text) leaves these out, so held-out stays unseen
        "heldout_problem_keys": sorted({r["_key"] for r in heldout if r.get("_key")}),
    }
    write_jsonl(out_dir / "train.jsonl", _written(train))
    write_jsonl(out_dir / "heldout.jsonl", _written(heldout))
    write_json(out_dir / "dialogues_meta.json", meta, indent=1)
    if verbose:
        _print_summary(meta, out_dir, time.time() - t0)
    return meta


def _check_arguments(families: Iterable[str] | None, caps: dict | None, heldout_per_family: int,
                     heldout_max_fraction: float) -> tuple[list[str], dict]:
    """(the wanted families, the cap of every family); a UserError for a bad argument."""
    wanted = list(DEFAULT_FAMILIES) if families is None else list(families)
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
    return wanted, caps_all


def _read_families(wanted: list[str], caps_all: dict,
                   inputs: Inputs) -> tuple[dict[str, list[dict]], dict[str, str], dict[str, dict]]:
    """(records per built family, capped; why each skipped family was skipped; source details)."""
    by_family: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    details: dict[str, dict] = {}
    for fam, family in REGISTRY.items():
        if fam not in wanted:
            continue
        cap = caps_all.get(fam)
        if cap == 0:
            skipped[fam] = "its cap is 0"
            continue
        why = family.missing(inputs)
        if why is not None:
            skipped[fam] = why
            continue
        recs, info = family.records(inputs, cap)
        if info is not None:
            details[fam] = info
        if not recs:
            skipped[fam] = "source present but yielded no records"
            continue
        by_family[fam] = sample_in_order(recs, cap, seeded_rng("cap", inputs.seed, fam))
    return by_family, skipped, details


def _drop_duplicates(by_family: dict[str, list[dict]]) -> tuple[list[dict], dict[str, int]]:
    """Exact duplicates (same messages) are dropped, first occurrence kept: (records, dropped
    per family)."""
    records, seen, dup = [], set(), {}
    for fam, recs in by_family.items():
        for r in recs:
            # a tool form with the same turns as its plain record differs by the tools on offer
            k = json.dumps([r["messages"], r.get("tools")] if r.get("tools") else r["messages"], ensure_ascii=False)
            if k in seen:
                dup[fam] = dup.get(fam, 0) + 1
                continue
            seen.add(k)
            records.append(r)
    return records, dup


def _written(records: Iterable[dict]) -> Iterator[dict]:
    """The records as written: without their internal ``_`` fields."""
    for r in records:
        yield {k: v for k, v in r.items() if not k.startswith("_")}


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
