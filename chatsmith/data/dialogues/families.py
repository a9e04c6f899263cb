"""The built-in dialogue families, in build order (the order of the meta file's counts and of
the held-out selection)."""

from __future__ import annotations

from chatsmith.data.dialogues.base import Family
from chatsmith.data.dialogues.chatterbot import Chatterbot
from chatsmith.data.dialogues.definition import Definition
from chatsmith.data.dialogues.generated import Generated, ToolGenerated
from chatsmith.data.dialogues.identity import Identity
from chatsmith.data.dialogues.poem import Poem
from chatsmith.data.dialogues.quiz import Quiz

# Record caps (before the split) are the families' default_cap. Together about 16k: a tiny
# model on a 2-core CPU gets through them in minutes, and the checkable families make up well
# over half.
REGISTRY: dict[str, Family] = {f.name: f for f in (
    Chatterbot(), Quiz(), Definition(), Generated("arithmetic", 4000),
    Generated("word_problem", 3000), Generated("number_sense", 2000), Identity(), Poem(),
    ToolGenerated("arithmetic", 4000), ToolGenerated("word_problem", 3000), ToolGenerated("number_sense", 1000))}

FAMILIES = tuple(REGISTRY)
DEFAULT_FAMILIES = tuple(name for name, f in REGISTRY.items() if f.default)
CHECKABLE = frozenset(name for name, f in REGISTRY.items() if f.checkable)
DEFAULT_CAPS = {name: f.default_cap for name, f in REGISTRY.items()}
