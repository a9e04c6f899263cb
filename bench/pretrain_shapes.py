"""Which model shape is best for a fixed pretraining time? Presets, vocabulary sizes and contexts
pretrained for the same wall-clock minutes on the same data, in one run.

    python bench/pretrain_shapes.py --run runs/speedrun --minutes 2.5
    python bench/pretrain_shapes.py --run runs/speedrun --variants tiny:8192 micro:8192 tiny:2048:128

--run is a speedrun directory (its data/corpus and data/chat are reused). A variant is
PRESET:VOCAB[:SEQ_LEN] (SEQ_LEN defaults to the preset's context). Each one trains its own BPE
tokenizer (cached per vocabulary size), then `chatsmith pretrain` with the speedrun's recipe (Muon,
batch 8, lr 3e-3, the task-text mixture with the dialogues' held-out problems excluded) for
--minutes, and is scored on the whole val split in bits per byte, which does not depend on the
tokenizer, next to its peer: a 3-gram Kneser-Ney model counted on as many training tokens as the
neural model saw. tasks bpb is the held-out task text (copying, column arithmetic, number sense):
the skills RL later needs. Wall-clock budgets make the result depend on the CPU and its load:
the load average is printed before and after; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatsmith import atomic  # noqa: E402
from chatsmith.speedrun import MIX, SPEEDRUN, compare_with_ngram  # noqa: E402
from chatsmith.tokenizer import train_command  # noqa: E402

DEFAULT_VARIANTS = ["tiny:8192", "micro:8192", "mini:8192", "small:8192", "tiny:4096", "tiny:2048", "tiny:8192:128"]


def parse_variant(spec: str) -> tuple[str, int, int | None]:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"error: variant {spec!r}: expected PRESET:VOCAB[:SEQ_LEN]")
    return parts[0], int(parts[1]), (int(parts[2]) if len(parts) == 3 else None)


def tokenizer_for(vocab: int, corpus: Path, out: Path) -> Path:
    d = out / f"tokenizer-{vocab}"
    if not (d / "tokenizer_stats.json").exists():
        train_command([str(corpus / "train.jsonl")], vocab, str(d), val=[str(corpus / "val.jsonl")])
    return d


def pretrain(preset: str, tok: Path, seq: int | None, a, corpus: Path, chat: Path, out: Path) -> dict:
    r = SPEEDRUN["pretrain"]
    cmd = [sys.executable, "-m", "chatsmith", "pretrain", "--input", str(corpus), "--tokenizer", str(tok),
           "--preset", preset, "--max-minutes", str(a.minutes), "--batch-size", str(r["batch_size"]),
           "--lr", str(r["lr"]), "--warmup-steps", str(r["warmup_steps"]), "--optimizer", r["optimizer"],
           "--eval-every", "100000", "--eval-batches", str(r["eval_batches"]), "--save-every", "100000",
           "--seed", str(a.seed), "--log-every", "20", "--out", str(out)]
    if seq:
        cmd += ["--seq-len", str(seq)]
    if a.mix != "none":
        cmd += ["--mix", a.mix, "--mix-exclude", str(chat)]
    print("$ chatsmith " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "train_summary.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a speedrun directory whose data/corpus and data/chat are reused")
    ap.add_argument("--minutes", type=float, default=2.5, help="pretraining wall-clock minutes per variant")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="PRESET:VOCAB[:SEQ_LEN] ...")
    ap.add_argument("--mix", default=MIX, help="pretrain --mix (\"none\": prose only)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="runs/shapes")
    a = ap.parse_args()
    variants = [parse_variant(v) for v in a.variants]
    corpus, chat = Path(a.run) / "data" / "corpus", Path(a.run) / "data" / "chat"
    for p in (corpus / "train.jsonl", chat / "dialogues_meta.json"):
        if not p.exists():
            raise SystemExit(f"error: {p} is missing: --run must be a speedrun directory past its data stage")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    toks = {v: tokenizer_for(v, corpus, out) for v in sorted({v for _, v, _ in variants})}
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    for preset, vocab, seq in variants:
        name = f"{preset}-v{vocab}" + (f"-s{seq}" if seq else "")
        d = out / name
        s = json.loads((d / "train_summary.json").read_text()) if (d / "train_summary.json").exists() else \
            pretrain(preset, toks[vocab], seq, a, corpus, chat, d)
        b = compare_with_ngram(d, corpus, order=3, seen_tokens=s["tokens"])
        rows.append({"variant": name, "preset": preset, "vocab": vocab, "seq_len": seq, "params": s["params"],
                     "steps": s["steps"], "tokens": s["tokens"], "val_bpb": b["neural_val_bpb"],
                     "kn_same_tokens_bpb": b.get("ngram3_same_tokens_val_bpb"), "kn_whole_bpb": b["ngram3_val_bpb"],
                     "tasks_val_bpb": s.get("tasks_val_bpb")})
        atomic.write_json(out / "shapes.json", {"minutes": a.minutes, "mix": a.mix, "rows": rows})
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    best = min(rows, key=lambda r: r["val_bpb"])
    print(f"\n{a.minutes:g} minutes of pretraining per variant, mix {a.mix}; val bits per byte (lower is better)")
    print("| variant | params | steps | tokens | val bpb | 3-gram KN, same tokens | ratio | tasks bpb |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kn = r["kn_same_tokens_bpb"]
        tb = f"{r['tasks_val_bpb']:.3f}" if r["tasks_val_bpb"] else "-"
        print(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens']:,} | {r['val_bpb']:.3f} "
              f"| {kn:.3f} | {r['val_bpb'] / kn:.2f}x | {tb} |")
    print(f"best at this budget: {best['variant']} ({best['val_bpb']:.3f} bpb)")


if __name__ == "__main__":
    main()
