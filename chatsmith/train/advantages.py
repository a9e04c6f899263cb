"""Advantages, baselines, KL terms and the clipped losses of the RL stage, as pure tensor functions.

Shapes: (N, T) per token (N replies, T completion positions, `mask` 1 on real reply tokens), or
(N,) per reply. Notation: ratio ρ_t = π(a_t|s_t) / π_old(a_t|s_t); KL term
k_t = log π_old(a_t|s_t) - log π_ref(a_t|s_t).
"""

from __future__ import annotations

import torch

from chatsmith.batching import masked_mean


# --------------------------------------------------------------------------- PPO

def token_rewards(kl_tok: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token reward (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019):
        r_t = -β k_t,   plus the sequence's score s at its last reply token."""
    r = -kl_coef * kl_tok
    last = (mask * torch.arange(mask.shape[1])).argmax(1)  # each row's last completion position
    r[torch.arange(len(scores)), last] += scores
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over masked token positions (N, T):
        δ_t = r_t + γ V(s_{t+1}) - V(s_t),   A_t = Σ_l (γλ)^l δ_{t+l},   R_t = A_t + V(s_t)
    (V past the last reply token is 0). Returns (advantages, returns); positions outside the mask are 0."""
    N, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(N)
    for t in reversed(range(T)):
        nxt_mask = mask[:, t + 1] if t + 1 < T else torch.zeros(N)
        nxt_v = values[:, t + 1] * nxt_mask if t + 1 < T else torch.zeros(N)
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        last = delta + gamma * lam * last * nxt_mask
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def whiten(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(v - mean) / std over the masked positions (mean and variance over the mask only)."""
    mean = masked_mean(v, mask)
    var = masked_mean((v - mean) ** 2, mask)
    return (v - mean) * torch.rsqrt(var + 1e-8) * mask


def average(v: torch.Tensor, mask: torch.Tensor, how: str = "token") -> torch.Tensor:
    """A per-token loss (N, T) reduced to one number.

    ``token``: Σ_i Σ_t m v / Σ_i Σ_t m, every reply token of the batch weighs the same (DAPO, Yu et
    al. 2025 §3.3; nanochat), so a long reply counts in proportion to its length. ``sequence``:
    (1/N) Σ_i (1/|o_i|) Σ_t m v, each reply weighs the same whatever its length (GRPO as written,
    DeepSeekMath eq. 3), which gives each token of a short reply more weight."""
    if how == "token":
        return masked_mean(v, mask)
    if how == "sequence":
        return masked_mean(v, mask, dim=1).mean()
    raise ValueError(f"unknown loss average {how!r}")


def ppo_losses(logp, old_logp, adv, mask, clip: float, how: str = "token"):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, and the clipped share:
        L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),  the mean as `average` says."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return average(pg, mask, how), masked_mean(((ratio - 1).abs() > clip).float(), mask)


def value_loss(v, old_v, returns, mask, clip: float):
    """The clipped value loss: ½ mean_t max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±ε)."""
    v_clip = old_v + (v - old_v).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((v - returns) ** 2, (v_clip - returns) ** 2), mask)


# --------------------------------------------------------------------------- GRPO

def group_advantages(scores: torch.Tensor, group: int, how: str = "zscore") -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2): each sample's score standardised within its
    prompt's group of G consecutive samples, A_i = (s_i - mean(s_group)) / std(s_group) (``zscore``);
    or only centred, A_i = s_i - mean(s_group) (``mean``: nanochat; Liu et al. 2025, "Dr. GRPO",
    argue the division by std over-weights groups that are almost all right or all wrong)."""
    s = scores.view(-1, group)
    centred = s - s.mean(1, keepdim=True)
    if how == "mean":
        return centred.view(-1)
    if how != "zscore":
        raise ValueError(f"unknown advantage {how!r}")
    return (centred / (s.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def k3_kl(logp, ref_logp):
    """Unbiased, always-positive estimator of KL(π‖π_ref) from samples of π (Schulman 2020; the
    KL term of DeepSeekMath eq. 4): exp(ref - logπ) - (ref - logπ) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# --------------------------------------------------------------------------- REINFORCE

def moving_baseline(baseline: float | None, returns: torch.Tensor, momentum: float) -> float:
    """REINFORCE's baseline (Williams 1992): b ← m b + (1 - m) mean(R) over the rollout; the first
    rollout starts it at its mean return."""
    b_now = float(returns.mean())
    return b_now if baseline is None else momentum * baseline + (1 - momentum) * b_now


# --------------------------------------------------------------------------- KL coefficient

def adaptive_kl_coef(coef: float, kl: float, target: float, n: int, horizon: int) -> float:
    """The adaptive KL controller (Ziegler et al. 2019, §2.2): β ← β (1 + e n / H), with the
    proportional error e = clip(KL / KL_target - 1, ±0.2) and n samples in this rollout."""
    err = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + err * n / horizon)


__all__ = ["token_rewards", "gae", "whiten", "average", "ppo_losses", "value_loss", "group_advantages", "k3_kl",
           "moving_baseline", "adaptive_kl_coef"]
