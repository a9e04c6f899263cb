"""What the RL stage rolls out: prompts, sampled replies with the engine, and DAPO's filter.

A `Rollout` is a batch of sampled replies, row i a reply to `items[i]`; with G samples per prompt
the G replies to one prompt are consecutive rows (a "group"). `sample` fills one with the engine
(KV cache, batched); the stage then scores it, and `keep_informative` (GRPO with --max-resample)
keeps the groups whose rewards differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from chatsmith.data.chat_formats import read_conversations
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.messages import heldout_overlap
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools.calls import split_reply
from chatsmith.tools.inline import ToolRunner


@dataclass
class PromptItem:
    messages: list[dict]  # the prompt turns (ending with a user turn)
    ids: list[int]
    reference: str | None  # the dataset's reply, if any (the discriminator's "real" sample)
    meta: dict
    source: str


def load_prompts(tok: Tokenizer, specs: list[str], ctx: int, families: set[str] | None,
                 min_new: int = 8, tools: list[dict] | None = None) -> tuple[list[PromptItem], dict]:
    """Prompts from chat files (any format SFT reads); a trailing assistant turn becomes the reference.
    tools: definitions offered in every prompt (RL with tools run inside the rollouts); a record's
    own "tools" are used where it has them."""
    records, _ = read_conversations(specs, prompts=True)
    items, too_long, other = [], 0, 0
    for r in records:
        if families and r.meta.get("family") not in families:
            other += 1
            continue
        msgs, ref = r.messages, None
        if msgs[-1]["role"] == "assistant":
            msgs, ref = msgs[:-1], msgs[-1]["content"]
        if not msgs or msgs[-1]["role"] != "user":
            continue
        ids, _ = tok.render_chat(msgs, add_generation_prompt=True, tools=r.meta.get("tools") or tools)
        if len(ids) > ctx - min_new:
            too_long += 1
            continue
        items.append(PromptItem(msgs, ids, ref, r.meta, r.source))
    return items, {"prompts": len(items), "too_long": too_long, "other_families": other}


def heldout_items(held_all: list[PromptItem], train: list[PromptItem], per_family: int) -> list[PromptItem]:
    """The first `per_family` held-out prompts of each family; none may also be a training prompt."""
    held, per = [], {}
    for it in held_all:
        f = it.meta.get("family", "all")
        if per.get(f, 0) < per_family:
            held.append(it)
            per[f] = per.get(f, 0) + 1
    leaked = heldout_overlap([it.messages for it in train], [it.messages for it in held])
    if leaked:
        raise UserError(f"{leaked} held-out prompts are also training prompts: the held-out figures "
                        f"would be meaningless")
    return held


@dataclass
class Rollout:
    """Sampled replies, row i a reply to items[i] (the G replies to one prompt are consecutive)."""

    items: list[PromptItem]
    texts: list[str]
    finished: list[bool]  # ended on its own (end token), not cut at max_new_tokens
    seqs: list[tuple[list[int], int]]  # (prompt + reply ids, prompt length) per row
    scores: torch.Tensor | None = None  # (N,) summed reward, once scored
    parts: dict[str, float] = field(default_factory=dict)  # logged means: reward, reward_<source>
    sampled: int = -1  # replies drawn to fill it (more than its rows after DAPO's filter); -1: its rows

    def __post_init__(self):
        if self.sampled < 0:
            self.sampled = len(self.items)

    @property
    def kept(self) -> int:
        return len(self.items)

    def take(self, rows) -> Rollout:
        """These rows (scores included), as a rollout of their own."""
        rows = list(rows)
        return dataclasses.replace(self, items=[self.items[i] for i in rows], texts=[self.texts[i] for i in rows],
                                   finished=[self.finished[i] for i in rows], seqs=[self.seqs[i] for i in rows],
                                   scores=self.scores[rows], sampled=len(rows))

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        return Rollout([x for r in parts for x in r.items], [x for r in parts for x in r.texts],
                       [x for r in parts for x in r.finished], [x for r in parts for x in r.seqs],
                       torch.cat([r.scores for r in parts]))


@torch.no_grad()
def sample(model, tok: Tokenizer, items: list[PromptItem], seed: int, temperature: float, max_new_tokens: int,
           end_id: int, n: int = 1, tools: dict | None = None, quantize: str | None = None) -> Rollout:
    """n completions for each item (grouped), unscored. tools: built-in tools run inside generation;
    the tokens they feed in are left out of the policy's loss, and the texts to score are what the
    model wrote around its calls. quantize: the engine's decode weights (None: fp32)."""
    was = model.training
    p = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, seed=seed,
                       tool_hook=ToolRunner(tok, tools).fork if tools else None)
    # one batch for the whole rollout when it fits (a decode step of 64 rows costs far less than 8
    # steps of 8), and one prefill per prompt for its group of n
    comps = Engine(model, tok, quantize=quantize).generate_many([it.ids for it in items], p,
                                                               max_batch=min(64, len(items) * n), n=n)
    items = [it for it in items for _ in range(n)]
    model.train(was)
    seqs = []
    for it, c in zip(items, comps):
        # the engine leaves the end token out of token_ids; the policy must learn to emit it
        resp = list(c.token_ids) + ([end_id] if c.finish_reason == "stop" else [])
        seqs.append((it.ids + (resp or [end_id]), len(it.ids), c.forced) if c.forced else
                    (it.ids + (resp or [end_id]), len(it.ids)))
    texts = [split_reply(c.text, tok.tool_markers)[0] if tools else c.text for c in comps]
    return Rollout(items, texts, [c.finish_reason == "stop" for c in comps], seqs)


