"""Direct Preference Optimization (Rafailov et al. 2023): preference learning without a reward model
or sampling. With a frozen reference π_ref (the starting model), eq. 7 of the paper:

    loss = -log σ( β [ (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x)) ] )

β · (log π - log π_ref) is the "implicit reward" of a reply; we report how often the chosen reply's
implicit reward beats the rejected one's (reward accuracy) and by how much (margin).
The reference log-probabilities are computed batch by batch with the frozen model, so they cost one
forward pass and no memory for the whole dataset.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chatsmith import atomic, runtime
from chatsmith.batching import completion_batch, length_grouped_batch, sequence_logprobs
from chatsmith.checkpoint import load_model
from chatsmith.config import TrainConfig
from chatsmith.data.chat_formats import read_conversations
from chatsmith.data.preferences import encode_pairs, read_pairs
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.tokenizer import Tokenizer
from chatsmith.train.optim import autocast
from chatsmith.train.reward import load_reward_model
from chatsmith.train.trainer import Trainer, steps_for_epochs


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float):
    """(loss, chosen implicit reward, rejected implicit reward), all from summed log-probs (N,)."""
    rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return -F.logsigmoid(rc - rr).mean(), rc, rr


class DPOStage:
    name = "dpo"
    show = ("reward_accuracy", "reward_margin")

    def __init__(self, examples, heldout, ref, cfg: TrainConfig, beta: float, pad_id: int, world: int = 1,
                 rpo_alpha: float = 0.0, amp: torch.dtype | None = None):
        self.examples, self.heldout, self.ref, self.cfg = examples, heldout, ref, cfg
        self.beta, self.pad_id, self.world, self.rpo_alpha = beta, pad_id, world, rpo_alpha
        self.amp = amp  # the trainer's autocast dtype: the reference scores under it too

    def _batch(self, ex) -> dict:
        b = completion_batch([(e[0], e[1]) for e in ex] + [(e[2], e[3]) for e in ex], self.pad_id)
        dev = next(self.ref.parameters()).device
        # batch() runs outside the training step's autocast: without it the reference's forward
        # would be fp32, as costly as the step's own forward on a CPU with native bf16
        with torch.no_grad(), autocast(self.amp, dev):
            b["ref"] = sequence_logprobs(self.ref, {k: v.to(dev) for k, v in b.items()}).cpu()
        return b

    def batch(self, step: int, micro: int, rank: int):
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, self.world)
        # grouped by the longer side's length, as the reward model's pairs
        return self._batch([self.examples[j] for j in length_grouped_batch(
            self.cfg.seed, i, self.cfg.batch_size, len(self.examples),
            lambda j: max(len(self.examples[j][0]), len(self.examples[j][2])))])

    def loss(self, model, batch):
        pi_c, pi_r = sequence_logprobs(model, batch).chunk(2)
        ref_c, ref_r = batch["ref"].chunk(2)
        loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta)
        rc, rr = rc.detach(), rr.detach()
        stats = {"reward_accuracy": float((rc > rr).float().mean()), "reward_margin": float((rc - rr).mean()),
                 "reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean())}
        if self.rpo_alpha > 0:
            # RPO (Pang et al. 2024): + α · NLL of the chosen reply per token. Pure DPO only pushes the
            # two replies apart and often lowers both likelihoods; this keeps the chosen one likely.
            n_c = batch["mask"].chunk(2)[0].sum(-1).clamp(min=1)
            nll = -(pi_c / n_c).mean()
            stats["chosen_nll"] = float(nll.detach())
            # the DPO part alone, the quantity the held-out loss measures (the report draws them together)
            stats["dpo_loss"] = float(loss.detach())
            loss = loss + self.rpo_alpha * nll
        return loss, stats

    def tokens(self, batch) -> int:
        return int(batch["mask"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.heldout:
            return {}
        acc = margin = loss = 0.0
        B = self.cfg.batch_size
        dev = next(model.parameters()).device
        for i in range(0, len(self.heldout), B):
            ex = self.heldout[i:i + B]
            b = {k: v.to(dev) for k, v in self._batch(ex).items()}
            pi_c, pi_r = sequence_logprobs(model, b).chunk(2)
            ref_c, ref_r = b["ref"].chunk(2)
            lo, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta)
            acc += float((rc > rr).sum())
            margin += float((rc - rr).sum())
            loss += float(lo) * len(ex)
        n = len(self.heldout)
        return {"heldout_loss": loss / n, "heldout_reward_accuracy": acc / n, "heldout_reward_margin": margin / n}


def run(cfg: TrainConfig, data: list[str], init: str, heldout: list[str] | None = None, beta: float = 0.1,
        skip_bad: bool = False, epochs: float | None = None, rpo_alpha: float = 0.0) -> dict:
    if rpo_alpha < 0:
        raise UserError("--rpo-alpha must be >= 0 (0 is plain DPO)")
    if beta <= 0:
        raise UserError("--beta must be > 0 (it scales the implicit reward; 0.1 is usual)")
    out = Path(cfg.out)
    model = load_model(init)
    ref = load_model(init).requires_grad_(False)
    tok = Tokenizer.load(init)
    max_len = min(cfg.seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len) + 1
    pairs, skipped = read_pairs(data, skip_bad)
    examples, dropped = encode_pairs(tok, pairs, max_len, skip_bad)
    held = []
    if heldout:
        held_pairs, _ = read_pairs(heldout, skip_bad)
        held, _ = encode_pairs(tok, held_pairs, max_len, skip_bad=True)
    print(f"dpo data: {len(examples)} pairs ({skipped} bad records and {dropped} too long skipped); "
          f"held-out: {len(held)}; beta {beta}", file=sys.stderr)
    world = runtime.world_size()
    steps_for_epochs(cfg, len(examples), epochs or 1.0)
    # the Trainer moves the model and picks the autocast dtype; the reference follows both
    trainer = Trainer(model, None, cfg, tokenizer_dir=init,
                      extra_config={"stage": "dpo", "beta": beta, "rpo_alpha": rpo_alpha})
    ref.to(trainer.device)
    trainer.stage = DPOStage(examples, held, ref, cfg, beta, tok.pad_id, world, rpo_alpha, amp=trainer.amp)
    summary = trainer.fit()
    summary["data"] = {"pairs": len(examples), "skipped_bad": skipped, "dropped_too_long": dropped,
                       "heldout": len(held), "beta": beta}
    if trainer.master:
        atomic.write_json(out / "train_summary.json", summary)
    return summary


def sample_pairs(model_dir: str, reward_model: str, prompts: list[str], out: str | os.PathLike,
                 limit: int = 1000, samples: int = 2, max_new_tokens: int = 48, temperature: float = 1.0,
                 seed: int = 0, min_margin: float = 0.0, quantize: str | None = None) -> dict:
    """On-policy pairs (DATA.md's "model samples ranked" recipe): `samples` replies of the model to
    each of the first `limit` prompts, scored by the reward model; the best and the worst reply form a
    pair (recipe "rm_ranked") when their scores differ by more than `min_margin`. DPO on such pairs
    optimises what the reward model prefers among what the policy actually says, where the built-in
    off-policy pairs only say what not to say. quantize: the engine's decode weights (None: fp32)."""
    if samples < 2:
        raise UserError("--samples must be at least 2: a pair needs two replies")
    records, _ = read_conversations(prompts, prompts=True)
    items = []
    for r in records[:limit]:
        msgs = r.messages[:-1] if r.messages[-1]["role"] == "assistant" else r.messages
        if msgs and msgs[-1]["role"] == "user":
            items.append(msgs)
    tok = Tokenizer.load(model_dir)
    model = load_model(model_dir)
    ctx = model.cfg.max_seq_len
    ids = [tok.render_chat(m, add_generation_prompt=True)[0] for m in items]
    keep = [i for i, x in enumerate(ids) if len(x) < ctx - 8]
    items, ids = [items[i] for i in keep], [ids[i] for i in keep]
    # one prefill per prompt for its `samples` replies
    outs = Engine(model, tok, quantize=quantize).generate_many(
        ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed), max_batch=64,
        n=samples)
    rm = load_reward_model(reward_model)
    texts = [c.text for c in outs]
    scores = rm.score([m + [{"role": "assistant", "content": t}]
                       for m, t in zip([m for m in items for _ in range(samples)], texts)])
    pairs = []
    for i, m in enumerate(items):
        group = sorted(zip(scores[i * samples:(i + 1) * samples], texts[i * samples:(i + 1) * samples]))
        (lo, worst), (hi, best) = group[0], group[-1]
        if hi - lo > min_margin and best.strip() and worst.strip() and best != worst:
            pairs.append({"prompt": m, "chosen": [{"role": "assistant", "content": best}],
                          "rejected": [{"role": "assistant", "content": worst}], "recipe": "rm_ranked",
                          "margin": round(hi - lo, 4)})
    atomic.write_jsonl(out, pairs)
    return {"prompts": len(items), "pairs": len(pairs), "samples": samples}


