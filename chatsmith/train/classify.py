"""Sentence classification with an encoder: `chatsmith classify train | eval | predict`.

Fine-tuning as in BERT (section 4.1): the pooled [CLS] state goes through dropout and one linear
layer to label logits, and the whole network is trained with cross-entropy at a small learning
rate for a few epochs. Inputs are [CLS] text [SEP] or, for pair tasks, [CLS] text [SEP] pair [SEP]
with segment ids 0/1. Labels are names (the sorted label set of the training file, stored in
config.json's id2label, so the directory loads in transformers' BertForSequenceClassification).

Data: chatsmith/data/labelled.py (JSONL, CSV/TSV, pairs), the built-in sentiment sets from
`chatsmith data build --what sentiment`. Metrics: chatsmith/eval/classification.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chatsmith import atomic
from chatsmith.config import TrainConfig
from chatsmith.data.labelled import LabelledData, read_eval, read_train
from chatsmith.encoder_engine import EncoderEngine, load_encoder
from chatsmith.errors import UserError
from chatsmith.eval.classification import classification_report
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.train.finetune_encoder import EncoderStage, fine_tune


def _held(ex) -> bool:
    """A fixed ~10% of training records held out for validation when no --val file is given (by a
    hash of the text: the same records whatever the file order)."""
    return hashlib.sha1(f"{ex.text}\x00{ex.text_pair}".encode()).digest()[0] < 26


class ClassifyStage(EncoderStage):
    name = "classify"

    def __init__(self, engine: EncoderEngine, train: LabelledData, val: LabelledData | None, cfg: TrainConfig):
        tok, L = engine.tok, engine.max_len
        a = tok.pieces([e.text for e in train.examples])
        b = tok.pieces([e.text_pair for e in train.examples]) if train.pairs else [None] * len(a)
        index = {lab: i for i, lab in enumerate(train.labels)}
        rows = [(*tok.join(x, y, L), index[e.label]) for x, y, e in zip(a, b, train.examples)]
        super().__init__(engine, cfg, rows, val)
        self.truncated = sum(len(x) + len(y or ()) + (3 if y is not None else 2) > L for x, y in zip(a, b))

    def targets(self, rows):
        return {"labels": torch.tensor([r[2] for r in rows])}

    def loss(self, model, b):
        logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], head="classify")
        return F.cross_entropy(logits.float(), b["labels"]), {}

    def score(self, engine):
        r = score(engine, self.val)
        return {"val_accuracy": r["accuracy"], "val_macro_f1": r["macro_f1"]}


def predict_labels(engine: EncoderEngine, data: LabelledData) -> tuple[list[str], torch.Tensor]:
    probs = engine.classify([e.text for e in data.examples], [e.text_pair for e in data.examples] if data.pairs else None)
    labels = engine.model.cfg.labels
    return [labels[i] for i in probs.argmax(-1).tolist()], probs


def score(engine: EncoderEngine, data: LabelledData) -> dict:
    pred, _ = predict_labels(engine, data)
    return classification_report([e.label for e in data.examples], pred, list(engine.model.cfg.labels))


def run(cfg: TrainConfig, data: str, init: str, val: str | None = None, epochs: float | None = None,
        max_len: int = 128) -> dict:
    model, tok = load_encoder(init)
    train = read_train(data)
    if val:
        held = read_eval(val, train.labels, train.pairs)
    else:  # a fixed slice of the training file
        keep = [e for e in train.examples if not _held(e)]
        out_ = [e for e in train.examples if _held(e)]
        held = LabelledData(out_, train.labels, train.pairs) if out_ and len(keep) > len(out_) else None
        if held is not None:
            train = LabelledData(keep, train.labels, train.pairs)
            if len({e.label for e in keep}) < 2:
                raise UserError(f"{data}: after holding out validation records only one class is left")
    model.keep_heads(("classify",)).add_head("classify", labels=tuple(train.labels))
    engine = EncoderEngine(model, tok, max_len=cfg.seq_len or max_len, batch_size=64)
    stage = ClassifyStage(engine, train, held, cfg)
    print(f"classify data: {len(train.examples)} train records ({stage.truncated} truncated to "
          f"{engine.max_len} tokens), {len(held.examples) if held else 0} validation; labels "
          f"{', '.join(train.labels)}{' (text pairs)' if train.pairs else ''}", file=sys.stderr)
    return fine_tune(model, stage, cfg, init, epochs or 3.0, {"stage": "classify"},
                     {"train": len(train.examples), "validation": len(held.examples) if held else 0,
                      "labels": train.labels, "truncated": stage.truncated})


# --- the verbs ------------------------------------------------------------------------------------
DEFAULTS = dict(out="runs/classify", lr=5e-5, warmup_steps=30, min_lr_ratio=0.0, weight_decay=0.01, beta2=0.999,
                batch_size=32, eval_every=200, save_every=500)


def _train_arguments(p):
    p.add_argument("--data", required=True, help="training records: .jsonl {text[,text_pair],label} or .csv/.tsv "
                   "with a header")
    p.add_argument("--init", required=True, help="the encoder to fine-tune: a directory (pretrain --family bert, "
                   "an imported BERT) or minilm")
    p.add_argument("--val", help="validation records (default: a fixed ~10%% of --data)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data when neither --max-steps nor "
                   "--max-minutes is given (default 3)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per input, [CLS]/[SEP] included")
    add_train_flags(p, DEFAULTS)


def _train_main(a):
    summary = run(dataclass_from_args(TrainConfig, a), a.data, a.init, val=a.val, epochs=a.epochs, max_len=a.max_len)
    print(json.dumps(summary, indent=2))


def _eval_arguments(p):
    p.add_argument("model", help="a fine-tuned classifier directory")
    p.add_argument("--data", required=True, help="labelled records to score (same formats as training)")
    p.add_argument("--out", help="write the metrics (accuracy, macro-F1, per class, confusion matrix) as JSON here")
    p.add_argument("--max-len", type=int, default=None, help="tokens per input (default: the model's context)")


def _eval_main(a):
    engine = EncoderEngine.load(a.model, max_len=a.max_len)
    engine.model.head("classify")
    data = read_eval(a.data, list(engine.model.cfg.labels))
    r = score(engine, data)
    r["data"] = str(a.data)
    if a.out:
        atomic.write_json(a.out, r)
    # beside the model, for `chatsmith report` (the held-out rows of this stage's column)
    atomic.write_json(Path(a.model) / "classify_eval.json",
                      {"classify": {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "data": str(a.data)}})
    labels = r["labels"]
    print(f"accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  ({r['total']} records)", file=sys.stderr)
    w = max(6, *(len(x) for x in labels))
    print("confusion (rows gold, columns predicted):\n" + " " * (w + 1) + " ".join(f"{x:>{w}}" for x in labels),
          file=sys.stderr)
    for lab, row in zip(labels, r["confusion_matrix"]):
        print(f"{lab:>{w}} " + " ".join(f"{v:>{w}}" for v in row), file=sys.stderr)
    print(json.dumps({k: r[k] for k in ("accuracy", "macro_f1", "total")}))


def _predict_arguments(p):
    p.add_argument("model", help="a fine-tuned classifier directory")
    p.add_argument("text", nargs="*", help="texts to classify (default: one per line on stdin)")
    p.add_argument("--file", help="a file of texts, one per line")
    p.add_argument("--max-len", type=int, default=None, help="tokens per input (default: the model's context)")


def _predict_main(a):
    engine = EncoderEngine.load(a.model, max_len=a.max_len)
    engine.model.head("classify")
    texts = list(a.text)
    if a.file:
        try:
            texts += Path(a.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--file {a.file}: {e}") from None
    if not a.text and not a.file:
        texts = sys.stdin.read().splitlines()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no text to classify: pass texts, --file FILE, or lines on stdin")
    labels = engine.model.cfg.labels
    probs = engine.classify(texts)
    for t, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        print(json.dumps({"text": t, "label": labels[best], "probs": {lab: round(q, 6) for lab, q in zip(labels, p)}},
                         ensure_ascii=False))


TRAIN_VERB = Verb("classify train", "fine-tune an encoder to label texts (sentiment, topics, text pairs)",
                  _train_arguments, _train_main)
EVAL_VERB = Verb("classify eval", "accuracy, macro-F1 and the confusion matrix of a classifier on labelled records",
                 _eval_arguments, _eval_main)
PREDICT_VERB = Verb("classify predict", "label texts with a fine-tuned classifier (JSON lines out)",
                    _predict_arguments, _predict_main)