def informative_rows(ro: Rollout, group: int) -> list[int]:
    """The rows of the groups whose rewards differ."""
    spread = ro.scores.view(-1, group).std(1, unbiased=False) > 1e-6
    return [i for g in torch.nonzero(spread).flatten().tolist() for i in range(g * group, (g + 1) * group)]


def keep_informative(first: Rollout, draw: Callable[[], Rollout], group: int, want: int, max_resample: int) -> Rollout:
    """DAPO's dynamic sampling (Yu et al. 2025, §3.2): a group whose G rewards are all equal has
    zero advantage everywhere and only costs a forward and backward pass, so such groups are
    dropped and more prompts are drawn (`draw`), up to max_resample times, until `want` rows of
    informative groups are collected. With a sparse reward (a weak model, a hard task) most groups
    carry no signal, and this keeps the optimizer's batch full of ones that do. When no draw has
    any, the last draw is kept whole (the step then only follows the KL term). The logged reward
    parts are the mean over everything drawn."""
    return keep_rows(first, draw, lambda ro: informative_rows(ro, group), want, max_resample)


def keep_rows(first: Rollout, draw: Callable[[], Rollout], select: Callable[[Rollout], list[int]], want: int,
              max_resample: int, cut: bool = True) -> Rollout:
    """The rows `select` picks from `first`, topped up from up to max_resample more draws until
    `want` rows are collected (then cut to `want`, unless not `cut`); with none picked in any draw,
    the last draw whole. `sampled` counts every reply drawn, and the reward parts average over all of them.
    (GRPO's filter keeps informative groups; rft keeps the replies the verifier accepts.)"""
    kept: list[Rollout] = []
    n_kept, sampled, part_sums = 0, 0, {}
    ro = first
    for attempt in range(max_resample + 1):
        if attempt:
            ro = draw()
        sampled += ro.kept
        for key, v in ro.parts.items():
            part_sums[key] = part_sums.get(key, 0.0) + v * ro.kept
        rows = select(ro)
        kept.append(ro.take(rows))
        n_kept += len(rows)
        if n_kept >= want:
            break
    parts = {key: v / sampled for key, v in part_sums.items()}
    if not n_kept:
        return dataclasses.replace(ro, parts=parts, sampled=sampled)
    n = want if cut and n_kept >= want else n_kept
    return dataclasses.replace(Rollout.concat(kept).take(range(n)), parts=parts, sampled=sampled)


__all__ = ["PromptItem", "load_prompts", "heldout_items", "Rollout", "sample", "informative_rows", "keep_informative", "keep_rows"]
