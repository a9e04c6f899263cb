"""Confidence intervals for exact-match proportions: one policy's (Wilson) and the change between two
policies answering the same items (Newcombe's paired interval), and how the tables print a change."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% at z = 1.96). Unlike the normal
    approximation p ± z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0, which is
    where a weak policy's exact match sits."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def exact_match_summary(per: dict[str, list[bool]]) -> dict:
    """Per family: the share right, [right, n], its Wilson 95% interval and the per-item 0/1 list
    (in item order, what a paired comparison of two evaluations needs)."""
    return {"exact_match": {f: sum(v) / len(v) for f, v in per.items()},
            "exact_match_counts": {f: [int(sum(v)), len(v)] for f, v in per.items()},  # [right, n]
            "exact_match_ci95": {f: list(wilson(sum(v), len(v))) for f, v in per.items()},
            "exact_match_items": {f: [int(x) for x in v] for f, v in per.items()}}


# the paired comparisons `rlhf` writes into rl_eval.json (key, label), RL against where it started and
# against the same-compute SFT control
RL_COMPARISONS = (("rl_vs_init", "RL - start"), ("rl_vs_control", "RL - control"))


def paired_difference(old: list[bool], new: list[bool], z: float = 1.96) -> dict:
    """new − old in exact match on the same items, with Newcombe's (1998, method 10) 95% interval for
    a difference of paired proportions: the two Wilson intervals combined through the correlation φ
    of the 2x2 table (a: both right, b: only new right, c: only old right, d: neither), φ shrunk by
    n/2 when positive as the paper's continuity correction. Pairing is what makes a small change
    measurable: two policies that agree on most items have a much narrower interval for their
    difference than the two separate Wilson intervals suggest."""
    if len(old) != len(new):
        raise ValueError(f"paired difference of {len(old)} and {len(new)} items")
    n = len(old)
    if n == 0:
        return {"diff": 0.0, "ci95": [-1.0, 1.0], "n": 0, "gained": 0, "lost": 0}
    a = sum(o and w for o, w in zip(old, new))
    b = sum(w and not o for o, w in zip(old, new))
    c = sum(o and not w for o, w in zip(old, new))
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n, z), wilson(a + c, n, z)
    den = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    num = a * d - b * c
    phi = 0.0 if den == 0 else (max(num - n / 2, 0.0) if num > 0 else num) / den
    lo = p1 - p2 - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = p1 - p2 + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"diff": p1 - p2, "ci95": [max(-1.0, lo), min(1.0, hi)], "n": n, "gained": b, "lost": c}


def paired_by_family(old: dict, new: dict) -> dict:
    """paired_difference per family of two evaluations' `exact_match_items` (same items, same order);
    families either side lacks are left out."""
    a, b = old.get("exact_match_items") or {}, new.get("exact_match_items") or {}
    return {f: paired_difference(a[f], b[f]) for f in a if f in b and len(a[f]) == len(b[f])}


def diff_cell(d: dict) -> str:
    """A paired difference in points as the tables show it: "+4.0 [+0.5, +7.6] (+6/-2)", the items
    gained and lost after the interval."""
    lo, hi = d["ci95"]
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (+{d['gained']}/-{d['lost']})"
