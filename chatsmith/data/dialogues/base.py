"""What every dialogue family shares: the :class:`Family` interface, the inputs a build hands
to it, and the record helpers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Inputs:
    """Everything a family may read: the build seed and where the raw sources are."""
    seed: int
    sources_dir: Path
    quiz_dir: Path
    wordnet_dir: Path
    fortunes_dir: Path
    poems_per_item: int


class Family:
    """One family of built-in dialogues. A subclass sets ``name`` (as in the meta file),
    ``checkable`` (records carry ``answers`` that a program can grade) and ``default_cap``
    (records kept before the split), and implements :meth:`records`."""

    name: str = ""
    checkable: bool = False
    default_cap: int | None = None
    default: bool = True  # built when no families are named (the tool forms are asked for by name)

    def missing(self, inputs: Inputs) -> str | None:
        """Why the raw source is not available (and how to install it), or None if it is."""
        return None

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], dict | None]:
        """The family's records (the build samples them down to ``cap`` afterwards; a reader may
        stop early at ``cap``) and details about the source for the meta file, or None."""
        raise NotImplementedError


def record(family: str, turns: list[str], source: str, answers: list[str] | None = None,
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


def seeded_rng(*parts) -> random.Random:
    # str seeds go through SHA-512, so this is stable across runs and Python versions.
    return random.Random(":".join(["chatsmith-dialogues", *map(str, parts)]))


def sample_in_order(items: list, cap: int | None, rng: random.Random) -> list:
    """At most ``cap`` items, chosen at random, in their original order."""
    if cap is None or len(items) <= cap:
        return list(items)
    keep = sorted(rng.sample(range(len(items)), cap))
    return [items[i] for i in keep]
