"""chatterbot: English and Chinese YAML conversations from the ``chatterbot-corpus`` wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

import yaml

from chatsmith.data.dialogues.base import Family, Inputs, record
from chatsmith.data.dialogues.identity import identity_prompts
from chatsmith.data.sources import warn
from chatsmith.data.tasks import normalise

CHATTERBOT_WHEEL_GLOB = "chatterbot_corpus-*.whl"  # pinned to 1.3.3 by scripts/setup.sh

# These two files list one prompt followed by *alternative* replies, not a conversation
# ("You are arrogant", "Arrogance is not one of my emotions.", "I have no real emotions, ...").
_ALTERNATIVE_REPLY_FILES = {"english/emotion.yml", "english/computers.yml"}
# Machine-translated nonsense ("没有告诉婆娘任何人" ...).
_SKIP_CHATTERBOT_FILES = {"chinese/gossip.yml"}
_CHATTERBOT_LANGS = ("english", "chinese")
# BaseLoader keeps every scalar a string: SafeLoader would turn "Yes" into True and "1963"
# into an int.
_YAML_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def find_chatterbot_wheel(sources_dir: Path) -> Path | None:
    found = sorted(Path(sources_dir).glob(CHATTERBOT_WHEEL_GLOB))
    return found[-1] if found else None


def read_chatterbot(wheel: Path, identity_prompts: set[str]) -> tuple[list[dict], dict]:
    """One record per conversation, read straight from the wheel (no install). A trailing
    user turn is dropped so each record ends with the assistant; conversations that ask the
    bot who it is are dropped (the identity family answers those)."""
    out, stats = [], {"conversations": 0, "dropped": 0}
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".yml"))
        for lang in _CHATTERBOT_LANGS:
            for name in names:
                rel = name.split("/data/", 1)[-1]
                if not rel.startswith(lang + "/") or rel in _SKIP_CHATTERBOT_FILES:
                    continue
                try:
                    doc = yaml.load(z.read(name).decode("utf-8"), Loader=_YAML_LOADER)
                except Exception as e:  # a broken file in the wheel: skip it, keep the rest
                    warn(f"{wheel.name}:{name}: cannot parse YAML ({e}); skipped")
                    continue
                convs = (doc or {}).get("conversations") or []
                topic = rel[:-len(".yml")]
                for conv in convs:
                    stats["conversations"] += 1
                    turns = _usable_turns(conv, identity_prompts)
                    if turns is None:
                        stats["dropped"] += 1
                        continue
                    if rel in _ALTERNATIVE_REPLY_FILES:
                        convs_out = [[turns[0], r] for r in turns[1:]]
                    else:
                        convs_out = [turns[:len(turns) - len(turns) % 2]]
                    for c in convs_out:
                        out.append(record("chatterbot", c, f"chatterbot/{topic}"))
    return out, stats


def _usable_turns(conv, identity_prompts: set[str]) -> list[str] | None:
    """The stripped turns of a conversation, or None when it is malformed, has an empty turn
    or fewer than two, asks who the bot is, or names chatterbot."""
    if not isinstance(conv, list) or not all(isinstance(t, str) for t in conv):
        return None
    turns = [t.strip() for t in conv]
    if any(not t for t in turns) or len(turns) < 2:
        return None
    if normalise(turns[0]) in identity_prompts or any("chatterbot" in t.lower() for t in turns):
        return None
    return turns


class Chatterbot(Family):
    name, default_cap = "chatterbot", 3000

    def missing(self, inputs: Inputs) -> str | None:
        if find_chatterbot_wheel(inputs.sources_dir) is None:
            return (f"no {CHATTERBOT_WHEEL_GLOB} in {inputs.sources_dir} "
                    "(pip download --no-deps chatterbot-corpus==1.3.3 -d .sources)")
        return None

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], dict]:
        wheel = find_chatterbot_wheel(inputs.sources_dir)
        recs, details = read_chatterbot(wheel, identity_prompts())
        details["wheel"] = wheel.name
        return recs, details
