"""identity: hand-written conversations in which the assistant says it is chatsmith (English and
Chinese). They live in ``identity.json`` beside this module:

- ``en`` / ``zh``: groups of ``{"prompts": [...], "replies": [...]}``; every prompt is paired
  with the replies in turn, so each phrasing is seen and the replies vary;
- ``multi``: whole multi-turn conversations (user, assistant, user, assistant, ...).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from chatsmith.data.dialogues.base import Family, Inputs, record
from chatsmith.data.tasks import normalise

IDENTITY_FILE = Path(__file__).with_name("identity.json")
_LANGS = ("en", "zh")


@functools.lru_cache(maxsize=1)  # read once per process: the chatterbot filter and the family both need it
def _load() -> dict:
    with open(IDENTITY_FILE, encoding="utf-8") as f:
        return json.load(f)


def identity_prompts() -> set[str]:
    """Normalised prompts the identity family answers (other sources' answers to them are
    dropped so the assistant has one consistent identity)."""
    table = _load()
    out = set()
    for lang in _LANGS:
        for group in table[lang]:
            out.update(normalise(p) for p in group["prompts"])
    out.update({"who are you", "what is your name", "你是谁", "你叫什么名字"})
    return out


def read_identity() -> list[dict]:
    table = _load()
    out = []
    for lang in _LANGS:
        for group in table[lang]:
            prompts, replies = group["prompts"], group["replies"]
            for i, p in enumerate(prompts):
                # Each prompt once with the next reply in turn, and a second time with another.
                for j in {i % len(replies), (i + 1) % len(replies)}:
                    out.append(record("identity", [p, replies[j]], f"identity/{lang}"))
    for conv in table["multi"]:
        out.append(record("identity", conv, "identity/multi"))
    return out


class Identity(Family):
    name, default_cap = "identity", 1000

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], None]:
        return read_identity(), None
