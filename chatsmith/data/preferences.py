"""Preference pairs: reading them in TRL's formats, and building the built-in ones.

A pair is a prompt (chat messages ending with a user turn) and two assistant replies, one
preferred. Accepted JSONL records (one per line), as TRL's preference datasets write them:

    {"prompt": "text", "chosen": "text", "rejected": "text"}                      standard
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}]}                                    conversational
    {"chosen": [...whole conversation...], "rejected": [...whole conversation...]}  implicit prompt

A plain-text prompt becomes one user turn and plain-text replies assistant turns: chatsmith's
alignment stages train chat models, so every pair is rendered with the chat template.

The built-in pairs are synthesised from the built-in dialogues (`chatsmith data build`), one
recipe per pair, recorded in its "recipe" field:

- ``wrong_answer``: a checkable question's worked answer vs. the same text with the final number
  changed (correct vs. perturbed answer);
- ``other_reply``: the real reply vs. a reply taken from another conversation (on-topic vs.
  off-topic);
- ``repetition``: the real reply vs. a degenerate one that repeats its opening words (the failure
  small models actually show).

Held-out pairs come only from held-out dialogues, so a reward model is scored on prompts it never
saw.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from chatsmith import atomic
from chatsmith.data.corpus import check_file, iter_jsonl
from chatsmith.errors import UserError
from chatsmith.messages import ROLES, MessageError, check_messages



@dataclass
class Pair:
    prompt: list[dict]  # messages, the last one a user turn
    chosen: str
    rejected: str
    source: str  # "file:line"
    meta: dict = field(default_factory=dict)


def _messages(v, where: str, key: str) -> list[dict]:
    if isinstance(v, str):
        return [{"role": "assistant" if key != "prompt" else "user", "content": v}]
    try:
        return check_messages(v, f'"{key}"', parts=False)
    except MessageError as e:
        raise UserError(f"{where}: {e} (each turn is an object with \"role\", one of {', '.join(ROLES)}, "
                        f"and a string \"content\")") from None


def parse_pair(obj, where: str) -> Pair:
    """One record in any of the accepted formats -> Pair; UserError naming `where` otherwise."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a preference record must be a JSON object, not {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise UserError(f"{where}: missing \"{key}\" (a preference record needs \"chosen\" and "
                            f"\"rejected\", and usually \"prompt\")")
    chosen = _messages(obj["chosen"], where, "chosen")
    rejected = _messages(obj["rejected"], where, "rejected")
    if "prompt" in obj:
        prompt = _messages(obj["prompt"], where, "prompt")
    else:  # implicit prompt: the shared prefix of the two conversations
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise UserError(f"{where}: without \"prompt\", \"chosen\" and \"rejected\" must be whole "
                            f"conversations sharing the prompt turns")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise UserError(f"{where}: \"{key}\" must be one assistant reply (after the prompt)")
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a user turn")
    c, r = chosen[0]["content"], rejected[0]["content"]
    if not c.strip() or not r.strip():
        raise UserError(f"{where}: the {'chosen' if not c.strip() else 'rejected'} reply is empty")
    if c == r:
        raise UserError(f"{where}: \"chosen\" and \"rejected\" are identical; the pair says nothing")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
    return Pair(prompt, c, r, where, meta)


def read_pairs(paths: list[str], skip_bad: bool = False) -> tuple[list[Pair], int]:
    """Every pair in the JSONL files (in order) and the count of bad records skipped."""
    pairs, skipped = [], 0
    for p in paths:
        path = Path(p)
        check_file(path, "preference file")
        for lineno, obj in iter_jsonl(path, "preference file"):
            try:
                pairs.append(parse_pair(obj, f"{path}:{lineno}"))
            except UserError:
                if not skip_bad:
                    raise
                skipped += 1
    if not pairs:
        raise UserError(f"no preference pairs in {', '.join(paths)}")
    return pairs, skipped


