"""Reinforcement learning from feedback: PPO, GRPO and REINFORCE on one machinery.

Every algorithm alternates two phases inside the one Trainer:

1. rollout: sample completions for a batch of prompts with the engine (KV cache, batched), score
   them with the reward sources, and compute with no gradient the sampling policy's token
   log-probabilities, the frozen reference model's, and (PPO) the value head's estimates;
2. optimisation: `ppo_epochs` passes over the rollout in `minibatches` minibatches, one
   optimizer step each.

The three algorithms differ only in the advantage and the loss (notation: ratio ρ_t = π(a_t|s_t) /
π_old(a_t|s_t), KL term k_t = log π_old(a_t|s_t) - log π_ref(a_t|s_t)):

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

Reward sources (summed when several are given): a reward-model directory; ``exact`` (1 when the
reply's final answer is right, for prompts with known answers); ``format`` (1 when the reply ends
on its own with "The answer is …"); ``module:function`` called as f(prompt_messages, reply, meta)
-> number; ``discriminator`` (a SeqGAN-style critic trained alongside, see Discriminator).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatsmith.checkpoint import load_model, save_checkpoint
from chatsmith.config import TrainConfig
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.tokenizer import Tokenizer
from chatsmith.batching import completion_batch, entropy, masked_mean, pad, token_logprobs
from chatsmith.train.trainer import Trainer, load_optimizer_tensors, optimizer_tensors

ALGOS = ("ppo", "grpo", "reinforce")


@dataclass
class RLConfig:
    """Knobs of the RL stage; the CLI exposes each as --field-name."""

    algo: str = "ppo"  # ppo | grpo | reinforce
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


@dataclass
class PromptItem:
    messages: list[dict]  # the prompt turns (ending with a user turn)
    ids: list[int]
    reference: str | None  # the dataset's reply, if any (the discriminator's "real" sample)
    meta: dict
    source: str


def load_prompts(tok: Tokenizer, specs: list[str], ctx: int, families: set[str] | None,
                 min_new: int = 8) -> tuple[list[PromptItem], dict]:
    """Prompts from chat files (any format SFT reads); a trailing assistant turn becomes the reference."""
    from chatsmith.data.chat_formats import read_conversations

    records, _ = read_conversations(specs, prompts=True)
    items, too_long, other = [], 0, 0
    for r in records:
        if families and r.meta.get("family") not in families:
            other += 1
            continue
        msgs, ref = r.messages, None
        if msgs[-1]["role"] == "assistant":
            msgs, ref = msgs[:-1], msgs[-1]["content"]
        if not msgs or msgs[-1]["role"] != "user":
            continue
        ids, _ = tok.render_chat(msgs, add_generation_prompt=True)
        if len(ids) > ctx - min_new:
            too_long += 1
            continue
        items.append(PromptItem(msgs, ids, ref, r.meta, r.source))
    return items, {"prompts": len(items), "too_long": too_long, "other_families": other}


# --------------------------------------------------------------------------- reward sources

class ExactReward:
    name = "exact"

    def __call__(self, items, texts, finished):
        from chatsmith.data.tasks import check_answer
        return [float(check_answer(it.meta.get("family", ""), t, it.meta["answers"]))
                for it, t in zip(items, texts)]


class FormatReward:
    """1 for a reply that ends on its own and states a final answer ("The answer is 12.")."""
    name = "format"

    def __call__(self, items, texts, finished):
        from chatsmith.data.tasks import extract_number, final_answer
        return [float(f and final_answer(t) != t and extract_number(final_answer(t)) is not None)
                for t, f in zip(texts, finished)]


class ModelReward:
    def __init__(self, path: str, device):
        from chatsmith.train.reward import load_reward_model
        self.name = f"rm:{Path(path).name}"
        self.rm = load_reward_model(path, device=device)

    def __call__(self, items, texts, finished):
        return self.rm.score([it.messages + [{"role": "assistant", "content": t}] for it, t in zip(items, texts)])


class FunctionReward:
    def __init__(self, spec: str):
        mod, _, fn = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--reward {spec}: cannot load {fn!r} from module {mod!r} ({e}); the module "
                            f"must be importable (on PYTHONPATH or in the current directory)") from None
        self.name = spec

    def __call__(self, items, texts, finished):
        out = []
        for it, t in zip(items, texts):
            try:
                v = self.fn(it.messages, t, dict(it.meta))
            except Exception as e:  # a user's function: report which prompt broke it
                raise UserError(f"reward function {self.name} raised {type(e).__name__}: {e} "
                                f"(prompt from {it.source})") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"reward function {self.name} returned {v!r} for the prompt from {it.source}: "
                                f"it must return a finite number")
            out.append(float(v))
        return out


class Discriminator:
    """The GAN idea applied to text (SeqGAN, Yu et al. 2017): a critic D (the trunk plus a scalar
    head) learns to tell the dataset's real replies (label 1) from policy samples (label 0) by
    logistic loss; the policy's reward is D's probability that its sample is real. The two
    alternate every rollout. `accuracy` is measured on fresh samples before D trains on them."""
    name = "discriminator"

    def __init__(self, init: str, tok: Tokenizer, lr: float, steps: int, device):
        self.model = load_model(init, device=device).add_head("score")
        self.model.train()
        self.tok, self.steps = tok, steps
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.last_accuracy = float("nan")
        self.history: list[float] = []

    def _logits(self, convs):
        from chatsmith.train.reward import last_scores
        ctx = self.model.cfg.max_seq_len
        x, last = pad([self.tok.render_chat(c)[0][-ctx:] for c in convs], self.tok.pad_id)
        return last_scores(self.model, x.to(self.model.lm_head.weight.device), last)

    def __call__(self, items, texts, finished):
        fake = [it.messages + [{"role": "assistant", "content": t}] for it, t in zip(items, texts)]
        real = [it.messages + [{"role": "assistant", "content": it.reference}] for it in items]
        with torch.no_grad():
            fl = self._logits(fake)
            rl = self._logits(real)
        self.last_accuracy = float(((fl < 0).float().mean() + (rl > 0).float().mean()) / 2)
        self.history.append(self.last_accuracy)
        labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(fl.device)
        for _ in range(self.steps):
            with torch.enable_grad():  # called from the rollout, which runs under no_grad
                logits = self._logits(real + fake)
                loss = F.binary_cross_entropy_with_logits(logits, labels)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return torch.sigmoid(fl).tolist()


def make_rewards(specs: list[str], init: str, tok, rl: RLConfig, items: list[PromptItem], device) -> list:
    if not specs:
        raise UserError("--reward is required: a reward-model directory, exact, format, module:function "
                        "or discriminator (several are summed)")
    out = []
    for s in specs:
        if s == "exact":
            missing = [it.source for it in items if not it.meta.get("answers")]
            if missing:
                raise UserError(f"--reward exact needs prompts with known answers; {len(missing)} have none "
                                f"(first: {missing[0]}); pick families with answers via --families")
            out.append(ExactReward())
        elif s == "format":
            out.append(FormatReward())
        elif s == "discriminator":
            missing = [it.source for it in items if not it.reference]
            if missing:
                raise UserError(f"--reward discriminator needs a real reply after each prompt; "
                                f"{missing[0]} has none")
            out.append(Discriminator(init, tok, rl.disc_lr, rl.disc_steps, device))
        elif Path(s).is_dir():
            out.append(ModelReward(s, device))
        elif ":" in s and not Path(s).exists():
            out.append(FunctionReward(s))
        else:
            raise UserError(f"--reward {s!r}: not a model directory, 'exact', 'format', 'discriminator' "
                            f"or module:function")
    return out


# --------------------------------------------------------------------------- advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over masked token positions (N, T).
    Returns (advantages, returns); positions outside the mask are 0."""
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
    mean = masked_mean(v, mask)
    var = masked_mean((v - mean) ** 2, mask)
    return (v - mean) * torch.rsqrt(var + 1e-8) * mask


