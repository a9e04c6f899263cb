"""What both speedruns share (chatsmith/speedrun.py from scratch, chatsmith/speedrun_from.py on a
pretrained model): one stage's slice of the time budget, the stage banner, and how to print a
command the user can paste."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def invocation() -> str:
    """How this process was started (`.venv/bin/chatsmith`, `chatsmith` on PATH, `python -m chatsmith`),
    so the commands it suggests run as printed."""
    me = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if Path(me).name == "chatsmith":
        return me if os.sep in me else "chatsmith"
    return f"{sys.executable} -m chatsmith"


def banner(text: str):
    print(f"\n=== {text} ===", file=sys.stderr, flush=True)


def stage_minutes(shares: dict, stage: str, spent_before: float, train_s: float) -> float:
    """The stage's share of train_s, plus its part of what earlier stages left unused (or minus its
    part of their overrun): the slack is spread over this stage and every later one in proportion
    to their shares, so one stage's overrun never falls on the next one alone (the last stage
    takes all that is left); at least 20 s."""
    order = list(shares)
    i = order.index(stage)
    planned_until = sum(shares[k] for k in order[:i]) * train_s
    slack = planned_until - spent_before
    rest = sum(shares[k] for k in order[i:])
    return max(shares[stage] * train_s + slack * shares[stage] / rest, 20) / 60
