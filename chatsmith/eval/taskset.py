"""Task names of `chatsmith eval` -> :class:`Task` objects, checked before a model is loaded.

``lm:PATH``        loss, perplexity and bits-per-byte (:func:`chatsmith.eval.lm.score_documents`)
                   on .txt/.md/.jsonl files or folders; for a ``data build`` corpus folder, its
                   ``val.jsonl`` only.
``arithmetic``,    exact match on the held-out built-in dialogues of that family
``word_problem``,  (``data/chat/heldout.jsonl`` unless ``heldout=`` says otherwise), checked never
``number_sense``,  to occur in the ``train.jsonl`` beside it.
``quiz``
``reward``,        replies scored by a reward model (the held-out prompts, or a prompt file).
``reward:PATH``
``PATH.jsonl``     your own task file (:mod:`chatsmith.eval.taskfile`).

Few-shot prompting draws examples from a pool: the *train* split of the same family for the
built-in tasks, ``pool=`` or ``NAME.pool.jsonl`` beside a task file ``NAME.jsonl``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from chatsmith.data.corpus import collect_input_files
from chatsmith.data.dialogues import prompt_hash
from chatsmith.errors import UserError
from chatsmith.eval.taskfile import Item, read_dialogue_items, read_objects, read_prompt_items, read_task_file

BUILTIN_TASKS = ("arithmetic", "word_problem", "number_sense", "quiz")
DEFAULT_HELDOUT = "data/chat/heldout.jsonl"
TASK_FORMS = ("lm:PATH (loss, perplexity and bits-per-byte on .txt/.md/.jsonl files or a corpus folder), "
              f"{', '.join(BUILTIN_TASKS)} (the built-in held-out dialogues), "
              "reward or reward:PATH.jsonl (replies scored by --reward-model, win rate with --compare), "
              "or PATH.jsonl (a task file: \"prompt\"/\"messages\" plus \"answer\"/\"answers\", "
              "\"reference\" or \"choices\" + \"label\")")


@dataclass
class Task:
    name: str
    kind: str                     # "lm" | "exact_match" | "reference" | "choice" | "reward"
    items: list[Item] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    pool_source: str | None = None
    pool: list[Item] | None = None
    never_trained: dict | None = None  # the held-out check by prompt hash (built-in tasks)


def check_never_trained(items: list[Item], heldout: str | os.PathLike, cache: dict | None = None) -> dict:
    """Held-out items are never trained on: none of their prompt hashes
    (:func:`chatsmith.data.dialogues.prompt_hash`, the hash the split itself uses) may occur in
    the ``train.jsonl`` beside the held-out file. A leak is a UserError (the figures would be
    meaningless); without a train file beside it the check is recorded as not done."""
    train = Path(heldout).with_name("train.jsonl")
    if not train.is_file():
        return {"checked": False, "reason": f"no {train} beside the held-out file"}
    key = str(train)
    if cache is None or key not in cache:
        hashes = set()
        for _, obj in read_objects(train, "training dialogues"):
            msgs = obj.get("messages")
            if isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              for m in msgs):
                hashes.add(prompt_hash(msgs))
        if cache is not None:
            cache[key] = hashes
    hashes = cache[key] if cache is not None else hashes
    leaked = [it.loc for it in items if prompt_hash(it.messages) in hashes]
    if leaked:
        raise UserError(f"{len(leaked)} held-out item(s) have the same prompt as a conversation in {train} "
                        f"(first: {leaked[0]}): scores on them would measure memorisation; rebuild the split "
                        f"with `chatsmith data build` or remove them")
    return {"checked": True, "against": key, "items": len(items), "train_prompts": len(hashes), "overlap": 0}


def _lm_task(name: str) -> Task:
    path = name[3:]
    if not path:
        raise UserError(f"task {name!r}: give a path after 'lm:', e.g. lm:data/corpus")
    p = Path(path)
    if p.is_dir() and (p / "val.jsonl").is_file() and (p / "train.jsonl").is_file():
        files = [str(p / "val.jsonl")]  # a `data build` corpus: its held-out split only
    else:
        files = [path]
    collect_input_files(files)  # checks existence and file types now
    return Task(name, "lm", files=files)


class _Resolver:
    """Reads the tasks of one run, sharing the train-split pools and prompt hashes between them."""

    def __init__(self, heldout: str, pool: str | None, need_pool: bool, limit: int | None):
        self.heldout, self.pool, self.need_pool, self.limit = heldout, pool, need_pool, limit
        self.train_pools: dict[tuple[str, str], list[Item]] = {}
        self.hashes: dict[str, set[str]] = {}

    def builtin(self, name: str) -> Task:
        items = read_dialogue_items(self.heldout, name, "held-out dialogues")[:self.limit]
        t = Task(name, "exact_match", items, [str(self.heldout)])
        t.never_trained = check_never_trained(items, self.heldout, self.hashes)
        if self.need_pool:
            train = str(Path(self.heldout).with_name("train.jsonl"))
            if (train, name) not in self.train_pools:
                self.train_pools[(train, name)] = read_dialogue_items(train, name, "training dialogues")
            t.pool, t.pool_source = self.train_pools[(train, name)], train
        return t

    def reward(self, name: str) -> Task:
        if name == "reward":
            items = read_prompt_items(self.heldout, "held-out dialogues")[:self.limit]
            t = Task(name, "reward", items, [str(self.heldout)])
            t.never_trained = check_never_trained(items, self.heldout, self.hashes)
            return t
        if not name[7:]:
            raise UserError(f"task {name!r}: give a prompt file after 'reward:', e.g. reward:prompts.jsonl")
        items = read_prompt_items(name[7:], "prompt file")[:self.limit]
        return Task(name, "reward", items, [name[7:]])

    def task_file(self, name: str) -> Task:
        items = read_task_file(name)[:self.limit]
        t = Task(name, items[0].kind, items, [name])
        if self.need_pool:
            src = self.pool
            if src is None:
                p = Path(name)
                sibling = p.with_name(p.name[:-len(p.suffix)] + ".pool" + p.suffix)
                if not sibling.is_file():
                    raise UserError(f"task {name}: few-shot examples need a pool of worked examples "
                                    f"(the same format): pass --pool PATH or create {sibling}")
                src = str(sibling)
            t.pool, t.pool_source = read_task_file(src, "example pool"), src
            if t.pool[0].kind != t.kind:
                raise UserError(f"{src}: the example pool holds {t.pool[0].kind.replace('_', ' ')} items but "
                                f"task {name} is {t.kind.replace('_', ' ')}")
        return t


def resolve_tasks(names: list[str], heldout: str | None, pool: str | None, need_pool: bool,
                  limit: int | None) -> list[Task]:
    """Check every task name and read its items (and example pool) before the model is loaded."""
    r = _Resolver(heldout or DEFAULT_HELDOUT, pool, need_pool, limit)
    tasks = []
    for name in dict.fromkeys(names):
        if name.startswith("lm:"):
            tasks.append(_lm_task(name))
        elif name in BUILTIN_TASKS:
            tasks.append(r.builtin(name))
        elif name == "reward" or name.startswith("reward:"):
            tasks.append(r.reward(name))
        elif name.lower().endswith((".jsonl", ".ndjson")):
            tasks.append(r.task_file(name))
        else:
            raise UserError(f"unknown task {name!r}; a task is {TASK_FORMS}")
    if not tasks:
        raise UserError(f"no tasks given; a task is {TASK_FORMS}")
    return tasks