# --- the verbs ------------------------------------------------------------------------------------
DEFAULTS = dict(out="runs/dpo", lr=5e-5, warmup_steps=10, min_lr_ratio=0.0, eval_every=100, save_every=200,
                batch_size=8, weight_decay=0.0)


def add_arguments(p):
    p.add_argument("--data", nargs="+", required=True, help="preference JSONL (as for `reward`)")
    p.add_argument("--init", required=True, help="the policy to start from; also the frozen reference")
    p.add_argument("--heldout", nargs="+", help="held-out pairs: implicit-reward accuracy and margin")
    p.add_argument("--beta", type=float, default=0.1, help="KL strength: scale of the implicit reward")
    p.add_argument("--rpo-alpha", type=float, default=0.0, help="weight of an NLL term on the chosen reply "
                   "(RPO); 0 is plain DPO")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad or over-long pairs")
    p.add_argument("--epochs", type=float, default=None, help="passes over the pairs when neither --max-steps "
                   "nor --max-minutes is given (default: 1)")
    add_train_flags(p, DEFAULTS)


def main(a):
    summary = run(dataclass_from_args(TrainConfig, a), a.data, a.init, heldout=a.heldout, beta=a.beta,
                  skip_bad=a.skip_bad, epochs=a.epochs, rpo_alpha=a.rpo_alpha)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


def add_pairs_arguments(p):
    p.add_argument("--model", required=True, help="the policy whose replies are sampled (e.g. the SFT model)")
    p.add_argument("--reward-model", required=True, help="the reward model that ranks them")
    p.add_argument("--prompts", nargs="+", required=True, help="chat files; a trailing assistant turn is dropped")
    p.add_argument("--out", required=True, help="the pairs JSONL to write (TRL conversational format)")
    p.add_argument("--limit", type=int, default=1000, help="prompts used (the first N)")
    p.add_argument("--samples", type=int, default=2, help="replies per prompt; the best and worst form the pair")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest sampled reply (tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the replies")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")


def pairs_main(a):
    res = sample_pairs(a.model, a.reward_model, a.prompts, a.out, limit=a.limit, samples=a.samples,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    print(f"{res['pairs']} pairs from {res['prompts']} prompts written to {a.out}")


VERB = Verb("dpo", "direct preference optimization against a frozen reference", add_arguments, main)
PAIRS_VERB = Verb("data pairs", "on-policy preference pairs: a model's samples ranked by a reward model",
                  add_pairs_arguments, pairs_main)
