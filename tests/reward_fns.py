"""Reward functions the RL tests load by name (`--reward reward_fns:NAME`), as users load theirs."""

import math


def says_the(prompt, reply, meta):
    """Share of the reply's words that are "the": a tiny problem every algorithm can solve by
    learning to prefer one token."""
    words = reply.lower().split()
    return sum(w == "the" for w in words) / max(len(words), 1)


def raises(prompt, reply, meta):
    raise ValueError("this reward function is broken")


def not_a_number(prompt, reply, meta):
    return "high"


def nan(prompt, reply, meta):
    return math.nan


def only_the_king(prompt, reply, meta):
    """A sparse reward: only the prompt about the king can earn anything (odd word counts do), so
    most GRPO groups carry no signal."""
    if "king" not in prompt[-1]["content"]:
        return 0.0
    return float(len(reply.split()) % 2)
