"""What the preference and RL stages share: prompt + completion batches and their log-probabilities.

A sequence is prompt ids followed by completion ids. The model reads x = ids[:-1] and predicts
y = ids[1:]; `mask` is 1 where y is a completion token, so log π(completion | prompt) is the sum of
the masked token log-probabilities.
"""

from __future__ import annotations

import torch

from chatsmith.errors import UserError


def completion_batch(seqs: list[tuple[list[int], int]], pad_id: int) -> dict:
    """(ids, prompt_len) pairs -> right-padded x, y (N, T) and the completion mask over y."""
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T))
    for i, (ids, p) in enumerate(seqs):
        if not 0 < p < len(ids):
            raise UserError(f"sequence {i}: the prompt ({p} tokens) must be followed by a completion")
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        mask[i, p - 1:n] = 1.0
    return {"x": x, "y": y, "mask": mask}


def token_logprobs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y] per position (N, T), in fp32 without materialising a second (N, T, V)."""
    logits = logits.float()
    return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position (N, T), nats."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Σ over completion tokens of log π(token | prefix), per row (N,)."""
    lp = token_logprobs(model(batch["x"]), batch["y"])
    return (lp * batch["mask"]).sum(-1)


def masked_mean(v: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (v * mask).sum() / mask.sum().clamp(min=1)
    return (v * mask).sum(dim) / mask.sum(dim).clamp(min=1)
