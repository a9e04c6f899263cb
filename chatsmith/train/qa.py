"""Extractive question answering with an encoder: `chatsmith qa train | eval | predict`.

BERT's SQuAD recipe (section 4.2): the input is [CLS] question [SEP] context [SEP]; a "span" head
gives every token a start and an end logit, and the answer is the span i <= j maximising
start_i + end_j. A context longer than the model is read in windows that overlap by --stride
tokens; a window that does not contain the whole answer (and every window of an unanswerable
SQuAD v2.0 question) is trained to point at [CLS], so "no answer" is the span (0, 0) and its score
competes with the best real span at prediction time (v2: answer "" when null - best > 0).

Token positions map back to character offsets in the context through the tokenizer's offsets, so
answers are exact substrings of what the user gave. Scored with SQuAD's exact match and F1
(chatsmith/eval/squad.py); data read by chatsmith/data/squad.py; the built-in set is
`chatsmith data build --what qa`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chatsmith import atomic
from chatsmith.config import TrainConfig
from chatsmith.data.squad import SquadData, gold_answers, read_squad
from chatsmith.encoder_engine import EncoderEngine, load_encoder
from chatsmith.errors import UserError
from chatsmith.eval.squad import squad_scores
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.train.finetune_encoder import EncoderStage, fine_tune


def span_labels(window, start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of the answer [start_char, end_char) in this window, or (0, 0) ([CLS]) when the
    window does not hold the whole answer."""
    ctx = [i for i, o in enumerate(window.offsets) if o is not None]
    off = window.offsets
    if not ctx or off[ctx[0]][0] > start_char or off[ctx[-1]][1] < end_char:
        return 0, 0
    s = next(i for i in ctx if off[i][1] > start_char)      # the token the answer starts in
    e = max(i for i in ctx if off[i][0] < end_char)         # the token it ends in
    return (s, e) if e >= s else (0, 0)


def features(engine: EncoderEngine, data: SquadData, stride: int):
    """Training windows (ids, type_ids, start, end) of every question; answerable questions whose
    answer falls in no window are counted (the context is cut by max_len and the stride)."""
    rows, lost = [], 0
    for ex in data.examples:
        windows = engine.tok.qa_windows(ex.question, ex.context, engine.max_len, stride)
        ans = ex.answers[0] if ex.answers else None
        hit = False
        for w in windows:
            s, e = span_labels(w, ans.start, ans.start + len(ans.text)) if ans else (0, 0)
            hit |= s > 0
            rows.append((w.ids, w.type_ids, s, e))
        lost += bool(ans) and not hit
    return rows, lost


class QAStage(EncoderStage):
    name = "qa"

    def __init__(self, engine: EncoderEngine, train: SquadData, val: SquadData | None, cfg: TrainConfig,
                 stride: int, max_answer_tokens: int):
        rows, self.lost = features(engine, train, stride)
        super().__init__(engine, cfg, rows, val)
        self.stride, self.max_answer = stride, max_answer_tokens

    def targets(self, rows):
        return {"start": torch.tensor([r[2] for r in rows]), "end": torch.tensor([r[3] for r in rows])}

    def loss(self, model, b):
        lg = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], head="span").float()
        # positions past a row's end are padding: they can be neither start nor end
        lg = lg.masked_fill(b["attention_mask"][..., None] == 0, -1e4)
        return (F.cross_entropy(lg[..., 0], b["start"]) + F.cross_entropy(lg[..., 1], b["end"])) / 2, {}

    def score(self, engine):
        r = score(engine, self.val, self.stride, self.max_answer)
        return {"val_exact": r["exact"], "val_f1": r["f1"]}


def predict(engine: EncoderEngine, data: SquadData, stride: int, max_answer_tokens: int) -> dict[str, str]:
    threshold = 0.0 if data.version == "v2.0" else None  # v1.1: every question has an answer
    return {ex.id: engine.answer(ex.question, ex.context, stride, max_answer_tokens, threshold).text
            for ex in data.examples}


def score(engine: EncoderEngine, data: SquadData, stride: int, max_answer_tokens: int) -> dict:
    return squad_scores(gold_answers(data), predict(engine, data, stride, max_answer_tokens))


def run(cfg: TrainConfig, data: str, init: str, val: str | None = None, epochs: float | None = None,
        max_len: int = 256, stride: int = 64, max_answer_tokens: int = 30, val_limit: int = 500) -> dict:
    model, tok = load_encoder(init)
    train = read_squad(data)
    held = read_squad(val) if val else None
    if held and len(held.examples) > val_limit:  # evaluations during training: a fixed first slice
        held = SquadData(held.examples[:val_limit], held.version)
    model.keep_heads(("span",)).add_head("span")
    engine = EncoderEngine(model, tok, max_len=cfg.seq_len or max_len, batch_size=64)
    stage = QAStage(engine, train, held, cfg, stride, max_answer_tokens)
    n_q = len(train.examples)
    print(f"qa data ({train.version}): {n_q} questions -> {len(stage.rows)} windows of <= {engine.max_len} tokens "
          f"(stride {stride}); {stage.lost} answers fall in no window; validation: "
          f"{len(held.examples) if held else 0}", file=sys.stderr)
    return fine_tune(model, stage, cfg, init, epochs or 2.0,
                     {"stage": "qa", "qa": {"stride": stride, "max_answer_tokens": max_answer_tokens,
                                            "version": train.version}},
                     {"questions": n_q, "windows": len(stage.rows), "answers_in_no_window": stage.lost,
                      "version": train.version})


