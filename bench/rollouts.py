#!/usr/bin/env python
"""RL rollout sampling: GRPO's groups (P prompts x G samples at temperature 1) through chatsmith's
engine vs transformers' `generate` (what TRL's GRPOTrainer samples with on a CPU), same weights,
same prompts, one run.

    python bench/rollouts.py --model smollm2                     # 8 prompts x 4, up to 64 tokens
    python bench/rollouts.py --model runs/from30/sft --prompts 16 --group 4 --json runs/rollouts.json

Rows:

    chatsmith rollouts, fp32     `chatsmith.train.rollouts.sample`: one prefill per prompt, its cache
                                 copied to the group's G rows, every row decoded in one batch
    chatsmith rollouts, bf16     the same with bf16 decode weights (`rlhf --quantize bf16`; only on
                                 a CPU with native bf16, skipped elsewhere)
    chatsmith rollouts, int8     `rlhf --quantize int8`
    transformers generate        LlamaForCausalLM on the exported HF directory, fp32, KV cache, the
                                 P prompts left-padded in one batch, num_return_sequences=G

Reply tokens/s = the tokens of every reply up to and including its end token, over the wall time
of the whole call (prefill included: a rollout pays it). Best of --repeats, rows interleaved.
Sampled replies differ in length between rows, so the figure is tokens per second, not calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

QUESTIONS = ["What is 17 + 25?", "What is 9 times 7?", "Tom has 12 apples and gives away 5. How many are left?",
             "Which is larger, 48 or 84?", "What is 100 - 37?", "What is 6 * 8 + 2?",
             "A box holds 4 rows of 6 eggs. How many eggs?", "Is 91 a prime number?", "What is 250 / 5?",
             "What is 13 + 29?", "Sara reads 15 pages a day. How many pages in 4 days?", "What is 7 squared?",
             "Which is smaller, 305 or 350?", "What is 81 - 19?", "What is 12 times 12?", "What is 3 + 4 * 5?"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, or a chat model directory (with a chat template)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    if not 1 <= a.prompts <= len(QUESTIONS):
        raise SystemExit(f"--prompts must be 1..{len(QUESTIONS)}")
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from chatsmith.checkpoint import load_model
    from chatsmith.engine import check_quantize, end_ids
    from chatsmith.errors import UserError
    from chatsmith.interop.convert import export
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.train import rollouts
    from decode import model_dir_for

    work = Path(tempfile.mkdtemp(prefix="chatsmith-rollouts-"))
    d, _ = model_dir_for(a.model, work)
    model, tok = load_model(d), Tokenizer.load(d)
    hf = AutoModelForCausalLM.from_pretrained(export(str(d), "hf", str(work / "hf")), dtype=torch.float32).eval()
    items = []
    for q in QUESTIONS[:a.prompts]:
        msgs = [{"role": "user", "content": q}]
        items.append(rollouts.PromptItem(msgs, tok.render_chat(msgs, add_generation_prompt=True)[0], None, {}, "bench"))
    end = tok.token_to_id("<|assistant_end|>")
    end = tok.eos_id if end is None else end
    ends = end_ids(tok)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id

    def ours(q):
        def run(seed):
            ro = rollouts.sample(model, tok, items, seed, 1.0, a.max_new_tokens, end, a.group,
                                 quantize=None if q == "fp32" else q)
            return sum(len(ids) - p for ids, p, *_ in ro.seqs)
        return run

    L = max(len(it.ids) for it in items)
    x = torch.tensor([[pad] * (L - len(it.ids)) + it.ids for it in items])
    attn = (torch.arange(L)[None] >= torch.tensor([L - len(it.ids) for it in items])[:, None]).long()

    def theirs(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(x, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              max_new_tokens=a.max_new_tokens, num_return_sequences=a.group,
                              eos_token_id=sorted(ends), pad_token_id=pad)
        n = 0
        for row in out[:, L:].tolist():  # up to and including the first end token
            n += next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        return n

    rows = {"chatsmith rollouts, fp32": ours("fp32")}
    for q in ("bf16", "int8"):
        try:
            check_quantize(model, q)
            rows[f"chatsmith rollouts, {q}"] = ours(q)
        except UserError as e:
            print(f"skipping {q}: {e}")
    rows["transformers generate"] = theirs
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {threads} threads; torch {torch.__version__}")
    print(f"model {a.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; {a.prompts} prompts x "
          f"{a.group} samples, up to {a.max_new_tokens} tokens; prompts {min(len(it.ids) for it in items)}-{L} tokens")
    best = {name: (0.0, 0, 0.0) for name in rows}
    for rep in range(a.repeats):
        for name, fn in rows.items():
            t = time.perf_counter()
            n = fn(1000 + rep)
            dt = time.perf_counter() - t
            if n / dt > best[name][0]:
                best[name] = (n / dt, n, dt)
    ref = best["transformers generate"][0]
    print(f"\n{'sampler':28s} {'reply tok/s':>11s} {'tokens':>7s} {'seconds':>8s} {'x transformers':>15s}")
    for name, (rate, n, dt) in best.items():
        print(f"{name:28s} {rate:11.1f} {n:7d} {dt:8.2f} {rate / ref:15.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": a.model, "prompts": a.prompts, "group": a.group,
                                            "max_new_tokens": a.max_new_tokens, "threads": threads,
                                            "rows": {k: {"tok_s": v[0], "tokens": v[1], "seconds": v[2]}
                                                     for k, v in best.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
