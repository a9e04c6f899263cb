"""The model families chatsmith knows, by name: the one place a new family is listed.

config.json records its family in the "chatsmith" block (`"family": "decoder"`; a checkpoint
written before families existed has none and is a decoder). A Hugging Face directory without that
block is matched by its `model_type`.
"""

from __future__ import annotations

from chatsmith.errors import UserError
from chatsmith.model import clip, decoder, encoder, seq2seq
from chatsmith.model.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (decoder.FAMILY, encoder.FAMILY, clip.FAMILY, seq2seq.FAMILY)}
DEFAULT = "decoder"
ALIASES = {"gpt": "decoder", "bert": "encoder", "transformer": "seq2seq", "translation": "seq2seq",
           "marian": "seq2seq"}  # what the tutorials call them


def get(name: str | None) -> Family:
    name = ALIASES.get(name, name) or DEFAULT
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; chatsmith knows: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(obj) -> Family:
    """The family of a model or of a config."""
    cfg = getattr(obj, "cfg", obj)
    for f in FAMILIES.values():
        if isinstance(cfg, f.config):
            return f
    raise UserError(f"{type(cfg).__name__} belongs to no registered model family")


def build(cfg):
    """A freshly initialised model of cfg's family."""
    return family_of(cfg).model(cfg)


def config_from_block(block: dict):
    """The config recorded in config.json's "chatsmith" block ({"family", "model"})."""
    return get(block.get("family")).config.from_dict(block["model"])


def config_from_hf(raw: dict):
    """The config of a plain Hugging Face config.json, by its model_type."""
    mt = raw.get("model_type")
    for f in FAMILIES.values():
        if mt in f.hf_model_types:
            return f.config.from_hf(raw)
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise UserError(f"config.json has model_type={mt!r}; chatsmith reads {', '.join(map(repr, known))}")


def preset(name: str, family: str = DEFAULT, **overrides):
    """A named model shape of `family` with overrides (None values ignored)."""
    return get(family).preset(name, **overrides)


def presets(family: str = DEFAULT) -> list[str]:
    return list(get(family).presets)


__all__ = ["FAMILIES", "DEFAULT", "get", "family_of", "build", "config_from_block", "config_from_hf",
           "preset", "presets"]
