"""Batches of token sequences and their log-probabilities: one collator, one sequence log-prob.

Every stage that trains or scores on variable-length sequences (SFT, the reward model, DPO, RL,
evaluation) pads them here, to the right. For next-token work a sequence `ids` becomes

    x = ids[:-1]    the model's input
    y = ids[1:]     the targets
    mask            1 on the targets that count (assistant tokens, a completion), 0 elsewhere

so log π(completion | prompt) = Σ_t mask_t · log softmax(model(x))_t[y_t]. Padding sits after every
real token, so in a causal model it can never influence them; padded targets carry mask 0.

Data order: `epoch_batch` draws examples from an endless, epoch-wise shuffled stream that is a pure
function of (seed, position), so a batch is a pure function of its global index
(`runtime.micro_batch_index`) and exact resume needs no data-loader state; `length_grouped_batch`
draws from the same stream and groups similar lengths, so batches of variable-length examples
(SFT, the reward model, DPO, translation) carry little padding.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from chatsmith.errors import UserError


# --- data order ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int):
    return np.random.default_rng([seed, epoch]).permutation(n)


def shuffled_index(seed: int, g: int, n: int) -> int:
    """The g-th example of an endless epoch-wise shuffled stream over n examples: a pure function
    of (seed, g), so batches are reproducible and exact resume needs no data-loader state."""
    return int(_epoch_permutation(seed, g // n, n)[g % n])


def epoch_batch(seed: int, index: int, size: int, n: int) -> list[int]:
    """Example indices of micro-batch number `index` (a global index, see runtime.micro_batch_index)."""
    first = index * size
    return [shuffled_index(seed, g, n) for g in range(first, first + size)]


LENGTH_BUCKET = 16  # micro-batches drawn together and cut by length (length_grouped_batch)


def length_grouped_batch(seed: int, index: int, size: int, n: int, length, bucket: int = LENGTH_BUCKET) -> list[int]:
    """Example indices of micro-batch `index`, grouped by length: `bucket` consecutive micro-batches
    of the shuffled stream are drawn together, sorted by `length(j)` and cut into `bucket` batches of
    similar lengths, served in a seeded order (Hugging Face's group_by_length does the same with its
    "megabatches"). Each example is still seen once per epoch, but a batch of short replies is no
    longer padded to the one long poem it happened to draw: the built-in dialogues and pairs are
    ~70 tokens on average with a tail to 370, and random batches of 8 are ~50% padding. A pure
    function of the index, as the trainer's exact resume needs. The pool never spans more than one
    epoch's worth of examples (a pool of several epochs of a small set would sort an example's copies
    into one batch): with fewer than two batches of examples there is no grouping."""
    bucket = max(1, min(bucket, n // size))
    group, k = divmod(index, bucket)
    pool = epoch_batch(seed, group, size * bucket, n)
    pool.sort(key=lambda j: (length(j), j))
    order = np.random.default_rng([seed, group, 11]).permutation(bucket)
    return pool[order[k] * size:(order[k] + 1) * size]


# --- padding ------------------------------------------------------------------------------------

def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and each row's last real position (N,)."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x, torch.tensor([len(s) - 1 for s in seqs])


def collate(seqs: list[list[int]], pad_id: int, masks: list[list[int]] | None = None,
            prompt_lens: list[int] | None = None) -> dict:
    """Sequences -> a next-token batch {x, y, mask} of shape (N, T), T = longest - 1.

    mask over y: `masks[i][1:]` when per-token masks are given (SFT: 1 on assistant tokens);
    1 from the first completion token on when `prompt_lens` are given (DPO, RL, scoring a
    continuation: y[p-1] is the first token after a prompt of p tokens); else 1 on every real token.
    """
    T = max(len(ids) for ids in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T))
    for i, ids in enumerate(seqs):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        if masks is not None:
            mask[i, :n] = torch.tensor(masks[i][1:], dtype=mask.dtype)
        elif prompt_lens is not None:
            p = prompt_lens[i]
            if not 0 < p < len(ids):
                raise UserError(f"sequence {i}: the prompt ({p} tokens) must be followed by a completion")
            mask[i, p - 1:n] = 1.0
        else:
            mask[i, :n] = 1.0
    return {"x": x, "y": y, "mask": mask}


def completion_batch(seqs: list[tuple], pad_id: int) -> dict:
    """(ids, prompt_len) pairs -> collate(...) with the mask on the completion tokens. A triple
    (ids, prompt_len, skip) leaves the completion positions in `skip` out of the mask too (the
    tokens a tool fed in during an RL rollout: the policy did not choose them)."""
    if all(len(s) == 2 for s in seqs):
        return collate([s[0] for s in seqs], pad_id, prompt_lens=[s[1] for s in seqs])
    masks = []
    for s in seqs:
        ids, p = s[0], s[1]
        if not 0 < p < len(ids):
            raise UserError(f"a sequence's prompt ({p} tokens) must be followed by a completion")
        m = [0] * p + [1] * (len(ids) - p)
        for j in (s[2] if len(s) > 2 else ()):
            m[p + j] = 0
        masks.append(m)
    return collate([s[0] for s in seqs], pad_id, masks=masks)


# --- log-probabilities ---------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y] per position (N, T), in fp32 without materialising a second (N, T, V)."""
    logits = logits.float()
    return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position (N, T), nats."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(v: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (v * mask).sum() / mask.sum().clamp(min=1)
    return (v * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_logprobs(model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, head="lm"):
    """token_logprobs(model(x), y) * mask, (N, T) fp32 with 0 off the mask, the LM head run at the
    masked positions only (a decoder's `logits_at`): the prompt's positions cost no logits. Also
    returns the (n, V) logits of those positions (an entropy to log), and with head=("lm", "score")
    the score head's values as (N, T), 0 off the mask (PPO's critic)."""
    sel = mask.bool()
    if getattr(getattr(model, "module", model), "family", None) == "decoder":  # (DDP wraps it in .module)
        out = model(x, logits_at=sel, head=head)
    else:  # another model's forward: the full logits, then the masked positions
        out = model(x) if head == "lm" else model(x, head=head)
        out = tuple(o[sel] for o in out) if isinstance(out, tuple) else out[sel]
    logits, values = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    lp = torch.zeros(x.shape, dtype=torch.float32, device=x.device).masked_scatter(sel, token_logprobs(logits, y[sel]))
    if values is None:
        return lp, logits
    return lp, logits, torch.zeros(x.shape, dtype=values.dtype, device=x.device).masked_scatter(sel, values)


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Σ over masked target tokens of log π(token | prefix), per row (N,)."""
    m = batch["mask"]
    return (masked_logprobs(model, batch["x"], batch["y"], m)[0] * m).sum(-1)


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0,
                          batch_size: int = 16) -> tuple[list[float], int]:
    """log p(continuation | context) for each (context ids, continuation ids) pair, and how many
    contexts were cut from the left to fit the model's context. Sorted by length into batches so
    little padding is computed; returned in the order given."""
    device = next(model.parameters()).device
    ctx = model.cfg.max_seq_len
    seqs, truncated = [], 0
    for c, x in pairs:
        if not x:
            raise ValueError("empty continuation")
        if len(x) > ctx:
            raise UserError(f"a choice is {len(x)} tokens, longer than the model's context ({ctx})")
        ids = c + x
        if len(ids) > ctx + 1:
            ids, truncated = ids[-(ctx + 1):], truncated + 1
        seqs.append((ids, len(ids) - len(x)))
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    was_training = model.training
    model.eval()
    for b in range(0, len(order), batch_size):
        group = order[b:b + batch_size]
        batch = {k: v.to(device) for k, v in completion_batch([seqs[i] for i in group], pad_id).items()}
        for i, lp in zip(group, sequence_logprobs(model, batch).tolist()):
            out[i] = lp
    model.train(was_training)
    return out, truncated


__all__ = ["shuffled_index", "epoch_batch", "length_grouped_batch", "pad", "collate", "completion_batch", "token_logprobs", "entropy",
           "masked_mean", "masked_logprobs", "sequence_logprobs", "continuation_logprobs"]
