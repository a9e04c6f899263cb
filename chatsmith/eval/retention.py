"""Knowledge kept, not only gained: facts a pretrained model knew before fine-tuning, re-asked after.

Facts come from the built-in held-out dialogues (never trained on): bsdgames quiz items ("What is
the atomic number of Iridium?" -> "77") and WordNet definitions ("What is the meaning of the word
'bandage'?" -> its gloss). Each fact is a multiple-choice item scored by likelihood: the model knows
it when the true answer, as the assistant's reply, has a higher mean log-probability per token than
each of `choices - 1` distractors (answers of other items of the same quiz file, glosses of other
words). Likelihood instead of generation because it needs one forward pass per option and no
answer parsing: a 135M model's free-form replies ("The atomic number of iridium is 77, which …")
would need a lenient matcher, and decoding costs far more on a CPU.

`retention(known_before, correct_after)` is the share of the facts the first model knew that the
later one still knows; facts the first model did not know are not counted (they measure gain, not
retention).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from chatsmith.batching import collate, masked_logprobs
from chatsmith.data.tasks import normalise


@dataclass
class Fact:
    family: str  # "quiz" or "definition"
    question: str
    options: list[str]  # options[0] is the true answer
    source: str


_GLOSS = re.compile(r"^.*?\)\s*:\s*(.*)$", re.S)  # "bandage (noun): a piece of ..." -> the gloss


def definition_gloss(reply: str) -> str:
    """The gloss of a built-in definition reply, without the headword (which would give the answer
    away) and without the example sentence."""
    m = _GLOSS.match(reply)
    gloss = (m.group(1) if m else reply).split(" For example:")[0].strip()
    return gloss


def build_facts(records, choices: int = 4, seed: int = 0, per_family: int | None = None) -> list[Fact]:
    """Multiple-choice facts from chat records (chat_formats.Record or dicts with messages/family/
    source) of the quiz and definition families. A fact needs `choices - 1` distractors that differ
    from every accepted answer; one without enough is left out."""
    rng = random.Random(seed)
    rows = []
    for r in records:
        meta = r.meta if hasattr(r, "meta") else r
        msgs = r.messages if hasattr(r, "messages") else r["messages"]
        fam = meta.get("family")
        if fam not in ("quiz", "definition") or len(msgs) < 2:
            continue
        q, a = msgs[-2]["content"], msgs[-1]["content"]
        if fam == "definition":
            answer, accepted = definition_gloss(a), {normalise(definition_gloss(a))}
        else:
            answer = a.strip()
            accepted = {normalise(x) for x in meta.get("answers") or [a]}
        pool = meta.get("source", fam) if fam == "quiz" else fam  # quiz distractors: same quiz file
        rows.append((fam, q, answer, accepted, pool))
    by_pool: dict[str, list[str]] = {}
    for fam, q, answer, accepted, pool in rows:
        by_pool.setdefault(pool, []).append(answer)
    facts, per = [], {}
    for fam, q, answer, accepted, pool in rows:
        if per_family is not None and per.get(fam, 0) >= per_family:
            continue
        others = sorted({x for x in by_pool[pool] if normalise(x) not in accepted})
        if len(others) < choices - 1:
            continue
        facts.append(Fact(fam, q, [answer] + rng.sample(others, choices - 1), pool))
        per[fam] = per.get(fam, 0) + 1
    return facts


@torch.no_grad()
def option_scores(model, tok, facts: list[Fact], batch_size: int = 32) -> list[list[float]]:
    """Mean log-probability per token of each option as the assistant's reply to the question (its
    end token included: a model that would go on talking after "77" scores lower)."""
    seqs, masks, where = [], [], []
    for i, f in enumerate(facts):
        for j, opt in enumerate(f.options):
            ids, mask = tok.render_chat([{"role": "user", "content": f.question},
                                         {"role": "assistant", "content": opt}])
            seqs.append(ids)
            masks.append(mask)
            where.append((i, j))
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = [[0.0] * len(f.options) for f in facts]
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))  # similar lengths batch with less padding
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = collate([seqs[k] for k in idx], tok.pad_id if tok.pad_id is not None else 0,
                    masks=[masks[k] for k in idx])
        m = b["mask"]
        lp = masked_logprobs(model, b["x"].to(dev), b["y"].to(dev), m.to(dev))[0].cpu()
        mean = lp.sum(1) / m.sum(1).clamp(min=1)
        for k, v in zip(idx, mean.tolist()):
            i, j = where[k]
            out[i][j] = v
    model.train(was)
    return out


def facts_correct(model, tok, facts: list[Fact], batch_size: int = 32) -> list[bool]:
    """Whether the true answer (option 0) beats every distractor, per fact."""
    return [s[0] > max(s[1:]) for s in option_scores(model, tok, facts, batch_size)]


def retention(known_before: list[bool], correct_after: list[bool]) -> dict:
    """Share of the facts known before that are still answered correctly, with the counts."""
    if len(known_before) != len(correct_after):
        raise ValueError("retention needs the same facts before and after")
    known = [a for k, a in zip(known_before, correct_after) if k]
    return {"known_before": len(known), "kept": int(sum(known)),
            "retention": (sum(known) / len(known)) if known else None}


def fact_to_dict(f: Fact) -> dict:
    return {"family": f.family, "question": f.question, "options": f.options, "source": f.source}


def fact_from_dict(d: dict) -> Fact:
    return Fact(d["family"], d["question"], list(d["options"]), d["source"])
