#!/usr/bin/env python
"""The calculator's worth to a small chat model: held-out exact match with and without the tool,
same checkpoint, same prompts, and how well the model decides when to call.

    base  -> an existing base model (the speedrun's tiny pretrain, RUN/base)
    data  -> the numeric families and their tool forms (chatsmith data build ... --families
             arithmetic word_problem number_sense arithmetic_tools word_problem_tools number_sense_tools)
    sft   -> chatsmith sft on that train split (a budget in minutes: the schedule fits it)
    eval  -> chatsmith eval on the held-out arithmetic / word_problem / number_sense prompts, greedy,
             without tools and with --tools calculator

Precision/recall of calls, on the mixed held-out set: arithmetic and word problems should call the
calculator, number_sense questions ("which is larger?") should not. A call is counted when the
reply makes at least one.

    python bench/tools_calculator.py --base runs/speedrun/base --out runs/bench-tools --minutes 27
    python bench/tools_calculator.py --sft runs/bench-tools/sft --data runs/bench-tools/chat --out runs/bench-tools
    python bench/tools_calculator.py --base smollm2 --lora-rank 8 --lr 1e-3 --max-steps 150 --batch-size 4 \
        --limit 40 --out runs/bench-tools-smollm2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PY = [sys.executable, "-m", "chatsmith"]
FAMILIES = ["arithmetic", "word_problem", "number_sense"]
SHOULD_CALL = {"arithmetic", "word_problem"}


def run(*args):
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([*PY, *map(str, args)], check=True)


def build_data(out: Path):
    from chatsmith.data.dialogues import build_dialogues

    fams = FAMILIES + [f"{f}_tools" for f in FAMILIES]
    return build_dialogues(out, families=fams, verbose=False)


def evaluate(model: Path, heldout: Path, out: Path, tools: bool, limit: int | None) -> dict:
    d = out / ("eval_tools" if tools else "eval_plain")
    extra = ["--tools", "calculator"] if tools else []
    run("eval", model, "--tasks", *FAMILIES, "--heldout", heldout, "--out", d, "--max-new-tokens", 64, "--chat",
        "--device", "cpu", *extra, *(["--limit", limit] if limit else []))
    return json.loads((d / "metrics.json").read_text())["tasks"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a base model to fine-tune (skip with --sft)")
    p.add_argument("--sft", help="an already fine-tuned model: only evaluate")
    p.add_argument("--data", help="the dialogues built for it (default: OUT/chat, built when missing)")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=27.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-steps", type=int, default=None, help="fixed work instead of --minutes")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA SFT (e.g. 8 for smollm2); 0 = full")
    p.add_argument("--limit", type=int, default=None, help="held-out prompts per family")
    a = p.parse_args()
    out = Path(a.out)
    data = Path(a.data) if a.data else out / "chat"
    t0 = time.time()
    if not (data / "heldout.jsonl").exists():
        build_data(data)
    model = Path(a.sft) if a.sft else out / "sft"
    if not a.sft:
        budget = ["--max-steps", a.max_steps] if a.max_steps else ["--max-minutes", a.minutes]
        run("sft", "--data", data / "train.jsonl", "--init", a.base, "--out", model, "--batch-size", a.batch_size,
            "--lr", a.lr, "--warmup-steps", 10, *budget, "--eval-every", 100000,
            "--save-every", 100000, "--log-every", 10, "--lora-rank", a.lora_rank)
    plain = evaluate(model, data / "heldout.jsonl", out, False, a.limit)
    tools = evaluate(model, data / "heldout.jsonl", out, True, a.limit)
    tp = sum(tools[f]["items_with_calls"] for f in SHOULD_CALL)
    fp = sum(tools[f]["items_with_calls"] for f in FAMILIES if f not in SHOULD_CALL)
    should = sum(tools[f]["n"] for f in SHOULD_CALL)
    res = {"model": str(model), "steps": json.loads((model / "train_summary.json").read_text()).get("steps"),
           "exact_match": {f: {"without": plain[f]["accuracy"], "with_calculator": tools[f]["accuracy"],
                               "n": plain[f]["n"]} for f in FAMILIES},
           "calls": {"precision": tp / max(tp + fp, 1), "recall": tp / max(should, 1), "tp": tp, "fp": fp,
                     "should_call": should},
           "seconds": round(time.time() - t0, 1)}
    (out / "tools_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
