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

from chatsmith.config import TRAIN_CHOICES, TRAIN_HELP, TrainConfig
from chatsmith.errors import UserError


@dataclass(frozen=True)
class Verb:
    name: str                                            # "sft", or "data build" for an action
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], object]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The one help formatter of every verb: each flag's one-line help, then its default, once.

    A help text that already says its default in words ("(default: the directory name)") keeps it;
    required flags, positionals and flags without a default show none. A default of None is not
    printed as "None": the flag's help has to say what leaving it out means (a test checks).
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "(default:" in text or action.required or not action.option_strings
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse's own errors (bad/unknown flag) are user errors too
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip=(), help: dict | None = None,
                        choices: dict | None = None):
    """Every dataclass field becomes --field-name, typed from its annotation.

    `help` maps a field to its one line of help (for a field whose default is None, that line says
    what None means), `choices` to the values it accepts; HelpFormatter adds the default.
    """
    help, choices = help or {}, choices or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kw = dict(default=f.default, help=help.get(f.name), choices=choices.get(f.name))
        if "bool" in t:
            p.add_argument(flag, type=_bool, nargs="?", const=True, metavar="BOOL", **kw)
        else:
            p.add_argument(flag, type=int if "int" in t else float if "float" in t else str, **kw)


def dataclass_from_args(cls, args, **extra):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(extra)
    return cls(**kw)


def add_train_flags(p: argparse.ArgumentParser, defaults: dict, skip=("preset",), choices: dict | None = None):
    """TrainConfig's fields as flags, with a stage's DEFAULTS in place of the dataclass defaults
    (`choices` adds to TRAIN_CHOICES, e.g. the model family's presets)."""
    add_dataclass_flags(p, TrainConfig, skip=skip, help=TRAIN_HELP, choices={**TRAIN_CHOICES, **(choices or {})})
    p.set_defaults(**defaults)


def train_config(defaults: dict, **overrides):
    """A stage's TrainConfig: TrainConfig's defaults, then the stage's DEFAULTS, then `overrides`."""
    return TrainConfig(**{**defaults, **overrides})


__all__ = ["Verb", "HelpFormatter", "Parser", "add_dataclass_flags", "dataclass_from_args", "add_train_flags", "train_config"]
