"""Time-to-quality: Muon (+AdamW for embeddings, heads, norms) against AdamW alone, same model,
data, schedule and steps, in one run.

    python bench/optimizer.py --data runs/speedrun/base/data --tokenizer runs/speedrun/tokenizer

Each optimizer pretrains the same preset from the same seed for --steps steps, evaluating every
--eval-every steps on the same validation batches. The target is AdamW's final validation loss;
the table gives the tokens (and training seconds) each needed to first reach it, and the ratio
(Muon's claim at small scale: about 0.7x the tokens or fewer). Tokens are exact and independent of
the machine's load; seconds are not, so read them against `uptime`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(opt: str, lr: float, a, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "chatsmith", "pretrain", "--data", a.data, "--tokenizer", a.tokenizer,
           "--preset", a.preset, "--max-steps", str(a.steps), "--eval-every", str(a.eval_every),
           "--eval-batches", str(a.eval_batches), "--save-every", str(a.steps), "--optimizer", opt,
           "--lr", str(lr), "--warmup-steps", str(a.warmup), "--seed", "1", "--log-every", "5", "--out", str(out)]
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def first_reaching(rows: list[dict], target: float):
    train = {r["step"]: r for r in rows if "loss" in r}
    for r in rows:
        if "val_loss" in r and r["val_loss"] <= target:
            t = train.get(r["step"], {})
            return r["step"], t.get("tokens"), t.get("elapsed")
    return None, None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="token shards (a pretrain run's data/ directory)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-3], help="peak learning rates to try (both)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="optim-bench-")
    base = Path(a.out or tmp.name)
    results = {}
    for lr in a.lr:
        for opt in ("adamw", "muon"):
            results[opt, lr] = run(opt, lr, a, base / f"{opt}-lr{lr:g}")
    best_adamw = min((min(r["val_loss"] for r in rows if "val_loss" in r), lr)
                     for (opt, lr), rows in results.items() if opt == "adamw")
    target = best_adamw[0]
    print(f"\n{a.preset}, {a.steps} steps; target: AdamW's best final val loss {target:.4f} (lr {best_adamw[1]:g})")
    print(f"  {'optimizer':>9} {'lr':>8} {'final val':>9} {'step':>5} {'tokens':>10} {'seconds':>8} {'s/step':>7}")
    ref = None
    for (opt, lr), rows in results.items():
        step, tokens, secs = first_reaching(rows, target)
        train = [r for r in rows if "loss" in r]
        per_step = train[-1]["elapsed"] / train[-1]["step"] if train and "elapsed" in train[-1] else float("nan")
        final = [r["val_loss"] for r in rows if "val_loss" in r][-1]
        if opt == "adamw" and lr == best_adamw[1]:
            ref = tokens
        print(f"  {opt:>9} {lr:>8g} {final:>9.4f} {step or '-':>5} {tokens or '-':>10} "
              f"{(f'{secs:.0f}' if secs else '-'):>8} {per_step:>7.2f}")
    for (opt, lr), rows in results.items():
        if opt == "muon":
            _, tokens, _ = first_reaching(rows, target)
            print(f"  muon lr {lr:g}: " + (f"{tokens / ref:.2f}x AdamW's tokens to the target" if tokens and ref
                                            else "did not reach the target"))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
