"""Reward sources of the RL stage, behind one interface: a number per reply.

    source(items, texts, finished) -> [float]     items[i]: the prompt (a PromptItem), texts[i]:
                                                   the reply, finished[i]: it ended on its own

Several sources are summed. ``exact``: 1 when the reply's final answer is right (prompts with
known answers); ``format``: 1 when the reply ends on its own with "The answer is …"; a reward-model
directory: its score; ``module:function``: a user's f(prompt_messages, reply, meta) -> number;
``discriminator``: a SeqGAN-style critic trained alongside the policy (see Discriminator).

A source that learns from what it scores (`learns`, the discriminator) is left out of held-out
evaluation, learns once per rollout from everything it scored for it (`learn(step)`, step: the
run's optimizer step, its learning-rate schedule's position), and checkpoints what it learnt with
the stage (`state` / `load_state`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from chatsmith import runtime
from chatsmith.batching import pad
from chatsmith.checkpoint import load_model
from chatsmith.config import TrainConfig
from chatsmith.data.tasks import check_answer, extract_number, final_answer
from chatsmith.errors import UserError
from chatsmith.reward_model import last_scores, load_reward_model
from chatsmith.tokenizer import Tokenizer
from chatsmith.train import optim
from chatsmith.train.rollouts import PromptItem


class RewardSource:
    name = "reward"
    learns = False  # trains on the replies it scores
    max_reward: float | None = None  # the best score a reply can get, where it is known and reachable

    def __call__(self, items: list[PromptItem], texts: list[str], finished: list[bool]) -> list[float]:
        raise NotImplementedError

    def learn(self, step: int):
        """Called once per rollout, after all its draws are scored, with the run's optimizer step."""

    def stats(self) -> dict[str, float]:
        """Figures for the rollout's metrics row."""
        return {}

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON, tensors) to checkpoint with the stage."""
        return {}, {}

    def load_state(self, js: dict, tensors: dict[str, torch.Tensor]):
        pass


class ExactReward(RewardSource):
    name = "exact"
    max_reward = 1.0

    def __call__(self, items, texts, finished):
        return [float(check_answer(it.meta.get("family", ""), t, it.meta["answers"]))
                for it, t in zip(items, texts)]


class FormatReward(RewardSource):
    """1 for a reply that ends on its own and states a final answer ("The answer is 12.")."""
    name = "format"
    max_reward = 1.0

    def __call__(self, items, texts, finished):
        return [float(f and final_answer(t) != t and extract_number(final_answer(t)) is not None)
                for t, f in zip(texts, finished)]


class ModelReward(RewardSource):
    def __init__(self, path: str, device):
        self.name = f"rm:{Path(path).name}"
        self.rm = load_reward_model(path, device=device)

    def __call__(self, items, texts, finished):
        return self.rm.score([it.messages + [{"role": "assistant", "content": t}] for it, t in zip(items, texts)])


class FunctionReward(RewardSource):
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


class Discriminator(RewardSource):
    """The GAN idea applied to text (SeqGAN, Yu et al. 2017): a critic D (the trunk plus a scalar
    head) learns to tell the dataset's real replies (label 1) from policy samples (label 0) by
    logistic loss; the policy's reward is D's probability that its sample is real. The two
    alternate every rollout: D scores the rollout's replies, then learns from them (`learn`, all
    of a rollout's draws when GRPO's filter draws more than once). `accuracy` is measured on those
    fresh samples before D trains on them.

    D's updates are the trainer's: AdamW with the run's betas and weight decay (matrices only),
    the run's schedule (warmup, then constant / cosine / WSD) peaking at `lr` and following the
    policy's step, gradients clipped to --grad-clip, bf16 autocast as --dtype says, and under
    torchrun the gradients averaged over the ranks (D is not wrapped in DDP), so every rank keeps
    the same D. Without a `cfg` (D on its own): constant `lr`, no weight decay."""
    name = "discriminator"
    learns = True

    def __init__(self, init: str, tok: Tokenizer, lr: float, steps: int, device, cfg: TrainConfig | None = None,
                 max_steps: Callable[[], int | None] = lambda: None):
        self.device = torch.device(device)
        self.tok, self.steps = tok, steps
        base = cfg if cfg is not None else TrainConfig(weight_decay=0.0, warmup_steps=0, schedule="constant")
        self.cfg, self.max_steps = dataclasses.replace(base, lr=lr), max_steps
        self.model = load_model(init, device="cpu")
        with torch.random.fork_rng(devices=[]):  # the new head's init from --seed, the run's RNG untouched
            torch.manual_seed(self.cfg.seed)
            self.model.add_head("score")
        self.model.to(self.device).train()
        self.world = runtime.world_size()
        self.amp = runtime.autocast_dtype(self.cfg.dtype, self.device)
        optim.broadcast_parameters(self.model, self.world)
        self.opt = optim.make_adamw(self.model.parameters(), self.cfg, self.device)
        self.pending: list[tuple] = []  # (real, fake, real logits, fake logits) per draw not learnt from yet
        self.last_accuracy = self.last_lr = self.last_grad_norm = float("nan")
        self.history: list[float] = []

    def _logits(self, convs):
        ctx = self.model.cfg.max_seq_len
        x, last = pad([self.tok.render_chat(c)[0][-ctx:] for c in convs], self.tok.pad_id)
        return last_scores(self.model, x.to(self.model.lm_head.weight.device), last)

    def __call__(self, items, texts, finished):
        fake = [it.messages + [{"role": "assistant", "content": t}] for it, t in zip(items, texts)]
        real = [it.messages + [{"role": "assistant", "content": it.reference}] for it in items]
        with torch.no_grad():
            fl = self._logits(fake)
            rl = self._logits(real)
        self.pending.append((real, fake, rl, fl))
        return torch.sigmoid(fl).tolist()

    def learn(self, step: int = 0):
        """`steps` optimizer steps of logistic loss, real (1) vs fake (0), on the replies scored
        since the last call (one draw: one batch; several: their gradients accumulated)."""
        if not self.pending:
            return
        draws, self.pending = self.pending, []
        rl, fl = torch.cat([d[2] for d in draws]), torch.cat([d[3] for d in draws])
        self.last_accuracy = float(((fl < 0).float().mean() + (rl > 0).float().mean()) / 2)
        self.history.append(self.last_accuracy)
        total = sum(len(real) + len(fake) for real, fake, *_ in draws)
        self.last_lr = optim.lr_at(step, self.cfg, self.max_steps() or 10**9)
        optim.set_lr(self.opt, self.last_lr)
        for _ in range(self.steps):
            for real, fake, *_ in draws:
                labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(self.device)
                # called from the rollout, which runs under no_grad
                with torch.enable_grad(), optim.autocast(self.amp, self.device):
                    loss = F.binary_cross_entropy_with_logits(self._logits(real + fake), labels)
                    loss = loss * ((len(real) + len(fake)) / total)  # this draw's share of the mean
                loss.backward()
            optim.all_reduce_gradients(self.model.parameters(), self.world)
            self.last_grad_norm = float(optim.clip_gradients(self.model.parameters(), self.cfg.grad_clip))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def stats(self):
        return {"disc_accuracy": self.last_accuracy}

    def state(self):
        tensors = {f"disc.model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(optim.optimizer_tensors(self.opt, "disc_optim"))
        return {"disc_history": self.history}, tensors

    def load_state(self, js, tensors):
        if any(k.startswith("disc.model.") for k in tensors):
            self.model.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("disc.model.")})
            optim.load_optimizer_tensors(self.opt, tensors, "disc_optim", next(self.model.parameters()).device)
            self.history = list(js.get("disc_history", []))


def make_rewards(specs: list[str], init: str, tok, items: list[PromptItem], device, disc_lr: float = 1e-4,
                 disc_steps: int = 1, cfg: TrainConfig | None = None,
                 max_steps: Callable[[], int | None] = lambda: None) -> list[RewardSource]:
    """The sources --reward names; `cfg` and `max_steps` (the run's) drive a discriminator's schedule."""
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
            out.append(Discriminator(init, tok, disc_lr, disc_steps, device, cfg, max_steps))
        elif Path(s).is_dir():
            out.append(ModelReward(s, device))
        elif ":" in s and not Path(s).exists():
            out.append(FunctionReward(s))
        else:
            raise UserError(f"--reward {s!r}: not a model directory, 'exact', 'format', 'discriminator' "
                            f"or module:function")
    return out


__all__ = ["RewardSource", "ExactReward", "FormatReward", "ModelReward", "FunctionReward", "Discriminator",
           "make_rewards"]
