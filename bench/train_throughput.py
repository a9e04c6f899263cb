#!/usr/bin/env python
"""Training throughput: chatsmith's GPT vs transformers' LlamaForCausalLM, same shapes, same data.

Both models start from the same weights (chatsmith's, copied into the HF model: the state-dict
names match) and train with the same plain loop -- forward with targets, backward, fused AdamW
step -- on the same random tokens, in up to four configurations:

    fp32           eager, fp32
    bf16           eager, bf16 autocast (weights stay fp32, as in chatsmith's trainer)
    fp32-compiled  torch.compile(model), fp32
    bf16-compiled  torch.compile(model), bf16 autocast

The reference runs as transformers recommends for training: SDPA attention, use_cache=False,
its own loss (`labels=`, with `shift_labels=` carrying the same already-shifted targets chatsmith
gets). Before timing, the two models' first-step losses must agree (1e-4 fp32, 3e-2 bf16).

Timed steps alternate between the two models, so drift of the machine hits both alike, and tok/s
comes from the median step. The 'busy' column is the largest share of the CPUs that *other*
processes used during a timed step: above 5% (or with steps spread over 10%) the numbers are
flagged as noisy. Reported: tokens/s per model and configuration, the ratio of chatsmith's best
configuration to the reference's best, and MFU = (6*N + 12*L*d*T) * tokens/s against matmul peaks
measured in the same run with square matmuls (N = parameters that take part in matmuls, lm_head
included, the embedding lookup not; 12*L*d*T is the attention score/value FLOPs per token, PaLM's
convention, counted as if not causal). Each configuration's MFU is against the peak of its matmul
dtype; on a CPU without native bf16 the bf16 "peak" is an emulated rate that bf16 runs sit at.

    python bench/train_throughput.py                       # tiny preset, 16x256, all four configs
    python bench/train_throughput.py --configs fp32,fp32-compiled --steps 10 --json out.json
    python bench/train_throughput.py --profile fp32        # op table for a couple of eager steps
    python bench/train_throughput.py --malloc-keep         # glibc keeps freed memory (see --help)
    python bench/train_throughput.py --device cuda --configs fp32,bf16-compiled
    python bench/train_throughput.py --configs fp32 --models chatsmith --cli-steps 30   # trainer overhead

--cli-steps N also runs `chatsmith pretrain` (the CLI: data loader, schedule, gradient clipping, logging,
metrics.jsonl) for N steps on the same shape, batch and thread count, on a syllable-soup corpus with an
8k BPE, and compares the median tok/s of its logged steps (each step's own window) with the bare loop's
fp32 median from this run: the trainer's own overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatsmith.model.registry import preset, presets  # noqa: E402
from chatsmith.model.decoder import GPT  # noqa: E402

CONFIGS = {  # name -> (autocast dtype or None, compiled)
    "fp32": (None, False),
    "bf16": (torch.bfloat16, False),
    "fp32-compiled": (None, True),
    "bf16-compiled": (torch.bfloat16, True),
}
MODELS = ("chatsmith", "reference")
LOSS_TOL = {None: 1e-4, torch.bfloat16: 3e-2}  # |first-step loss difference| allowed
# A run is flagged noisy past these: two busy threads on two cores stall at every barrier when a
# third process takes even a few percent of the machine.
NOISY_BUSY, NOISY_SPREAD = 0.05, 0.10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=presets())
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's context length")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per model and config (>= 1; default 1 eager, 2 compiled)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model and config")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of chatsmith, reference")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs available)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--peak-sizes", default="1024,2048",
                   help="comma list of n: the peaks are the best n x n matmul rate over these sizes")
    p.add_argument("--no-peaks", action="store_true", help="skip the matmul peaks (no MFU)")
    p.add_argument("--explain", action="store_true",
                   help="report torch._dynamo.explain graph/graph-break counts for each model")
    p.add_argument("--profile", default=None, metavar="CONFIG",
                   help="after the benchmark, profile 2 steps of each model in CONFIG and print op tables")
    p.add_argument("--malloc-keep", action="store_true",
                   help="re-run under glibc settings that keep freed memory (MALLOC_MMAP_MAX_=0, "
                        "MALLOC_TRIM_THRESHOLD_=huge): no page faults on the big per-step tensors")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here as JSON")
    p.add_argument("--cli-steps", type=int, default=0, metavar="N",
                   help="also time `chatsmith pretrain` for N steps (its overhead over the bare loop)")
    a = p.parse_args(argv)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for c in a.configs + ([a.profile] if a.profile else []):
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if (a.warmup is not None and a.warmup < 1) or a.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return a


# --- models -----------------------------------------------------------------------------------
def build_reference(cfg, state_dict):
    """transformers' LlamaForCausalLM from chatsmith's config, holding chatsmith's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "torch_dtype"})
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "HF model did not tie lm_head"
    return model


