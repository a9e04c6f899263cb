"""Reinforcement learning from feedback: PPO, GRPO and REINFORCE on one machinery.

Every algorithm alternates two phases inside the one Trainer:

1. rollout: sample completions for a batch of prompts with the engine (KV cache, batched), score
   them with the reward sources, and compute with no gradient the sampling policy's token
   log-probabilities, the frozen reference model's, and (PPO) the value head's estimates;
2. optimisation: `ppo_epochs` passes over the rollout in `minibatches` minibatches, one
   optimizer step each.

The three algorithms differ only in the advantage and the loss (notation: ratio ρ_t = π(a_t|s_t) /
π_old(a_t|s_t), KL term k_t = log π_old(a_t|s_t) - log π_ref(a_t|s_t); the equations are in
chatsmith/train/advantages.py):

- ``ppo`` (Schulman et al. 2017; InstructGPT, Ouyang et al. 2022): per-token reward
  r_t = -β k_t, plus the sequence's score at its last token; advantages by GAE,
  δ_t = r_t + γ V(s_{t+1}) - V(s_t), A_t = Σ_l (γλ)^l δ_{t+l}, whitened; loss
  max(-A ρ, -A clip(ρ, 1±ε)) + c_v · ½ max((V - R)², (V_clip - R)²), R = A + V_old.
  β is fixed, or adapted towards a KL target (Ziegler et al. 2019).
- ``grpo`` (Shao et al. 2024, DeepSeekMath eq. 3): G samples per prompt; every token of sample i
  gets A_i = (s_i - mean(s_group)) / std(s_group); no value function; the KL to the reference
  is a loss term with the unbiased k3 estimator exp(ref - logπ) - (ref - logπ) - 1.
- ``reinforce`` (Williams 1992, with a baseline): sequence return R = s - β Σ_t k_t, baseline b a
  moving average of R; loss -(R - b) Σ_t log π(a_t|s_t). One on-policy update per rollout.
- ``rft`` (expert iteration, Anthony et al. 2017; rejection-sampling fine-tuning, Yuan et al. 2023;
  STaR, Zelikman et al. 2022): G samples per prompt, keep those whose reward reaches
  --success-threshold (default: the sources' maximum, "verified correct" for ``exact``), and take
  supervised steps on the kept replies: loss -mean_t log π(a_t|s_t) over their tokens (the prompt
  masked, as in SFT), plus β times the k3 KL term when β > 0. No advantage, no ratio: only the
  accepted samples teach, each as a demonstration.

``grpo-simple`` is a preset of ``grpo``, not a fifth algorithm: nanochat's simplified GRPO (no KL,
one on-policy pass so the ratio is 1 and never clipped, token-level averaging, advantage = reward -
group mean, rollouts at temperature 1); see PRESETS.

``--curriculum`` draws the prompts adaptively, preferring those whose group success rate is between
--curriculum-low and --curriculum-high (chatsmith/train/curriculum.py); any algorithm can use it.

Reward sources (summed when several are given) are in chatsmith/train/rewards.py; prompts,
sampling and DAPO's filter in chatsmith/train/rollouts.py; held-out evaluation in
chatsmith/train/rl_eval.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatsmith import atomic, runtime
from chatsmith.batching import completion_batch, entropy, masked_logprobs, masked_mean
from chatsmith.checkpoint import load_model, save_checkpoint
from chatsmith.config import TrainConfig
from chatsmith.engine import QUANTIZE, check_quantize
from chatsmith.errors import UserError
from chatsmith.eval.intervals import paired_by_family
from chatsmith.flags import Verb, add_dataclass_flags, add_train_flags, dataclass_from_args
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools.inline import builtin_tools
from chatsmith.train import optim, rl_control, rollouts
from chatsmith.train.advantages import (adaptive_kl_coef, average, gae, group_advantages, k3_kl, moving_baseline,
                                        ppo_losses, token_rewards, value_loss, whiten)
from chatsmith.train.curriculum import Curriculum
from chatsmith.train.rewards import Discriminator, make_rewards
from chatsmith.train.rl_eval import evaluate_policy, flatten, print_rl_table
from chatsmith.train.rollouts import PromptItem, Rollout, heldout_items, load_prompts
from chatsmith.train.trainer import Trainer

ALGOS = ("ppo", "grpo", "reinforce", "rft")
# Named recipes built from the options of an algorithm above: `--algo NAME` runs `algo` with these
# fields set (they override the flags of the same name; to vary one, use the base algorithm and set
# the options by hand).
PRESETS = {
    # nanochat's RL (scripts/chat_rl.py): GRPO without the KL term, one on-policy pass per rollout
    # (ratio = 1, so PPO's clipping never acts), token-level averaging, advantage = r - mean(group)
    "grpo-simple": dict(algo="grpo", kl_coef=0.0, kl_target=0.0, ppo_epochs=1, minibatches=1, advantage="mean",
                        loss_average="token", temperature=1.0),
}
ALGO_CHOICES = ALGOS + tuple(PRESETS)
ADVANTAGES = ("zscore", "mean")
LOSS_AVERAGES = ("token", "sequence")


@dataclass
class RLConfig:
    """Knobs of the RL stage; the CLI exposes each as --field-name."""

    algo: str = "ppo"  # ppo | grpo | reinforce | rft, or a preset (grpo-simple)
    rollout_prompts: int = 16  # prompts per rollout
    group_size: int = 4  # samples per prompt (GRPO's G; needs >= 2 for grpo)
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature of the rollouts (1 = the policy itself)
    ppo_epochs: int = 2  # passes over each rollout (reinforce: always 1)
    minibatches: int = 2  # optimizer steps per pass (reinforce: always 1)
    clip_range: float = 0.2  # ε of the clipped ratio
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # β
    kl_target: float = 0.0  # > 0: adapt β towards this KL per sequence (nats)
    kl_horizon: int = 10000
    baseline_momentum: float = 0.9  # reinforce: moving-average baseline
    families: str = ""  # comma list: only prompts of these families (default: all)
    eval_prompts: int = 50  # held-out prompts per family for the evaluation
    disc_lr: float = 1e-4  # discriminator learning rate
    disc_steps: int = 1  # discriminator updates per rollout
    # grpo: draw up to this many more rollouts to fill the batch with groups whose rewards differ
    # (DAPO's dynamic sampling); 0 trains on every group, including those with no signal
    max_resample: int = 4
    tools: str = ""  # comma list of built-in tools run inside the rollouts (calculator)
    quantize: str = "none"  # int8 / bf16: the rollouts' decode weights (the evaluations stay fp32)
    advantage: str = "zscore"  # grpo: zscore (r - mean) / std within the group, or mean (r - mean)
    loss_average: str = "token"  # token: every reply token weighs the same; sequence: every reply
    success_threshold: float | None = None  # a reply is a success (rft keeps it) at this reward or above
    curriculum: bool = False  # draw prompts at the edge of competence (chatsmith/train/curriculum.py)
    curriculum_low: float = 0.1
    curriculum_high: float = 0.9
    curriculum_explore: float = 0.1  # weight of a prompt outside the band (1 inside)


RL_HELP = {
    "quantize": "decode the training rollouts with int8 or bf16 weights (a fresh snapshot each rollout; the "
                "loss, the reference and the evaluations keep --dtype, so samples come from a slightly different "
                "policy); bf16 only on a CPU with native bf16, where 32 rollouts decode ~1.4x faster",
    "tools": "built-in tools offered in the prompts and run inside the rollouts, comma separated (calculator)",
    "algo": "the RL algorithm (see the table in the README)",
    "rollout_prompts": "prompts per rollout",
    "group_size": "sampled replies per prompt (GRPO's G; grpo needs at least 2)",
    "max_new_tokens": "longest sampled reply (tokens)",
    "temperature": "sampling temperature of the rollouts (1 = the policy itself)",
    "ppo_epochs": "passes over each rollout (reinforce: always 1)",
    "minibatches": "optimizer steps per pass (reinforce: always 1)",
    "clip_range": "epsilon of the clipped probability ratio",
    "value_clip": "ppo: clip range of the value-function update",
    "vf_coef": "ppo: weight of the value loss",
    "gamma": "ppo: discount of the per-token rewards",
    "lam": "ppo: lambda of generalised advantage estimation",
    "kl_coef": "beta: strength of the KL penalty to the reference",
    "kl_target": "adapt beta towards this KL per reply in nats (0 = fixed beta)",
    "kl_horizon": "adaptive KL: steps over which beta moves towards the target",
    "baseline_momentum": "reinforce: momentum of the moving-average reward baseline",
    "families": "only prompts of these families, comma-separated (default: all)",
    "eval_prompts": "held-out prompts per family in the before/after evaluation",
    "disc_lr": "discriminator reward: its learning rate",
    "disc_steps": "discriminator reward: its updates per rollout",
    "max_resample": "grpo: extra draws to fill the batch with groups whose rewards differ (0 = keep all); "
                    "rft: extra draws while fewer replies than --rollout-prompts were accepted",
    "advantage": "grpo: zscore = (r - group mean) / group std (DeepSeekMath), mean = r - group mean (nanochat)",
    "loss_average": "token = mean over all reply tokens of the batch (DAPO, nanochat); sequence = mean over "
                    "replies of each reply's token mean (GRPO as published)",
    "success_threshold": "reward at or above which a reply counts as verified: rft trains on it, --curriculum "
                         "counts it a success (default: the sum of the sources' maxima, 1 for exact; sources "
                         "with no known maximum need it set)",
    "curriculum": "draw rollout prompts preferring those whose group success rate lies in "
                  "[--curriculum-low, --curriculum-high], per prompt and per family x level",
    "curriculum_low": "curriculum: lower edge of the competence band",
    "curriculum_high": "curriculum: upper edge of the competence band",
    "curriculum_explore": "curriculum: sampling weight of a prompt outside the band (inside: 1)",
}


class RLStage:
    name = "rlhf"
    show = ("reward", "kl", "response_len")  # on the progress line

    def __init__(self, policy, ref, tok, items, rewards, rl: RLConfig, cfg: TrainConfig, world: int = 1,
                 heldout=(), threshold: float | None = None, amp: torch.dtype | None = None):
        self.policy, self.ref, self.tok, self.items, self.rewards = policy, ref, tok, items, rewards
        self.amp = amp  # the trainer's autocast dtype, for the rollout's scoring forwards too
        self.threshold = threshold  # reward of a verified reply (rft, curriculum)
        self.curriculum = (Curriculum([it.meta for it in items], rl.curriculum_low, rl.curriculum_high,
                                      rl.curriculum_explore) if rl.curriculum else None)
        self._drawn: list[tuple[np.ndarray, torch.Tensor]] = []  # (prompt indices, scores) of this rollout's draws
        self._before: dict | None = None  # the adapted state as rollout _k found it
        self._next_u = 0  # the next micro-batch to serve
        self.heldout = list(heldout)
        self.last_result = None
        self.rl, self.cfg, self.world = rl, cfg, world
        self.tools = rl_tools(rl, tok) or None  # built-in tools run inside the rollouts
        self.end_id = tok.token_to_id("<|assistant_end|>")
        if self.end_id is None:
            self.end_id = tok.eos_id
        self.kl_coef = rl.kl_coef
        self.baseline = None
        self.per_rollout = 1 if rl.algo == "reinforce" else rl.ppo_epochs * rl.minibatches
        # one optimizer pass over each rollout (GRPO or rft with --ppo-epochs 1 --minibatches 1): the
        # policy that sampled is the one being updated, so the ratio π/π_old is 1 at every token and
        # the rollout's own forward of the policy is redundant; the loss's forward, detached, stands in
        # (one of a step's three scoring forwards, ~2.5 s of a 22-29 s GRPO step on SmolLM2, Zen 4).
        # Not with an adaptive KL coefficient, which is set from the rollout's KL before the step.
        self.single_pass = rl.algo in ("grpo", "rft") and self.per_rollout == 1 and rl.kl_target <= 0
        self._k, self._ro = -1, None

    def _adapted(self) -> dict:
        js = {"kl_coef": self.kl_coef, "baseline": self.baseline}
        if self.curriculum is not None:
            js["curriculum"] = self.curriculum.state()
        return js

    # checkpointed with the policy (see Trainer): what the stage adapts as it runs --------------
    def state(self) -> tuple[dict, dict]:
        """(JSON, tensors): the adaptive KL coefficient, REINFORCE's baseline, and what reward
        sources learn (a discriminator's weights, optimizer moments and accuracy history); a
        resumed run goes on with them rather than with their starting values. A checkpoint taken in
        the middle of a rollout's optimizer steps stores them as that rollout found them: the
        resumed run redoes the rollout, and with it their update."""
        mid_rollout = self._next_u // self.per_rollout == self._k and self._before is not None
        js, tensors = dict(self._before if mid_rollout else self._adapted()), {}
        for fn in self.rewards:
            j, t = fn.state()
            js.update(j)
            tensors.update(t)
        return js, tensors

    def load_state(self, js: dict, tensors: dict):
        self.kl_coef = js.get("kl_coef", self.kl_coef)
        self.baseline = js.get("baseline", self.baseline)
        if self.curriculum is not None and "curriculum" in js:
            self.curriculum.load_state(js["curriculum"])
        for fn in self.rewards:
            fn.load_state(js, tensors)

    # rollout phase ----------------------------------------------------------------------
    def sample(self, model, items: list[PromptItem], seed: int, temperature: float, n: int = 1,
               quantize: str | None = None) -> Rollout:
        """Completions for each item (n each, grouped), unscored."""
        return rollouts.sample(model, self.tok, items, seed, temperature, self.rl.max_new_tokens, self.end_id, n,
                               tools=self.tools, quantize=quantize)

    def score(self, items, texts, finished) -> tuple[torch.Tensor, dict]:
        total = torch.zeros(len(texts))
        parts = {}
        for fn in self.rewards:
            v = torch.tensor(fn(items, texts, finished), dtype=torch.float32)
            if v.shape != total.shape or not torch.isfinite(v).all():
                raise UserError(f"reward source {fn.name} gave {v.tolist()[:4]}…: expected one finite number "
                                f"per reply")
            parts[f"reward_{fn.name}"] = float(v.mean())
            total += v
        return total, parts

    def sample_scored(self, rng) -> Rollout:
        """One draw: rollout_prompts random prompts, group_size samples each, scored. The logged
        reward (`parts`) is the mean over everything drawn, before any filtering."""
        rl = self.rl
        if self.curriculum is not None:
            pick = self.curriculum.pick(rng, rl.rollout_prompts)
        else:
            pick = rng.choice(len(self.items), size=rl.rollout_prompts, replace=len(self.items) < rl.rollout_prompts)
        ro = self.sample(self.policy, [self.items[i] for i in pick], int(rng.integers(2**31)), rl.temperature,
                         rl.group_size, quantize=rl.quantize)
        ro.scores, ro.parts = self.score(ro.items, ro.texts, ro.finished)
        ro.parts["reward"] = float(ro.scores.mean())
        self._drawn.append((pick, ro.scores))
        return ro

    def verified(self, scores: torch.Tensor) -> torch.Tensor:
        """1.0 for a reply whose reward reaches the success threshold, else 0.0."""
        return (scores >= self.threshold - 1e-6).float()

    def accepted(self, rng, first: Rollout) -> Rollout:
        """rft: the verified replies, with more draws (up to --max-resample) while fewer than
        --rollout-prompts are; none in any draw: the last draw, to be trained on with weight 0."""
        return rollouts.keep_rows(first, lambda: self.sample_scored(rng),
                                  lambda ro: torch.nonzero(self.verified(ro.scores)).flatten().tolist(),
                                  self.rl.rollout_prompts, self.rl.max_resample, cut=False)

    def _learn_curriculum(self) -> dict:
        """Every group drawn for this rollout updates the success tables; the stats describe the draws."""
        G = self.rl.group_size
        picks = np.concatenate([p for p, _ in self._drawn])
        succ = torch.cat([self.verified(s).view(-1, G).mean(1) for _, s in self._drawn]).tolist()
        self.curriculum.update(picks, succ)
        return self.curriculum.stats(picks)  # share drawn per level, running success with these groups in

    def informative_groups(self, rng, first: Rollout) -> Rollout:
        """GRPO with --max-resample: only groups whose rewards differ, topped up with more draws
        (see rollouts.keep_informative)."""
        G = self.rl.group_size
        return rollouts.keep_informative(first, lambda: self.sample_scored(rng), G, self.rl.rollout_prompts * G,
                                         self.rl.max_resample)

    @torch.no_grad()
    def make_rollout(self, k: int, rank: int) -> dict:
        """Rollout number k: sampled, scored, and turned into the tensors the loss needs."""
        rl = self.rl
        rng = np.random.default_rng([self.cfg.seed, k, rank])
        self._before, self._drawn = self._adapted(), []
        ro = self.sample_scored(rng)
        if rl.algo == "grpo" and rl.max_resample > 0:
            ro = self.informative_groups(rng, ro)
        elif rl.algo == "rft":
            ro = self.accepted(rng, ro)
        for fn in self.rewards:  # a discriminator learns from what it scored, at the step this rollout starts
            fn.learn(k * self.per_rollout // self.cfg.grad_accum)
        out, values = self._logprobs(ro.seqs)
        mask, scores = out["mask"], ro.scores
        # single pass: the policy's log-probs come with the loss's forward, and so does the logged KL
        kl_tok = None if self.single_pass else (out["old_logp"] - out["ref_logp"]) * mask
        kl_seq = None if kl_tok is None else kl_tok.sum(1)
        if rl.algo == "ppo":
            adv, ret = gae(token_rewards(kl_tok, mask, scores, self.kl_coef), values * mask, mask, rl.gamma, rl.lam)
            out.update(adv=whiten(adv, mask), returns=ret, old_values=values * mask)
        elif rl.algo == "grpo":
            out["adv"] = group_advantages(scores, rl.group_size, rl.advantage)[:, None] * mask
        elif rl.algo == "rft":
            out["weight"] = self.verified(scores)  # (N,): 0 only when no draw had a verified reply
        else:
            ret = scores - self.kl_coef * kl_seq
            self.baseline = moving_baseline(self.baseline, ret, rl.baseline_momentum)
            out["seq_adv"] = ret - self.baseline
        if rl.kl_target > 0:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, float(kl_seq.mean()), rl.kl_target, len(ro.seqs),
                                            rl.kl_horizon)
        parts = dict(ro.parts)
        stats = {"reward": parts.pop("reward"), **({} if kl_seq is None else {"kl": float(kl_seq.mean())}),
                 "kl_coef": self.kl_coef,
                 "response_len": float(mask.sum(1).mean()), "ended_share": float(np.mean(ro.finished)), **parts}
        if rl.algo == "grpo" and rl.max_resample > 0:
            stats["kept_share"] = ro.kept / ro.sampled
        if rl.algo == "rft":
            n_ok = sum(float(self.verified(s).sum()) for _, s in self._drawn)
            stats["accept_rate"] = n_ok / ro.sampled  # verified share of every reply drawn (all are trained on)
        if self.curriculum is not None:
            stats.update(self._learn_curriculum())
        for fn in self.rewards:
            stats.update(fn.stats())
        out["stats"] = stats
        return out

    def _logprobs(self, seqs) -> tuple[dict, torch.Tensor | None]:
        """The sampling policy's and the reference's token log-probabilities of the replies (and,
        PPO, the value head's estimates), on the CPU."""
        dev = next(self.policy.parameters()).device
        b = completion_batch(seqs, self.tok.pad_id)
        x, y, mask = b["x"].to(dev), b["y"].to(dev), b["mask"].to(dev)
        was, values = self.policy.training, None
        self.policy.eval()
        # under the training step's autocast: each of these forwards costs as much as the step's own
        # (SmolLM2, 32 replies, 2-core Zen 4: 2.5 s under bf16 autocast)
        with optim.autocast(self.amp, dev):
            if self.rl.algo == "ppo":
                old_logp, _, values = masked_logprobs(self.policy, x, y, mask, head=("lm", "score"))
                values = values.float().cpu()
            elif not self.single_pass:
                old_logp = masked_logprobs(self.policy, x, y, mask)[0]
            ref_logp = masked_logprobs(self.ref, x, y, mask)[0]
        self.policy.train(was)
        out = {"x": b["x"], "y": b["y"], "mask": mask.cpu(), "ref_logp": ref_logp.cpu()}
        if not self.single_pass:
            out["old_logp"] = old_logp.cpu()
        return out, values

    # optimisation phase -----------------------------------------------------------------
    def batch(self, step: int, micro: int, rank: int):
        u = step * self.cfg.grad_accum + micro  # micro-batch counter
        self._next_u = u + 1
        k, j = divmod(u, self.per_rollout)
        if k != self._k:
            self._ro, self._k = self.make_rollout(k, rank), k
        ro = self._ro
        n = ro["x"].shape[0]
        epoch, mb = divmod(j, 1 if self.rl.algo == "reinforce" else self.rl.minibatches)
        perm = np.random.default_rng([self.cfg.seed, k, epoch, rank]).permutation(n)
        # a filtered GRPO rollout can hold fewer rows than minibatches: then some repeat
        n_mb = min(n, 1 if self.rl.algo == "reinforce" else self.rl.minibatches)
        parts = np.array_split(perm, n_mb)[mb % n_mb]
        idx = torch.as_tensor(parts)
        out = {key: v[idx] for key, v in ro.items() if torch.is_tensor(v)}
        # trim the padding columns this minibatch does not need
        width = int(out["mask"].nonzero()[:, 1].max()) + 1 if out["mask"].any() else 1
        out = {key: v[:, :width] if v.dim() == 2 else v for key, v in out.items()}
        out["stats"] = ro["stats"]
        return out

    def loss(self, model, batch):
        rl, mask = self.rl, batch["mask"]
        if rl.algo == "ppo":
            logp, logits, v = masked_logprobs(model, batch["x"], batch["y"], mask, head=("lm", "score"))
        else:
            logp, logits = masked_logprobs(model, batch["x"], batch["y"], mask)
        stats = dict(batch["stats"])
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()  # single pass: π_old = π
        with torch.no_grad():  # logits: the reply tokens' only
            stats["entropy"] = float(entropy(logits).mean()) if logits.numel() else 0.0
            stats["approx_kl"] = float(masked_mean(0.5 * (logp - old) ** 2, mask))
            if "kl" not in stats:  # Σ_t log π - log π_ref per reply, as the rollout logs it otherwise
                stats["kl"] = float(((logp - batch["ref_logp"]) * mask).sum(1).mean())
        if rl.algo == "ppo":
            pg, clip_frac = ppo_losses(logp, batch["old_logp"], batch["adv"], mask, rl.clip_range, rl.loss_average)
            vf = value_loss(v.float(), batch["old_values"], batch["returns"], mask, rl.value_clip)
            stats.update(policy_loss=pg.item(), value_loss=vf.item(), clip_frac=clip_frac.item())
            return pg + rl.vf_coef * vf, stats
        if rl.algo == "grpo":
            pg, clip_frac = ppo_losses(logp, old, batch["adv"], mask, rl.clip_range, rl.loss_average)
            kl = average(k3_kl(logp, batch["ref_logp"]), mask, rl.loss_average)
            stats.update(policy_loss=pg.item(), clip_frac=clip_frac.item(), kl_k3=kl.item())
            return pg + self.kl_coef * kl, stats
        if rl.algo == "rft":
            # SFT on the verified replies: rows with weight 0 (no verified reply drawn) give no gradient
            keep = mask * batch["weight"][:, None]
            nll = average(-logp, keep, rl.loss_average)
            kl = average(k3_kl(logp, batch["ref_logp"]), keep, rl.loss_average)
            stats.update(nll=nll.item(), kl_k3=kl.item())
            return nll + self.kl_coef * kl if self.kl_coef else nll, stats
        # REINFORCE: -(R - b) log π(y|x); the sum over tokens is divided by the fixed max length so the
        # step size does not depend on how long this batch's replies happen to be
        seq_logp = (logp * mask).sum(1)
        return -(batch["seq_adv"] * seq_logp).mean() / rl.max_new_tokens, stats

    def tokens(self, batch) -> int:
        if "weight" in batch:  # rft: the tokens trained on
            return int((batch["mask"] * batch["weight"][:, None]).sum())
        return int(batch["mask"].sum())

    def evaluate(self, model) -> dict:
        res = evaluate_policy(self, model, self.heldout, seed=self.cfg.seed)
        self.last_result = res  # the trainer evaluates the final policy; run() reports this one
        return {k: v for k, v in flatten(res).items() if isinstance(v, float)}


# --------------------------------------------------------------------------- the verb

def apply_preset(rl: RLConfig) -> RLConfig:
    """A preset's algorithm and settings in place of its name (--algo grpo-simple -> grpo, ...)."""
    return dataclasses.replace(rl, **PRESETS[rl.algo]) if rl.algo in PRESETS else rl


def check_config(rl: RLConfig):
    if rl.algo not in ALGOS:
        raise UserError(f"--algo must be one of {', '.join(ALGO_CHOICES)}, got {rl.algo!r}")
    if rl.advantage not in ADVANTAGES:
        raise UserError(f"--advantage must be one of {', '.join(ADVANTAGES)}, got {rl.advantage!r}")
    if rl.loss_average not in LOSS_AVERAGES:
        raise UserError(f"--loss-average must be one of {', '.join(LOSS_AVERAGES)}, got {rl.loss_average!r}")
    if not 0 <= rl.curriculum_low <= rl.curriculum_high <= 1:
        raise UserError("--curriculum-low and --curriculum-high must satisfy 0 <= low <= high <= 1")
    if not 0 < rl.curriculum_explore <= 1:
        raise UserError("--curriculum-explore must be in (0, 1]: a prompt outside the band must stay drawable")
    if rl.algo == "grpo" and rl.group_size < 2:
        raise UserError("--algo grpo needs --group-size >= 2: advantages are relative to the group")
    for name in ("rollout_prompts", "group_size", "max_new_tokens", "ppo_epochs", "minibatches"):
        if getattr(rl, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if rl.minibatches > rl.rollout_prompts * rl.group_size:
        raise UserError("--minibatches cannot exceed the samples per rollout (rollout-prompts x group-size)")


def success_threshold(rl: RLConfig, scorers) -> float | None:
    """The reward of a verified reply: --success-threshold, else the sum of the sources' maxima.
    None when neither rft nor the curriculum needs one."""
    if rl.success_threshold is not None:
        return rl.success_threshold
    if rl.algo != "rft" and not rl.curriculum:
        return None
    unknown = [fn.name for fn in scorers if fn.max_reward is None]
    if unknown:
        raise UserError(f"--{'algo rft' if rl.algo == 'rft' else 'curriculum'} needs to know when a reply is "
                        f"verified, and reward source {unknown[0]} has no known maximum: pass "
                        f"--success-threshold R (a reply with reward >= R counts)")
    return float(sum(fn.max_reward for fn in scorers))


def rl_tools(rl: RLConfig, tok) -> dict:
    try:
        tools = builtin_tools([t.strip() for t in rl.tools.split(",") if t.strip()])
    except ValueError as e:
        raise UserError(f"--tools: {e}") from None
    if tools and tok.tool_markers is None:
        raise UserError("--tools: the policy's chat template has no tool support")
    return tools


def run(cfg: TrainConfig, rl: RLConfig, prompts: list[str], init: str, rewards: list[str],
        heldout: list[str] | None = None, control: str | None = None) -> dict:
    """control: "tokens" or "seconds" also trains the same-compute SFT control into OUT/control
    (chatsmith/train/rl_control.py) and reports it next to init and rl."""
    preset = rl.algo if rl.algo in PRESETS else None
    rl = apply_preset(rl)
    check_config(rl)
    if control is not None and control not in rl_control.MODES:
        raise UserError(f"--control-sft must be one of {', '.join(rl_control.MODES)}, got {control!r}")
    tok = Tokenizer.load(init)
    policy = load_model(init)
    if rl.quantize != "none":  # (with --lora-rank the snapshot merges the adapters in)
        check_quantize(policy.to(runtime.resolve_device(cfg.device)), rl.quantize)
    ref = load_model(init).requires_grad_(False)
    fams = {f.strip() for f in rl.families.split(",") if f.strip()} or None
    tools = rl_tools(rl, tok)
    defs = [spec for spec, _ in tools.values()] or None
    items, info = load_prompts(tok, prompts, policy.cfg.max_seq_len, fams, tools=defs)
    if not items:
        raise UserError(f"no usable prompts in {', '.join(prompts)} ({info})")
    held = []
    if heldout:
        held = heldout_items(load_prompts(tok, heldout, policy.cfg.max_seq_len, fams, tools=defs)[0], items,
                             rl.eval_prompts)
    print(f"rl ({rl.algo}): {info['prompts']} prompts ({info['too_long']} too long, {info['other_families']} "
          f"of other families skipped); held-out {len(held)}", file=sys.stderr)
    if rl.algo == "ppo":
        policy.add_head("score", std=0.0)  # the value head starts at 0: no opinion before the first rollout
    extra = {"stage": "rlhf", "algo": rl.algo, "rl_config": rl.__dict__.copy(), "rewards": rewards,
             **({"algo_preset": preset} if preset else {})}
    # the Trainer moves the policy; the reference and reward models follow it
    trainer = Trainer(policy, None, cfg, tokenizer_dir=init, extra_config=extra)
    ref.to(trainer.device)
    # a discriminator follows the policy's schedule (peak --disc-lr) over the trainer's step count
    scorers = make_rewards(rewards, init, tok, items, trainer.device, rl.disc_lr, rl.disc_steps, cfg,
                           max_steps=lambda: trainer.max_steps)
    stage = RLStage(policy, ref, tok, items, scorers, rl, cfg, runtime.world_size(), heldout=held,
                    threshold=success_threshold(rl, scorers), amp=trainer.amp)
    trainer.stage = stage
    if control:  # refused before any RL step, not after
        rl_control.control_examples(tok, items, policy.cfg.max_seq_len)
    before = evaluate_policy(stage, ref, held, seed=cfg.seed) if held and trainer.master else None
    summary = trainer.fit()
    res = {}
    if trainer.master and held:
        res = {"init": before, "rl": stage.last_result or evaluate_policy(stage, trainer.unwrapped, held,
                                                                          seed=cfg.seed)}
    if control:
        model, summary["control"] = rl_control.train_control(cfg, summary, init, tok, items, control,
                                                             Path(cfg.out) / "control")
        if trainer.master and held:
            res["control"] = evaluate_policy(stage, model.eval(), held, seed=cfg.seed)
    if res.get("init") and res.get("rl"):  # paired on the same held-out items: what RL changed
        res["rl_vs_init"] = paired_by_family(res["init"], res["rl"])
        if res.get("control"):
            res["rl_vs_control"] = paired_by_family(res["control"], res["rl"])
    if trainer.master:
        _report(Path(cfg.out), init, summary, res, scorers)
    return summary


def _report(out: Path, init: str, summary: dict, res: dict, scorers: list):
    """rl_eval.json (before/after, discriminator accuracy), the discriminator's checkpoint, the
    before/after table, and train_summary.json with the evaluation in it."""
    for fn in scorers:
        if isinstance(fn, Discriminator):
            res["discriminator_accuracy"] = fn.history
            save_checkpoint(out / "discriminator", fn.model, init, extra_config={"stage": "discriminator"})
    if res:
        atomic.write_json(out / "rl_eval.json", res)
        summary["eval"] = res
        print_rl_table(res)
    atomic.write_json(out / "train_summary.json", summary)


# the stage's TrainConfig defaults (the CLI's and the speedrun's starting point)
DEFAULTS = dict(out="runs/rlhf", lr=1e-5, warmup_steps=5, schedule="constant", weight_decay=0.0, eval_every=50,
                save_every=50, log_every=1)



def add_arguments(p):
    p.add_argument("--init", required=True, help="the policy to start from (an SFT model); also the frozen reference")
    p.add_argument("--prompts", nargs="+", required=True, help="chat files whose prompts are rolled out "
                   "(a trailing assistant turn is the reference reply)")
    p.add_argument("--reward", nargs="+", default=[], metavar="SOURCE", help="reward sources, summed: a "
                   "reward-model directory, exact, format, module:function or discriminator (default: none)")
    p.add_argument("--heldout", nargs="+", help="held-out prompts: exact match, reward and KL before/after")
    p.add_argument("--control-sft", nargs="?", const="tokens", choices=rl_control.MODES, default=None,
                   help="also train the same-compute control, SFT from --init on the prompts' reference replies, "
                        "into OUT/control and report it next to RL: 'tokens' (default when given: RL's optimizer "
                        "steps x trained tokens per step) or 'seconds' (RL's training seconds); none when left out")
    add_dataclass_flags(p, RLConfig, help=RL_HELP, choices={"algo": ALGO_CHOICES, "quantize": QUANTIZE,
                                                            "advantage": ADVANTAGES, "loss_average": LOSS_AVERAGES})
    add_train_flags(p, DEFAULTS, skip=("preset", "batch_size"))


def main(a):
    summary = run(dataclass_from_args(TrainConfig, a), dataclass_from_args(RLConfig, a), a.prompts, a.init,
                  a.reward, heldout=a.heldout, control=a.control_sft)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


VERB = Verb("rlhf", "reinforcement learning from a reward: PPO, GRPO, REINFORCE or rejection-sampling fine-tuning",
            add_arguments, main)

__all__ = ["ALGOS", "ALGO_CHOICES", "PRESETS", "DEFAULTS", "RLConfig", "RLStage", "VERB", "apply_preset",
           "check_config", "success_threshold", "run"]
