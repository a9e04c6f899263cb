"""arithmetic, word_problem, number_sense: questions from the seeded generator in
:mod:`chatsmith.data.tasks`, the reply its worked answer (checkable)."""

from __future__ import annotations

from chatsmith.data.dialogues.base import Family, Inputs, record
from chatsmith.data.tasks import generate_tasks, normalise


def read_tasks(family: str, n: int, seed: int) -> list[dict]:
    """``n`` tasks with distinct questions (the generator's draws are independent, so it is
    asked for more and repeats are passed over)."""
    out, seen = [], set()
    for t in generate_tasks(family, 3 * n + 100, seed):
        q = normalise(t["question"])
        if q in seen:
            continue
        seen.add(q)
        out.append(record(family, [t["question"], t["worked"]], f"tasks/{family}",
                          answers=t["answers"], key=t["key"]))
        if len(out) >= n:
            break
    return out


class Generated(Family):
    """One generator family; with no cap it still makes ``default_cap`` records."""
    checkable = True

    def __init__(self, name: str, default_cap: int):
        self.name, self.default_cap = name, default_cap

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], None]:
        n = self.default_cap if cap is None else cap
        return read_tasks(self.name, n, inputs.seed), None
