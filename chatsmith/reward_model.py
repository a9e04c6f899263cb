"""Reward-model scoring: a checkpoint with a scalar head as a scorer of chat conversations.

The score of a conversation is the scalar head at its last token (the assistant's end token).
Training the head is the reward stage (:mod:`chatsmith.train.reward`); scoring lives down here so
that evaluation (reward tasks, win rates) and RL can judge replies without the training code.
"""

from __future__ import annotations

import os

import torch

from chatsmith.batching import pad
from chatsmith.checkpoint import load_model, read_config
from chatsmith.errors import UserError
from chatsmith.tokenizer import Tokenizer


def last_scores(model, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The scalar head at each row's last real token (right padding cannot reach it: causal)."""
    s = model(x, head="score")
    return s.float().gather(1, last[:, None].to(s.device)).squeeze(1)


class RewardModel:
    """A trained reward model as a scorer: .score(conversations) -> one float per conversation, each
    an OpenAI-style message list ending with the assistant reply to score."""

    def __init__(self, model, tok: Tokenizer, batch_size: int = 16):
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, conversations: list[list[dict]]) -> list[float]:
        ctx = self.model.cfg.max_seq_len
        out: list[float] = []
        for i in range(0, len(conversations), self.batch_size):
            seqs = []
            for conv in conversations[i:i + self.batch_size]:
                if not conv or conv[-1].get("role") != "assistant":
                    raise UserError("a conversation to score must end with an assistant reply")
                ids, _ = self.tok.render_chat(conv)
                seqs.append(ids[-ctx:])  # over-long: keep the end, where the reply is
            x, last = pad(seqs, self.tok.pad_id)
            out += last_scores(self.model, x.to(self.device), last).tolist()
        return out


def load_reward_model(path: str | os.PathLike, device="cpu") -> RewardModel:
    if not read_config(path).score_head:
        raise UserError(f"{path} has no reward head: train one with `chatsmith reward --init {path} ...`")
    return RewardModel(load_model(path, device=device), Tokenizer.load(path))


__all__ = ["last_scores", "RewardModel", "load_reward_model"]
