"""The encoder family's tokenizer: BERT's WordPiece with [CLS] A [SEP] B [SEP] inputs.

Training, normalisation, pre-tokenisation and the WordPiece model are Hugging Face `tokenizers`
(Rust), configured as BERT's: BertNormalizer (clean text, a space around every CJK character so
Chinese is read character by character, optional lowercasing), BertPreTokenizer (split on
whitespace and punctuation), `##`-prefixed continuation pieces. The same class reads an imported
BERT tokenizer (all-MiniLM-L6-v2's `tokenizer.json`), so our encoders and imported ones take the
same path; saved as `tokenizer.json` + `tokenizer_config.json`, which transformers'
`BertTokenizerFast` loads.

Inputs are built here rather than by the tokenizer's own truncation/padding settings (which are
mutable state on a shared object): segments are encoded once, then cut and joined per request.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from chatsmith.errors import UserError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIALS = [PAD, UNK, CLS, SEP, MASK]  # ids 0..4 in a tokenizer chatsmith trains


@dataclass
class Window:
    """One model input of a (question, context) pair: context tokens [start, end) of the whole
    context, with each input position's character span in the context (None: not context)."""
    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int] | None]


class EncoderTokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None, path: Path | None = None):
        tok.no_truncation()
        tok.no_padding()
        self.tok, self.config, self.path = tok, dict(config or {}), path
        ids = {}
        for name, default in (("cls", CLS), ("sep", SEP), ("pad", PAD), ("mask", MASK), ("unk", UNK)):
            t = self.config.get(f"{name}_token", default)
            t = t.get("content") if isinstance(t, dict) else t
            ids[name] = tok.token_to_id(t) if t else None
        missing = [n for n in ("cls", "sep", "pad") if ids[n] is None]
        if missing:
            raise UserError(f"tokenizer at {path} has no {'/'.join(missing)} token: it is not a BERT-style "
                            f"(encoder) tokenizer")
        self.cls_id, self.sep_id, self.pad_id = ids["cls"], ids["sep"], ids["pad"]
        self.mask_id, self.unk_id = ids["mask"], ids["unk"]
        self.special_ids = {i for i in ids.values() if i is not None}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    # what the token shards (chatsmith/data/shards.py) ask of a tokenizer: documents are separated by [SEP]
    @property
    def bos_id(self) -> int:
        return self.sep_id

    eos_id = bos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.pieces(texts)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EncoderTokenizer":
        d = Path(path)
        f = d / "tokenizer.json"
        if not f.exists():
            raise UserError(f"{d} has no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise UserError(f"{f} cannot be read as a tokenizer ({e})") from None
        cfg_file = d / "tokenizer_config.json"
        try:
            config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_file} is not valid JSON ({e})") from None
        return cls(tok, config, d)

    def save(self, out_dir: str | os.PathLike, model_max_length: int | None = None):
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        cfg = {"tokenizer_class": "BertTokenizerFast", "cls_token": CLS, "sep_token": SEP, "pad_token": PAD,
               "mask_token": MASK, "unk_token": UNK, **self.config}
        if model_max_length:
            cfg["model_max_length"] = model_max_length
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    # --- encoding ---------------------------------------------------------------------------
    def pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text without [CLS]/[SEP]."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def join(self, a: list[int], b: list[int] | None, max_len: int) -> tuple[list[int], list[int]]:
        """[CLS] a [SEP] (b [SEP]) cut to max_len, longest segment first (BERT's truncation)."""
        a, b = list(a), None if b is None else list(b)
        room = max_len - (3 if b is not None else 2)
        if room < 1:
            raise UserError(f"max length {max_len} leaves no room for text")
        while len(a) + len(b or ()) > room:
            (a if b is None or len(a) >= len(b) else b).pop()
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def batch(self, rows: list[tuple[list[int], list[int]]], device=None) -> dict[str, torch.Tensor]:
        """Right-padded tensors input_ids, attention_mask, token_type_ids from (ids, type_ids) rows."""
        T = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        tt = torch.zeros((len(rows), T), dtype=torch.long)
        am = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (ids, types) in enumerate(rows):
            x[i, :len(ids)] = torch.tensor(ids)
            tt[i, :len(ids)] = torch.tensor(types)
            am[i, :len(ids)] = 1
        return {"input_ids": x.to(device), "attention_mask": am.to(device), "token_type_ids": tt.to(device)}

    def encode(self, texts: list[str], pairs: list[str] | None = None, max_len: int = 128, device=None):
        """A padded batch of [CLS] text [SEP] (text_pair [SEP]) inputs, truncated to max_len."""
        a = self.pieces(texts)
        b = self.pieces(pairs) if pairs is not None else [None] * len(a)
        return self.batch([self.join(x, y, max_len) for x, y in zip(a, b)], device)

    def qa_windows(self, question: str, context: str, max_len: int, stride: int,
                   max_question: int = 64) -> list[Window]:
        """[CLS] question [SEP] context-window [SEP] inputs covering the whole context: a context longer
        than the room is cut into windows that overlap by `stride` tokens (so an answer near a cut is
        whole in one of them). Each position carries its character span in the context."""
        q = self.pieces([question])[0][:max_question]
        enc = self.tok.encode(context, add_special_tokens=False)
        room = max_len - len(q) - 3
        if room < 8:
            raise UserError(f"max length {max_len} leaves only {room} tokens of context after the question")
        if stride >= room:
            raise UserError(f"--stride {stride} must be smaller than the context room ({room} tokens)")
        n, out, start = len(enc.ids), [], 0
        while True:
            end = min(start + room, n)
            ids = [self.cls_id, *q, self.sep_id, *enc.ids[start:end], self.sep_id]
            types = [0] * (len(q) + 2) + [1] * (end - start + 1)
            offsets = [None] * (len(q) + 2) + [tuple(o) for o in enc.offsets[start:end]] + [None]
            out.append(Window(ids, types, offsets))
            if end >= n:
                return out
            start = end - stride

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)


def is_encoder_tokenizer(path: str | os.PathLike) -> bool:
    d = Path(path)
    try:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(cfg.get("cls_token") and cfg.get("sep_token"))


def train_wordpiece(texts: Iterator[str], vocab_size: int, lowercase: bool = False) -> EncoderTokenizer:
    """A BERT WordPiece tokenizer trained on texts (specials [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4)."""
    tok = HFTokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    return EncoderTokenizer(tok, {"do_lower_case": lowercase})


__all__ = ["SPECIALS", "Window", "EncoderTokenizer", "is_encoder_tokenizer", "train_wordpiece"]
