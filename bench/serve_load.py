"""Serving benchmark: decode speed against `transformers`, and the server under concurrent load.

    python bench/serve_load.py                       # a random-init `tiny` model (6.9M params, 8k vocab)
    python bench/serve_load.py --model runs/speedrun/sft

1. Single-stream decode tokens/s: chatsmith's engine vs `transformers`' `generate` (KV cache,
   greedy, batch 1) on the same weights (the checkpoint loads in both), in this process.
2. `chatsmith serve` in a subprocess on 127.0.0.1: aggregate tokens/s and p50/p95 time to first
   token with 1, 4, 16 and 32 concurrent streaming clients; ratios against one client.
3. 200 requests from 32 concurrent clients (`--soak`): errors (must be 0) and the server's RSS: idle,
   peak (sampled every 50 ms) and after.

    python bench/serve_load.py --model smollm2 --max-batch 32 --skip-single --levels 1 8 32   # memory

Loopback only, every loop bounded in requests and time; the server is stopped at the end.
Timings are wall-clock on a shared machine: check `uptime` and rerun when the load is high.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatsmith.interop.registry import KNOWN, resolve  # noqa: E402


def syllable_docs(seed: int = 0, n_docs: int = 2000, words: int = 200) -> list[str]:
    """Pronounceable nonsense: enough distinct words for an 8k BPE, no corpus needed."""
    rng = random.Random(seed)
    syl = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ng", "qu"]
    return [" ".join("".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(words))
            for _ in range(n_docs)]


def random_tiny_model(out: Path, seed: int = 0) -> Path:
    """A `tiny` preset model with random weights and an 8k byte-level BPE trained on syllable soup."""
    import torch

    from chatsmith.checkpoint import write_model_files
    from chatsmith.model.registry import preset
    from chatsmith.model.decoder import GPT
    from chatsmith.tokenizer import train_tokenizer

    tok = train_tokenizer(iter(syllable_docs(seed)), vocab_size=8192)
    out.mkdir(parents=True)
    tok.save(out / "tok")
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                 pad_token_id=tok.pad_id)
    write_model_files(out, GPT(cfg), out / "tok")
    return out


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# --- 1. single-stream decode --------------------------------------------------------------------

def single_stream(model_dir: Path, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams
    from chatsmith.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    prompt = tok.encode("The history of the world", bos=True)
    engine = Engine(load_model(model_dir), tok)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    p = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def ours():
        return len(engine.generate(prompt, p)[0].token_ids)

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, eos_token_id=None, pad_token_id=tok.pad_id)
        return out.shape[1] - ids.shape[1]

    res = {}
    for name, fn in (("chatsmith", ours), ("transformers", theirs)):
        fn()  # warm up
        best = best_cpu = 0.0
        for _ in range(repeats):  # best of N: the least disturbed by other processes
            t, c = time.perf_counter(), time.process_time()
            n = fn()
            best = max(best, n / (time.perf_counter() - t))
            # tokens per CPU-second of this process: what the decode costs, whatever else runs
            best_cpu = max(best_cpu, n / (time.process_time() - c))
        res[name], res[name + "_cpu"] = best, best_cpu
    # the two decode the same tokens (greedy, same weights): a check that the comparison is fair
    with torch.no_grad():
        hf_ids = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
    ours_ids = engine.generate(prompt, SamplingParams(max_new_tokens=32, temperature=0))[0].token_ids
    res["same_tokens"] = hf_ids[:len(ours_ids)] == ours_ids
    # batching in the engine alone (no HTTP): 16 prompts of different lengths decoded together
    # against one, in tokens per CPU-second, which a busy machine disturbs far less than wall time
    prompts = [tok.encode("The history of the world " * (1 + i % 5), bos=True) for i in range(16)]
    for b in (1, 16):
        engine.generate_many(prompts[:b], SamplingParams(max_new_tokens=8, temperature=0))
        c = time.process_time()
        outs = engine.generate_many(prompts[:b], SamplingParams(max_new_tokens=64, temperature=0))
        res[f"batch{b}_cpu"] = sum(len(o.token_ids) for o in outs) / (time.process_time() - c)
    return res


# --- 2 and 3. the server under load -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(client, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Stream one completion: (time to first token, tokens generated)."""
    t0 = time.perf_counter()
    ttft = None
    usage = None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(d["error"]["message"])
            if ttft is None and d["choices"] and d["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if d.get("usage"):
                usage = d["usage"]
    return (ttft if ttft is not None else time.perf_counter() - t0), usage["completion_tokens"]


async def load_level(base: str, clients: int, total: int, max_tokens: int, time_limit: float) -> dict:
    """`clients` concurrent streaming clients sending `total` requests between them (or until
    time_limit, the bound on a machine that turns out to be slow)."""
    import httpx

    rng = random.Random(clients)
    words = "the king queen river light night day sea land heart mind name".split()
    ttfts, tokens, errors = [], [0], []
    left = [total]
    deadline = time.perf_counter() + time_limit

    async def client_loop(c):
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            while left[0] > 0:
                left[0] -= 1
                if time.perf_counter() > deadline:
                    return
                prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))  # lengths differ
                try:
                    ttft, n = await one_request(client, prompt, max_tokens)
                    ttfts.append(ttft)
                    tokens[0] += n
                except Exception as e:  # counted, reported
                    errors.append(repr(e))

    t = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": len(ttfts), "errors": len(errors), "first_error": errors[:1],
            "tokens": tokens[0], "wall_s": wall, "tok_s": tokens[0] / wall,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p95_ms": 1000 * percentile(ttfts, 95)}