def build(name, cfg, state_dict, device="cpu"):
    if name == "chatsmith":
        model = GPT(cfg)
        model.load_state_dict(state_dict)
    else:
        model = build_reference(cfg, state_dict)
    return model.to(device).train()


def loss_fn(name):
    """(model, x, y) -> mean next-token cross-entropy, each model on its own native loss path."""
    if name == "chatsmith":
        return lambda model, x, y: model(x, y)[1]
    # HF shifts `labels` itself; shift_labels hands it our already-shifted targets instead
    return lambda model, x, y: model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def matmul_params(model) -> int:
    """Parameters that take part in a matmul (every nn.Linear weight; a tied lm_head counts once)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


class Runner:
    """One model in one configuration: its own weights (a fresh copy), optimizer and step function."""

    def __init__(self, name, cfg, state_dict, amp, compiled, lr, device):
        self.name, self.amp, self.device = name, amp, torch.device(device)
        self.model = build(name, cfg, state_dict, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.1, fused=True)
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.loss = loss_fn(name)
        self.times: list[float] = []
        self.foreign: list[float] = []  # other processes' CPU share during each timed step
        self.last_foreign = None
        self.first_loss = None
        self.first_step_s = None

    def step(self, x, y) -> float:
        s0 = _cpu_snapshot()
        t0 = time.perf_counter()
        ctx = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
               else contextlib.nullcontext())
        with ctx:
            loss = self.loss(self.fwd, x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        v = loss.item()
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.last_foreign = foreign_load(s0, _cpu_snapshot(), dt)
        if self.first_loss is None:
            self.first_loss, self.first_step_s = v, dt
        return dt


# --- machine -----------------------------------------------------------------------------------
def _cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def foreign_load(s0, s1, wall: float) -> float | None:
    """Share of the machine's CPUs that other processes kept busy between two snapshots."""
    if s0 is None or s1 is None or wall <= 0:
        return None
    return max(0.0, (s1[0] - s0[0]) - (s1[1] - s0[1])) / (wall * (os.cpu_count() or 1))


