"""Task text for mid-training (`pretrain --mix corpus=0.8,tasks=0.2`): exercises a small model can
learn from plain next-token prediction, so that the skills RL later sharpens exist at all.

A chat model trained on prose alone cannot copy a number from the question into its answer, and
RL cannot create that skill, only sharpen it. Copying forms quickly on repetitive synthetic text
(induction heads: Olsson et al. 2022), and small transformers learn multi-digit addition from a few
thousand examples when the answer is written digit by digit (Lee et al. 2023). So a document here
is a run of short exercises of three kinds:

- copy / repeat: "Repeat: 4831 907. 4831 907." and "Say "red river" three times: red river red
  river red river." (the answer copies the question);
- arithmetic with a worked answer: the built-in arithmetic questions (chatsmith/data/tasks.py, all
  their phrasings), + and - solved column by column with carries and borrows, × with the generator's
  tens-and-ones split, each ending "The answer is N.";
- number sense: the built-in larger/smaller/before/after questions with their worked answers.

Generation is a pure function of (n, seed).
"""

from __future__ import annotations

import random
import re

from chatsmith.data.tasks import generate_tasks

_WORDS = ("red", "blue", "green", "river", "stone", "light", "house", "bird", "sea", "tree", "moon", "king",
          "queen", "road", "cloud", "fire", "snow", "gold", "night", "day")
_TIMES = {2: "twice", 3: "three times", 4: "four times"}
_KEY = re.compile(r"arithmetic:(\d+)([-+×])(\d+)")  # the generator's problem key


def digit_by_digit(a: int, op: str, b: int) -> str | None:
    """Column arithmetic written out, ones first, for a + b (a, b >= 0) and a - b (a >= b >= 0):
    "7 + 8 = 15, write 5 carry 1; 3 + 4 + 1 = 8, write 8. So 37 + 48 = 85."; None otherwise."""
    if op not in "+-" or min(a, b) < 0 or (op == "-" and a < b):
        return None
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry, digits = [], 0, []
    for i in range(width):
        x, y = int(da[i]), int(db[i])
        if op == "+":
            s = x + y + carry
            terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
            carry, d = divmod(s, 10)
            steps.append(f"{terms} = {s}, write {d}" + (" carry 1" if carry else ""))
        else:
            x2 = x - carry
            borrow = x2 < y
            d = x2 + 10 * borrow - y
            terms = f"{x}" + (f" - {carry}" if carry else "") + (" + 10" if borrow else "") + f" - {y}"
            steps.append(f"{terms} = {d}, write {d}" + (" borrow 1" if borrow else ""))
            carry = int(borrow)
        digits.append(d)
    if op == "+" and carry:
        steps.append(f"carry {carry}, write {carry}")
    c = a + b if op == "+" else a - b
    return f"{'; '.join(steps)}. So {a} {op} {b} = {c}. The answer is {c}."


def _copy(rng: random.Random) -> str:
    if rng.random() < 0.5:
        item = " ".join(str(rng.randint(0, 10 ** rng.randint(1, 4) - 1)) for _ in range(rng.randint(1, 3)))
        return f"Repeat: {item}. {item}."
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
    k = rng.choice(tuple(_TIMES))
    return f'Say "{words}" {_TIMES[k]}: {" ".join([words] * k)}.'


def _arithmetic(task: dict) -> str:
    """The question and a worked answer: column by column for + and - (when a >= b), else the
    generator's own (a negative difference, or ×: tens and ones)."""
    m = _KEY.fullmatch(task["key"])
    worked = digit_by_digit(int(m[1]), m[2], int(m[3])) if m else None  # None: a - b < 0 or ×
    return f"{task['question']} {worked or task['worked']}"


def task_documents(n: int, seed: int, per_doc: int = 8, exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """n documents, each `per_doc` exercises (one a line) drawn from the three kinds. `exclude`: problem
    keys (tasks.py's `key`) never used, e.g. the dialogues' held-out problems (their
    dialogues_meta.json `heldout_problem_keys`), so an evaluation on them measures a skill, not recall."""
    rng = random.Random(f"chatsmith-task-text:{seed}")
    # operands of 1-3 digits; generate_tasks is a pure function of its arguments, so pools are fixed
    pools = {"arithmetic": [t for d in (1, 2, 3) for t in generate_tasks("arithmetic", n * per_doc // 6 + 10,
                                                                         seed, difficulty=d) if t["key"] not in exclude],
             "number_sense": [t for d in (1, 2) for t in generate_tasks("number_sense", n * per_doc // 8 + 10,
                                                                        seed, difficulty=d) if t["key"] not in exclude]}
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(per_doc):
            kind = rng.random()
            if kind < 0.3:
                lines.append(_copy(rng))
            elif kind < 0.8:
                lines.append(_arithmetic(rng.choice(pools["arithmetic"])))
            else:
                t = rng.choice(pools["number_sense"])
                lines.append(f"{t['question']} {t['worked']}")
        docs.append("\n".join(lines))
    return docs


__all__ = ["digit_by_digit", "task_documents"]
