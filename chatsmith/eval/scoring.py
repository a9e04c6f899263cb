"""Scores of `chatsmith eval`: exact match, BLEU/chrF, multiple choice, reward and win rate.

- exact match: the reply (for chain-of-thought, the answer read from its last line) checked
  against the accepted answers by :func:`chatsmith.data.tasks.check_answer`;
- reference: sacrebleu's corpus BLEU and chrF against one or more references per item;
- multiple choice: the choice with the highest summed log-likelihood (acc), and per UTF-8 byte
  of the choice (acc_norm);
- reward: the mean reward-model score of the replies and, against a second model, the win rate.
"""

from __future__ import annotations

from collections import Counter
from math import comb

import sacrebleu

from chatsmith.data.tasks import check_answer, final_answer
from chatsmith.eval.taskfile import Item


def extract_cot_answer(reply: str) -> str:
    """The answer of a chain-of-thought reply: its last non-empty line, after the last answer
    marker ("The answer is X." -> "X") when there is one."""
    lines = [ln.strip() for ln in reply.split("\n") if ln.strip()]
    if not lines:
        return ""
    return final_answer(lines[-1]).strip()


def exact_match(items: list[Item], extracted: list[str]) -> tuple[list[bool], dict]:
    """Per-item correctness of the extracted answers, and the accuracy over the items."""
    ok = [check_answer(it.family, e, it.answers) for it, e in zip(items, extracted)]
    return ok, {"accuracy": sum(ok) / len(ok), "correct": sum(ok)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. 2021 (Codex, eq. 1) from n samples of which c are right:
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a right one."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def sampled_scores(items: list[Item], samples: list[list[str]], temperature: float) -> tuple[list[list[bool]], dict]:
    """Exact match of N sampled answers per item: pass@k (k = 1, 2, 4, …, N), maj@N (the most
    common final answer of the N, ties to the first seen, checked as one answer; self-consistency,
    Wang et al. 2023), and the share of items at the edge of competence, right in some samples but
    not all (where GRPO's group of N has a learning signal; RL sharpens a model toward maj@N and at
    most pass@N, Yue et al. 2025)."""
    n = len(samples[0]) if samples else 0
    ok = [[check_answer(it.family, a, it.answers) for a in answers] for it, answers in zip(items, samples)]
    ks = [k for k in (2 ** i for i in range(n.bit_length())) if k <= n]
    votes = []
    for it, answers, right in zip(items, samples, ok):
        key = [final_answer(a).strip().lower() for a in answers]
        top = Counter(key).most_common(1)[0][0]
        votes.append(right[key.index(top)])
    m = max(len(items), 1)
    return ok, {"samples": n, "temperature": temperature,
                "pass_at": {str(k): sum(pass_at_k(n, sum(r), k) for r in ok) / m for k in ks},
                f"maj_at_{n}": sum(votes) / m, "edge_share": sum(0 < sum(r) < n for r in ok) / m}


def score_references(hyps: list[str], refs: list[list[str]]) -> dict:
    """Corpus BLEU and chrF of ``hyps`` against one or more references per hypothesis, exactly
    as sacrebleu computes them (default settings: 13a tokenisation, exp smoothing, chrF β=2, char
    order 6). Items with fewer references are padded with None, which sacrebleu skips."""
    m = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(m)]
    bleu = sacrebleu.corpus_bleu(hyps, streams)
    chrf = sacrebleu.corpus_chrf(hyps, streams)
    return {"bleu": bleu.score, "chrf": chrf.score, "bleu_detail": str(bleu), "chrf_detail": str(chrf),
            "brevity_penalty": bleu.bp, "sacrebleu": sacrebleu.__version__}


def pick_choices(items: list[Item], logprobs: list[list[float]]) -> dict:
    """Accuracy by the highest summed log-likelihood, and by the highest per-byte log-likelihood
    of the choice text (acc_norm); ties go to the first choice."""
    correct = correct_norm = 0
    picks = []
    for it, lps in zip(items, logprobs):
        best = max(range(len(lps)), key=lambda j: (lps[j], -j))
        norm = [lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(lps, it.choices)]
        best_n = max(range(len(norm)), key=lambda j: (norm[j], -j))
        correct += best == it.label
        correct_norm += best_n == it.label
        picks.append((best, best_n))
    n = max(len(items), 1)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "correct": correct,
            "correct_norm": correct_norm, "picks": picks}


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def reward_summary(families: list[str], scores: list[float]) -> dict:
    """Mean and standard deviation of the reward scores, and the mean per family when there are several."""
    mean, std = mean_std(scores)
    res = {"mean_reward": mean, "reward_std": std}
    fams: dict[str, list[float]] = {}
    for f, sc in zip(families, scores):
        fams.setdefault(f, []).append(sc)
    if len(fams) > 1:
        res["reward_by_family"] = {f: sum(v) / len(v) for f, v in sorted(fams.items())}
    return res


def win_rate(scores_a: list[float], scores_b: list[float]) -> dict:
    """A vs B judged per prompt by the reward model: a win when A's reply scores higher, a tie
    (counted as half a win) when equal. ``ci95`` is the normal-approximation half-width."""
    if len(scores_a) != len(scores_b):
        raise ValueError("one score per prompt for each model")
    n = len(scores_a)
    wins = sum(a > b for a, b in zip(scores_a, scores_b))
    ties = sum(a == b for a, b in zip(scores_a, scores_b))
    rate = (wins + 0.5 * ties) / n if n else 0.0
    return {"win_rate": rate, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate_ci95": 1.96 * (rate * (1 - rate) / n) ** 0.5 if n else 0.0,
            "mean_margin": sum(a - b for a, b in zip(scores_a, scores_b)) / n if n else 0.0}
