#!/usr/bin/env python
"""Batch-1 greedy decode speed: chatsmith vs transformers vs llama.cpp, same weights, same CPU, one run.

    python bench/decode.py --model tiny                  # a random-init `tiny` model (the issue's row)
    python bench/decode.py --model smollm2 --new-tokens 128
    python bench/decode.py --model runs/speedrun/sft --json runs/decode.json

Rows (all on the same weights, the same prompt token ids, exactly --new-tokens tokens each):

    chatsmith Engine          the one engine, fp32 (`chatsmith generate`)
    chatsmith Engine, int8    `--quantize int8` decode weights
    chatsmith Engine, bf16    `--quantize bf16` decode weights (a CPU with native bf16 only)
    transformers generate     LlamaForCausalLM (the exported HF directory), fp32, KV cache
    llama.cpp <type>          our own `chatsmith export --format gguf --gguf-type <type>` file, and for
                              smollm2 also the GGUF file its package ships (Q4_1), run by llama.cpp's
                              prebuilt CPU build through node-llama-cpp (bench/peers; install once with
                              `npm install --prefix bench/peers --no-audit --no-fund`)

Decode tokens/s = (N - 1) / (time of the Nth token - time of the 1st), so prefill and one-off costs
cancel; best of --repeats (Python rows interleaved). Also per CPU-second of the process, which other
processes on the machine disturb far less than wall time. Every row must produce the same tokens as
the chatsmith fp32 row where its weights are the same (fp32 / f32); the quantized rows report how
many leading tokens they share with it. End tokens do not stop any row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PROMPT = "The capital of France is"
PEERS = HERE / "peers"
NODE_SCRIPT = PEERS / "llamacpp_decode.mjs"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))


def llamacpp(gguf: Path, ids: list[int], n: int, threads: int, repeats: int) -> dict:
    if not (PEERS / "node_modules" / "node-llama-cpp").exists():
        raise SystemExit("llama.cpp rows need node-llama-cpp: npm install --prefix bench/peers --no-audit --no-fund "
                         "(or pass --no-llamacpp)")
    r = subprocess.run(["node", str(NODE_SCRIPT), str(gguf), json.dumps(ids), str(n), str(threads), str(repeats)],
                       capture_output=True, text=True, cwd=PEERS)
    if r.returncode:
        raise SystemExit(f"llama.cpp on {gguf.name} failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if len(res["tokens"]) != n or not res.get("decode_tok_s"):
        raise SystemExit(f"llama.cpp on {gguf.name}: {len(res['tokens'])} tokens, rate {res.get('decode_tok_s')}: "
                         f"{r.stderr[-1000:]}")
    return res


def model_dir_for(name: str, work: Path) -> tuple[Path, Path | None]:
    """(chatsmith model directory, the GGUF file its package ships or None)."""
    from chatsmith.interop.registry import KNOWN, packaged_file, resolve

    if name == "tiny":
        from serve_load import random_tiny_model

        return random_tiny_model(work / "tiny"), None
    if name in KNOWN:
        return Path(resolve(name)), packaged_file(name)
    return Path(name), None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (random init), smollm2, or a model directory")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads for every row (default: the CPUs available)")
    ap.add_argument("--gguf-types", default="f32,f16,q8_0", help="our GGUF exports llama.cpp decodes")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams, check_quantize
    from chatsmith.errors import UserError
    from chatsmith.interop.convert import export
    from chatsmith.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="chatsmith-decode-"))
    d, shipped = model_dir_for(a.model, work)
    ours = load_model(d)
    tok = Tokenizer.load(d)
    hf_dir = export(str(d), "hf", str(work / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok.encode(PROMPT, bos=True)
    n = a.new_tokens
    if len(ids) + n > ours.cfg.max_seq_len:
        n = ours.cfg.max_seq_len - len(ids)
        print(f"--new-tokens cut to {n}: the model's context is {ours.cfg.max_seq_len}")
    x = torch.tensor([ids])
    engine = Engine(ours, tok, max_batch=1)  # one row of KV cache: a batch-1 benchmark
    engine.eos_ids = set()  # exactly n tokens: an end token does not stop the row
    engine8 = Engine(ours, tok, max_batch=1, quantize="int8")
    engine8.eos_ids = set()
    greedy = lambda k: SamplingParams(max_new_tokens=k, temperature=0.0)  # noqa: E731
    engine16 = None
    try:  # bf16 decode weights only where the CPU has native bf16
        check_quantize(ours, "bf16")
        engine16 = Engine(ours, tok, max_batch=1, quantize="bf16")
        engine16.eos_ids = set()
    except UserError as e:
        print(f"skipping the bf16 row: {e}")

    def hf_gen(k):
        with torch.no_grad():
            return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                               do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)

    ref = engine.generate(ids, greedy(n))[0].token_ids
    tokens = {"chatsmith Engine": ref,
              "chatsmith Engine, int8": engine8.generate(ids, greedy(n))[0].token_ids,
              "transformers generate": hf_gen(n)[0, len(ids):].tolist()}
    impls = {"chatsmith Engine": lambda k: engine.generate(ids, greedy(k)),
             "chatsmith Engine, int8": lambda k: engine8.generate(ids, greedy(k)),
             "transformers generate": hf_gen}
    if engine16 is not None:
        impls["chatsmith Engine, bf16"] = lambda k: engine16.generate(ids, greedy(k))
        tokens["chatsmith Engine, bf16"] = impls["chatsmith Engine, bf16"](n)[0].token_ids
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {threads} threads in every row; "
          f"torch {torch.__version__}")
    print(f"model {a.model}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params; prompt {len(ids)} tokens, "
          f"{n} new tokens")
    best = {name: [float("inf")] * 4 for name in impls}  # wall 1, cpu 1, wall n, cpu n
    for _ in range(a.repeats):  # interleaved: a burst of load hits every row alike
        for name, fn in impls.items():
            w1, c1 = timed(lambda: fn(1))
            wn, cn = timed(lambda: fn(n))
            best[name] = [min(p, q) for p, q in zip(best[name], (w1, c1, wn, cn))]
    rows = {}
    for name, (w1, c1, wn, cn) in best.items():
        rows[name] = {"decode_tok_s": (n - 1) / max(wn - w1, 1e-9), "cpu_tok_s": (n - 1) / max(cn - c1, 1e-9)}
    if not a.no_llamacpp:
        files = {f"llama.cpp {t}": Path(export(str(d), "gguf", str(work / f"model-{t}.gguf"), gguf_type=t))
                 for t in a.gguf_types.split(",") if t}
        if shipped is not None and shipped.suffix == ".gguf":
            files[f"llama.cpp, shipped {shipped.name}"] = shipped
        for name, f in files.items():
            res = llamacpp(f, ids, n, threads, a.repeats)
            rows[name] = {"decode_tok_s": res["decode_tok_s"], "cpu_tok_s": res["cpu_tok_s"],
                          "gguf_mb": round(f.stat().st_size / 1e6, 1)}
            tokens[name] = res["tokens"]
    base = rows["chatsmith Engine"]["decode_tok_s"]
    hf_rate = rows["transformers generate"]["decode_tok_s"]
    print(f"\n{'decoder':34s} {'tok/s':>8s} {'per CPU-s':>9s} {'x chatsmith':>11s} {'same tokens':>12s}")
    for name, r in rows.items():
        r["same_prefix"] = common_prefix(ref, tokens[name])
        cpu = f"{r['cpu_tok_s']:9.1f}" if r.get("cpu_tok_s") else f"{'-':>9s}"
        print(f"{name:34s} {r['decode_tok_s']:8.1f} {cpu} {r['decode_tok_s'] / base:11.2f} "
              f"{r['same_prefix']:>6d}/{n}")
    print(f"\nchatsmith / transformers: {base / hf_rate:.2f}x")
    for name, r in rows.items():
        if name.startswith("llama.cpp"):
            print(f"chatsmith / {name}: {base / r['decode_tok_s']:.2f}x; "
                  f"chatsmith int8 / {name}: {rows['chatsmith Engine, int8']['decode_tok_s'] / r['decode_tok_s']:.2f}x")
    exact = [k for k in ("transformers generate", "llama.cpp f32") if k in rows]
    for k in exact:
        if rows[k]["same_prefix"] != n:
            print(f"warning: {k} parted from chatsmith's greedy tokens at token {rows[k]['same_prefix']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": a.model, "new_tokens": n, "threads": threads,
                                            "load_average": os.getloadavg()[0], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
