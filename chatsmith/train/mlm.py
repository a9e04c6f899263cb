"""Masked-language-model pretraining of an encoder (BERT, Devlin et al. 2019, section 3.1).

`chatsmith pretrain --family bert --input data/corpus` lands here. The corpus is tokenised with a
WordPiece tokenizer (trained on the train split unless --tokenizer names one) into the same token
shards the decoder uses, documents separated by [SEP]. A training example is a random window of
the stream:

    [CLS] window [SEP]                              (default: RoBERTa's "full sentences" packing)
    [CLS] A [SEP] B [SEP]                           (--nsp: B follows A in 50% of examples, else B is
                                                     a window from elsewhere; the "nsp" head says which)

and 15% of its non-special tokens are chosen for prediction: 80% of those become [MASK], 10% a
random token, 10% stay as they are (so the model cannot tell which visible tokens it will be asked
about). The loss is cross-entropy on the chosen positions only (+ NSP's on the pooled state).

Masks are drawn from a generator seeded by (seed, step, micro-batch): a batch is a pure function of
its position, which keeps resume exact as for every other stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatsmith import atomic, runtime
from chatsmith.config import TrainConfig
from chatsmith.data.shards import TokenShards, write_shards
from chatsmith.errors import UserError
from chatsmith.model import registry
from chatsmith.tokenizer import iter_texts
from chatsmith.train.trainer import Trainer
from chatsmith.wordpiece import EncoderTokenizer, train_wordpiece


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, n_real: int, gen: torch.Generator,
                prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a batch (B, T): -> (inputs, labels), labels -100 where nothing is asked.
    `special` (B, T) marks [CLS]/[SEP]/[PAD], never chosen; random replacements come from the
    tokenizer's real ids [0, n_real), not the padded rows of the embedding."""
    u = torch.rand(ids.shape, generator=gen)
    chosen = (u < prob) & ~special
    labels = ids.masked_fill(~chosen, -100)
    how = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (how < 0.8)] = mask_id
    rand = chosen & (how >= 0.8) & (how < 0.9)
    inputs[rand] = torch.randint(0, n_real, ids.shape, generator=gen)[rand]
    return inputs, labels