# --- the verbs ------------------------------------------------------------------------------------
DEFAULTS = dict(out="runs/qa", lr=5e-5, warmup_steps=50, min_lr_ratio=0.0, weight_decay=0.01, beta2=0.999,
                batch_size=16, eval_every=500, save_every=500)


def _window_flags(p, train: bool):
    p.add_argument("--max-len", type=int, default=256 if train else None,
                   help="tokens per window (question + context + 3 specials)" + ("" if train else "; default: the model's"))
    p.add_argument("--stride", type=int, default=64, help="tokens shared by consecutive windows of a long context")
    p.add_argument("--max-answer-tokens", type=int, default=30, help="the longest answer span considered")


def _train_arguments(p):
    p.add_argument("--data", required=True, help="SQuAD v1.1/v2.0 JSON (e.g. data/qa/train.json from data build --what qa)")
    p.add_argument("--init", required=True, help="the encoder to fine-tune (a directory or minilm)")
    p.add_argument("--val", help="SQuAD JSON scored during training (its first 500 questions)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the windows (default 2) when neither "
                   "--max-steps nor --max-minutes is given")
    _window_flags(p, True)
    add_train_flags(p, DEFAULTS)


def _train_main(a):
    summary = run(dataclass_from_args(TrainConfig, a), a.data, a.init, val=a.val, epochs=a.epochs, max_len=a.max_len,
                  stride=a.stride, max_answer_tokens=a.max_answer_tokens)
    print(json.dumps(summary, indent=2))


def _eval_arguments(p):
    p.add_argument("model", help="a fine-tuned QA directory")
    p.add_argument("--data", required=True, help="SQuAD v1.1/v2.0 JSON")
    p.add_argument("--out", help="write scores and per-question predictions as JSON here")
    _window_flags(p, False)


def _eval_main(a):
    engine = EncoderEngine.load(a.model, max_len=a.max_len)
    engine.model.head("span")
    data = read_squad(a.data)
    preds = predict(engine, data, a.stride, a.max_answer_tokens)
    r = squad_scores(gold_answers(data), preds)
    if a.out:
        atomic.write_json(a.out, {**r, "data": str(a.data), "predictions": preds})
    # beside the model, for `chatsmith report` (the held-out rows of this stage's column)
    atomic.write_json(Path(a.model) / "qa_eval.json", {"qa": {"exact": r["exact"], "f1": r["f1"], "data": str(a.data)}})
    print(f"exact match {r['exact']:.2f}  F1 {r['f1']:.2f}  ({r['total']} questions, {data.version})", file=sys.stderr)
    print(json.dumps(r))


def _predict_arguments(p):
    p.add_argument("model", help="a fine-tuned QA directory")
    p.add_argument("--question", "-q", action="append", required=True, help="a question (repeat for several)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--context", help="the paragraph to answer from (default: stdin)")
    g.add_argument("--context-file", help="a text file to answer from")
    p.add_argument("--no-answer", action="store_true", help="allow 'no answer' (SQuAD v2 style) instead of always a span")
    _window_flags(p, False)


def _predict_main(a):
    engine = EncoderEngine.load(a.model, max_len=a.max_len)
    engine.model.head("span")
    if a.context_file:
        try:
            context = Path(a.context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--context-file {a.context_file}: {e}") from None
    else:
        context = a.context if a.context is not None else sys.stdin.read()
    if not context.strip():
        raise UserError("the context is empty: pass --context TEXT, --context-file FILE or text on stdin")
    for q in a.question:
        if not q.strip():
            raise UserError("--question is empty")
        s = engine.answer(q, context, a.stride, a.max_answer_tokens, 0.0 if a.no_answer else None)
        print(json.dumps({"question": q, "answer": s.text, "start": s.start, "score": round(s.score, 4),
                          "null_score": round(s.null_score, 4)}, ensure_ascii=False))


TRAIN_VERB = Verb("qa train", "fine-tune an encoder for extractive question answering (SQuAD format)",
                  _train_arguments, _train_main)
EVAL_VERB = Verb("qa eval", "SQuAD exact match and F1 of a QA model", _eval_arguments, _eval_main)
PREDICT_VERB = Verb("qa predict", "answer questions about a paragraph with a QA model", _predict_arguments,
                    _predict_main)
