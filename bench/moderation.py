"""Moderation quality: the lexicon, the learned layer and alt-profanity-check, in the same run.

    nice -n 10 python bench/moderation.py --data data/moderation --corpus data/corpus \
        --dialogues data/chat/heldout.jsonl [--model runs/moderation-clf] [--out bench/results/moderation]

The classifier runs at the threshold calibrated on the data's *dev* split (`chatsmith moderate
--calibrate data/moderation/dev.jsonl --moderation MODEL`, stored in MODEL/moderation.json), the
one `serve --moderation MODEL` uses; the test split is only measured here.
  * precision / recall / F1 / false-positive rate of "offensive" on the test split of
    `data build --what moderation`;
  * false-positive rate on ordinary text: corpus val paragraphs and the built-in held-out dialogues'
    messages (every message a unit);
  * recall on evasion sets: (a) the held-out offensive lines with each word of 4+ letters rewritten
    with one evasion at random (leetspeak, spaced letters, inner dots, full-width, random case,
    stretched letters; Chinese: traditional characters, spaces), (b) "you are a WORD" for each
    lexicon entry (English) / "你这个WORD" (Chinese), with and without the same evasions.
alt-profanity-check (a linear SVM on English tweets and Wikipedia comments) is the reference; it
reads English only, which the Spanish and Italian fortunes are not: its row says what an
off-the-shelf English filter does on them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import zhconv  # noqa: E402

from chatsmith.atomic import write_json, write_text  # noqa: E402
from chatsmith.data.moderation import corpus_paragraphs  # noqa: E402
from chatsmith.moderation import Moderator, load_moderator, read_calibration  # noqa: E402

LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "$", "t": "7"}


def fullwidth(w):
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in w)


def evade(word: str, rng: random.Random) -> str:
    if any("\u4e00" <= c <= "\u9fff" for c in word):
        return rng.choice([lambda w: zhconv.convert(w, "zh-hant"), lambda w: " ".join(w), lambda w: ".".join(w)])(word)
    kinds = [lambda w: "".join(LEET.get(c, c) for c in w), lambda w: " ".join(w), lambda w: ".".join(w),
             fullwidth, lambda w: "".join(c.upper() if rng.random() < 0.5 else c for c in w),
             lambda w: w[:2] + w[2] * 4 + w[3:] if len(w) > 3 else w + w[-1] * 3]
    return rng.choice(kinds)(word)


def evade_line(line: str, rng: random.Random) -> str:
    return " ".join(evade(w, rng) if len(w) >= 4 and w.isalpha() else w for w in line.split())


def prf(gold: list[bool], pred: list[bool]) -> dict:
    tp = sum(g and p for g, p in zip(gold, pred))
    fp = sum(p and not g for g, p in zip(gold, pred))
    fn = sum(g and not p for g, p in zip(gold, pred))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "n": len(gold), "positives": sum(gold)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--dialogues", required=True)
    ap.add_argument("--model", default=None, help="the learned layer (classify train on --data)")
    ap.add_argument("--max-dialogue-messages", type=int, default=2000)
    ap.add_argument("--limit", type=int, default=None, help="at most N texts per set (a smoke run, not a measurement)")
    ap.add_argument("--out", default="bench/results/moderation")
    a = ap.parse_args()
    rng = random.Random(0)
    test = [json.loads(x) for x in open(Path(a.data) / "test.jsonl", encoding="utf-8")][:a.limit]
    texts, gold = [r["text"] for r in test], [r["label"] == "offensive" for r in test]
    ordinary = {"corpus_val": corpus_paragraphs(Path(a.corpus), "val"), "dialogues": []}
    for line in open(a.dialogues, encoding="utf-8"):
        ordinary["dialogues"] += [m["content"] for m in json.loads(line)["messages"] if m["content"].strip()]
    ordinary["dialogues"] = ordinary["dialogues"][:a.max_dialogue_messages]
    offensive = [t for t, g in zip(texts, gold) if g]
    lex = load_moderator("lexicon")
    entries_en = sorted(lex.lexicon.single)
    entries_zh = list(lex.lexicon.zh)
    evasion = {
        "heldout_offensive": offensive,
        "heldout_offensive_evaded": [evade_line(t, rng) for t in offensive],
        "lexicon_entries": [f"you are a {w}" for w in entries_en] + [f"你这个{w}" for w in entries_zh],
        "lexicon_entries_evaded": [f"you are a {evade(w, rng)}" for w in entries_en]
                                  + [f"你这个{evade(w, rng)}" for w in entries_zh],
    }
    if a.limit:
        ordinary = {k: v[:a.limit] for k, v in ordinary.items()}
        evasion = {k: v[:a.limit] for k, v in evasion.items()}
    systems = {"lexicon": lambda xs: [v.categories["offensive"] for v in lex.check(xs)]}
    calibration = None
    if a.model:
        learned = load_moderator(a.model)
        calibration = read_calibration(a.model)
        if calibration is None:
            print(f"{a.model} is not calibrated: the classifier runs at threshold {learned.threshold}", file=sys.stderr)
        learned.classifier = CachedClassifier(learned.classifier)  # both rows below read one pass per text
        systems["lexicon+classifier"] = lambda xs: [v.categories["offensive"] for v in learned.check(xs)]
        alone = Moderator(_empty_lexicon(lex.lexicon), learned.classifier, learned.threshold)
        systems["classifier"] = lambda xs: [v.categories["offensive"] for v in alone.check(xs)]
    try:
        from profanity_check import predict
        systems["alt-profanity-check"] = lambda xs: [bool(p) for p in predict(xs)]
    except ImportError:
        print("alt-profanity-check is not installed: its row is left out", file=sys.stderr)
    res = {"calibration": calibration, "test": {}, "fpr": {}, "evasion_recall": {}, "seconds": {}, "sizes": {
        "test": len(texts), "test_offensive": sum(gold), **{k: len(v) for k, v in ordinary.items()},
        **{k: len(v) for k, v in evasion.items()}}, "load_average": os.getloadavg()[0]}
    for name, fn in systems.items():
        t0 = time.perf_counter()
        pred = fn(texts)
        res["test"][name] = prf(gold, pred)
        res["test"][name]["fpr_clean"] = sum(p and not g for g, p in zip(gold, pred)) / max(1, gold.count(False))
        res["fpr"][name] = {k: sum(fn(v)) / max(1, len(v)) for k, v in ordinary.items()}
        res["evasion_recall"][name] = {k: sum(fn(v)) / max(1, len(v)) for k, v in evasion.items()}
        res["seconds"][name] = time.perf_counter() - t0
        print(name, json.dumps({k: res[k][name] for k in ("test", "fpr", "evasion_recall")}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res, indent=1)
    write_text(out / "table.md", render_table(res))
    print(render_table(res))
    examples = [{"original": o, "evaded": e} for o, e in zip(evasion["heldout_offensive"][:5],
                                                             evasion["heldout_offensive_evaded"][:5])]
    write_text(out / "evasion_examples.json", json.dumps(examples, indent=1, ensure_ascii=False))


def render_table(res) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    cal = res.get("calibration")
    L = []
    if cal:
        d = cal["dev"]
        L += [f"Classifier threshold {cal['threshold']:.4f} (max_len {cal['max_len']}), set on the dev split "
              f"({d['records']} texts): best dev F1 ({d['f1']:.3f}) where the classifier flags at most "
              f"{pct(cal['target_fpr'])} of ordinary dev text beyond the lexicon (it adds "
              f"{pct(d.get('fpr_ordinary_added', d['fpr_ordinary']))}; with the lexicon's "
              f"{pct(d.get('fpr_ordinary_lexicon', 0.0))}: {pct(d['fpr_ordinary'])})", ""]
    L += ["| | precision | recall | F1 | FPR test clean | FPR corpus val | FPR dialogues | recall: lexicon entries / "
          "evaded | recall: test offensive / evaded |", "|---|---|---|---|---|---|---|---|---|"]
    for name, t in res["test"].items():
        f, e = res["fpr"][name], res["evasion_recall"][name]
        L.append(f"| {name} | {pct(t['precision'])} | {pct(t['recall'])} | {pct(t['f1'])} | {pct(t['fpr_clean'])} | "
                 f"{pct(f['corpus_val'])} | {pct(f['dialogues'])} | {pct(e['lexicon_entries'])} / "
                 f"{pct(e['lexicon_entries_evaded'])} | {pct(e['heldout_offensive'])} / "
                 f"{pct(e['heldout_offensive_evaded'])} |")
    z = res["sizes"]
    L += ["", f"test {z['test']} texts ({z['test_offensive']} offensive); corpus val {z['corpus_val']} paragraphs; "
              f"dialogues {z['dialogues']} messages; load average {res['load_average']:.1f}"]
    return "\n".join(L) + "\n"


class CachedClassifier:
    """An EncoderEngine whose classify() remembers each text's probabilities (same model, same answers)."""

    def __init__(self, engine):
        self.engine, self.model, self.max_len, self.memo = engine, engine.model, engine.max_len, {}

    def classify(self, texts):
        new = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if new:
            for t, p in zip(new, self.engine.classify(new)):
                self.memo[t] = p
        return torch.stack([self.memo[t] for t in texts])


def _empty_lexicon(lexicon):
    """A copy of the lexicon that matches nothing: the classifier's judgement alone."""
    e = object.__new__(type(lexicon))
    e.__dict__.update(lexicon.__dict__)
    e.single, e.phrases, e.zh, e._zh_re = set(), set(), [], None
    return e


if __name__ == "__main__":
    main()
