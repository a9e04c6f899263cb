"""The command line's building blocks: a verb, flags from dataclass fields, user-error parsing.

Each verb lives with the module that does its job (the stage modules for training, chat.py for
the terminal chat, ...) as a `Verb`: its name, one line of help, `add_arguments(parser)` and
`main(args)`. chatsmith/cli.py is the table of them. Training verbs take every `TrainConfig` field
as a flag, with the stage's own defaults (`DEFAULTS` in each stage module, the one place a stage
default is written; `speedrun` starts from the same `DEFAULTS`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable

from chatsmith.config import TrainConfig
from chatsmith.errors import UserError


@dataclass(frozen=True)
class Verb:
    name: str                                            # "sft", or "data build" for an action
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], object]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (bad/unknown flag) are user errors too
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip=()):
    """Every dataclass field becomes --field-name, typed from its annotation."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in t:
            p.add_argument(flag, type=_bool, nargs="?", const=True, default=default,
                           help=f"(default: {default})")
        elif "int" in t:
            p.add_argument(flag, type=int, default=default, help=f"(default: {default})")
        elif "float" in t:
            p.add_argument(flag, type=float, default=default, help=f"(default: {default})")
        else:
            p.add_argument(flag, type=str, default=default, help=f"(default: {default})")


def dataclass_from_args(cls, args, **extra):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(extra)
    return cls(**kw)


def add_train_flags(p: argparse.ArgumentParser, defaults: dict, skip=("preset",)):
    """TrainConfig's fields as flags, with a stage's DEFAULTS in place of the dataclass defaults."""
    add_dataclass_flags(p, TrainConfig, skip=skip)
    p.set_defaults(**defaults)


def train_config(defaults: dict, **overrides):
    """A stage's TrainConfig: TrainConfig's defaults, then the stage's DEFAULTS, then `overrides`."""
    return TrainConfig(**{**defaults, **overrides})


__all__ = ["Verb", "Parser", "add_dataclass_flags", "dataclass_from_args", "add_train_flags", "train_config"]