class MLMStage:
    name = "pretrain"

    def __init__(self, data_dir: Path, cfg: TrainConfig, seq_len: int, tok: EncoderTokenizer, nsp: bool,
                 mask_prob: float = 0.15):
        self.train, self.val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
        self.cfg, self.seq_len, self.tok, self.nsp, self.mask_prob = cfg, seq_len, tok, nsp, mask_prob
        self.special = torch.tensor(sorted(tok.special_ids))

    def _examples(self, shards: TokenShards, n: int, seed: int, index: int):
        """n examples (ids, type ids, is_next) built from random windows of the shard stream."""
        L = self.seq_len
        if not self.nsp:
            x, _ = shards.batch(n, L - 2, seed, index, 0)
            rows = [([self.tok.cls_id, *r.tolist(), self.tok.sep_id], [0] * L) for r in x]
            return rows, None
        x, _ = shards.batch(n, L - 3, seed, index, 0)
        other, _ = shards.batch(n, L - 3, seed + 1, index, 0)  # independent windows: the "not next" Bs
        rng = np.random.default_rng([seed, index, 7])
        cut = rng.integers(1, L - 3, size=n)
        is_next = rng.random(n) < 0.5
        rows = []
        for i in range(n):
            a = x[i, :cut[i]].tolist()
            b = x[i, cut[i]:].tolist() if is_next[i] else other[i, :L - 3 - cut[i]].tolist()
            rows.append(self.tok.join(a, b, L))
        return rows, torch.tensor(is_next, dtype=torch.long)

    def _batch(self, shards, n, seed, index):
        rows, is_next = self._examples(shards, n, seed, index)
        b = self.tok.batch(rows)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
        special = torch.isin(b["input_ids"], self.special)
        b["input_ids"], b["labels"] = mask_tokens(b["input_ids"], special, self.tok.mask_id, self.tok.vocab_size,
                                                  gen, self.mask_prob)
        if is_next is not None:
            b["is_next"] = is_next
        return b

    def batch(self, step: int, micro: int, rank: int):
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, runtime.world_size())
        return self._batch(self.train, self.cfg.batch_size, self.cfg.seed, i)

    def _losses(self, model, b):
        heads = ("mlm", "nsp") if self.nsp else "mlm"
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], head=heads)
        logits = out[0] if self.nsp else out
        mlm = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        nsp = F.cross_entropy(out[1].float(), b["is_next"]) if self.nsp else None
        return logits, mlm, nsp, (out[1] if self.nsp else None)

    def loss(self, model, b):
        _, mlm, nsp, _ = self._losses(model, b)
        if nsp is None:
            return mlm, {}
        return mlm + nsp, {"mlm_loss": mlm.item(), "nsp_loss": nsp.item()}

    def tokens(self, b) -> int:
        return int(b["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Masked-token loss and accuracy (and NSP accuracy) on fixed masked val windows."""
        device = next(model.parameters()).device
        nats = hits = n = nsp_hits = nsp_n = 0.0
        for k in range(self.cfg.eval_batches):
            b = {key: v.to(device) for key, v in self._batch(self.val, self.cfg.batch_size, 4242, k).items()}
            logits, _, _, nsp_logits = self._losses(model, b)
            y = b["labels"].flatten()
            sel = y != -100
            lg = logits.float().flatten(0, 1)[sel]
            nats += F.cross_entropy(lg, y[sel], reduction="sum").item()
            hits += (lg.argmax(-1) == y[sel]).sum().item()
            n += sel.sum().item()
            if nsp_logits is not None:
                nsp_hits += (nsp_logits.argmax(-1) == b["is_next"]).sum().item()
                nsp_n += len(b["is_next"])
        res = {"val_mlm_loss": nats / max(n, 1), "val_mlm_acc": hits / max(n, 1)}
        if nsp_n:
            res["val_nsp_acc"] = nsp_hits / nsp_n
        return res


def prepare_data(corpus: dict[str, list[str]], tokenizer: str | None, out: Path, vocab_size: int,
                 lowercase: bool) -> tuple[Path, Path]:
    """-> (token shard dir, tokenizer dir): a WordPiece tokenizer (trained unless given) and shards."""
    tok_dir = Path(tokenizer) if tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        if tokenizer:
            raise UserError(f"--tokenizer {tok_dir} has no tokenizer.json")
        print(f"training a {vocab_size}-token WordPiece tokenizer on {corpus['train'][0]}", file=sys.stderr)
        train_wordpiece(iter_texts(corpus["train"]), vocab_size, lowercase=lowercase).save(tok_dir)
    tok = EncoderTokenizer.load(tok_dir)
    shard_dir = out / "data"
    write_shards(corpus, tok, shard_dir)
    return shard_dir, tok_dir


def run(cfg: TrainConfig, corpus: dict[str, list[str]], tokenizer=None, vocab_size: int = 8192, nsp: bool = False,
        mask_prob: float = 0.15, lowercase: bool = False, model_overrides: dict | None = None) -> dict:
    if not 0 < mask_prob < 1:
        raise UserError(f"--mask-prob must be in (0, 1), got {mask_prob:g}")
    out = Path(cfg.out)
    with runtime.rank0_first(cfg.device):
        shard_dir, tok_dir = prepare_data(corpus, tokenizer, out, vocab_size, lowercase)
    tok = EncoderTokenizer.load(tok_dir)
    mcfg = registry.preset(cfg.preset, family="encoder", vocab_size=(tok.vocab_size + 63) // 64 * 64,
                           pad_token_id=tok.pad_id, heads=("mlm", "nsp") if nsp else ("mlm",),
                           **(model_overrides or {}))
    torch.manual_seed(cfg.seed)
    model = registry.build(mcfg)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len or seq_len < 8:
        raise UserError(f"--seq-len {seq_len} must be in [8, {mcfg.max_seq_len}] for the {cfg.preset} encoder")
    print(f"model: encoder preset {cfg.preset}, {model.num_params() / 1e6:.2f}M parameters, vocab "
          f"{mcfg.vocab_size}, {seq_len} tokens per example, heads {', '.join(mcfg.heads)}", file=sys.stderr)
    stage = MLMStage(shard_dir, cfg, seq_len, tok, nsp, mask_prob)
    before = stage.evaluate(model.eval())
    model.train()
    trainer = Trainer(model, stage, cfg, tokenizer_dir=tok_dir, extra_config={"stage": "pretrain"})
    summary = trainer.fit()
    summary["params"] = model.num_params()
    summary["before"] = before  # the untrained model on the same masked val windows
    if trainer.master:  # the report's before/after rows and fill-mask examples
        after = {k: v for k, v in trainer.last_eval.items() if k.startswith("val_")}
        atomic.write_json(out / "mlm_eval.json", {
            "init": before,
            "pretrain": {**after, "samples": fill_mask_samples(trainer.unwrapped, tok, stage.val)}})
    return summary


@torch.no_grad()
def fill_mask_samples(model, tok: EncoderTokenizer, val: TokenShards, n: int = 8, width: int = 16) -> list[dict]:
    """Val snippets with their middle token masked: what the model puts there (top 3) vs what was there."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for k in range(min(n, max(len(val) // width - 1, 0))):
        ids = val.data[k * width * 7 % max(len(val) - width, 1):][:width].astype("int64").tolist()
        ids = [i for i in ids if i not in tok.special_ids]
        if len(ids) < 5:
            continue
        mid = len(ids) // 2
        masked = ids[:mid] + [tok.mask_id] + ids[mid + 1:]
        row = tok.join(masked, None, width + 2)
        b = tok.batch([row], device)
        logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], head="mlm")[0, row[0].index(tok.mask_id)]
        top = logits[:tok.vocab_size].float().topk(3).indices.tolist()
        out.append({"family": "fill-mask", "prompt": tok.decode(masked, skip_special=False),
                    "reply": " | ".join(tok.decode([t]) for t in top), "reference": tok.decode([ids[mid]])})
    return out


__all__ = ["mask_tokens", "MLMStage", "run", "fill_mask_samples"]
