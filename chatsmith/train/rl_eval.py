"""Held-out evaluation of an RL policy: greedy replies to held-out prompts, scored, and its KL to the
reference on sampled replies; the before/after table `chatsmith rlhf` prints."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import torch

from chatsmith.batching import completion_batch, token_logprobs
from chatsmith.data.tasks import check_answer, extract_number, final_answer
from chatsmith.train.rollouts import PromptItem


@torch.no_grad()
def evaluate_policy(stage, model, items: list[PromptItem], seed: int = 0) -> dict:
    """Greedy replies to held-out prompts: exact match per family (where answers are known), mean
    reward (every source but those that learn as they score, the discriminator), reply length;
    and the policy's KL to the reference, Σ_t log π - log π_ref averaged over sampled replies.
    `stage` is the RLStage (its sampler, reward sources and reference model)."""
    if not items:
        return {}
    ro = stage.sample(model, items, seed, temperature=0.0)
    its, texts, finished = ro.items, ro.texts, ro.finished
    res: dict = {"heldout_prompts": len(its)}
    fams: dict[str, list[bool]] = {}
    for it, t in zip(its, texts):
        if it.meta.get("answers"):
            fams.setdefault(it.meta.get("family", "all"), []).append(
                check_answer(it.meta.get("family", ""), t, it.meta["answers"]))
    if fams:
        res["exact_match"] = {f: float(np.mean(v)) for f, v in sorted(fams.items())}
        res["exact_match_all"] = float(np.mean([x for v in fams.values() for x in v]))
        res.update(answer_collapse([t for it, t in zip(its, texts) if it.meta.get("answers")]))
    scorers = [fn for fn in stage.rewards if not fn.learns]
    if scorers:
        total = torch.zeros(len(texts))
        for fn in scorers:
            total += torch.tensor(fn(its, texts, finished), dtype=torch.float32)
        res["heldout_reward"] = float(total.mean())
    res["ended_share"] = float(np.mean(finished))
    res["samples"] = _samples(its, texts)
    if model is stage.ref:  # the reference against itself: 0 by definition
        res["kl_to_ref"] = 0.0
        return res
    res["kl_to_ref"] = _kl_to_ref(stage, model, items, seed + 1)
    return res


def _samples(items: list[PromptItem], texts: list[str], per_family: int = 2) -> list[dict]:
    """A few replies to show, `per_family` of each family."""
    per_fam: dict[str, int] = {}
    out = []
    for it, t in zip(items, texts):
        f = it.meta.get("family", "all")
        if per_fam.get(f, 0) < per_family:
            per_fam[f] = per_fam.get(f, 0) + 1
            out.append({"family": f, "prompt": it.messages[-1]["content"], "reply": t})
    return out


def _kl_to_ref(stage, model, items: list[PromptItem], seed: int) -> float:
    """KL on sampled replies (greedy ones are not samples of π) to up to 32 of the prompts."""
    sub = items[: min(len(items), 32)]
    b = completion_batch(stage.sample(model, sub, seed, temperature=1.0).seqs, stage.tok.pad_id)
    dev = next(model.parameters()).device
    x, y = b["x"].to(dev), b["y"].to(dev)
    lp = token_logprobs(model(x), y).cpu()
    ref = token_logprobs(stage.ref(x), y).cpu()
    return float(((lp - ref) * b["mask"]).sum(1).mean())


def answer_collapse(texts: list[str]) -> dict:
    """The most common final answer among the replies and its share. A policy that cannot solve
    the task can still raise exact match by learning the answer that is right most often ("0"
    for products with a zero factor); a share far above the data's own shows that is happening."""
    counts = Counter(extract_number(final_answer(t)) for t in texts)
    if not counts:
        return {}
    top, n = counts.most_common(1)[0]
    return {"top_answer": top, "top_answer_share": n / len(texts)}


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> one level, keys joined with "/" (exact_match/arithmetic)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def print_rl_table(res: dict):
    a, b = res.get("init") or {}, res.get("rl") or {}
    print(f"{'held-out':32s} {'before':>8s} {'after':>8s}", file=sys.stderr)
    for fam in sorted(set(a.get("exact_match", {})) | set(b.get("exact_match", {}))):
        va, vb = a.get("exact_match", {}).get(fam), b.get("exact_match", {}).get(fam)
        print(f"{'exact match: ' + fam:32s} {'-' if va is None else f'{va:.0%}':>8s} "
              f"{'-' if vb is None else f'{vb:.0%}':>8s}", file=sys.stderr)
    if "top_answer" in a or "top_answer" in b:
        print(f"{'most common final answer':32s} {str(a.get('top_answer')):>8s} {str(b.get('top_answer')):>8s}",
              file=sys.stderr)
    for key in ("heldout_reward", "kl_to_ref", "ended_share", "top_answer_share"):
        if key in a or key in b:
            print(f"{key:32s} {a.get(key, float('nan')):8.3f} {b.get(key, float('nan')):8.3f}", file=sys.stderr)


__all__ = ["evaluate_policy", "answer_collapse", "flatten", "print_rl_table"]
