"""The one training loop, shared by every stage.

A stage is a small object with
    batch(step, micro, rank) -> dict of tensors     (deterministic in its arguments)
    loss(model, batch)       -> (loss tensor, {name: float})
    evaluate(model)          -> {name: float}        (optional)
    tokens(batch)            -> int                   (tokens in the batch, for tokens/s)
    state() / load_state(json_dict, tensors)          (optional: what the stage itself learns
                                                       as it goes, saved with each checkpoint)
and the trainer supplies everything else: AdamW, warmup + cosine/WSD schedule, gradient
accumulation and clipping, bf16 autocast, optional torch.compile, DDP under torchrun, a progress
line, metrics.jsonl, atomic checkpoints every N steps (last K kept), exact resume and a time budget.

Exact resume rests on three facts: batches are a pure function of (seed, step, rank); the optimizer
moments, step and RNG states are checkpointed; and the schedule length is fixed once (fitted to the
time budget in the first steps, then stored). A resumed run therefore repeats the uninterrupted
run's arithmetic bit for bit on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from chatsmith import atomic, runtime
from chatsmith.checkpoint import (list_checkpoints, load_hf_weights, load_tensors, prune_checkpoints, publish,
                                  save_checkpoint)
from chatsmith.config import TrainConfig
from chatsmith.errors import UserError
from chatsmith.model import registry
from chatsmith.model.lora import apply_lora_from_config, load_adapter_state_dict, summary as lora_summary
from chatsmith.train import optim
from chatsmith.train.optim import full_tensor, load_optimizer_tensors, lr_at, optimizer_tensors

FIT_AFTER = 5  # steps timed before the schedule is fitted to --max-minutes


def steps_for_epochs(cfg: TrainConfig, n_examples: int, epochs: float):
    """--epochs as a step count, when neither --max-steps nor --max-minutes is given: passes over
    n_examples at the global batch (batch size x accumulation x processes)."""
    if cfg.max_steps is None and cfg.max_minutes is None:
        per_step = cfg.batch_size * cfg.grad_accum * runtime.world_size()
        cfg.max_steps = max(1, int(epochs * n_examples / per_step))


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Trainer:
    def __init__(self, model, stage, cfg: TrainConfig, tokenizer_dir=None, extra_config: dict | None = None):
        self.cfg, self.stage = cfg, stage
        self.out = Path(cfg.out)
        self.tokenizer_dir = tokenizer_dir
        self.extra_config = extra_config or {}
        # torchrun sets these; a plain `python` run is world size 1
        self.world, self.rank = runtime.world_size(), runtime.rank()
        self.device = runtime.resolve_device(cfg.device)
        runtime.init_distributed(cfg.device)
        self.fsdp = bool(getattr(cfg, "fsdp", False)) and self.world > 1
        if self.fsdp and cfg.lora_rank > 0:
            raise UserError("--fsdp with --lora-rank is not supported: LoRA trains few weights, use plain DDP")
        if cfg.fsdp and cfg.optimizer == "muon":
            raise UserError("--fsdp with --optimizer muon is not supported: Muon needs each whole matrix; use DDP")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.master = self.rank == 0
        self.amp = runtime.autocast_dtype(cfg.dtype, self.device)
        if cfg.lora_rank > 0:  # freeze the model, add adapters: the optimizer below sees only those
            apply_lora_from_config(model, cfg)
        self.model = model.to(self.device)
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.max_steps = cfg.max_steps
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # training seconds spent by earlier (resumed-from) runs
        self.last_eval: dict = {}

    # --- setup ------------------------------------------------------------------------------
    def _make_optimizer(self, fused: bool = True):
        return optim.make_optimizer(self.model, self.cfg, self.device, fused=fused)

    def log(self, *a, **k):
        if self.master:
            print(*a, **k, file=sys.stderr, flush=True)

    def _metric(self, row: dict):
        if self.master:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.cfg.tensorboard:
                self._tensorboard_row(row)

    def _tensorboard_row(self, row: dict):
        """The same row as TensorBoard scalars (tag = metrics.jsonl key), rank 0 only."""
        if getattr(self, "_tb", None) is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard, protobuf): --tensorboard only

            # purge_step: a resumed run drops the events the killed run logged after its checkpoint,
            # as _truncate_metrics does for metrics.jsonl
            self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step if self.cfg.resume else None)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._tb.add_scalar(k, v, row["step"])
        self._tb.flush()

    # --- checkpoint state -------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            t["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        t.update(optimizer_tensors(self.optimizer, "optim"))
        if hasattr(self.stage, "state"):
            t.update({f"stage.{k}": v.detach().cpu().clone() for k, v in self.stage.state()[1].items()})
        return t

    def _trainer_state(self) -> dict:
        return {"step": self.step, "max_steps": self.max_steps, "tokens_seen": self.tokens_seen,
                "elapsed_seconds": round(self.elapsed_before + self._run_seconds(), 3),
                "world_size": self.world, "stage": getattr(self.stage, "name", "train"),
                "last_eval": self.last_eval, "train_config": asdict(self.cfg),
                **({"stage_state": self.stage.state()[0]} if hasattr(self.stage, "state") else {})}

    def save(self):
        """Everyone reaches here; only rank 0 writes (under FSDP every rank first helps gather)."""
        model, tensors = self.unwrapped, None
        if self.fsdp:
            sd = {k: full_tensor(v).cpu() for k, v in self.unwrapped.state_dict().items()}
            tensors = self._state_tensors()
            if self.master:  # a CPU model around the gathered weights, for the checkpoint writer
                with torch.device("meta"):
                    model = registry.build(self.unwrapped.cfg)
                model.load_state_dict(sd, strict=True, assign=True)
        if self.master:
            path = self.out / "checkpoints" / f"step-{self.step:08d}"
            save_checkpoint(path, model, self.tokenizer_dir, self._trainer_state(),
                            tensors if tensors is not None else self._state_tensors(), self.extra_config)
            prune_checkpoints(self.out, self.cfg.keep_last)
        if self.world > 1:
            dist.barrier()

    def _try_resume(self) -> bool:
        """Load the newest readable checkpoint under out/checkpoints; corrupt ones are skipped."""
        for ckpt in reversed(list_checkpoints(self.out)):
            if (ckpt / "adapter_config.json").exists() != (self.cfg.lora_rank > 0):
                raise UserError(f"{ckpt} was trained {'with' if self.cfg.lora_rank == 0 else 'without'} LoRA: "
                                f"resume with the --lora-* flags of that run")
            try:
                state = json.loads((ckpt / "trainer_state.json").read_text())
                # with LoRA a checkpoint holds the adapters alone; the frozen base is already loaded
                weights = load_tensors(ckpt / ("adapter_model.safetensors" if self.cfg.lora_rank > 0
                                               else "model.safetensors"))
                tensors = load_tensors(ckpt / "optimizer.safetensors")
            except (OSError, json.JSONDecodeError, UserError) as e:
                self.log(f"warning: checkpoint {ckpt} is unreadable ({e}); trying an older one")
                continue
            if self.cfg.lora_rank > 0:
                load_adapter_state_dict(self.unwrapped, weights, where=str(ckpt / "adapter_model.safetensors"))
            else:
                load_hf_weights(self.unwrapped, weights)
            load_optimizer_tensors(self.optimizer, tensors, "optim", self.device)
            torch.set_rng_state(tensors["rng.torch"])
            if "rng.cuda" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            self.step = state["step"]
            self.max_steps = state["max_steps"] if self.cfg.max_steps is None else self.cfg.max_steps
            self.tokens_seen = state["tokens_seen"]
            self.elapsed_before = state["elapsed_seconds"]
            self.last_eval = state.get("last_eval", {})
            if hasattr(self.stage, "load_state"):
                self.stage.load_state(state.get("stage_state", {}),
                                      {k[6:]: v for k, v in tensors.items() if k.startswith("stage.")})
            self._truncate_metrics(self.step)
            self.log(f"resumed from {ckpt} at step {self.step}")
            return True
        return False

    def _truncate_metrics(self, step: int):
        """Drop log rows the killed run wrote after its last checkpoint: they are about to be redone."""
        f = self.out / "metrics.jsonl"
        if not (self.master and f.exists()):
            return
        keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic.write_text(f, "".join(ln + "\n" for ln in keep))

    def _fit_schedule(self, per_step: float, budget: float):
        per_step *= 1 + 0.35 * self.cfg.eval_batches / self.cfg.eval_every  # room for evals still to come
        left = budget - self.elapsed_before - self._run_seconds() - 2 * per_step
        new = self.step + max(1, int(left / per_step))
        if self.world > 1:  # every rank must agree on the schedule
            t = torch.tensor([new], device=self.device)
            dist.broadcast(t, 0)
            new = int(t.item())
        if self.max_steps is None or abs(new - self.max_steps) > 0.02 * self.max_steps:
            self.log(f"time budget {self.cfg.max_minutes:.3g} min: {per_step:.3f}s/step -> {new} steps")
            self.max_steps = new

    # --- FSDP ---------------------------------------------------------------------------------
    def _shard(self):
        """FSDP2 (fully_shard): each of the model's blocks(), then the rest (embeddings, heads, norms), keep
        1/world of every weight, gradient and optimizer moment; weights are all-gathered per block
        for compute. The optimizer is rebuilt over the sharded parameters, and moments restored by
        --resume (full tensors, loaded before sharding) are sharded the same way."""
        # only FSDP runs need these (and they pull in much of torch.distributed)
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        # the decoder's forward returns logits as a view; nothing here writes into it in place,
        # which is what FSDP's warning about returned views is about
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        old = self.optimizer.state_dict()["state"]
        for block in self.unwrapped.blocks():
            fully_shard(block)
        fully_shard(self.unwrapped)
        self.optimizer = self._make_optimizer(fused=False)  # fused AdamW takes no DTensors
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, st in old.items():
            p = params[i]
            self.optimizer.state[p] = {k: distribute_tensor(v.to(self.device), p.device_mesh, p.placements)
                                       if k != "step" else v for k, v in st.items()}
        return self.unwrapped

    def _unshard(self):
        """Swap the sharded model for a plain one holding the gathered weights (every rank), so code
        after fit (evaluations, generation on rank 0 alone) needs no collectives."""
        sd = {k: full_tensor(v) for k, v in self.unwrapped.state_dict().items()}
        plain = registry.build(self.unwrapped.cfg).to(self.device)
        plain.load_state_dict(sd, strict=True)
        plain.tie_weights()
        self.unwrapped = self.model = plain.eval()

    # --- the loop ---------------------------------------------------------------------------
    def _run_seconds(self) -> float:
        return time.time() - self.t_start

    def _autocast(self):
        return optim.autocast(self.amp, self.device)

    def evaluate(self) -> dict:
        fn = getattr(self.stage, "evaluate", None)
        if fn is None:
            return {}
        self.unwrapped.eval()
        with torch.no_grad(), self._autocast():
            res = fn(self.unwrapped)
        self.model.train()
        if self.world > 1:  # every rank evaluated the same windows; nothing to reduce
            pass
        self.last_eval = res
        return res

    def fit(self):
        cfg = self.cfg
        if self.device.type == "cpu":
            runtime.keep_freed_memory()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.master:  # a killed run's half-written checkpoint (or file) is never resumed from: drop it
            atomic.remove_stale_temporaries(self.out)
        self.unwrapped = self.model
        self.t_start = time.time()
        if cfg.resume:
            if not self._try_resume():
                self.log(f"--resume: no checkpoint under {self.out / 'checkpoints'}; starting fresh")
        elif list_checkpoints(self.out):
            raise UserError(f"{self.out} already holds checkpoints: pass --resume to continue that run, "
                            f"or choose another --out")
        if self.step == 0 and self.master:  # a fresh start, also a --resume that found no checkpoint
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.step == 0:  # dropout RNG; a resumed run restored its RNG state instead
            torch.manual_seed(cfg.seed + self.rank)
        start_step = self.step
        model = self.model
        if self.fsdp:
            model = self._shard()
        elif self.world > 1:
            # a model with several heads trains only one of them in most stages (reward: score,
            # SFT: lm_head): DDP must then look for parameters that got no gradient
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                        find_unused_parameters=len(self.unwrapped.heads) > 1)
        if cfg.compile:
            model = torch.compile(model)
        self.model = model
        model.train()
        n_params = sum(p.numel() for p in self.unwrapped.parameters())
        if cfg.lora_rank > 0:
            self.log(lora_summary(self.unwrapped))
        self.log(f"training {getattr(self.stage, 'name', 'model')}: {n_params / 1e6:.2f}M parameters on "
                 f"{self.device}{' x' + str(self.world) if self.world > 1 else ''}, "
                 f"{'bf16 autocast' if self.amp else 'fp32'}{', compiled' if cfg.compile else ''}")
        if self.max_steps is None and cfg.max_minutes is None:
            self.max_steps = 1000
        # with --max-minutes and no --max-steps the schedule length is fitted to the budget
        self._auto_steps = cfg.max_minutes is not None and cfg.max_steps is None
        budget = cfg.max_minutes * 60 if cfg.max_minutes else None
        self.t_start = time.time()
        t_fit, fit_step = None, 0
        tok_window, t_window = 0, time.time()
        interrupted = stopped_by_budget = False
        try:
            while self.max_steps is None or self.step < self.max_steps:
                lr = lr_at(self.step, cfg, self.max_steps or 10**9)
                optim.set_lr(self.optimizer, lr)
                loss_sum, stats_sum, n_tok = 0.0, {}, 0
                for micro in range(cfg.grad_accum):
                    batch = self.stage.batch(self.step, micro, self.rank)
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    sync = micro == cfg.grad_accum - 1 or self.world == 1
                    if self.fsdp:  # FSDP2: reduce-scatter gradients only after the last micro-batch
                        model.set_requires_gradient_sync(sync)
                    ctx = contextlib.nullcontext() if sync or self.fsdp else model.no_sync()
                    with ctx, self._autocast():
                        loss, stats = self.stage.loss(model, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss became {loss.item()} at step {self.step}: lower --lr "
                                                 f"or check the data; the last checkpoint is intact")
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item() / cfg.grad_accum
                    for k, v in stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.grad_accum
                    n_tok += self.stage.tokens(batch)
                gnorm = optim.clip_gradients(self.unwrapped.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                n_tok *= self.world
                self.tokens_seen += n_tok
                tok_window += n_tok
                if self.world > 1:  # report the global mean loss and stats (same keys on every rank)
                    keys = sorted(stats_sum)
                    t = torch.tensor([loss_sum, *(stats_sum[k] for k in keys)], dtype=torch.float64,
                                     device=self.device)
                    dist.all_reduce(t)
                    t = (t / self.world).tolist()
                    loss_sum, stats_sum = t[0], dict(zip(keys, t[1:]))
                # fit the schedule to the time budget once the step time is known, then refit at
                # every log step until the last 5% (timings drift: other processes, evals), so the
                # schedule ends inside the budget instead of being cut off before it decays
                if budget and self.step == start_step + 1:
                    t_fit, fit_step = time.time(), self.step  # first step carries one-off costs
                elif budget and self._auto_steps and (self.step == fit_step + FIT_AFTER or (
                        self.max_steps is not None and self.step > fit_step + FIT_AFTER
                        and self.step % cfg.log_every == 0 and self.step < 0.95 * self.max_steps)):
                    self._fit_schedule((time.time() - t_fit) / (self.step - fit_step), budget)
                row = {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": float(gnorm),
                       "tokens": self.tokens_seen, **stats_sum}
                if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                    now = time.time()
                    tps = tok_window / max(now - t_window, 1e-9)
                    tok_window, t_window = 0, now
                    el = self._run_seconds()
                    row.update(tok_per_s=round(tps, 1), elapsed=round(self.elapsed_before + el, 2))
                    self._metric(row)
                    eta = ""
                    if self.max_steps:
                        done_here = self.step - start_step
                        eta = f" | ETA {fmt_time(el / max(done_here, 1) * (self.max_steps - self.step))}"
                    # a stage may name stats worth the progress line (RL: reward, KL, reply length)
                    shown = "".join(f" | {k} {row[k]:.3g}" for k in getattr(self.stage, "show", ()) if k in row)
                    self.log(f"step {self.step}/{self.max_steps or '?'} | loss {loss_sum:.4f}{shown} | lr {lr:.2e} | "
                             f"{tps / 1e3:.2f}k tok/s | {fmt_time(self.elapsed_before + el)}{eta}")
                last = self.step == self.max_steps
                if self.step % cfg.eval_every == 0 or last:
                    res = self.evaluate()
                    if res:
                        self._metric({"step": self.step, **res})
                        self.log("eval step {} | {}".format(self.step, " | ".join(
                            f"{k} {v:.4f}" for k, v in res.items())))
                over = bool(budget) and self.elapsed_before + self._run_seconds() > budget
                if budget and self.world > 1:  # rank 0's clock decides, or the ranks would part ways
                    t = torch.tensor([int(over)], device=self.device)
                    dist.broadcast(t, 0)
                    over = bool(t.item())
                if over and not last:
                    stopped_by_budget = True
                    if self.step % cfg.log_every:  # the last step still gets its row (report, curves)
                        self._metric({**row, "elapsed": round(self.elapsed_before + self._run_seconds(), 2)})
                    self.log(f"time budget of {cfg.max_minutes:.3g} min reached at step {self.step}")
                    break
                if self.step % cfg.save_every == 0 and not last:
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
            self.log(f"\ninterrupted at step {self.step}: saving a checkpoint (resume with --resume)")
        if stopped_by_budget:
            res = self.evaluate()
            if res and self.step % cfg.eval_every:  # (an eval row at this step exists already)
                self._metric({"step": self.step, **res})
            self.last_eval = res or self.last_eval
        self.save()
        if self.fsdp:
            self._unshard()
        if self.master:
            ckpt = list_checkpoints(self.out)[-1]
            publish(ckpt, self.out, names=[p.name for p in ckpt.iterdir() if p.name != "optimizer.safetensors"])
        summary = {"steps": self.step, "max_steps": self.max_steps, "tokens": self.tokens_seen,
                   "seconds": round(self.elapsed_before + self._run_seconds(), 1),
                   "interrupted": interrupted, **self.last_eval}
        if self.master:
            atomic.write_json(self.out / "train_summary.json", summary)
        if getattr(self, "_tb", None) is not None:
            self._tb.close()
            self._tb = None
        if interrupted:
            raise KeyboardInterrupt
        return summary
