"""arithmetic, word_problem, number_sense: questions from the seeded generator in
:mod:`chatsmith.data.tasks`, the reply its worked answer (checkable).

Their tool forms (arithmetic_tools, word_problem_tools, number_sense_tools) are the same
questions with the calculator on offer (OpenAI's fine-tuning format: "tools" beside "messages"):
the assistant calls the calculator with the worked answer's expression, reads the result and
states the answer. number_sense_tools answers without a call (which of two numbers is larger
needs no calculator), so a model trained on the mix learns when not to call, too. A tool record
shares its question's `_key` with the plain record, so both land on the same side of the split.
"""

from __future__ import annotations

import json
import re

from chatsmith.data.dialogues.base import Family, Inputs, record
from chatsmith.data.tasks import generate_tasks, normalise
from chatsmith.tools.calculator import SPEC as CALCULATOR
from chatsmith.tools.calculator import calculator

# the first "a op b (op c …) =" in a worked answer
_EXPR = re.compile(r"(\(?\d+(?:\s*[+\-×÷*/]\s*\(?\d+\)?)+)\s*=")


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


def tool_record(family: str, task: dict) -> dict | None:
    """The task as a tool dialogue, or None when its worked answer has no expression whose value
    is the answer (the calculator could not have given it)."""
    zh = "答案" in task["worked"]
    final = f"答案是 {task['answer']}。" if zh else f"The answer is {task['answer']}."
    msgs = [{"role": "user", "content": task["question"]}]
    if family != "number_sense":
        m = _EXPR.search(task["worked"])
        if m is None:
            return None
        expr = m.group(1).strip()
        if calculator({"expression": expr}) != task["answer"]:
            return None
        call = {"id": "call_0", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expr}, ensure_ascii=False)}}
        msgs += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_0", "content": task["answer"]}]
    msgs.append({"role": "assistant", "content": final if family != "number_sense" else task["worked"]})
    return {"messages": msgs, "tools": [CALCULATOR], "family": f"{family}_tools", "source": f"tasks/{family}",
            "answers": task["answers"], "_key": task["key"]}


class ToolGenerated(Family):
    """The tool form of one generator family (built only when named: --families arithmetic_tools)."""
    checkable = True
    default = False

    def __init__(self, family: str, default_cap: int):
        self.family, self.name, self.default_cap = family, f"{family}_tools", default_cap

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], None]:
        n = self.default_cap if cap is None else cap
        out, seen = [], set()
        # the same seed as the plain family: the same questions, so the two forms pair up
        for t in generate_tasks(self.family, 3 * n + 100, inputs.seed):
            q = normalise(t["question"])
            if q in seen:
                continue
            seen.add(q)
            r = tool_record(self.family, t)
            if r is not None:
                out.append(r)
            if len(out) >= n:
                break
        return out, None
