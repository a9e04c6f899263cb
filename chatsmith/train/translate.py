"""Machine translation with the encoder–decoder Transformer: `chatsmith translate train | MODEL`.

Training is teacher forcing on the one trainer: the encoder reads `<2tgt> source </s>`, the decoder
reads the target shifted right (starting from the pad token, Marian's decoder start) and is
trained to predict each next target token, with label-smoothed cross-entropy (ε = 0.1 in the
paper). One joint byte-level BPE vocabulary covers both languages, so the embedding matrix is
shared by encoder, decoder and output layer (as the paper and Marian do), and a Chinese name left
untranslated in English text is the same tokens on both sides. `--both` trains both directions
into one model: the target-language tag tells it which way to go.

Sources and targets longer than the context are cut (and counted); empty sides and absurd length
ratios are refused with file:line unless --skip-bad (chatsmith/data/translation.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chatsmith import atomic, runtime
from chatsmith.batching import length_grouped_batch
from chatsmith.config import DEVICES, TrainConfig
from chatsmith.data.translation import Pair, read_pairs
from chatsmith.engine import SamplingParams
from chatsmith.errors import UserError
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.model import registry
from chatsmith.model.seq2seq import PRESETS
from chatsmith.runtime import resolve_device
from chatsmith.seq2seq_engine import Seq2SeqEngine, lang_tag
from chatsmith.tokenizer import Tokenizer, train_tokenizer
from chatsmith.train.trainer import Trainer, steps_for_epochs


def _held(p: Pair) -> bool:
    """A fixed ~2% of the training pairs for validation when no --val is given (by a hash of the
    source text, so both directions of a pair land on the same side)."""
    key = min(p.src, p.tgt)
    return hashlib.sha1(key.encode()).digest()[0] < 5


def encode_pairs(tok: Tokenizer, pairs: list[Pair], max_len: int, eos: int) -> tuple[list, int]:
    """(src ids, tgt ids) rows: src = [<2tgt>] + text + [eos], tgt = text + [eos], each cut to
    max_len; -> (rows, how many pairs were cut)."""
    rows, cut = [], 0
    srcs = tok.encode_batch([p.src for p in pairs])
    tgts = tok.encode_batch([p.tgt for p in pairs])
    for p, s, t in zip(pairs, srcs, tgts):
        tag = tok.tok.token_to_id(lang_tag(p.tgt_lang))
        cut += len(s) > max_len - 2 or len(t) > max_len - 1
        rows.append(([tag] + s[:max_len - 2] + [eos], t[:max_len - 1] + [eos]))
    return rows, cut


def collate_pairs(rows: list[tuple[list[int], list[int]]], pad: int, start: int) -> dict:
    S, T = max(len(s) for s, _ in rows), max(len(t) for _, t in rows)
    src = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    tgt_in = torch.full((len(rows), T), pad, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (s, t) in enumerate(rows):
        src[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        tgt_in[i, :len(t)] = torch.tensor([start] + t[:-1])
        labels[i, :len(t)] = torch.tensor(t)
    return {"src": src, "src_mask": mask, "tgt_in": tgt_in, "labels": labels}


class TranslationStage:
    name = "translate"

    def __init__(self, rows, val_rows, cfg: TrainConfig, pad: int, start: int, label_smoothing: float = 0.1):
        self.rows, self.val_rows, self.cfg = rows, val_rows, cfg
        self.pad, self.start, self.eps = pad, start, label_smoothing

    def batch_rows(self, index: int) -> list[int]:
        """Pair indices of micro-batch `index`, grouped by length (batching.length_grouped_batch): a
        batch of short sentences is no longer padded to the longest paragraph (about half the
        compute, on the help pages)."""
        return length_grouped_batch(self.cfg.seed, index, self.cfg.batch_size, len(self.rows),
                                    lambda j: len(self.rows[j][0]) + len(self.rows[j][1]))

    def batch(self, step: int, micro: int, rank: int):
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, runtime.world_size())
        return collate_pairs([self.rows[j] for j in self.batch_rows(i)], self.pad, self.start)

    def _logits(self, model, b):
        return model(b["src"], b["tgt_in"], b["src_mask"]).float()

    def loss(self, model, b):
        logits = self._logits(model, b)
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                               label_smoothing=self.eps)
        return loss, {}

    def tokens(self, b) -> int:
        return int(b["src_mask"].sum() + (b["labels"] != -100).sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Cross-entropy (no smoothing) and next-token accuracy on the validation pairs."""
        if not self.val_rows:
            return {}
        device = next(model.parameters()).device
        nats = hits = n = 0.0
        bs = self.cfg.batch_size
        for k in range(0, min(len(self.val_rows), bs * self.cfg.eval_batches), bs):
            b = {key: v.to(device) for key, v in collate_pairs(self.val_rows[k:k + bs], self.pad, self.start).items()}
            logits = self._logits(model, b)
            y = b["labels"].flatten()
            sel = y != -100
            lg = logits.flatten(0, 1)[sel]
            nats += F.cross_entropy(lg, y[sel], reduction="sum").item()
            hits += (lg.argmax(-1) == y[sel]).sum().item()
            n += sel.sum().item()
        return {"val_loss": nats / max(n, 1), "val_token_acc": hits / max(n, 1)}