def group_advantages(scores: torch.Tensor, group: int) -> torch.Tensor:
    """GRPO: each sample's score standardised within its prompt's group of G samples."""
    s = scores.view(-1, group)
    return ((s - s.mean(1, keepdim=True)) / (s.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def ppo_losses(logp, old_logp, adv, mask, clip: float):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, and the clipped share."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return masked_mean(pg, mask), masked_mean(((ratio - 1).abs() > clip).float(), mask)


def value_loss(v, old_v, returns, mask, clip: float):
    v_clip = old_v + (v - old_v).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((v - returns) ** 2, (v_clip - returns) ** 2), mask)


def k3_kl(logp, ref_logp):
    """Unbiased, always-positive estimator of KL(π‖π_ref) from samples of π (Schulman 2020)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# --------------------------------------------------------------------------- the stage

class RLStage:
    name = "rlhf"
    show = ("reward", "kl", "response_len")  # on the progress line

    def __init__(self, policy, ref, tok, items, rewards, rl: RLConfig, cfg: TrainConfig, world: int = 1,
                 heldout=()):
        self.policy, self.ref, self.tok, self.items, self.rewards = policy, ref, tok, items, rewards
        self.heldout = list(heldout)
        self.last_result = None
        self.rl, self.cfg, self.world = rl, cfg, world
        self.end_id = tok.token_to_id("<|assistant_end|>")
        if self.end_id is None:
            self.end_id = tok.eos_id
        self.kl_coef = rl.kl_coef
        self.baseline = None
        self.per_rollout = 1 if rl.algo == "reinforce" else rl.ppo_epochs * rl.minibatches
        self._k, self._ro = -1, None

    # checkpointed with the policy (see Trainer): what the stage adapts as it runs --------------
    def state(self) -> tuple[dict, dict]:
        """(JSON, tensors): the adaptive KL coefficient, REINFORCE's baseline, and a
        discriminator's weights, optimizer moments and accuracy history; a resumed run goes on
        with them rather than with their starting values."""
        js, tensors = {"kl_coef": self.kl_coef, "baseline": self.baseline}, {}
        for fn in self.rewards:
            if isinstance(fn, Discriminator):
                js["disc_history"] = fn.history
                tensors.update({f"disc.model.{k}": v for k, v in fn.model.state_dict().items()})
                tensors.update(optimizer_tensors(fn.opt, "disc_optim"))
        return js, tensors

    def load_state(self, js: dict, tensors: dict):
        self.kl_coef = js.get("kl_coef", self.kl_coef)
        self.baseline = js.get("baseline", self.baseline)
        for fn in self.rewards:
            if isinstance(fn, Discriminator) and any(k.startswith("disc.model.") for k in tensors):
                fn.model.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("disc.model.")})
                load_optimizer_tensors(fn.opt, tensors, "disc_optim", next(fn.model.parameters()).device)
                fn.history = list(js.get("disc_history", []))

    # rollout phase ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model, items: list[PromptItem], seed: int, temperature: float, n: int = 1):
        """Completions for each item (n each, grouped), as (items, texts, finished, seqs)."""
        items = [it for it in items for _ in range(n)]
        was = model.training
        p = SamplingParams(max_new_tokens=self.rl.max_new_tokens, temperature=temperature, top_p=1.0,
                           seed=seed)
        # one batch for the whole rollout when it fits: decode steps cost about the same for 8 or 64 rows
        comps = Engine(model, self.tok).generate_many([it.ids for it in items], p, max_batch=min(64, len(items)))
        model.train(was)
        seqs = []
        for it, c in zip(items, comps):
            # the engine leaves the end token out of token_ids; the policy must learn to emit it
            resp = list(c.token_ids) + ([self.end_id] if c.finish_reason == "stop" else [])
            seqs.append((it.ids + (resp or [self.end_id]), len(it.ids)))
        return items, [c.text for c in comps], [c.finish_reason == "stop" for c in comps], seqs

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

    @torch.no_grad()
    def make_rollout(self, k: int, rank: int) -> dict:
        rl = self.rl
        rng = np.random.default_rng([self.cfg.seed, k, rank])
        items, texts, finished, seqs, scores, parts = self.sample_scored(rng)
        drawn = {"sampled": len(items), "kept": len(items)}
        if rl.algo == "grpo" and rl.max_resample > 0:
            items, texts, finished, seqs, scores, parts, drawn = self.informative_groups(
                rng, (items, texts, finished, seqs, scores, parts))
        dev = next(self.policy.parameters()).device
        b = completion_batch(seqs, self.tok.pad_id)
        x, y, mask = b["x"].to(dev), b["y"].to(dev), b["mask"].to(dev)
        was = self.policy.training
        self.policy.eval()
        if rl.algo == "ppo":
            logits, values = self.policy(x, head=("lm", "score"))
            values = values.float().cpu()
        else:
            logits = self.policy(x)
        self.policy.train(was)
        old_logp = token_logprobs(logits, y).cpu()
        ref_logp = token_logprobs(self.ref(x), y).cpu()
        mask = mask.cpu()
        kl_tok = (old_logp - ref_logp) * mask
        kl_seq = kl_tok.sum(1)
        ro = {"x": b["x"], "y": b["y"], "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp}
        if rl.algo == "ppo":
            r = -self.kl_coef * kl_tok
            last = (mask * torch.arange(mask.shape[1])).argmax(1)  # each row's last completion position
            r[torch.arange(len(seqs)), last] += scores
            adv, ret = gae(r, values * mask, mask, rl.gamma, rl.lam)
            ro.update(adv=whiten(adv, mask), returns=ret, old_values=values * mask)
        elif rl.algo == "grpo":
            ro["adv"] = group_advantages(scores, rl.group_size)[:, None] * mask
        else:
            ret = scores - self.kl_coef * kl_seq
            b_now = float(ret.mean())
            self.baseline = b_now if self.baseline is None else (
                rl.baseline_momentum * self.baseline + (1 - rl.baseline_momentum) * b_now)
            ro["seq_adv"] = ret - self.baseline
        if rl.kl_target > 0:  # adaptive KL controller (Ziegler et al. 2019, §2.2)
            err = max(-0.2, min(0.2, float(kl_seq.mean()) / rl.kl_target - 1))
            self.kl_coef *= 1 + err * len(seqs) / rl.kl_horizon
        stats = {"reward": parts.pop("reward"), "kl": float(kl_seq.mean()), "kl_coef": self.kl_coef,
                 "response_len": float(mask.sum(1).mean()), "ended_share": float(np.mean(finished)), **parts}
        if rl.algo == "grpo" and rl.max_resample > 0:
            stats["kept_share"] = drawn["kept"] / drawn["sampled"]
        for fn in self.rewards:
            if isinstance(fn, Discriminator):
                stats["disc_accuracy"] = fn.last_accuracy
        ro["stats"] = stats
        return ro

    def sample_scored(self, rng):
        """One draw: rollout_prompts random prompts, group_size samples each, scored. The logged
        reward (`parts`) is the mean over everything drawn, before any filtering."""
        rl = self.rl
        pick = rng.choice(len(self.items), size=rl.rollout_prompts, replace=len(self.items) < rl.rollout_prompts)
        items, texts, finished, seqs = self.sample(self.policy, [self.items[i] for i in pick],
                                                   int(rng.integers(2**31)), rl.temperature, rl.group_size)
        scores, parts = self.score(items, texts, finished)
        parts["reward"] = float(scores.mean())
        return items, texts, finished, seqs, scores, parts

    def informative_groups(self, rng, first):
        """DAPO's dynamic sampling (Yu et al. 2025, §3.2): a group whose G rewards are all equal has
        zero advantage everywhere and only costs a forward and backward pass, so such groups are
        dropped and more prompts are drawn, up to max_resample times, until rollout_prompts
        informative groups are collected. With a sparse reward (a weak model, a hard task) most
        groups carry no signal, and this keeps the optimizer's batch full of ones that do. When no
        draw has any, the last draw is kept whole (the step then only follows the KL term)."""
        rl, G = self.rl, self.rl.group_size
        kept = [[], [], [], [], []]  # items, texts, finished, seqs, scores of the informative groups
        sampled, part_sums = 0, {}
        draw = first
        for attempt in range(rl.max_resample + 1):
            if attempt:
                draw = self.sample_scored(rng)
            items, texts, finished, seqs, scores, parts = draw
            sampled += len(items)
            for key, v in parts.items():
                part_sums[key] = part_sums.get(key, 0.0) + v * len(items)
            spread = scores.view(-1, G).std(1, unbiased=False) > 1e-6
            for g in torch.nonzero(spread).flatten().tolist():
                rows = range(g * G, (g + 1) * G)
                for col, seq in zip(kept, (items, texts, finished, seqs, scores.tolist())):
                    col.extend(seq[i] for i in rows)
            if len(kept[0]) >= rl.rollout_prompts * G:
                break
        parts = {key: v / sampled for key, v in part_sums.items()}
        if not kept[0]:
            return (*draw[:5], parts, {"sampled": sampled, "kept": len(draw[0])})
        n = rl.rollout_prompts * G
        items, texts, finished, seqs, scores = (col[:n] for col in kept)
        return (items, texts, finished, seqs, torch.tensor(scores), parts,
                {"sampled": sampled, "kept": len(items)})

    # optimisation phase -----------------------------------------------------------------
    def batch(self, step: int, micro: int, rank: int):
        u = step * self.cfg.grad_accum + micro  # micro-batch counter
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
            logits, v = model(batch["x"], head=("lm", "score"))
        else:
            logits = model(batch["x"])
        logp = token_logprobs(logits, batch["y"])
        stats = dict(batch["stats"])
        with torch.no_grad():
            stats["entropy"] = float(masked_mean(entropy(logits), mask))
            stats["approx_kl"] = float(masked_mean(0.5 * (logp - batch["old_logp"]) ** 2, mask))
        if rl.algo == "ppo":
            pg, clip_frac = ppo_losses(logp, batch["old_logp"], batch["adv"], mask, rl.clip_range)
            vf = value_loss(v.float(), batch["old_values"], batch["returns"], mask, rl.value_clip)
            stats.update(policy_loss=pg.item(), value_loss=vf.item(), clip_frac=clip_frac.item())
            return pg + rl.vf_coef * vf, stats
        if rl.algo == "grpo":
            pg, clip_frac = ppo_losses(logp, batch["old_logp"], batch["adv"], mask, rl.clip_range)
            kl = masked_mean(k3_kl(logp, batch["ref_logp"]), mask)
            stats.update(policy_loss=pg.item(), clip_frac=clip_frac.item(), kl_k3=kl.item())
            return pg + self.kl_coef * kl, stats
        # REINFORCE: -(R - b) log π(y|x); the sum over tokens is divided by the fixed max length so the
        # step size does not depend on how long this batch's replies happen to be
        seq_logp = (logp * mask).sum(1)
        return -(batch["seq_adv"] * seq_logp).mean() / rl.max_new_tokens, stats

    def tokens(self, batch) -> int:
        return int(batch["mask"].sum())

    def evaluate(self, model) -> dict:
        res = evaluate_policy(self, model, self.heldout, seed=self.cfg.seed)
        self.last_result = res  # the trainer evaluates the final policy; run() reports this one
        return {k: v for k, v in _flatten(res).items() if isinstance(v, float)}


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_policy(stage: RLStage, model, items: list[PromptItem], seed: int = 0) -> dict:
    """Greedy replies to held-out prompts: exact match per family (where answers are known), mean
    reward (every source but the discriminator, which is still training), reply length; and the
    policy's KL to the reference, Σ_t log π - log π_ref averaged over sampled replies."""
    from chatsmith.data.tasks import check_answer

    if not items:
        return {}
    its, texts, finished, seqs = stage.sample(model, items, seed, temperature=0.0)
    res: dict = {"heldout_prompts": len(its)}
    fams: dict[str, list[bool]] = {}
    for it, t in zip(its, texts):
        if it.meta.get("answers"):
            fams.setdefault(it.meta.get("family", "all"), []).append(
                check_answer(it.meta.get("family", ""), t, it.meta["answers"]))
    if fams:
        res["exact_match"] = {f: float(np.mean(v)) for f, v in sorted(fams.items())}
        res["exact_match_all"] = float(np.mean([x for v in fams.values() for x in v]))
        res.update(answer_collapse([t for it, t in zip(its, texts) if it.meta.get("answers")]))
    scorers = [fn for fn in stage.rewards if not isinstance(fn, Discriminator)]
    if scorers:
        total = torch.zeros(len(texts))
        for fn in scorers:
            total += torch.tensor(fn(its, texts, finished), dtype=torch.float32)
        res["heldout_reward"] = float(total.mean())
    res["ended_share"] = float(np.mean(finished))
    per_fam: dict[str, int] = {}
    res["samples"] = []
    for it, t in zip(its, texts):  # two per family
        f = it.meta.get("family", "all")
        if per_fam.get(f, 0) < 2:
            per_fam[f] = per_fam.get(f, 0) + 1
            res["samples"].append({"family": f, "prompt": it.messages[-1]["content"], "reply": t})
    if model is stage.ref:  # the reference against itself: 0 by definition
        res["kl_to_ref"] = 0.0
        return res
    # KL on sampled replies (greedy ones are not samples of π)
    sub = items[: min(len(items), 32)]
    _, _, _, sseqs = stage.sample(model, sub, seed + 1, temperature=1.0)
    b = completion_batch(sseqs, stage.tok.pad_id)
    dev = next(model.parameters()).device
    x, y = b["x"].to(dev), b["y"].to(dev)
    lp = token_logprobs(model(x), y).cpu()
    ref = token_logprobs(stage.ref(x), y).cpu()
    res["kl_to_ref"] = float(((lp - ref) * b["mask"]).sum(1).mean())
    return res


def answer_collapse(texts: list[str]) -> dict:
    """The most common final answer among the replies and its share. A policy that cannot solve
    the task can still raise exact match by learning the answer that is right most often ("0"
    for products with a zero factor); a share far above the data's own shows that is happening."""
    from collections import Counter

    from chatsmith.data.tasks import extract_number, final_answer

    counts = Counter(extract_number(final_answer(t)) for t in texts)
    if not counts:
        return {}
    top, n = counts.most_common(1)[0]
    return {"top_answer": top, "top_answer_share": n / len(texts)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def run(cfg: TrainConfig, rl: RLConfig, prompts: list[str], init: str, rewards: list[str],
        heldout: list[str] | None = None) -> dict:
    if rl.algo not in ALGOS:
        raise UserError(f"--algo must be one of {', '.join(ALGOS)}, got {rl.algo!r}")
    if rl.algo == "grpo" and rl.group_size < 2:
        raise UserError("--algo grpo needs --group-size >= 2: advantages are relative to the group")
    for name in ("rollout_prompts", "group_size", "max_new_tokens", "ppo_epochs", "minibatches"):
        if getattr(rl, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if rl.minibatches > rl.rollout_prompts * rl.group_size:
        raise UserError("--minibatches cannot exceed the samples per rollout (rollout-prompts x group-size)")
    out = Path(cfg.out)
    tok = Tokenizer.load(init)
    policy = load_model(init)
    ref = load_model(init).requires_grad_(False)
    fams = {f.strip() for f in rl.families.split(",") if f.strip()} or None
    items, info = load_prompts(tok, prompts, policy.cfg.max_seq_len, fams)
    if not items:
        raise UserError(f"no usable prompts in {', '.join(prompts)} ({info})")
    held = []
    if heldout:
        held_all, _ = load_prompts(tok, heldout, policy.cfg.max_seq_len, fams)
        per: dict[str, int] = {}
        for it in held_all:  # the first eval_prompts of each family
            f = it.meta.get("family", "all")
            if per.get(f, 0) < rl.eval_prompts:
                held.append(it)
                per[f] = per.get(f, 0) + 1
        train_keys = {json.dumps(it.messages, ensure_ascii=False) for it in items}
        leaked = sum(json.dumps(it.messages, ensure_ascii=False) in train_keys for it in held)
        if leaked:
            raise UserError(f"{leaked} held-out prompts are also training prompts: the held-out figures "
                            f"would be meaningless")
    print(f"rl ({rl.algo}): {info['prompts']} prompts ({info['too_long']} too long, {info['other_families']} "
          f"of other families skipped); held-out {len(held)}", file=sys.stderr)
    if rl.algo == "ppo":
        policy.add_head("score", std=0.0)  # the value head starts at 0: no opinion before the first rollout
    world = int(os.environ.get("WORLD_SIZE", 1))
    extra = {"stage": "rlhf", "algo": rl.algo, "rl_config": rl.__dict__.copy(), "rewards": rewards}
    # the Trainer moves the policy; the reference and reward models follow it
    trainer = Trainer(policy, None, cfg, tokenizer_dir=init, extra_config=extra)
    ref.to(trainer.device)
    scorers = make_rewards(rewards, init, tok, rl, items, trainer.device)
    stage = RLStage(policy, ref, tok, items, scorers, rl, cfg, world, heldout=held)
    trainer.stage = stage
    before = evaluate_policy(stage, ref, held, seed=cfg.seed) if held and trainer.master else None
    summary = trainer.fit()
    if trainer.master:
        after = stage.last_result or evaluate_policy(stage, trainer.unwrapped, held, seed=cfg.seed)
        res = {"init": before, "rl": after} if held else {}
        for fn in scorers:
            if isinstance(fn, Discriminator):
                res["discriminator_accuracy"] = fn.history
                save_checkpoint(out / "discriminator", fn.model, init, extra_config={"stage": "discriminator"})
        if res:
            (out / "rl_eval.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
            summary["eval"] = res
            print_rl_table(res)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def print_rl_table(res: dict):
    a, b = res.get("init") or {}, res.get("rl") or {}
    print(f"{'held-out':32s} {'before':>8s} {'after':>8s}", file=sys.stderr)
    for fam in sorted(set(a.get("exact_match", {})) | set(b.get("exact_match", {}))):
        va, vb = a.get("exact_match", {}).get(fam), b.get("exact_match", {}).get(fam)
        print(f"{'exact match: ' + fam:32s} {'-' if va is None else f'{va:.0%}':>8s} "
              f"{'-' if vb is None else f'{vb:.0%}':>8s}", file=sys.stderr)
    if "top_answer" in a or "top_answer" in b:
        print(f"{'most common final answer':32s} {str(a.get('top_answer')):>8s} {str(b.get('top_answer')):>8s}",
              file=sys.stderr)
    for key in ("heldout_reward", "kl_to_ref", "ended_share", "top_answer_share"):
        if key in a or key in b:
            print(f"{key:32s} {a.get(key, float('nan')):8.3f} {b.get(key, float('nan')):8.3f}", file=sys.stderr)


# the stage's TrainConfig defaults (the CLI's and the speedrun's starting point)
DEFAULTS = dict(out="runs/rlhf", lr=1e-5, warmup_steps=5, schedule="constant", weight_decay=0.0, eval_every=50,
                save_every=50, log_every=1)
