#!/usr/bin/env python
"""The encoder family against its baselines, in one run, on the built-in held-out splits.

    sentiment (en sentences, zh reviews): accuracy / macro-F1 of
        TF-IDF + logistic regression (bench/sentiment_baseline.py, C by 5-fold CV on train)
        all-MiniLM-L6-v2 fine-tuned          (chatsmith classify train --init minilm)
        our encoder from scratch             (chatsmith pretrain --family bert, then classify train)
    QA (the built-in SQuAD v2.0 set): exact match / F1 of MiniLM fine-tuned and the from-scratch encoder
    MLM: the from-scratch encoder's masked-token accuracy on val before and after pretraining

Everything goes through the CLI a user runs, with fixed epochs (fine-tuning) and a minutes budget
(pretraining), so accuracy does not depend on how busy the machine is; the wall times printed do.

    python -m chatsmith data build --what sentiment --out data && python -m chatsmith data build --what qa --out data
    python bench/encoder_tasks.py --data data --out runs/bench-encoder [--only sentiment qa] [--sets en zh]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import sentiment_baseline  # bench/ is on sys.path when this file runs as a script
from cli_run import sh


def classify(init: str, set_dir: Path, out: Path, epochs: float, max_len: int, lr: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    secs = sh("classify", "train", "--data", set_dir / "train.jsonl", "--init", init, "--out", out / "model",
              "--epochs", epochs, "--max-len", max_len, "--lr", lr, "--batch-size", 32, "--eval-every", 100_000,
              "--save-every", 100_000, log=out / "train.log")
    sh("classify", "eval", out / "model", "--data", set_dir / "test.jsonl", "--out", out / "test.json",
       "--max-len", max_len, log=out / "eval.log")
    r = json.loads((out / "test.json").read_text())
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "train_seconds": secs}


def qa(init: str, data: Path, out: Path, epochs: float, lr: float, max_len: int, minutes: float | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    budget = ["--max-minutes", minutes] if minutes else ["--epochs", epochs]
    secs = sh("qa", "train", "--data", data / "train.json", "--init", init, "--out", out / "model", *budget,
              "--lr", lr, "--max-len", max_len, "--stride", 64, "--batch-size", 16, "--eval-every", 100_000,
              "--save-every", 100_000, log=out / "train.log")
    sh("qa", "eval", out / "model", "--data", data / "test.json", "--out", out / "test.json", "--max-len", max_len,
       log=out / "eval.log")
    r = json.loads((out / "test.json").read_text())
    return {"exact": r["exact"], "f1": r["f1"], "HasAns_f1": r.get("HasAns", {}).get("f1"),
            "NoAns_exact": r.get("NoAns", {}).get("exact"), "train_seconds": secs}


def pretrain(data: Path, out: Path, minutes: float, sets: list[str]) -> tuple[str, dict]:
    """Our encoder from scratch: MLM on the built-in corpus plus the sentiment sets' *train* texts
    (never their test texts), within `minutes`."""
    out.mkdir(parents=True, exist_ok=True)
    extra = []
    for s in sets:
        f = data / "sentiment" / s / "train.jsonl"
        if f.exists():
            extra.append(f)
    inputs = [data / "corpus" / "train.jsonl", *extra] if (data / "corpus" / "train.jsonl").exists() else extra
    secs = sh("pretrain", "--family", "bert", "--input", *inputs, "--preset", "tiny", "--out", out / "model",
              "--max-minutes", minutes, "--seq-len", 128, "--batch-size", 32, "--lr", 5e-4, "--warmup-steps", 100,
              "--vocab-size", 16000, "--eval-every", 500, "--save-every", 1000, log=out / "pretrain.log")
    rows = [json.loads(x) for x in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in rows if "val_mlm_acc" in r][-1]
    log = (out / "pretrain.log").read_text()
    before = json.loads(log[log.rindex("\n{"):])["before"] if "\n{" in log else {}
    return str(out / "model"), {"mlm_acc_before": before.get("val_mlm_acc"), "mlm_acc_after": after["val_mlm_acc"],
                                "val_mlm_loss": after["val_mlm_loss"], "steps": after["step"], "seconds": secs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data", help="the --out of `data build --what sentiment` / `--what qa`")
    ap.add_argument("--out", default="runs/bench-encoder")
    ap.add_argument("--only", nargs="+", default=["sentiment", "qa"], choices=["sentiment", "qa"])
    ap.add_argument("--sets", nargs="+", default=["en", "zh"], help="sentiment sets")
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch encoder")
    ap.add_argument("--pretrain-minutes", type=float, default=10.0, help="MLM budget of the from-scratch encoder")
    ap.add_argument("--epochs", type=float, default=3.0, help="fine-tuning epochs (classification)")
    ap.add_argument("--zh-epochs", type=float, default=1.0, help="fine-tuning epochs on zh (4x the records of en)")
    ap.add_argument("--qa-epochs", type=float, default=1.0)
    ap.add_argument("--qa-max-len", type=int, default=192, help="tokens per QA window")
    ap.add_argument("--qa-minutes", type=float, default=None, help="train QA for this long instead of --qa-epochs")
    a = ap.parse_args(argv)
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"sentiment": {}, "qa": {}}
    scratch = None
    if not a.no_scratch:
        scratch, res["mlm"] = pretrain(data, out / "scratch", a.pretrain_minutes, a.sets)
        print(f"from-scratch encoder: MLM accuracy {res['mlm']['mlm_acc_before']:.3f} -> "
              f"{res['mlm']['mlm_acc_after']:.3f} in {res['mlm']['steps']} steps", flush=True)
    if "sentiment" in a.only:
        for s in a.sets:
            d = data / "sentiment" / s
            base = sentiment_baseline.run(d, s, seed=0)
            row = {"tfidf_lr": {"accuracy": base["accuracy"], "macro_f1": base["macro_f1"],
                                "train_seconds": base["seconds"]}}
            ep = a.zh_epochs if s.startswith("zh") else a.epochs
            row["minilm"] = classify("minilm", d, out / f"minilm-{s}", ep, 128, 5e-5)
            if scratch:
                row["scratch"] = classify(scratch, d, out / f"scratch-{s}", ep, 128, 1e-4)
            res["sentiment"][s] = row
            print(f"{s}: " + "  ".join(f"{k} {100 * v['accuracy']:.2f}" for k, v in row.items()), flush=True)
    if "qa" in a.only:
        res["qa"]["minilm"] = qa("minilm", data / "qa", out / "minilm-qa", a.qa_epochs, 1e-4, a.qa_max_len, a.qa_minutes)
        if scratch:
            res["qa"]["scratch"] = qa(scratch, data / "qa", out / "scratch-qa", a.qa_epochs, 2e-4, min(a.qa_max_len, 128),
                                  a.qa_minutes)
        print("qa: " + "  ".join(f"{k} EM {v['exact']:.1f} F1 {v['f1']:.1f}" for k, v in res["qa"].items()), flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{'task':<14}{'system':<12}{'accuracy / EM':>15}{'macro-F1 / F1':>15}{'vs TF-IDF':>11}{'train s':>9}")
    for s, row in res["sentiment"].items():
        ref = row["tfidf_lr"]["accuracy"]
        for k, v in row.items():
            print(f"{'sentiment-' + s:<14}{k:<12}{100 * v['accuracy']:>15.2f}{100 * v['macro_f1']:>15.2f}"
                  f"{100 * (v['accuracy'] - ref):>+11.2f}{v['train_seconds']:>9.0f}")
    for k, v in res["qa"].items():
        print(f"{'qa':<14}{k:<12}{v['exact']:>15.2f}{v['f1']:>15.2f}{'':>11}{v['train_seconds']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
