"""`chatsmith speedrun`: the whole chain on the built-in corpus under one time budget.

    corpus  -> RUN/corpus     (chatsmith data build)
    BPE     -> RUN/tokenizer  (chatsmith tokenizer train)
    base    -> RUN/base       (chatsmith pretrain, fitted to what is left of the budget)
    samples -> RUN/samples.txt, RUN/speedrun.json

Each stage that already finished is skipped, so `--resume` continues an interrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from chatsmith.config import TrainConfig
from chatsmith.errors import UserError

SAMPLE_PROMPTS = ["The history of the United States", "ROMEO. O, she doth teach", "The committee said that",
                  "床前明月光"]
RESERVE_S = 45  # left at the end for the samples and the summary


def banner(text: str):
    print(f"\n=== {text} ===", file=sys.stderr, flush=True)


def run(a) -> dict:
    from chatsmith.data.corpus import build_corpus
    from chatsmith.data.sources import available_sources
    from chatsmith.tokenizer import train_command

    t0 = time.time()
    budget = a.minutes * 60
    run_dir = Path(a.out)
    if run_dir.exists() and any(run_dir.iterdir()) and not a.resume:
        raise UserError(f"{run_dir} already exists: pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}

    corpus = run_dir / "corpus"
    banner("1/4 corpus")
    t = time.time()
    if not (corpus / "corpus_meta.json").exists():
        if not available_sources(a.sources_dir):
            raise UserError(f"no built-in sources under {a.sources_dir}: run `bash scripts/setup.sh` first")
        build_corpus(corpus, sources_dir=a.sources_dir)
    meta = json.loads((corpus / "corpus_meta.json").read_text())
    stages["corpus"] = {"seconds": round(time.time() - t, 1), "meta": meta}

    banner("2/4 tokenizer")
    t = time.time()
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer_stats.json").exists():
        train_command([str(corpus / "train.jsonl")], a.vocab_size, str(tok_dir), val=[str(corpus / "val.jsonl")])
    stats = json.loads((tok_dir / "tokenizer_stats.json").read_text())
    print(f"tokenizer: {stats['vocab_size']} tokens, {stats.get('val_bytes_per_token')} bytes/token on val",
          file=sys.stderr)
    stages["tokenizer"] = {"seconds": round(time.time() - t, 1), **stats}

    banner("3/4 pretrain")
    from chatsmith.train import pretrain

    left = budget - (time.time() - t0) - RESERVE_S
    if left < 30:
        raise UserError(f"--minutes {a.minutes:g} leaves {left:.0f}s for pretraining; give at least "
                        f"{(budget - left + 30) / 60:.1f} minutes")
    base = run_dir / "base"
    # the budget covers tokenising the corpus too: shards take a few seconds, estimated at 15
    cfg = TrainConfig(out=str(base), preset=a.preset, max_minutes=(left - 15) / 60, batch_size=16,
                      lr=3e-3, warmup_steps=50, eval_every=100, eval_batches=10, save_every=100,
                      log_every=10, device=a.device, dtype=a.dtype,
                      resume=a.resume and (base / "checkpoints").exists())
    t = time.time()
    summary = pretrain.run(cfg, inputs=[str(corpus)], tokenizer=str(tok_dir))
    stages["pretrain"] = {"seconds": round(time.time() - t, 1), **summary}

    banner("4/4 samples")
    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams
    from chatsmith.tokenizer import Tokenizer

    engine = Engine(load_model(base), Tokenizer.load(base))
    samples = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        c = engine.generate(engine.tok.encode(prompt, bos=True),
                            SamplingParams(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=i))[0]
        samples.append({"prompt": prompt, "completion": c.text})
        print(f"\n> {prompt}{c.text}")
    (run_dir / "samples.txt").write_text("".join(f"> {s['prompt']}{s['completion']}\n\n" for s in samples))

    result = {"minutes_budget": a.minutes, "seconds": round(time.time() - t0, 1), "stages": stages,
              "val_bpb": summary.get("val_bpb"), "samples": samples}
    (run_dir / "speedrun.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"\nspeedrun finished in {result['seconds'] / 60:.1f} min: val bits-per-byte "
          f"{summary.get('val_bpb', float('nan')):.3f} after {summary['steps']} steps "
          f"({summary['tokens'] / 1e6:.1f}M tokens)")
    print(f"base model: {base}\nsample it:  chatsmith generate {base} --prompt \"Once upon a time\"")
    return result