# --- peaks --------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak(n: int, dtype, reps: int, device) -> float:
    """Best-of-reps FLOP/s of an (n x n) @ (n x n) matmul."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# --- main ---------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def main(argv=None):
    a = parse_args(argv)
    if a.malloc_keep and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads these at start-up only, so start again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    import transformers

    cfg = preset(a.preset, vocab_size=a.vocab_size)
    T = a.seq_len or cfg.max_seq_len
    if T > cfg.max_seq_len:
        raise SystemExit(f"--seq-len {T} exceeds the preset's context of {cfg.max_seq_len}")
    B = a.batch_size
    if cfg.arch != "llama" and "reference" in a.models:
        raise SystemExit(f"the reference is LlamaForCausalLM; preset {a.preset} is {cfg.arch}-shaped "
                         f"(run it with --models chatsmith)")
    torch.manual_seed(a.seed)
    base = GPT(cfg)
    init = {k: v.detach().clone() for k, v in base.state_dict().items()}
    n_params = sum(p.numel() for p in base.parameters())
    n_mm = matmul_params(base)
    del base
    attn_per_tok = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
    flops_per_tok = 6 * n_mm + attn_per_tok

    def warmup_for(cname):
        return a.warmup if a.warmup is not None else (2 if CONFIGS[cname][1] else 1)

    n_data = max(warmup_for(c) for c in a.configs) + a.steps
    g = torch.Generator().manual_seed(a.seed)
    data = torch.randint(0, cfg.vocab_size, (n_data, B, T + 1), generator=g).to(a.device)

    s0, t0 = _cpu_snapshot(), time.perf_counter()
    time.sleep(0.5)
    bg = foreign_load(s0, _cpu_snapshot(), time.perf_counter() - t0)
    dev_name = cpu_name() if torch.device(a.device).type == "cpu" else (
        torch.cuda.get_device_name(a.device) if torch.device(a.device).type == "cuda" else a.device)
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | {dev_name} | "
          f"{os.cpu_count()} CPUs | torch threads {torch.get_num_threads()} "
          f"(interop {torch.get_num_interop_threads()})")
    print(f"background CPU use before start: {'-' if bg is None else f'{100 * bg:.0f}%'} | malloc: "
          + (" ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "glibc defaults"))
    print(f"model: preset {a.preset}, {cfg.arch}, d={cfg.d_model}, layers={cfg.n_layer}, heads={cfg.n_head}"
          f"/{cfg.n_kv_head}, d_ff={cfg.d_ff}, vocab={cfg.vocab_size}, tied={cfg.tie_embeddings}: "
          f"{n_params / 1e6:.2f}M params, {n_mm / 1e6:.2f}M in matmuls")
    warm = a.warmup if a.warmup is not None else "1 (eager) / 2 (compiled)"
    print(f"batch {B}x{T} = {B * T} tokens/step | {flops_per_tok / 1e6:.1f} MFLOP/token "
          f"(6N {6 * n_mm / 1e6:.1f} + attention {attn_per_tok / 1e6:.1f}) | {warm} warmup + {a.steps} "
          f"timed steps per model and config,\ntimed steps alternate between the models; tok/s from the "
          f"median step; '1st step' includes compilation; 'busy': other processes' peak CPU share")

    peaks = {}
    if not a.no_peaks:
        t0 = time.perf_counter()
        sizes = [int(n) for n in a.peak_sizes.split(",") if n.strip()]
        peaks["fp32"] = max(matmul_peak(n, torch.float32, 4, a.device) for n in sizes)
        peaks["bf16"] = max(matmul_peak(n, torch.bfloat16, 3, a.device) for n in sizes)
        print(f"matmul peaks (best of n x n, n in {sizes}; {time.perf_counter() - t0:.1f}s): "
              f"fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s | bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")

    if a.explain:
        explain(cfg, init, a.models, data[0, :, :-1].contiguous(), data[0, :, 1:].contiguous(), a.device)

    results, failures, noisy = [], [], []
    print(f"\n{'config':<14} {'model':<10} {'tok/s':>8} {'step s':>7} {'±':>6} {'1st step':>9} "
          f"{'GFLOP/s':>8} {'MFU':>6} {'1st loss':>9} {'busy':>5}")
    for cname in a.configs:
        amp, compiled = CONFIGS[cname]
        torch._dynamo.reset()
        runners = [Runner(m, cfg, init, amp, compiled, a.lr, a.device) for m in a.models]
        n_warm = warmup_for(cname)
        for i in range(n_warm + a.steps):
            x, y = data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous()
            for r in runners if i % 2 == 0 else runners[::-1]:  # alternate who goes first
                dt = r.step(x, y)
                if i >= n_warm:
                    r.times.append(dt)
                    if r.last_foreign is not None:
                        r.foreign.append(r.last_foreign)
        peak = peaks.get("bf16" if amp is not None else "fp32")
        for r in runners:
            tok_s = B * T / statistics.median(r.times)
            flops = flops_per_tok * tok_s
            row = {"config": cname, "model": r.name, "tok_per_s": tok_s,
                   "tok_per_s_mean": B * T * len(r.times) / sum(r.times),
                   "step_s_median": statistics.median(r.times), "step_s_mean": statistics.mean(r.times),
                   "step_s_stdev": statistics.stdev(r.times) if len(r.times) > 1 else 0.0,
                   "step_s": r.times, "first_step_s": r.first_step_s, "first_loss": r.first_loss,
                   "flops_per_s": flops, "mfu": flops / peak if peak else None,
                   "mfu_vs_fp32_peak": flops / peaks["fp32"] if peaks else None,
                   "mfu_vs_bf16_peak": flops / peaks["bf16"] if peaks else None,
                   "background_cpu_max": max(r.foreign) if r.foreign else None}
            results.append(row)
            mfu = f"{100 * row['mfu']:5.1f}%" if peak else "    -"
            print(f"{cname:<14} {r.name:<10} {tok_s:8.0f} {row['step_s_median']:7.3f} "
                  f"{row['step_s_stdev']:6.3f} {r.first_step_s:8.2f}s {flops / 1e9:8.1f} {mfu} "
                  f"{r.first_loss:9.5f} "
                  f"{'%4.0f%%' % (100 * max(r.foreign)) if r.foreign else '    -'}")
            busy = max(r.foreign) if r.foreign else 0.0
            if busy > NOISY_BUSY or row["step_s_stdev"] > NOISY_SPREAD * row["step_s_median"]:
                noisy.append(f"{cname}/{r.name}")
        if len(runners) == 2:
            d = abs(runners[0].first_loss - runners[1].first_loss)
            ok = d <= LOSS_TOL[amp]
            tps = {row["model"]: row["tok_per_s"] for row in results[-2:]}
            print(f"{'':<14} first-step loss |diff| {d:.2e} (tolerance {LOSS_TOL[amp]:g}): "
                  f"{'ok' if ok else 'MISMATCH'}; chatsmith/reference "
                  f"{tps['chatsmith'] / tps['reference']:.2f}x")
            if not ok:
                failures.append(f"{cname}: first-step losses differ by {d:.3g}")
        del runners

    if noisy:
        print(f"warning: noisy timings for {', '.join(noisy)}: other processes used over "
              f"{100 * NOISY_BUSY:.0f}% of the CPUs (column 'busy') or the steps spread over "
              f"{100 * NOISY_SPREAD:.0f}% (column '±'); rerun on a quiet machine or with more --steps")
    summary = {}
    best = {}
    for m in a.models:
        rows = [r for r in results if r["model"] == m]
        if rows:
            best[m] = max(rows, key=lambda r: r["tok_per_s"])
    print()
    for m, r in best.items():
        mfu = (f" | MFU {100 * r['mfu_vs_fp32_peak']:.1f}% of fp32 peak, "
               f"{100 * r['mfu_vs_bf16_peak']:.1f}% of bf16 peak") if peaks else ""
        print(f"best {m:<10} {r['config']:<14} {r['tok_per_s']:8.0f} tok/s{mfu}")
    if len(best) == 2:
        ratio = best["chatsmith"]["tok_per_s"] / best["reference"]["tok_per_s"]
        summary["best_ratio"] = ratio
        print(f"chatsmith best / reference best: {ratio:.2f}x")

    if a.cli_steps:
        loop = next((r["tok_per_s"] for r in results if r["model"] == "chatsmith" and r["config"] == "fp32"), None)
        summary["cli"] = cli_throughput(a, B, T, threads)
        cli = summary["cli"]["tok_per_s"]
        print(f"chatsmith pretrain (CLI, {a.cli_steps} steps, median of steps {summary['cli']['from_step']}+): "
              f"{cli:8.0f} tok/s" + (f" | bare loop fp32 {loop:.0f} tok/s | CLI/loop {cli / loop:.3f}x" if loop else ""))
        if loop:
            summary["cli"]["vs_loop"] = cli / loop

    if a.json:
        out = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu_name(),
               "device": a.device, "device_name": dev_name, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(),
               "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
               "preset": a.preset, "model_config": cfg.__dict__, "batch_size": B, "seq_len": T,
               "warmup": {c: warmup_for(c) for c in a.configs}, "steps": a.steps,
               "params": n_params, "matmul_params": n_mm, "flops_per_token": flops_per_tok,
               "peak_flops": peaks, "results": results,
               "best": {m: {"config": r["config"], "tok_per_s": r["tok_per_s"]} for m, r in best.items()},
               **summary, "failures": failures}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")

    if a.profile:
        profile(cfg, init, a.models, a.profile, data, a.lr, a.device)

    if failures:
        raise SystemExit("sanity check failed: " + "; ".join(failures))


def cli_throughput(a, B: int, T: int, threads: int) -> dict:
    """`chatsmith pretrain` on the same shape: the median of its per-step tok/s (metrics.jsonl,
    log_every 1), past the first quarter of the steps (warm-up, allocator growth)."""
    import subprocess
    import tempfile

    from serve_load import syllable_docs  # noqa: E402 (a bench sibling)

    from chatsmith.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="chatsmith-cli-"))
    docs = syllable_docs(a.seed, n_docs=4000)
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer(iter(docs), vocab_size=a.vocab_size).save(work / "tok")
    cmd = [sys.executable, "-m", "chatsmith", "pretrain", "--input", str(work / "corpus.jsonl"),
           "--tokenizer", str(work / "tok"), "--preset", a.preset, "--batch-size", str(B), "--seq-len", str(T),
           "--max-steps", str(a.cli_steps), "--lr", str(a.lr), "--warmup-steps", "1", "--eval-every", "1000000",
           "--save-every", "1000000", "--log-every", "1", "--device", a.device, "--dtype", "fp32",
           "--seed", str(a.seed), "--out", str(work / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"chatsmith pretrain failed:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    rows = [json.loads(line) for line in open(work / "run" / "metrics.jsonl") if '"tok_per_s"' in line]
    first = max(2, a.cli_steps // 4)
    rates = [row["tok_per_s"] for row in rows if row.get("step", 0) > first]
    return {"tok_per_s": statistics.median(rates), "steps": len(rows), "from_step": first + 1}


def explain(cfg, init, models, x, y, device):
    """Dynamo graph count and graph breaks of one training forward (with loss) per model."""
    for m in models:
        model = build(m, cfg, init, device)
        f = loss_fn(m)
        torch._dynamo.reset()
        e = torch._dynamo.explain(lambda x, y: f(model, x, y))(x, y)
        reasons = "; ".join(sorted({str(b.reason).splitlines()[0][:120] for b in e.break_reasons}))
        print(f"dynamo explain {m}: {e.graph_count} graph(s), {e.graph_break_count} graph break(s)"
              + (f": {reasons}" if reasons else ""))
    torch._dynamo.reset()


def profile(cfg, init, models, cname, data, lr, device):
    from torch.profiler import ProfilerActivity, profile as tprofile

    amp, compiled = CONFIGS[cname]
    torch._dynamo.reset()
    for m in models:
        r = Runner(m, cfg, init, amp, compiled, lr, device)
        r.step(data[0, :, :-1].contiguous(), data[0, :, 1:].contiguous())  # warm (and compile)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for i in (1, 2):
                j = i % len(data)
                r.step(data[j, :, :-1].contiguous(), data[j, :, 1:].contiguous())
        print(f"\nprofile: {m}, {cname}, 2 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
