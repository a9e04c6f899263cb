#!/usr/bin/env python
"""LoRA vs full fine-tuning: peak memory (RSS) and step time, on any chatsmith model directory.

Each configuration runs in a fresh subprocess, so its peak resident set size (getrusage's
ru_maxrss: what the OS actually had to give the process -- tracemalloc does not see PyTorch's
allocations) is its own. A subprocess loads the model, builds chatsmith's Trainer (which applies
LoRA when --lora-rank > 0 and builds the fused AdamW over the trainable parameters), then runs the
trainer's step -- forward with targets, backward, gradient clipping, optimizer step -- on random
tokens. Reported per configuration:

    trainable     parameters the optimizer updates
    load MB       RSS after loading the model (the weights themselves)
    peak MB       peak RSS over the run: weights + gradients + AdamW moments + activations
    train MB      peak - load: what training adds on top of holding the model
    s/step        median over the timed steps (the first --warmup steps are not timed)

    python bench/lora_memory.py                                # a random-init `small` model (28M)
    python bench/lora_memory.py --model runs/smollm2 --seq-len 256 --batch-size 4
    python bench/lora_memory.py --model DIR --configs full,lora8,lora8-qv --json out.json
    python bench/lora_memory.py --device cuda                  # peak CUDA memory instead of RSS

Configurations: `full` (every weight), `loraR` (rank R on all-linear, e.g. lora8, lora16),
`loraR-qv` (rank R on q_proj,v_proj only, the paper's main setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    """Current RSS from /proc (Linux); ru_maxrss only gives the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def reset_peak_rss() -> bool:
    """Linux: restart the peak-RSS counter (VmHWM), so loading the model (which briefly holds the
    file's tensors and a freshly initialised copy) does not count as training memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


# glibc keeps freed blocks below a threshold that grows with the biggest block freed so far, so by
# default peak RSS also counts the allocator's leftovers (it grows step after step). A fixed mmap
# threshold hands every big tensor back to the OS when freed: RSS then tracks live memory.
# --malloc-default measures with glibc's defaults instead.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def parse_config(name: str) -> dict:
    if name == "full":
        return {"lora_rank": 0}
    m = re.fullmatch(r"lora(\d+)(-qv)?", name)
    if not m:
        raise SystemExit(f"unknown config {name!r}: full, loraR or loraR-qv (e.g. lora8, lora8-qv)")
    return {"lora_rank": int(m.group(1)), "lora_alpha": 2.0 * int(m.group(1)),
            "lora_targets": "q_proj,v_proj" if m.group(2) else "all-linear"}


class RandomTokens:
    """A stage for the trainer: random token windows (the cost of a step does not depend on the text)."""

    name = "bench"

    def __init__(self, vocab: int, batch: int, seq: int):
        self.vocab, self.batch_size, self.seq = vocab, batch, seq

    def batch(self, step, micro, rank):
        import torch

        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, self.vocab, (self.batch_size, self.seq + 1), generator=g)
        return {"x": ids[:, :-1], "y": ids[:, 1:]}

    def loss(self, model, batch):
        _, loss = model(batch["x"], batch["y"])
        return loss, {}

    def tokens(self, batch):
        return batch["y"].numel()


def worker(a) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from chatsmith.checkpoint import load_model
    from chatsmith.config import TrainConfig
    from chatsmith.train.trainer import Trainer

    torch.manual_seed(0)
    rss0 = rss_mb()
    model = load_model(a.model)
    cuda = a.device == "cuda"
    cfg = TrainConfig(out=tempfile.mkdtemp(prefix="lora-bench-"), batch_size=a.batch_size, lr=1e-4,
                      warmup_steps=1, device=a.device, dtype=a.dtype, **parse_config(a.config))
    stage = RandomTokens(model.cfg.vocab_size, a.batch_size, a.seq_len)
    trainer = Trainer(model, stage, cfg)
    model = trainer.model
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    hwm_reset = cuda or reset_peak_rss()
    model.train()
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        batch = {k: v.to(trainer.device) for k, v in stage.batch(step, 0, 0).items()}
        with trainer._autocast():
            loss, _ = stage.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"config": a.config, "params": n_all, "trainable": n_train, "rss_before_load_mb": round(rss0, 1),
            "load_mb": round(load, 1), "peak_mb": round(peak, 1), "train_mb": round(peak - load, 1),
            "s_per_step": round(statistics.median(times), 4), "final_loss": round(loss.item(), 4),
            "memory": "cuda allocated" if cuda else "process RSS",
            "peak_includes_load": not hwm_reset, "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ}}


def default_model(d: Path, preset_name: str) -> Path:
    """A random-init chatsmith model directory (no tokenizer needed: the bench feeds random ids)."""
    from chatsmith.checkpoint import save_checkpoint
    from chatsmith.model.registry import preset
    from chatsmith.model.decoder import GPT

    import torch

    torch.manual_seed(0)
    out = d / preset_name
    save_checkpoint(out, GPT(preset(preset_name, vocab_size=8192)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: a random-init --preset model)")
    p.add_argument("--preset", default="small", help="shape of the default random-init model")
    p.add_argument("--configs", default="full,lora8,lora8-qv")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--malloc-default", action="store_true", help="measure under glibc's default malloc "
                   "settings (peak RSS then includes freed memory glibc keeps; see MALLOC_ENV)")
    p.add_argument("--config", help=argparse.SUPPRESS)  # worker mode: run one configuration
    a = p.parse_args()
    if a.config:
        print(json.dumps(worker(a)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or str(default_model(Path(tmp), a.preset))
        rows = []
        for c in a.configs.split(","):
            cmd = [sys.executable, __file__, "--model", model, "--config", c, "--batch-size", str(a.batch_size),
                   "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--device", a.device, "--dtype", a.dtype]
            env = os.environ if a.malloc_default else {**os.environ, **MALLOC_ENV}
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{c} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"  {c}: done", file=sys.stderr)
    full = next((r for r in rows if r["config"] == "full"), None)
    print(f"\nmodel {a.model or 'random-init ' + a.preset} ({rows[0]['params'] / 1e6:.1f}M parameters), "
          f"batch {a.batch_size} x {a.seq_len} tokens, {a.device} {a.dtype}, "
          f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}; memory = {rows[0]['memory']}"
          f"{' (glibc default malloc)' if a.malloc_default else ''}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'config':10s} {'trainable':>12s} {'load MB':>9s} {'peak MB':>9s} {'train MB':>9s} {'s/step':>8s}"
          f"{'  vs full (train MB, s/step)' if full else ''}")
    for r in rows:
        vs = ""
        if full and r is not full:
            vs = f"  {r['train_mb'] / full['train_mb']:.2f}x, {r['s_per_step'] / full['s_per_step']:.2f}x"
        print(f"{r['config']:10s} {r['trainable']:>12,d} {r['load_mb']:>9.0f} {r['peak_mb']:>9.0f} "
              f"{r['train_mb']:>9.0f} {r['s_per_step']:>8.3f}{vs}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "config"},
                                            "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
