"""Watermark detection, robustness, quality and speed on a chat model's replies (SmolLM2 by default).

    nice -n 10 python bench/watermark.py --model smollm2 --dialogues data/chat/heldout.jsonl \
        --corpus data/corpus [--prompts 200] [--tokens 200] [--paraphrase 100] [--out bench/results/watermark]
    python bench/watermark.py --model runs/speedrun/sft --dialogues runs/speedrun/data/chat/heldout.jsonl \
        --corpus runs/speedrun/data/corpus --prompts 200 --out runs/speedrun/watermark

Prompts: the first user turn of each held-out built-in dialogue (distinct, in file order), in the
model's chat template. Every prompt is answered plain and watermarked (γ 0.25, δ 2, left-hash,
width 1), sampling at temperature 0.7 / top-p 0.95 with the model's end tokens banned (logit_bias
-100), so every reply has --tokens tokens (the paper's fixed-length continuations; a model whose
context is shorter gets shorter replies, and a length they do not reach is not scored).

Detection scores the reply's token ids (no prompt), with every token and with repeated n-grams
counted once (`--ignore-repeated-ngrams`). The threshold is set empirically: at each length T
(50 / 100 / 200) it is the z that at most 1% of the negatives exceed, the negatives being the
plain replies and human text (corpus val documents, tokenized by the model's tokenizer, in windows
of --tokens tokens, first T scored). TPR is taken at that threshold; beside it, the FPR of each
negative set at the z-test's nominal 1% threshold (z > 2.326).

Attacks: (a) 10 / 20 / 30% of a watermarked reply's tokens replaced by uniformly random ids (each
substitution also re-seeds the next token's green list); (b) a paraphrase by SmolLM2-135M-Instruct
*without* the watermark ("Rewrite the following text in other words: …", its end token allowed,
at most --tokens tokens), re-tokenized by the detecting tokenizer and scored whole at the T = 200
threshold (z is length-normalised; a paraphrase shorter than 200 tokens is scored as it is).

Quality: perplexity of the plain and the watermarked replies under SmolLM2 given the prompt. With
--model smollm2 those are the generation's own logprobs (the raw distribution, before the
watermark's δ, temperature and top-p); another model's replies are scored by SmolLM2 afterwards
(its own chat template, the reply re-tokenized).

Speed, tokens/s with and without the watermark in the same run: the two full batched runs
(--batch rows, one after the other), and short alternating runs at batch 1 (and at --batch rows
with --speed-batch); plus the watermark's own cost
per step (Watermark.add_bias on a batch of real contexts, fresh green-list cache) and streaming
moderation's (the lexicon over each new piece, as serve --moderation does).

Writes OUT/results.json (after every phase, so a run cut short keeps what it measured),
OUT/table.md and OUT/robustness.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from chatsmith.atomic import write_json, write_text  # noqa: E402
from chatsmith.checkpoint import load_model  # noqa: E402
from chatsmith.engine import Engine, SamplingParams  # noqa: E402
from chatsmith.interop.registry import resolve  # noqa: E402
from chatsmith.moderation import load_moderator  # noqa: E402
from chatsmith.tokenizer import Tokenizer  # noqa: E402
from chatsmith.watermark import Watermark, WatermarkConfig, detect  # noqa: E402

Z_NOMINAL = statistics.NormalDist().inv_cdf(0.99)  # 2.326: the one-sided z-test's 1% threshold
LENGTHS = (50, 100, 200)
MODES = {"all": False, "ignore_repeated": True}
PARAPHRASE = "Rewrite the following text in other words:\n\n{}"


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


class MemoWatermark(Watermark):
    """The same green lists, with each (context, token) verdict remembered: detection scores tens of
    thousands of texts, and `prime` draws each distinct context's list once instead of once per
    occurrence (an LRU of 1,024 lists misses on human text's thousands of contexts)."""

    def __init__(self, cfg, vocab_size):
        super().__init__(cfg, vocab_size)
        self.memo: dict[tuple, bool] = {}

    def is_green(self, window, token: int) -> bool:
        key = (tuple(window), token)
        v = self.memo.get(key)
        if v is None:
            v = self.memo[key] = super().is_green(window, token)
        return v

    def prime(self, seqs):
        """Left-hash: the verdicts of every (previous ids, token) of seqs, one green list per context."""
        n = self.cfg.context_width
        by_ctx: dict[tuple, set] = {}
        for s in seqs:
            for i in range(n, len(s)):
                by_ctx.setdefault(tuple(s[i - n:i]), set()).add(s[i])
        for ctx, toks in by_ctx.items():
            new = [t for t in toks if (ctx, t) not in self.memo]
            if new:
                green = set(self.greenlist(ctx).tolist())
                for t in new:
                    self.memo[ctx, t] = t in green


def threshold(neg: list[float], fpr: float = 0.01) -> float:
    """The smallest z that at most fpr of the negatives exceed (the k-th largest, k = ⌊fpr·N⌋)."""
    zs = sorted(neg, reverse=True)
    k = int(fpr * len(zs))
    return zs[k] if k < len(zs) else -math.inf


def rate(zs: list[float], thr: float) -> float:
    return sum(z > thr for z in zs) / max(1, len(zs))


def zs_of(seqs, wm, T, ignore) -> list[float]:
    return [detect(s[:T], wm, min_tokens=1, ignore_repeated_ngrams=ignore).z for s in seqs if len(s) >= T]


def substitute(seqs, frac, vocab, rng) -> list[list[int]]:
    out = []
    for s in seqs:
        s = list(s)
        for i in rng.sample(range(len(s)), int(frac * len(s))):
            s[i] = rng.randrange(vocab)
        out.append(s)
    return out


def chat_ids(tok, texts: list[str]) -> list[list[int]]:
    return [tok.render_chat([{"role": "user", "content": t}], add_generation_prompt=True)[0] for t in texts]


@torch.inference_mode()
def perplexity(model, prompts_ids, replies) -> float:
    nll, n = 0.0, 0
    for p, r in zip(prompts_ids, replies):
        if not r:
            continue
        logp = model(torch.tensor([p + r])).float().log_softmax(-1)[0]
        nll -= float(logp[len(p) - 1:len(p) - 1 + len(r)].gather(1, torch.tensor(r)[:, None]).sum())
        n += len(r)
    return math.exp(nll / max(1, n))


def timed(engine, ids, p, batch) -> tuple[list, float]:
    t0 = time.perf_counter()
    comps = engine.generate_many(ids, p, max_batch=batch)
    return comps, time.perf_counter() - t0


def speed_pairs(engine, ids, base, wm, batch, tokens, reps=2) -> dict:
    """Alternating plain / watermarked runs of the same prompts: tokens/s of each."""
    secs, toks = {"plain": 0.0, "watermarked": 0.0}, {"plain": 0, "watermarked": 0}
    for _ in range(reps):
        for name, w in (("plain", None), ("watermarked", wm)):
            p = SamplingParams(**{**base.__dict__, "max_new_tokens": tokens, "watermark": w, "logprobs": None})
            comps, s = timed(engine, ids, p, batch)
            secs[name] += s
            toks[name] += sum(len(c.token_ids) for c in comps)
    tps = {k: toks[k] / secs[k] for k in secs}
    return {"batch": batch, "tokens": toks, "seconds": secs, "tokens_per_s": tps,
            "ms_per_token_added": 1e3 * (1 / tps["watermarked"] - 1 / tps["plain"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="the chat model (a directory, or smollm2)")
    ap.add_argument("--dialogues", required=True, help="held-out dialogues (JSONL): the first user turns are the prompts")
    ap.add_argument("--corpus", required=True, help="a built corpus: its val.jsonl is the human text")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--paraphrase", type=int, default=None, help="paraphrase the first N watermarked replies "
                    "(default: all; 0: skip)")
    ap.add_argument("--paraphraser", default="smollm2", help="the paraphrasing model, run without the watermark")
    ap.add_argument("--ppl-model", default="smollm2", help="the model perplexity is measured under")
    ap.add_argument("--max-human", type=int, default=1000, help="human-text windows at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: up to 2)")
    ap.add_argument("--skip-speed", action="store_true", help="no short speed runs")
    ap.add_argument("--speed-batch", action="store_true", help="also a short alternating pair at --batch rows")
    ap.add_argument("--out", default="bench/results/watermark")
    a = ap.parse_args()
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mdir = resolve(a.model)
    model, tok = load_model(mdir), Tokenizer.load(mdir)
    engine = Engine(model, tok, max_batch=a.batch)
    smol = Path(resolve("smollm2")).resolve()
    own_ppl = Path(mdir).resolve() == Path(resolve(a.ppl_model)).resolve()
    prompts = prompts_from(Path(a.dialogues), a.prompts)
    ids = chat_ids(tok, prompts)
    cfg = WatermarkConfig(gamma=0.25, delta=2.0)
    wm = Watermark(cfg, tok.vocab_size)
    dm = MemoWatermark(cfg, tok.vocab_size)  # detection's copy: the same lists, remembered
    ban = {t: -100.0 for t in engine.eos_ids}
    base = SamplingParams(max_new_tokens=a.tokens, temperature=0.7, top_p=0.95, seed=a.seed, logit_bias=ban,
                          logprobs=0 if own_ppl else None)
    res = {"model": str(mdir), "prompts": len(prompts), "tokens": a.tokens, "watermark": cfg.__dict__ | {"key": "default"},
           "sampling": {"temperature": 0.7, "top_p": 0.95, "end_tokens_banned": True}, "threads": torch.get_num_threads(),
           "load_average_start": os.getloadavg()[0]}

    def save():
        res["load_average_now"] = os.getloadavg()[0]
        write_json(out / "results.json", res, indent=1)

    if not a.skip_speed:  # short alternating runs at batch 1 (the full runs below are the batched ones)
        res["speed"] = {"batch_1": speed_pairs(engine, ids[:2], base, wm, 1, 48)}
        if a.speed_batch:
            res["speed"][f"batch_{a.batch}"] = speed_pairs(engine, ids[:a.batch], base, wm, a.batch, 16)
        print("speed", json.dumps(res["speed"]), flush=True)
        save()
    comps = {}
    res["runs"] = {}
    for name, w in (("plain", None), ("watermarked", wm)):
        c, s = timed(engine, ids, SamplingParams(**{**base.__dict__, "watermark": w}), a.batch)
        comps[name] = c
        n = sum(len(x.token_ids) for x in c)
        res["runs"][name] = {"tokens": n, "seconds": s, "tokens_per_s": n / s}
        print(f"{name}: {n} tokens in {s:.0f}s ({n / s:.1f} tok/s, batch {a.batch})", flush=True)
    save()
    write_json(out / "replies.json", [{"prompt": p, "plain": cp.text, "watermarked": cw.text}
                                      for p, cp, cw in zip(prompts, comps["plain"], comps["watermarked"])], indent=1)
    plain_ids = [c.token_ids for c in comps["plain"]]
    wm_ids = [c.token_ids for c in comps["watermarked"]]
    human = []
    for line in open(Path(a.corpus) / "val.jsonl", encoding="utf-8"):
        t = tok.encode(json.loads(line)["text"])
        human += [t[i:i + a.tokens] for i in range(0, len(t) - a.tokens + 1, a.tokens)]
    human = human[:a.max_human]
    res["negatives"] = {"plain": len(plain_ids), "human": len(human)}
    res["detection"], thr = {}, {}
    rng = random.Random(a.seed)
    attacked = {f: substitute(wm_ids, f, tok.vocab_size, rng) for f in (0.1, 0.2, 0.3)}
    t0 = time.perf_counter()
    dm.prime(wm_ids + plain_ids + human + [s for v in attacked.values() for s in v])
    for mode, ignore in MODES.items():
        res["detection"][mode] = {}
        for T in LENGTHS:
            zw, zp, zh = (zs_of(s, dm, T, ignore) for s in (wm_ids, plain_ids, human))
            if not zw or not zp + zh:
                continue
            thr[mode, T] = t = threshold(zp + zh)
            res["detection"][mode][T] = {
                "threshold_z": t, "tpr": rate(zw, t), "n_pos": len(zw), "n_plain": len(zp), "n_human": len(zh),
                "fpr_at_threshold": rate(zp + zh, t), "median_z": statistics.median(zw),
                "fpr_nominal": {"plain": rate(zp, Z_NOMINAL), "human": rate(zh, Z_NOMINAL)},
                "tpr_nominal": rate(zw, Z_NOMINAL),
                "substitutions": {f: rate(zs_of(s, dm, T, ignore), t) for f, s in attacked.items()}}
    res["detection_seconds"] = time.perf_counter() - t0
    save()
    # quality: perplexity under SmolLM2
    if own_ppl:
        ppl = {k: math.exp(-sum(e[1] for c in cs for e in c.logprobs) / max(1, sum(len(c.logprobs) for c in cs)))
               for k, cs in comps.items()}
    else:
        pdir = resolve(a.ppl_model)
        pmodel, ptok = load_model(pdir), Tokenizer.load(pdir)
        pp = chat_ids(ptok, prompts)
        ppl = {k: perplexity(pmodel, pp, [ptok.encode(c.text) for c in cs]) for k, cs in comps.items()}
        del pmodel
    res["perplexity"] = {"under": str(resolve(a.ppl_model)), "prompts": len(prompts), **ppl}
    save()
    # the watermark's own cost per step over a batch of real contexts (the replies' own), with a fresh
    # green-list cache as a server meets new contexts: one add_bias for the batch (now) against the
    # per-row clone and indexed add the engine did before (same lists, same result)
    B = min(a.batch, len(wm_ids))
    steps = min(a.tokens, min(map(len, wm_ids)))
    ctxs = [[(x + c)[len(x) + i - 1:len(x) + i] for x, c in zip(ids[:B], wm_ids[:B])] for i in range(steps)]
    logits = torch.zeros(B, model.cfg.vocab_size)
    cost = {"batch": B, "steps": steps}
    for name in ("per_row", "add_bias", "per_row_warm", "add_bias_warm"):
        w = Watermark(cfg, tok.vocab_size) if not name.endswith("warm") else wm
        t0 = time.perf_counter()
        for cs in ctxs:
            if name.startswith("add_bias"):
                w.add_bias(cs, logits)
            else:
                for r, c in enumerate(cs):
                    row = logits[r].clone()
                    row[w.greenlist(c)] += cfg.delta
                    logits[r] = row
        cost[f"{name}_ms_per_step"] = 1e3 * (time.perf_counter() - t0) / max(1, steps)
    res["watermark_cost"] = cost
    # streaming moderation: the lexicon over each newly decoded piece (with its 64-character lead), per token
    lex = load_moderator("lexicon").lexicon
    t0, n = time.perf_counter(), 0
    for s in plain_ids:
        text = ""
        for t in s:
            before = text
            text += tok.decode([t])
            lex.hits(text[max(0, len(before) - 64):])
            n += 1
    res["streaming_moderation"] = {"ms_per_token": 1e3 * (time.perf_counter() - t0) / max(1, n)}
    save()
    k = len(wm_ids) if a.paraphrase is None else min(a.paraphrase, len(wm_ids))
    if k:
        same = Path(resolve(a.paraphraser)).resolve() == Path(mdir).resolve()
        pmodel_dir = resolve(a.paraphraser)
        pe = engine if same else Engine(load_model(pmodel_dir), Tokenizer.load(pmodel_dir), max_batch=a.batch)
        pp = chat_ids(pe.tok, [PARAPHRASE.format(c.text) for c in comps["watermarked"][:k]])
        t0 = time.perf_counter()
        para = pe.generate_many(pp, SamplingParams(max_new_tokens=a.tokens, temperature=0.7, top_p=0.95,
                                                   seed=a.seed + 1), max_batch=a.batch)
        para_ids = [tok.encode(c.text) for c in para]
        res["paraphrase"] = {"paraphraser": str(pmodel_dir), "n": k, "seconds": time.perf_counter() - t0,
                             "median_tokens": statistics.median(map(len, para_ids))}
        for mode, ignore in MODES.items():
            Ts = [T for m, T in thr if m == mode]
            if Ts:  # the threshold of the longest length measured
                zp_ = [detect(s, dm, min_tokens=1, ignore_repeated_ngrams=ignore).z for s in para_ids if s]
                res["paraphrase"][mode] = {"threshold_tokens": max(Ts), "threshold_z": thr[mode, max(Ts)],
                                           "tpr": rate(zp_, thr[mode, max(Ts)]),
                                           "median_z": statistics.median(zp_) if zp_ else None}
        write_json(out / "paraphrases.json", [{"watermarked": c.text, "paraphrase": q.text}
                                              for c, q in zip(comps["watermarked"], para)], indent=1)
        save()
    table = render_table(res)
    write_text(out / "table.md", table)
    plot(res, out / "robustness.png")
    print(table)


def render_table(res) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    L = [f"Watermark on {Path(res['model']).name}: {res['prompts']} prompts x {res['tokens']} tokens, γ 0.25, δ 2, "
         f"left-hash; negatives {res['negatives']['plain']} plain replies + {res['negatives']['human']} human "
         f"windows; threshold: the z at most 1% of the negatives exceed", "",
         "| | " + " | ".join(f"{T} tokens" for T in LENGTHS) + " |", "|---|" + "---|" * len(LENGTHS)]
    for mode, label in (("all", "every token"), ("ignore_repeated", "repeated n-grams ignored")):
        d = res["detection"].get(mode, {})
        cell = lambda f: " | ".join(f(d[T]) if T in d else "–" for T in LENGTHS)  # noqa: E731
        L.append(f"| {label}: threshold z | " + cell(lambda r: f"{r['threshold_z']:.2f}") + " |")
        L.append(f"| {label}: TPR at 1% FPR | " + cell(lambda r: f"**{pct(r['tpr'])}** (median z {r['median_z']:.1f})")
                 + " |")
        L.append(f"| {label}: FPR at z > 2.33, plain / human | "
                 + cell(lambda r: f"{pct(r['fpr_nominal']['plain'])} / {pct(r['fpr_nominal']['human'])}") + " |")
        L.append(f"| {label}: TPR after 10 / 20 / 30% substitutions | "
                 + cell(lambda r: " / ".join(pct(r["substitutions"][f]) for f in (0.1, 0.2, 0.3))) + " |")
    if "paraphrase" in res:
        p = res["paraphrase"]
        L += ["", f"Paraphrase by {Path(p['paraphraser']).name} (no watermark), {p['n']} replies, median "
                  f"{p['median_tokens']:.0f} tokens, at the {p.get('all', {}).get('threshold_tokens', '–')}-token "
                  f"threshold: TPR "
                  + ", ".join(f"{m} {pct(p[m]['tpr'])} (median z {p[m]['median_z']:.2f})" for m in MODES if m in p)]
    if "perplexity" in res:
        q = res["perplexity"]
        L += ["", f"Perplexity under {Path(q['under']).name}: plain {q['plain']:.2f}, watermarked {q['watermarked']:.2f}"]
    sp = [f"{k.replace('_', ' ')}: {v['tokens_per_s']['plain']:.1f} → {v['tokens_per_s']['watermarked']:.1f} tok/s "
          f"({v['ms_per_token_added']:+.2f} ms/token)" for k, v in res.get("speed", {}).items()]
    if "runs" in res:
        r = res["runs"]
        sp.append(f"full runs: {r['plain']['tokens_per_s']:.1f} → {r['watermarked']['tokens_per_s']:.1f} tok/s")
    if "watermark_cost" in res:
        c = res["watermark_cost"]
        sp.append(f"the bias alone per step of {c['batch']} rows: {c['add_bias_ms_per_step']:.2f} ms as one scatter "
                  f"vs {c['per_row_ms_per_step']:.2f} ms row by row (fresh green-list cache; warm: "
                  f"{c['add_bias_warm_ms_per_step']:.2f} vs {c['per_row_warm_ms_per_step']:.2f} ms)")
    if "streaming_moderation" in res:
        sp.append(f"streaming moderation (lexicon) {res['streaming_moderation']['ms_per_token']:.3f} ms/token")
    L += ["", "Speed, plain → watermarked: " + "; ".join(sp)]
    return "\n".join(L) + "\n"


def plot(res, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    for mode, style in (("all", "-"), ("ignore_repeated", "--")):
        for T, color in zip(LENGTHS, ("C0", "C1", "C2")):
            r = res["detection"].get(mode, {}).get(T)
            if r is None:
                continue
            xs = [0, 10, 20, 30]
            ys = [r["tpr"]] + [r["substitutions"][f] for f in (0.1, 0.2, 0.3)]
            ax.plot(xs, ys, style, color=color, marker="o", label=f"{T} tokens" + (" (no repeats)" if mode != "all"
                                                                                   else ""))
    p = res.get("paraphrase", {}).get("all")
    if p:
        ax.scatter([40], [p["tpr"]], color="C3", marker="*", s=90, zorder=3, label="paraphrased")
    ax.set_xticks([0, 10, 20, 30] + ([40] if p else []), ["0", "10", "20", "30"] + (["para."] if p else []))
    ax.set_xlabel("random token substitutions (%)")
    ax.set_ylabel("TPR at 1% FPR (empirical)")
    ax.set_title(f"{Path(res['model']).name}, γ=0.25 δ=2, {res['prompts']} prompts", fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
