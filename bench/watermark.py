"""Watermark detection, robustness, quality and speed on SmolLM2-135M-Instruct's replies.

    nice -n 10 python bench/watermark.py --dialogues data/chat/heldout.jsonl --corpus data/corpus \
        [--prompts 200] [--tokens 200] [--out bench/results/watermark]

Prompts: the first user turn of each held-out built-in dialogue (distinct, in file order), in
SmolLM2's chat template. Every prompt is answered twice in one batched run (the engine's
continuous batching: the plain and the watermarked request of each prompt decode in the same steps), plain and watermarked (γ 0.25, δ 2, left-hash, width 1), sampling
at temperature 0.7 / top-p 0.95, with SmolLM2's end tokens banned (logit_bias -100) so every reply
has exactly --tokens tokens (as the paper's fixed-length continuations). Detection scores the
reply's token ids (no prompt); negatives are the plain replies and human text (corpus val
documents, SmolLM2-tokenized, in windows of the same length). TPR is taken at the one-sided z-test's 1%
false-positive threshold (z > 2.326), and the negatives' measured FPR is printed beside it.
Robustness: 10/20/30% of a watermarked reply's tokens replaced by uniformly random ids (each
substitution also breaks the next token's context). Quality: perplexity of the plain and of the
watermarked replies under SmolLM2 itself (given the prompt). Speed: tokens/s of the run; the
watermark's own cost per token (Watermark.apply over the replies' contexts, timed apart) and that
of streaming moderation (the lexicon over each new piece, as serve --moderation does), each as
the tokens/s it leaves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from chatsmith.checkpoint import load_model  # noqa: E402
from chatsmith.engine import Engine, SamplingParams  # noqa: E402
from chatsmith.interop.registry import resolve  # noqa: E402
from chatsmith.moderation import load_moderator  # noqa: E402
from chatsmith.serve.moderations import Moderations  # noqa: E402
from chatsmith.tokenizer import Tokenizer  # noqa: E402
from chatsmith.watermark import Watermark, WatermarkConfig, detect  # noqa: E402

Z1 = 2.3263478740408408  # one-sided 1% threshold


def prompts_from(path: Path, n: int) -> list[str]:
    seen, out = set(), []
    for line in path.open(encoding="utf-8"):
        msgs = json.loads(line)["messages"]
        u = next((m["content"] for m in msgs if m["role"] == "user"), None)
        if u and u not in seen:
            seen.add(u)
            out.append(u)
        if len(out) == n:
            break
    return out


def tpr(zs, thr=Z1):
    return sum(z is not None and z > thr for z in zs) / max(1, len(zs))


@torch.no_grad()
def perplexity(model, prompts_ids, replies) -> float:
    nll, n = 0.0, 0
    for p, r in zip(prompts_ids, replies):
        x = torch.tensor([p + r])
        logp = model(x).float().log_softmax(-1)[0]
        tgt = torch.tensor(r)
        nll -= float(logp[len(p) - 1:len(p) - 1 + len(r)].gather(1, tgt[:, None]).sum())
        n += len(r)
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-prompts", type=int, default=None, help="perplexity on the first N prompts' replies (default: all)")
    ap.add_argument("--out", default="bench/results/watermark")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mdir = resolve("smollm2")
    model, tok = load_model(mdir), Tokenizer.load(mdir)
    engine = Engine(model, tok, max_batch=a.batch)
    prompts = prompts_from(Path(a.dialogues), a.prompts)
    ids = [tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    wm = Watermark(WatermarkConfig(gamma=0.25, delta=2.0), tok.vocab_size)
    ban = {t: -100.0 for t in engine.eos_ids}
    base = SamplingParams(max_new_tokens=a.tokens, temperature=0.7, top_p=0.95, seed=a.seed, logit_bias=ban)
    # one batched run: each prompt plain and watermarked, side by side in the same steps (per-request
    # sampling settings), so both see the same machine load
    P = len(ids)
    engine.max_batch, engine.slot_len = min(a.batch, 2 * P), max(map(len, ids)) + a.tokens
    pw = SamplingParams(**{**base.__dict__, "watermark": wm})
    t0 = time.perf_counter()
    reqs = [engine.add_request(x, base, stream_id=i) for i, x in enumerate(ids)]
    reqs += [engine.add_request(x, pw, stream_id=i) for i, x in enumerate(ids)]
    engine.run_until_done(reqs)
    gen_s = time.perf_counter() - t0
    runs = {"plain": {"comps": [r.completions[0] for r in reqs[:P]]},
            "watermarked": {"comps": [r.completions[0] for r in reqs[P:]]}}
    n_gen = sum(len(r.completions[0].token_ids) for r in reqs)
    print(f"generated {n_gen} tokens in {gen_s:.0f}s ({n_gen / gen_s:.1f} tok/s, batch {engine.max_batch})", flush=True)
    # the watermark's own cost per token: Watermark.apply on each watermarked reply's contexts (fresh
    # green-list cache, as a server meets new contexts), against the measured time per generated token
    logits = torch.zeros(model.cfg.vocab_size)
    wm_fresh = Watermark(wm.cfg, tok.vocab_size)
    t0 = time.perf_counter()
    n_wm = 0
    for x, c in zip(ids, runs["watermarked"]["comps"]):
        seq = x + c.token_ids
        for i in range(len(x), len(seq)):
            wm_fresh.apply(seq[i - 1:i], logits)
            n_wm += 1
    wm_per_tok = (time.perf_counter() - t0) / n_wm
    # human text: the corpus val documents, SmolLM2-tokenized, in windows of --tokens tokens
    human = []
    for line in open(Path(a.corpus) / "val.jsonl", encoding="utf-8"):
        t = tok.encode(json.loads(line)["text"])
        human += [t[i:i + a.tokens] for i in range(0, len(t) - a.tokens + 1, a.tokens)]
    human = human[:1000]
    wm_ids = [c.token_ids for c in runs["watermarked"]["comps"]]
    plain_ids = [c.token_ids for c in runs["plain"]["comps"]]
    res = {"prompts": len(prompts), "tokens": a.tokens, "gamma": 0.25, "delta": 2.0, "human_texts": len(human),
           "load_average": os.getloadavg()[0], "detection": {}}
    for T in (50, 100, 200):
        if T > a.tokens:
            continue
        z = lambda seqs: [detect(s[:T], wm, min_tokens=1).z for s in seqs if len(s) >= T]  # noqa: E731
        zw, zp, zh = z(wm_ids), z(plain_ids), z(human)
        res["detection"][T] = {"tpr": tpr(zw), "fpr_plain": tpr(zp), "fpr_human": tpr(zh), "n_pos": len(zw),
                               "n_plain": len(zp), "n_human": len(zh),
                               "median_z": sorted(zw)[len(zw) // 2] if zw else None}
    rng = random.Random(a.seed)
    res["robustness"] = {}
    for frac in (0.0, 0.1, 0.2, 0.3):
        att = []
        for s in wm_ids:
            s = list(s)
            for i in rng.sample(range(len(s)), int(frac * len(s))):
                s[i] = rng.randrange(tok.vocab_size)
            att.append(s)
        res["robustness"][frac] = {T: tpr([detect(s[:T], wm, min_tokens=1).z for s in att])
                                   for T in (50, 100, 200) if T <= a.tokens}
    k = a.ppl_prompts or len(ids)
    res["perplexity"] = {"prompts": k, "plain": perplexity(model, ids[:k], plain_ids[:k]),
                         "watermarked": perplexity(model, ids[:k], wm_ids[:k])}
    per_tok = gen_s / n_gen
    res["speed"] = {"generated_tokens": n_gen, "seconds": gen_s, "tokens_per_s": 1 / per_tok,
                    "watermark_ms_per_token": wm_per_tok * 1e3,
                    "tokens_per_s_without_watermark": 1 / max(per_tok - wm_per_tok / 2, 1e-9)}
    # streaming moderation: the lexicon over each newly decoded piece (with its 64-character lead), per token
    guard = Moderations(load_moderator("lexicon"))
    lex = guard.moderator.lexicon
    pieces = [[tok.decode([t]) for t in s] for s in plain_ids]
    t0 = time.perf_counter()
    n = 0
    for ps in pieces:
        text = ""
        for p in ps:
            before = text
            text += p
            lex.hits(text[max(0, len(before) - 64):])
            n += 1
    mod_per_tok = (time.perf_counter() - t0) / n
    res["streaming_moderation"] = {"ms_per_token": mod_per_tok * 1e3, "tokens_per_s_plain": 1 / per_tok,
                                   "tokens_per_s_with_moderation": 1 / (per_tok + mod_per_tok)}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for T in (50, 100, 200):
        if T <= a.tokens:
            ax.plot([100 * f for f in res["robustness"]], [res["robustness"][f][T] for f in res["robustness"]],
                    marker="o", label=f"{T} tokens")
    ax.set_xlabel("random token substitutions (%)")
    ax.set_ylabel("TPR at 1% FPR (z > 2.33)")
    ax.set_title(f"SmolLM2-135M, γ=0.25 δ=2, {len(prompts)} prompts")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=120)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
