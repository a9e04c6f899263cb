"""The held-out split. It is chosen per family with a fixed seed and is disjoint from train by
*prompt hash* (:func:`prompt_hash`): records that share a prompt, or that share an underlying
problem (their ``_key``: two phrasings of one arithmetic question, two requests for one poem),
are linked and always land on the same side."""

from __future__ import annotations

import hashlib

from chatsmith.data.dialogues.base import seeded_rng
from chatsmith.data.dialogues.families import FAMILIES
from chatsmith.data.tasks import normalise


def prompt_hash(messages: list[dict]) -> str:
    """The identity of a conversation's question side: SHA-256 (first 16 hex digits) of its
    user turns, each normalised (:func:`chatsmith.data.tasks.normalise`), joined by newlines."""
    users = "\n".join(normalise(m["content"]) for m in messages if m["role"] == "user")
    return hashlib.sha256(users.encode("utf-8")).hexdigest()[:16]


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
                  heldout_max_fraction: float, heldout_sizes: dict[str, int] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, heldout). Per family a seeded sample of components goes to held-out until it
    holds ``min(heldout_per_family, floor(heldout_max_fraction * family size))`` records;
    ``heldout_sizes`` names families that hold out that many instead (at most half the family),
    e.g. the checkable ones, whose evaluation needs hundreds of items for a tight interval."""
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
        if heldout_sizes and fam in heldout_sizes:
            target = min(heldout_sizes[fam], len(idx) // 2)
        else:
            target = min(heldout_per_family, int(heldout_max_fraction * len(idx)))
        size: dict[str, int] = {}
        for i in idx:
            size[comp[i]] = size.get(comp[i], 0) + 1
        order = list(size)  # first-appearance order: deterministic
        seeded_rng("heldout", seed, fam).shuffle(order)
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