def _directions(src: str, tgt: str, both: bool) -> list[tuple[str, str]]:
    return [(src, tgt), (tgt, src)] if both else [(src, tgt)]


def load_training_pairs(path: str, src: str, tgt: str, both: bool, skip_bad: bool) -> tuple[list[Pair], dict]:
    pairs, stats = read_pairs(path, src, tgt, skip_bad)
    if both:  # the reverse of each pair
        pairs = pairs + [Pair(p.tgt, p.src, p.tgt_lang, p.src_lang, p.source, p.where) for p in pairs]
    return pairs, stats


def prepare_tokenizer(pairs: list[Pair], tokenizer: str | None, out: Path, vocab_size: int,
                      langs: list[str]) -> Path:
    """A joint BPE over both sides of the training pairs (unless --tokenizer names one), with a
    <2xx> tag per target language."""
    tok_dir = Path(tokenizer) if tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        if tokenizer:
            raise UserError(f"--tokenizer {tok_dir} has no tokenizer.json")
        print(f"training a joint {vocab_size}-token BPE over {len(pairs)} pairs", file=sys.stderr)
        texts = (t for p in pairs for t in (p.src, p.tgt))
        tok = train_tokenizer(texts, vocab_size)
        tok.tok.add_special_tokens([lang_tag(x) for x in langs])
        tok.save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    missing = [lang_tag(x) for x in langs if tok.tok.token_to_id(lang_tag(x)) is None]
    if missing:
        raise UserError(f"--tokenizer {tok_dir} lacks the language tags {', '.join(missing)}")
    return tok_dir


def run(cfg: TrainConfig, data: str, src: str, tgt: str, val: str | None = None, both: bool = False,
        tokenizer: str | None = None, vocab_size: int = 8000, label_smoothing: float = 0.1,
        skip_bad: bool = False, epochs: float | None = None, model_overrides: dict | None = None) -> dict:
    if not 0 <= label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {label_smoothing:g}")
    out = Path(cfg.out)
    pairs, stats = load_training_pairs(data, src, tgt, both, skip_bad)
    if val:
        held, vstats = load_training_pairs(val, src, tgt, both, skip_bad)
    else:
        held = [p for p in pairs if _held(p)]
        pairs = [p for p in pairs if not _held(p)] if len(held) < len(pairs) else pairs
    dirs = _directions(src, tgt, both)
    langs = sorted({b for _, b in dirs})
    with runtime.rank0_first(cfg.device):
        tok_dir = prepare_tokenizer(pairs, tokenizer, out, vocab_size, langs)
    tok = Tokenizer.load(tok_dir)
    mcfg = registry.preset(cfg.preset, family="seq2seq", vocab_size=(tok.vocab_size + 63) // 64 * 64,
                           pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, languages=tuple(langs),
                           **(model_overrides or {}))
    L = cfg.seq_len or mcfg.max_seq_len
    if not 8 <= L <= mcfg.max_seq_len:
        raise UserError(f"--seq-len {L} must be in [8, {mcfg.max_seq_len}] for the {cfg.preset} seq2seq preset")
    rows, cut = encode_pairs(tok, pairs, L, tok.eos_id)
    val_rows, _ = encode_pairs(tok, held, L, tok.eos_id)
    val_rows.sort(key=lambda r: len(r[0]))  # less padding; the set is fixed
    torch.manual_seed(cfg.seed)
    model = registry.build(mcfg)
    print(f"translate data: {len(rows)} training pairs ({', '.join(f'{a}->{b}' for a, b in dirs)}; {cut} cut to "
          f"{L} tokens; {stats['bad']} bad skipped), {len(val_rows)} validation; model: seq2seq preset "
          f"{cfg.preset}, {model.num_params() / 1e6:.2f}M parameters, vocab {mcfg.vocab_size}", file=sys.stderr)
    stage = TranslationStage(rows, val_rows, cfg, mcfg.pad_token_id, mcfg.decoder_start_token_id, label_smoothing)
    steps_for_epochs(cfg, len(rows), epochs or 10.0)
    extra = {"stage": "translate", "directions": [list(d) for d in dirs], "label_smoothing": label_smoothing}
    trainer = Trainer(model, stage, cfg, tokenizer_dir=tok_dir, extra_config=extra)
    summary = trainer.fit()
    summary["data"] = {"train": len(rows), "validation": len(val_rows), "cut": cut, "bad_skipped": stats["bad"],
                       "directions": [f"{a}->{b}" for a, b in dirs]}
    summary["params"] = model.num_params()
    if trainer.master:
        atomic.write_json(out / "train_summary.json", summary)
    return summary