class PeakRSS:
    """The largest RSS of a process, sampled every 50 ms in a thread while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, None

    def __enter__(self):
        import threading

        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, rss_mb(self.pid))

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def start_server(model_dir: Path, port: int, threads: int | None, max_batch: int | None = None):
    extra = ["--threads", str(threads)] if threads else []
    extra += ["--max-batch", str(max_batch)] if max_batch else []
    proc = subprocess.Popen([sys.executable, "-m", "chatsmith", "serve", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--max-queue", "256", *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start within 60 s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a random-init tiny model)")
    ap.add_argument("--new-tokens", type=int, default=200, help="single-stream decode length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request under load")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--level-seconds", type=float, default=60, help="time limit per concurrency level")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both (default: torch's)")
    ap.add_argument("--soak", type=int, default=200, help="requests from 32 clients after the levels (0: none)")
    ap.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own)")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    result: dict = {"model": a.model or "tiny (random init)", "max_batch": a.max_batch}

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
    model_dir = Path(a.model) if a.model else random_tiny_model(Path(tmp.name) / "tiny")
    if a.model in KNOWN and not model_dir.exists():  # "smollm2": the imported copy in the cache
        model_dir = resolve(a.model)
    if not a.skip_single:
        s = result["single"] = single_stream(model_dir, a.new_tokens, a.repeats)
        print(f"\nsingle stream, greedy, {a.new_tokens} new tokens, best of {a.repeats}:")
        print(f"  {'':22} {'tok/s':>8} {'tok/CPU-s':>10}")
        print(f"  chatsmith engine       {s['chatsmith']:8.1f} {s['chatsmith_cpu']:10.1f}")
        print(f"  transformers generate  {s['transformers']:8.1f} {s['transformers_cpu']:10.1f}")
        print(f"  ratio                  {s['chatsmith'] / s['transformers']:7.2f}x {s['chatsmith_cpu'] / s['transformers_cpu']:9.2f}x"
              f"   (target >= 2x; same tokens: {s['same_tokens']})")
        print(f"  engine batching, 16 prompts of different lengths vs 1: {s['batch16_cpu']:.0f} vs "
              f"{s['batch1_cpu']:.0f} tok/CPU-s = {s['batch16_cpu'] / s['batch1_cpu']:.2f}x", flush=True)

    port = free_port()
    proc = start_server(model_dir, port, a.threads, a.max_batch)
    base = f"http://127.0.0.1:{port}"
    try:
        rows = []
        rss0 = rss_mb(proc.pid)
        asyncio.run(load_level(base, 2, 1, 8, 30))  # warm up
        with PeakRSS(proc.pid) as peak:
            for c in a.levels:
                rows.append(asyncio.run(load_level(base, c, c * a.requests_per_client, a.max_tokens,
                                                   a.level_seconds)))
        one = rows[0]["tok_s"] if rows and rows[0]["clients"] == 1 else None
        print(f"\nserver, streaming completions of {a.max_tokens} tokens, prompts of 2-30 words:")
        print(f"  {'clients':>7} {'requests':>8} {'errors':>6} {'tok/s':>8} {'vs 1':>6} {'TTFT p50':>9} {'TTFT p95':>9}")
        for r in rows:
            ratio = f"{r['tok_s'] / one:5.2f}x" if one else "   -  "
            print(f"  {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['tok_s']:>8.1f} {ratio:>6} "
                  f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p95_ms']:>7.0f}ms")
        if one and 16 in a.levels:
            r16 = next(r for r in rows if r["clients"] == 16)
            print(f"  16 clients / 1 client: {r16['tok_s'] / one:.2f}x (target >= 6x)")
        rss1 = rss_mb(proc.pid)
        result.update(levels=rows, rss_mb={"idle_loaded": rss0, "peak_levels": peak.peak, "idle_after": rss1})
        print(f"  server RSS: {rss0:.0f} MB idle after loading, {peak.peak:.0f} MB peak under the levels, "
              f"{rss1:.0f} MB idle after them", flush=True)
        if a.soak:
            with PeakRSS(proc.pid) as peak:
                soak = asyncio.run(load_level(base, 32, a.soak, 32, 300))
            rss2 = rss_mb(proc.pid)
            result["soak"] = {**soak, "rss_before_mb": rss1, "rss_peak_mb": peak.peak, "rss_after_mb": rss2}
            print(f"\n{soak['requests'] + soak['errors']} requests from 32 clients: {soak['errors']} errors "
                  f"{soak['first_error'] or ''}; server RSS {rss1:.0f} MB before, {peak.peak:.0f} MB peak, "
                  f"{rss2:.0f} MB after the soak", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
