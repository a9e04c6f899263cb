"""An adaptive prompt sampler for RL (`rlhf --curriculum`): prompts at the edge of competence.

A group of G replies to one prompt teaches GRPO something only when its rewards differ: a prompt
the policy always solves, or never solves, gives every reply the same advantage, zero. RL gains
come from prompts whose group success rate p is neither 0 nor 1 (Razin et al. 2023 on vanishing
gradients; Yue et al. 2025), so the sampler keeps running success rates and draws preferentially
the prompts whose rate lies in [lo, hi] (default [0.1, 0.9]).

Rates are kept at two grains. Each prompt has its own (an exponential moving average of the success
share of its groups, momentum `momentum` per visit), and each *level* has one, a level being the
prompt's family and difficulty: ``meta["difficulty"]`` when the record has one, else the number
of digits of its answer ("arithmetic:2" for 37 + 48 = 85), which tracks operand size and carries
for every numeric family. A prompt never drawn takes its level's rate, and a level never seen is
treated as inside the band (unknown is worth exploring). A prompt's weight is 1 inside the band and
`explore` outside it, so no prompt's probability ever reaches zero: a level the policy has
mastered is revisited now and then (forgetting shows), and one it cannot do yet is retried as it
improves. Rollouts draw `rollout_prompts` distinct prompts with probabilities proportional to the
weights.

The state (both tables and visit counts) is plain JSON, checkpointed with the RL stage. Under
torchrun each process keeps its own tables, learnt from the groups it drew (ranks draw different
prompts), and the checkpoint holds rank 0's: a resumed multi-process run starts every rank from it.
"""

from __future__ import annotations

import numpy as np


def level_of(meta: dict) -> str:
    """family:difficulty, the difficulty from the record or, failing that, the answer's digits."""
    fam = meta.get("family", "all")
    if meta.get("difficulty") is not None:
        return f"{fam}:{meta['difficulty']}"
    answers = meta.get("answers") or []
    if answers:
        digits = sum(c.isdigit() for c in str(answers[0]))
        return f"{fam}:{digits}" if digits else f"{fam}:text"
    return f"{fam}:-"


class Curriculum:
    def __init__(self, metas: list[dict], lo: float = 0.1, hi: float = 0.9, explore: float = 0.1,
                 momentum: float = 0.5):
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"the competence band [{lo}, {hi}] must lie inside [0, 1]")
        if not 0 < explore <= 1:
            raise ValueError(f"explore weight {explore} must be in (0, 1]")
        self.lo, self.hi, self.explore, self.momentum = lo, hi, explore, momentum
        self.levels = [level_of(m) for m in metas]
        self.level_names = sorted(set(self.levels))
        self.prompt_rate: dict[int, float] = {}  # prompt index -> running success rate
        self.level_rate: dict[str, float] = {}
        self.visits: dict[int, int] = {}

    # --- sampling ----------------------------------------------------------------------------
    def rate(self, i: int) -> float | None:
        """The prompt's estimated success rate: its own, else its level's, else None (unknown)."""
        if i in self.prompt_rate:
            return self.prompt_rate[i]
        return self.level_rate.get(self.levels[i])

    def weights(self) -> np.ndarray:
        w = np.empty(len(self.levels))
        for i in range(len(self.levels)):
            r = self.rate(i)
            w[i] = 1.0 if r is None or self.lo <= r <= self.hi else self.explore
        return w

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n prompt indices, distinct when there are enough prompts, drawn in proportion to weights()."""
        w = self.weights()
        return rng.choice(len(w), size=n, replace=len(w) < n, p=w / w.sum())

    # --- learning ----------------------------------------------------------------------------
    def update(self, picked, successes):
        """picked[j]: a prompt's index; successes[j]: its group's success share (0..1). Every group
        seen counts once; a prompt drawn twice in one rollout is updated twice."""
        m = self.momentum
        per_level: dict[str, list[float]] = {}
        for i, s in zip(picked, successes):
            i, s = int(i), float(s)
            old = self.prompt_rate.get(i)
            self.prompt_rate[i] = s if old is None else m * old + (1 - m) * s
            self.visits[i] = self.visits.get(i, 0) + 1
            per_level.setdefault(self.levels[i], []).append(s)
        for lvl, ss in per_level.items():
            s = float(np.mean(ss))
            old = self.level_rate.get(lvl)
            self.level_rate[lvl] = s if old is None else m * old + (1 - m) * s

    def stats(self, picked) -> dict[str, float]:
        """For the rollout's metrics row, one key per level of the prompt set (every row has the
        same keys, so ranks and steps line up): the share of this rollout's prompts (`picked`)
        drawn from the level, and the level's running success rate (-1 before it was first seen);
        `curriculum_in_band`: the share of all prompts whose estimated rate is inside the band."""
        out = {}
        picked_levels = [self.levels[int(i)] for i in picked]
        for lvl in self.level_names:
            out[f"curriculum_share/{lvl}"] = picked_levels.count(lvl) / max(len(picked_levels), 1)
            out[f"curriculum_success/{lvl}"] = self.level_rate.get(lvl, -1.0)
        w = self.weights()
        out["curriculum_in_band"] = float(np.mean(w == 1.0))
        return out

    # --- checkpointed ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"prompt_rate": {str(k): v for k, v in self.prompt_rate.items()},
                "level_rate": dict(self.level_rate), "visits": {str(k): v for k, v in self.visits.items()}}

    def load_state(self, js: dict):
        self.prompt_rate = {int(k): float(v) for k, v in js.get("prompt_rate", {}).items()}
        self.level_rate = {k: float(v) for k, v in js.get("level_rate", {}).items()}
        self.visits = {int(k): int(v) for k, v in js.get("visits", {}).items()}


__all__ = ["Curriculum", "level_of"]