# --- the verbs ------------------------------------------------------------------------------------
DEFAULTS = dict(out="runs/translate", preset="tiny", lr=1e-3, warmup_steps=200, min_lr_ratio=0.05,
                weight_decay=0.01, beta2=0.98, batch_size=32, eval_every=200, eval_batches=10, save_every=500)


def _train_arguments(p):
    p.add_argument("--data", required=True, help="training pairs: .tsv (source<TAB>target), .jsonl {src, tgt} or "
                   "{translation: {LANG: TEXT}} (data build --what translation writes the last)")
    p.add_argument("--src", required=True, help="source language code (a key of the translation records)")
    p.add_argument("--tgt", required=True, help="target language code")
    p.add_argument("--both", action="store_true", help="also train tgt->src: one model for both directions, "
                   "told apart by the <2LANG> tag")
    p.add_argument("--val", help="validation pairs (default: a fixed ~2%% of --data)")
    p.add_argument("--tokenizer", help="an existing tokenizer directory with the <2LANG> tags (default: train a "
                   "joint BPE over both languages of --data)")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary size")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing epsilon of the loss")
    p.add_argument("--skip-bad", action="store_true", help="drop (and count) empty or absurdly mismatched pairs "
                   "instead of stopping at the first")
    p.add_argument("--epochs", type=float, default=None, help="passes over the pairs when neither --max-steps nor "
                   "--max-minutes is given (default 10)")
    add_train_flags(p, DEFAULTS, skip=(), choices={"preset": tuple(PRESETS)})


def _train_main(a):
    summary = run(dataclass_from_args(TrainConfig, a), a.data, a.src, a.tgt, val=a.val, both=a.both,
                  tokenizer=a.tokenizer, vocab_size=a.vocab_size, label_smoothing=a.label_smoothing,
                  skip_bad=a.skip_bad, epochs=a.epochs)
    print(json.dumps(summary, indent=2))


def _run_arguments(p):
    p.add_argument("model", help="a translation model directory (chatsmith translate train)")
    p.add_argument("--text", action="append", help="a text to translate (repeatable; default: lines on stdin)")
    p.add_argument("--src", default=None, help="source language, checked against the directions the model was "
                   "trained on (default: not checked)")
    p.add_argument("--tgt", default=None, help="target language (default: the model's only one)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1: greedy, or sampling with --temperature)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score = logp / length**this")
    p.add_argument("--num-return-sequences", type=int, default=1, help="translations per source (<= --num-beams "
                   "with beam search)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest translation in tokens (the model's "
                   "context caps it)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample (no beams)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=32, help="sources decoded together")
    p.add_argument("--json", action="store_true", help="one JSON object per source (all returned sequences, "
                   "scores) instead of one line of text")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run")


def _run_main(a):
    engine = Seq2SeqEngine.load(a.model, device=resolve_device(a.device), max_batch=max(1, a.batch_size))
    texts = list(a.text or []) or [ln for ln in sys.stdin.read().splitlines()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("nothing to translate: pass --text TEXT or lines on stdin")
    if a.temperature > 0 and a.num_beams > 1:
        raise UserError("--temperature > 0 samples; it does not combine with --num-beams > 1")
    p = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                       num_beams=a.num_beams, num_return_sequences=a.num_return_sequences,
                       length_penalty=a.length_penalty)
    outs, cut = engine.translate(texts, a.tgt, p, src=a.src)
    if cut:
        print(f"warning: {cut} source(s) longer than the model's {engine.cfg.max_seq_len} tokens were cut",
              file=sys.stderr)
    for t, comps in zip(texts, outs):
        if a.json:
            print(json.dumps({"source": t, "translations": [
                {"text": c.text, "score": c.score, "finish_reason": c.finish_reason} for c in comps]},
                ensure_ascii=False))
        else:
            print("\t".join(c.text for c in comps))


TRAIN_VERB = Verb("translate train", "train an encoder-decoder Transformer translator on parallel text",
                  _train_arguments, _train_main)
RUN_VERB = Verb("translate run", "translate texts with a trained model (also: chatsmith translate MODEL)",
                _run_arguments, _run_main)
ACTIONS = ("train", "run")

__all__ = ["TranslationStage", "collate_pairs", "encode_pairs", "run", "TRAIN_VERB", "RUN_VERB", "ACTIONS"]
