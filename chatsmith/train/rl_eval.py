"""Held-out evaluation of an RL policy: greedy replies to held-out prompts, scored, and its KL to the
reference on sampled replies; the before/after table `chatsmith rlhf` prints."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import torch

from chatsmith.batching import completion_batch, masked_logprobs
from chatsmith.data.tasks import check_answer, extract_number, final_answer
from chatsmith.eval.intervals import RL_COMPARISONS, diff_cell, exact_match_summary
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
        res.update(exact_match_summary(dict(sorted(fams.items()))))
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
    x, y, m = b["x"].to(dev), b["y"].to(dev), b["mask"].to(dev)
    lp = masked_logprobs(model, x, y, m)[0]
    ref = masked_logprobs(stage.ref, x, y, m)[0]
    return float((lp - ref).sum(1).mean())


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


SIDES = ("init", "rl", "control")  # the starting policy, the RL policy, the same-compute SFT control


def _cell(side: dict, fam: str) -> str:
    v = side.get("exact_match", {}).get(fam)
    if v is None:
        return "-"
    ci = side.get("exact_match_ci95", {}).get(fam)
    return f"{v:.1%} [{ci[0]:.0%},{ci[1]:.0%}]" if ci else f"{v:.1%}"


def print_rl_table(res: dict):
    """Held-out figures per side (init, rl and, with --control-sft, control): exact match per family
    with its 95% Wilson interval and item count, the most common final answer and its share."""
    sides = [s for s in SIDES if res.get(s) is not None or s != "control"]
    cols = {s: res.get(s) or {} for s in sides}
    print(f"{'held-out':28s}" + "".join(f" {s:>20s}" for s in sides), file=sys.stderr)
    fams = sorted({f for c in cols.values() for f in c.get("exact_match", {})})
    for fam in fams:
        n = max(c.get("exact_match_counts", {}).get(fam, [0, 0])[1] for c in cols.values())
        print(f"{f'exact match: {fam} (n={n})':28s}" + "".join(f" {_cell(c, fam):>20s}" for c in cols.values()),
              file=sys.stderr)
    if any("top_answer" in c for c in cols.values()):
        print(f"{'most common final answer':28s}" + "".join(f" {str(c.get('top_answer')):>20s}"
                                                              for c in cols.values()), file=sys.stderr)
    for key in ("top_answer_share", "heldout_reward", "kl_to_ref", "ended_share"):
        if any(key in c for c in cols.values()):
            print(f"{key:28s}" + "".join(f" {c.get(key, float('nan')):20.3f}" for c in cols.values()),
                  file=sys.stderr)
    for key, label in RL_COMPARISONS:
        for fam, d in (res.get(key) or {}).items():
            print(f"{f'{label}: {fam}':28s} {diff_cell(d):>20s}", file=sys.stderr)


__all__ = ["evaluate_policy", "answer_collapse", "flatten", "print_rl_table"]