def encode_pair(tok, pair: Pair, max_len: int) -> tuple[list[int], int, list[int], int]:
    """(chosen ids, prompt length, rejected ids, prompt length): prompt + reply + end token under the
    chat template. UserError naming the record when it does not fit the context."""
    prompt_ids, _ = tok.render_chat(pair.prompt, add_generation_prompt=True)
    out = []
    for reply in (pair.chosen, pair.rejected):
        ids, _ = tok.render_chat(pair.prompt + [{"role": "assistant", "content": reply}])
        if len(ids) > max_len:
            raise UserError(f"{pair.source}: prompt + reply is {len(ids)} tokens, beyond the "
                            f"{max_len}-token context (shorten it, or pass --skip-bad to drop such pairs)")
        out += [ids, len(prompt_ids)]
    return tuple(out)


def encode_pairs(tok, pairs: list[Pair], max_len: int, skip_bad: bool = False):
    encoded, dropped = [], 0
    for p in pairs:
        try:
            encoded.append(encode_pair(tok, p, max_len))
        except UserError:
            if not skip_bad:
                raise
            dropped += 1
    return encoded, dropped


# --------------------------------------------------------------------------- built-in pairs

_NUM = re.compile(r"-?\d+")


def perturb_answer(reply: str, rng: random.Random) -> str | None:
    """The reply with its final number changed everywhere it stands alone ("7 + 5 = 12. The answer
    is 12." -> "7 + 5 = 13. The answer is 13."), or None when it has no number."""
    nums = _NUM.findall(reply)
    if not nums:
        return None
    n = int(nums[-1])
    wrong = n + rng.choice([-10, -2, -1, 1, 2, 10]) if n != 0 else rng.randint(1, 9)
    return re.sub(rf"(?<![\d.]){re.escape(nums[-1])}(?![\d])", str(wrong), reply)


def repetition(reply: str, rng: random.Random) -> str | None:
    words = reply.split()
    if len(words) < 2:
        return None if not reply.strip() else (reply.strip() + " ") * 4
    k = rng.randint(1, min(3, len(words) - 1))
    return " ".join(words[:k] * rng.randint(4, 7))


def synthesise_pairs(records: list[dict], seed: int) -> list[dict]:
    """TRL-format pair records from dialogue records (see the module docstring for the recipes)."""
    rng = random.Random(seed)
    replies = [r["messages"][-1]["content"] for r in records]
    out = []
    for i, r in enumerate(records):
        msgs = r["messages"]
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            continue
        prompt, reply = msgs[:-1], msgs[-1]["content"]
        fam = r.get("family", "")
        cands = []
        if r.get("answers") and fam in ("arithmetic", "word_problem"):
            cands.append(("wrong_answer", perturb_answer(reply, rng)))
        other = replies[rng.randrange(len(replies))]
        cands.append(("other_reply", other))
        cands.append(("repetition", repetition(reply, rng)))
        # checkable questions get their perturbed answer half the time: it teaches correctness
        weights = [2.0 if c[0] == "wrong_answer" else 1.0 for c in cands]
        recipe, rejected = rng.choices(cands, weights)[0]
        if not rejected or rejected.strip() == reply.strip() or not reply.strip():
            continue
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": reply}],
                    "rejected": [{"role": "assistant", "content": rejected}], "recipe": recipe,
                    "family": fam})
    return out


def build_preferences(chat_dir: str | os.PathLike, seed: int = 1337, heldout: str = "heldout.jsonl") -> dict:
    """pairs_train.jsonl / pairs_heldout.jsonl in chat_dir from its train/heldout dialogues (`heldout`:
    the held-out file's name in chat_dir, e.g. the speedrun's family-capped heldout_judge.jsonl)."""
    d = Path(chat_dir)
    counts = {}
    for split in ("train", "heldout"):
        src = d / (heldout if split == "heldout" else f"{split}.jsonl")
        if not src.exists():
            raise UserError(f"{src} is missing: build the dialogues first (`chatsmith data build`)")
        records = [obj for _, obj in iter_jsonl(src, "dialogue file")]
        pairs = synthesise_pairs(records, seed + (split == "heldout"))
        atomic.write_jsonl(d / f"pairs_{split}.jsonl", pairs)
        by = {}
        for p in pairs:
            by[p["recipe"]] = by.get(p["recipe"], 0) + 1
        counts[split] = {"pairs": len(pairs), "recipes": by}
    return counts
