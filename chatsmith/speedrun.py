"""`chatsmith speedrun`: the whole chain on the built-in corpus under one time budget.

    data    -> RUN/data/corpus, RUN/data/chat   (chatsmith data build)
    BPE     -> RUN/tokenizer                    (chatsmith tokenizer train)
    base    -> RUN/base                         (chatsmith pretrain: PRETRAIN_SHARE of what is left)
    chat    -> RUN/sft                          (chatsmith sft on the built-in dialogues)
    samples -> RUN/samples.txt, RUN/speedrun.json

Each stage that already finished is skipped, so `--resume` continues an interrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from chatsmith.config import TrainConfig
from chatsmith.errors import UserError

SAMPLE_PROMPTS = ["The history of the United States", "ROMEO. O, she doth teach", "The committee said that",
                  "床前明月光"]
RESERVE_S = 30  # left at the end for the samples and the summary
PRETRAIN_SHARE = 0.6  # of the training time; the rest goes to SFT and its held-out evaluation
BASELINE_S = 30  # 3-gram counting from the shards + scoring the whole val split twice
SFT_EVAL_S = 45  # held-out generation before and after SFT (measured ~20-40 s for tiny on 2 cores)
CHAT_PROMPTS = ["Who are you?", "What is 7 + 5?", "What is the capital of France?", "请写一首唐诗《静夜思》"]


def banner(text: str):
    print(f"\n=== {text} ===", file=sys.stderr, flush=True)


def shard_documents(path: Path, bos_id: int, dtype: str):
    """Documents back out of a token shard: it is <|bos|> + tokens, document after document."""
    import numpy as np

    data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    starts = np.flatnonzero(data == bos_id).tolist() + [len(data)]
    for a, b in zip(starts[:-1], starts[1:]):
        yield data[a + 1:b].tolist()


def compare_with_ngram(base: Path, corpus: Path, order: int = 3) -> dict:
    """Val bits-per-byte of the base model next to a Kneser-Ney n-gram over the same tokenizer."""
    from chatsmith.checkpoint import load_model
    from chatsmith.eval.lm import score_documents
    from chatsmith.eval.ngram import NGramLM
    from chatsmith.tokenizer import Tokenizer

    tok = Tokenizer.load(base)
    meta = json.loads((base / "data" / "meta.json").read_text())
    ngram = NGramLM.train(shard_documents(base / "data" / "train.bin", tok.bos_id, meta["dtype"]), order,
                          tok.vocab_size, tok.bos_id)
    texts = [json.loads(line)["text"] for line in open(corpus / "val.jsonl", encoding="utf-8")]
    nats, n_tok = ngram.score_docs([tok.encode(t) for t in texts])
    n_bytes = sum(len(t.encode()) for t in texts)
    neural = score_documents(load_model(base), tok, texts)
    res = {"neural_val_bpb": neural["bits_per_byte"], f"ngram{order}_val_bpb": nats / (math.log(2) * n_bytes),
           "val_tokens": n_tok, "val_bytes": n_bytes}
    print(f"val bits-per-byte on all {len(texts)} val documents: neural {res['neural_val_bpb']:.3f}, "
          f"{order}-gram Kneser-Ney {res[f'ngram{order}_val_bpb']:.3f}", file=sys.stderr)
    return res


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

    from chatsmith.data.dialogues import build_dialogues

    corpus, chat = run_dir / "data" / "corpus", run_dir / "data" / "chat"
    banner("1/5 data")
    t = time.time()
    if not (corpus / "corpus_meta.json").exists():
        if not available_sources(a.sources_dir):
            raise UserError(f"no built-in sources under {a.sources_dir}: run `bash scripts/setup.sh` first")
        build_corpus(corpus, sources_dir=a.sources_dir)
    if not (chat / "dialogues_meta.json").exists():
        build_dialogues(chat, sources_dir=a.sources_dir)
    meta = json.loads((corpus / "corpus_meta.json").read_text())
    stages["data"] = {"seconds": round(time.time() - t, 1), "corpus": meta,
                      "dialogues": json.loads((chat / "dialogues_meta.json").read_text())["families"]}

    banner("2/5 tokenizer")
    t = time.time()
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer_stats.json").exists():
        train_command([str(corpus / "train.jsonl")], a.vocab_size, str(tok_dir), val=[str(corpus / "val.jsonl")])
    stats = json.loads((tok_dir / "tokenizer_stats.json").read_text())
    print(f"tokenizer: {stats['vocab_size']} tokens, {stats.get('val_bytes_per_token')} bytes/token on val",
          file=sys.stderr)
    stages["tokenizer"] = {"seconds": round(time.time() - t, 1), **stats}

    banner("3/5 pretrain")
    from chatsmith.train import pretrain, sft

    left = budget - (time.time() - t0) - RESERVE_S - SFT_EVAL_S - BASELINE_S
    if left < 60:
        raise UserError(f"--minutes {a.minutes:g} leaves {left:.0f}s for training; give at least "
                        f"{(budget - left + 60) / 60:.1f} minutes")
    base = run_dir / "base"
    # the budget covers tokenising the corpus too: shards take a few seconds, estimated at 15
    pre_s = left * PRETRAIN_SHARE
    cfg = TrainConfig(out=str(base), preset=a.preset, max_minutes=(pre_s - 15) / 60, batch_size=8,
                      lr=3e-3, warmup_steps=50, eval_every=100, eval_batches=10, save_every=100,
                      log_every=10, device=a.device, dtype=a.dtype,
                      resume=a.resume and (base / "checkpoints").exists())
    t = time.time()
    summary = pretrain.run(cfg, inputs=[str(corpus)], tokenizer=str(tok_dir))
    stages["pretrain"] = {"seconds": round(time.time() - t, 1), **summary}

    # the classical baseline on the same tokens, and both scored on the whole val split
    t = time.time()
    stages["baseline"] = compare_with_ngram(base, corpus, order=3)
    stages["baseline"]["seconds"] = round(time.time() - t, 1)

    banner("4/5 sft")
    sft_dir = run_dir / "sft"
    left = budget - (time.time() - t0) - RESERVE_S - SFT_EVAL_S
    cfg = TrainConfig(out=str(sft_dir), max_minutes=max(left, 20) / 60, batch_size=16, lr=1e-3, warmup_steps=20,
                      min_lr_ratio=0.0, eval_every=100, eval_batches=10, save_every=100, log_every=10,
                      device=a.device, dtype=a.dtype, resume=a.resume and (sft_dir / "checkpoints").exists())
    t = time.time()
    sft_summary = sft.run(cfg, [str(chat / "train.jsonl")], str(base), heldout=[str(chat / "heldout.jsonl")],
                          eval_samples=16, eval_max_new_tokens=40)
    stages["sft"] = {"seconds": round(time.time() - t, 1), **sft_summary}

    banner("5/5 samples")
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
    chat_engine = Engine(load_model(sft_dir), Tokenizer.load(sft_dir))
    conversation = []
    print()
    for i, q in enumerate(CHAT_PROMPTS):
        ids, _ = chat_engine.tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        c = chat_engine.generate(ids, SamplingParams(max_new_tokens=80, temperature=0))[0]
        conversation.append({"user": q, "assistant": c.text})
        print(f"you> {q}\nbot> {c.text}")
    (run_dir / "samples.txt").write_text(
        "".join(f"> {s['prompt']}{s['completion']}\n\n" for s in samples)
        + "".join(f"you> {c['user']}\nbot> {c['assistant']}\n" for c in conversation))

    result = {"minutes_budget": a.minutes, "seconds": round(time.time() - t0, 1), "stages": stages,
              "val_bpb": stages["baseline"]["neural_val_bpb"], "baseline": stages["baseline"], "sft_eval": sft_summary.get("eval"), "samples": samples,
              "conversation": conversation}
    (run_dir / "speedrun.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    b = stages["baseline"]
    print(f"\nspeedrun finished in {result['seconds'] / 60:.1f} min: val bits-per-byte "
          f"{b['neural_val_bpb']:.3f} (3-gram Kneser-Ney baseline: {b['ngram3_val_bpb']:.3f}) after "
          f"{summary['steps']} pretraining steps ({summary['tokens'] / 1e6:.1f}M tokens)")
    ev = sft_summary.get("eval") or {}
    if ev.get("sft"):
        em = ", ".join(f"{k} {v:.0%}" for k, v in ev["sft"]["exact_match"].items())
        print(f"chat model, held-out: assistant loss {ev['base']['assistant_loss']:.2f} -> "
              f"{ev['sft']['assistant_loss']:.2f}, replies ended {ev['sft']['ended_share']:.0%}, exact match: {em}")
    print(f"base model: {base}\nsample it:  chatsmith generate {base} --prompt \"Once upon a time\"")
    print(f"chat model: {sft_dir}\nchat with it: chatsmith chat {sft_dir}")
    from chatsmith.report import write_report
    print(f"report card: {write_report(run_dir)}")
    return result
