"""`chatsmith serve` over a translation model: requests/s with 1 and with N concurrent clients.

    python bench/serve_translation.py runs/mt [--requests 64] [--concurrency 1 16] [--beams 1 4]

The same fixed requests (Chinese digit-name sentences, a fixed seed, `max_tokens` fixed, no stop),
greedy and with beams, from one client at a time and from N at once; the worker thread decodes the
requests waiting together in one batch, and the table says how many engine calls it made. The
server runs in this process on 127.0.0.1 (one torch thread); the clients are threads here too, so
with a micro model the HTTP work, not decoding, is what is measured. Check `uptime` first.
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

from chatsmith.serve.app import create_app  # noqa: E402

DIGITS = "零一二三四五六七八九"


def texts(n: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 5))) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--tgt", default="en")
    a = ap.parse_args()
    torch.set_num_threads(1)
    app = create_app(a.model, model_name="mt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    src = texts(a.requests)
    for t in src[:8]:  # warm-up, not measured
        httpx.post(url, json={"model": f"mt:{a.tgt}", "prompt": t, "max_tokens": a.max_tokens}, timeout=300)
    print("| beams | clients | requests/s | engine batches |\n| ---: | ---: | ---: | ---: |")
    for beams in a.beams:
        for conc in a.concurrency:
            worker = app.state.server.scheduler
            b0, todo, lock = worker.batches, iter(src), threading.Lock()

            def client():
                with httpx.Client(timeout=300) as c:
                    while True:
                        with lock:
                            t = next(todo, None)
                        if t is None:
                            return
                        c.post(url, json={"model": f"mt:{a.tgt}", "prompt": t, "num_beams": beams,
                                          "max_tokens": a.max_tokens}).raise_for_status()

            threads = [threading.Thread(target=client) for _ in range(conc)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
            print(f"| {beams} | {conc} | {len(src) / dt:.1f} | {worker.batches - b0} |", flush=True)
    server.should_exit = True


if __name__ == "__main__":
    main()
