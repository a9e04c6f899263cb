"""`chatsmith eval MODEL --tasks translation[:PAIRS.jsonl]`: BLEU and chrF on held-out pairs.

The pairs (default data/translation/test.jsonl, from `chatsmith data build --what translation`)
are scored per direction and per source (help, bible) with sacrebleu's corpus BLEU — `zh`
tokenisation for Chinese targets, 13a otherwise — and chrF, and sample translations are kept in
metrics.json. An encoder–decoder model translates in the directions it was trained on (beam search
with --num-beams); a decoder-only chat model is asked "Translate to English: …" in a user turn and
its greedy reply is the translation (the prompt `chat_prompt` the bench fine-tunes it on).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import sacrebleu

from chatsmith.atomic import write_json
from chatsmith.checkpoint import load_model, read_config
from chatsmith.data.translation import Pair, chat_prompt, read_pairs
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.model.registry import family_of
from chatsmith.runtime import resolve_device
from chatsmith.seq2seq_engine import Seq2SeqEngine
from chatsmith.tokenizer import Tokenizer

DEFAULT_PAIRS = "data/translation/test.jsonl"


def is_translation_task(name: str) -> bool:
    return name == "translation" or name.startswith("translation:")


def bleu_chrf(hyps: list[str], refs: list[str], tgt_lang: str) -> dict:
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh" if tgt_lang == "zh" else "13a")
    chrf = sacrebleu.corpus_chrf(hyps, [refs])
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2), "n": len(hyps),
            "bleu_signature": f"tok:{'zh' if tgt_lang == 'zh' else '13a'}"}


def heldout_pairs(path: str, directions: list[tuple[str, str]], limit: int | None) -> dict[tuple, list[Pair]]:
    """(src, tgt, source) -> the first `limit` pairs of that group."""
    pairs, _ = read_pairs(path, "both", "both", skip_bad=True)
    groups: dict[tuple, list[Pair]] = defaultdict(list)
    for p in pairs:
        key = (p.src_lang, p.tgt_lang, p.source)
        if (p.src_lang, p.tgt_lang) in directions and (limit is None or len(groups[key]) < limit):
            groups[key].append(p)
    if not groups:
        raise UserError(f"{path} has no pairs in the directions {', '.join(f'{a}->{b}' for a, b in directions)}")
    return dict(sorted(groups.items()))


def evaluate(translate, groups: dict[tuple, list[Pair]], n_samples: int = 3) -> dict:
    """translate(texts, src, tgt) -> hypotheses. Scores per group, per direction, with samples."""
    out, by_dir = {}, defaultdict(lambda: ([], [], None))
    for (a, b, source), pairs in groups.items():
        t0 = time.time()
        hyps = translate([p.src for p in pairs], a, b)
        r = bleu_chrf(hyps, [p.tgt for p in pairs], b)
        r["seconds"] = round(time.time() - t0, 2)
        r["samples"] = [{"source": p.src, "reference": p.tgt, "translation": h} for p, h in
                        list(zip(pairs, hyps))[:n_samples]]
        out[f"{a}->{b}/{source}"] = r
        h_all, r_all, _ = by_dir[(a, b)]
        by_dir[(a, b)] = (h_all + hyps, r_all + [p.tgt for p in pairs], b)
    return {"groups": out,
            "directions": {f"{a}->{b}": bleu_chrf(h, r, t) for (a, b), (h, r, t) in by_dir.items()}}


def seq2seq_translator(engine: Seq2SeqEngine, num_beams: int, max_new_tokens: int):
    p = SamplingParams(temperature=0.0, num_beams=num_beams, max_new_tokens=max_new_tokens)

    def translate(texts, src, tgt):
        outs, _ = engine.translate(texts, tgt, p, src=src)
        return [o[0].text for o in outs]
    return translate


def chat_translator(model, tok: Tokenizer, max_new_tokens: int):
    """A decoder-only chat model as a translator: the prompt as the user turn, the greedy reply."""
    engine = Engine(model, tok)
    p = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    ctx = model.cfg.max_seq_len

    def translate(texts, src, tgt):
        prompts = []
        for t in texts:
            ids, _ = tok.render_chat([{"role": "user", "content": chat_prompt(t, tgt)}], add_generation_prompt=True)
            prompts.append(ids[-(ctx - max_new_tokens):] if len(ids) + max_new_tokens > ctx else ids)
        return [c.text.strip() for c in engine.generate_many(prompts, p)]
    return translate


def run_translation_eval(model_dir, tasks: list[str], out=None, limit: int | None = None, device: str = "cpu",
                         max_new_tokens: int = 128, num_beams: int = 1, n_samples: int = 3,
                         quiet: bool = False) -> dict:
    t0 = time.time()
    dev = resolve_device(device)
    cfg = read_config(model_dir)
    seq2seq = family_of(cfg).name == "seq2seq"
    results = {}
    for task in tasks:
        path = task.partition(":")[2] or DEFAULT_PAIRS
        if not Path(path).is_file():
            raise UserError(f"translation pairs {path} not found: run `chatsmith data build --what translation`, "
                            f"or pass --tasks translation:PAIRS.jsonl")
        if seq2seq:
            engine = Seq2SeqEngine.load(model_dir, device=dev)
            directions = engine.directions or [(a, b) for b in engine.cfg.languages for a in ("zh", "en") if a != b]
            translate = seq2seq_translator(engine, num_beams, max_new_tokens)
        else:
            if num_beams > 1:
                raise UserError("--num-beams applies to encoder-decoder models; a chat model is decoded greedily")
            tok = Tokenizer.load(model_dir)
            if not tok.has_chat:
                raise UserError(f"{model_dir} is neither an encoder-decoder model nor a chat model")
            directions = [("zh", "en"), ("en", "zh")]
            translate = chat_translator(load_model(model_dir, device=dev), tok, max_new_tokens)
        groups = heldout_pairs(path, [tuple(d) for d in directions], limit)
        r = evaluate(translate, groups, n_samples)
        results[task] = {"kind": "translation", "data": path, "n": sum(len(g) for g in groups.values()), **r}
    metrics = {"model": str(model_dir), "family": family_of(cfg).name,
               "decoding": f"beam {num_beams}" if num_beams > 1 else "greedy", "max_new_tokens": max_new_tokens,
               "limit": limit, "tasks": results, "seconds": round(time.time() - t0, 2),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = (Path(out) if out is not None else Path(model_dir) / "eval") / "metrics.json"
    write_json(path, metrics)
    metrics["path"] = str(path)
    if not quiet:
        for task, r in results.items():
            print(f"{task} ({metrics['decoding']})")
            for name, g in {**r["directions"], **r["groups"]}.items():
                print(f"  {name:22s} n {g['n']:5d}  BLEU {g['bleu']:6.2f}  chrF {g['chrf']:6.2f}")
        print(f"metrics written to {path}", file=sys.stderr)
    return metrics


__all__ = ["run_translation_eval", "evaluate", "bleu_chrf", "heldout_pairs", "seq2seq_translator",
           "chat_translator", "is_translation_task", "DEFAULT_PAIRS"]
