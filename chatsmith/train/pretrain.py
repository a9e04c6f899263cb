"""Pretraining: next-token prediction on token shards (decoders), or masked-token prediction
(`--family bert`: chatsmith/train/mlm.py).

Input is either `--data DIR` (token shards from an earlier run) or `--input PATH…` (a corpus
directory from `chatsmith data build`, or raw .txt/.md/.jsonl files, which are cleaned, split and
sharded first). Without `--tokenizer` a byte-level BPE tokenizer is trained on the train split.

`--mix corpus=0.8,tasks=0.2` mixes in task text (chatsmith/data/task_text.py: copy exercises,
column arithmetic, number sense), sharded into OUT/data_tasks: each row of a batch comes from
source j with probability w_j (a multinomial per micro-batch, a pure function of its index, so
resume stays exact); every row is seq_len tokens, so the weights are token shares. The token
shares actually drawn are logged per step (mix_share/NAME) and summed in the summary; the
validation loss and bits-per-byte stay on the corpus, and tasks_val_loss is the task text's.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatsmith import atomic, runtime
from chatsmith.checkpoint import has_results
from chatsmith.config import TrainConfig
from chatsmith.data.corpus import build_corpus
from chatsmith.data.task_text import task_documents
from chatsmith.data.shards import TokenShards, write_shards
from chatsmith.errors import UserError
from chatsmith.flags import Verb, add_train_flags, dataclass_from_args
from chatsmith.model import registry
from chatsmith.tokenizer import SPECIAL_TOKENS, Tokenizer, bytes_per_token, iter_texts, train_tokenizer
from chatsmith.train import mlm
from chatsmith.train.trainer import Trainer


MIX_SOURCES = ("corpus", "tasks")
MIX_SEED = 7  # the task text generator's seed (fixed: the text is data, not an experiment's randomness)


def parse_mix(spec: str | None) -> dict[str, float] | None:
    """"corpus=0.8,tasks=0.2" -> {"corpus": 0.8, "tasks": 0.2}, normalised to sum to 1."""
    if not spec:
        return None
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, w = part.strip().partition("=")
        if not sep:
            raise UserError(f"--mix {spec!r}: expected NAME=WEIGHT,… (e.g. corpus=0.8,tasks=0.2)")
        if name not in MIX_SOURCES:
            raise UserError(f"--mix: unknown source {name!r}; the sources are {', '.join(MIX_SOURCES)}")
        if name in weights:
            raise UserError(f"--mix: {name} is given twice")
        try:
            v = float(w)
        except ValueError:
            raise UserError(f"--mix: the weight of {name} must be a number, got {w!r}") from None
        if not (math.isfinite(v) and v >= 0):
            raise UserError(f"--mix: the weight of {name} must be a finite number >= 0, got {w!r}")
        weights[name] = v
    total = sum(weights.values())
    if total <= 0:
        raise UserError(f"--mix {spec!r}: at least one weight must be positive")
    return {k: weights[k] / total for k in MIX_SOURCES if k in weights}


def mix_counts(weights: list[float], rows: int, seed: int, index: int) -> np.ndarray:
    """Rows of micro-batch `index` drawn from each source: a multinomial, a pure function of its arguments."""
    return np.random.default_rng([seed, index, 2, 0]).multinomial(rows, weights)


class PretrainStage:
    name = "pretrain"

    def __init__(self, data_dir: Path, cfg: TrainConfig, seq_len: int, token_bytes: list[int],
                 mix: dict[str, float] | None = None, task_dir: Path | None = None):
        self.train = TokenShards(data_dir, "train")
        self.val = TokenShards(data_dir, "val")
        self.cfg, self.seq_len = cfg, seq_len
        self.token_bytes = torch.tensor(token_bytes, dtype=torch.float64)
        self.mix = mix
        self.sources = {"corpus": self.train}
        self.task_val = None
        if mix and "tasks" in mix:
            self.sources["tasks"] = TokenShards(task_dir, "train")
            self.task_val = TokenShards(task_dir, "val")

    def batch(self, step: int, micro: int, rank: int):
        # one independent stream per micro-batch of the global batch, numbered across ranks
        # (micro-major), so the global batch of a step is the same for any split of
        # world x grad_accum: 2 processes with --grad-accum 1 see what 1 process with 2 sees
        i = runtime.micro_batch_index(step, micro, rank, self.cfg.grad_accum, runtime.world_size())
        if not self.mix:
            x, y = self.train.batch(self.cfg.batch_size, self.seq_len, self.cfg.seed, i, 0)
            return {"x": x, "y": y}
        counts = mix_counts(list(self.mix.values()), self.cfg.batch_size, self.cfg.seed, i)
        xs, ys, src = [], [], []
        for j, (name, n) in enumerate(zip(self.mix, counts)):
            if n:  # source j's own window stream (corpus: j = 0, the stream an unmixed run reads)
                x, y = self.sources[name].batch(int(n), self.seq_len, self.cfg.seed, i, MIX_SOURCES.index(name))
                xs.append(x)
                ys.append(y)
                src += [j] * int(n)
        return {"x": torch.cat(xs), "y": torch.cat(ys), "source": torch.tensor(src)}

    def loss(self, model, batch):
        _, loss = model(batch["x"], batch["y"])
        if not self.mix:
            return loss, {}
        src = batch["source"]
        return loss, {f"mix_share/{name}": float((src == j).float().mean()) for j, name in enumerate(self.mix)}

    def token_shares(self, micro_batches: int) -> dict[str, float]:
        """The share of training tokens each source supplied over the first `micro_batches`
        micro-batches (all ranks), recomputed from the batch indices: exact, and resume-proof."""
        if not micro_batches:
            return {}
        w = list(self.mix.values())
        tot = sum(mix_counts(w, self.cfg.batch_size, self.cfg.seed, i) for i in range(micro_batches))
        return {name: float(c) / float(tot.sum()) for name, c in zip(self.mix, tot)}

    def tokens(self, batch) -> int:
        return batch["x"].numel()

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Validation loss (nats/token) and bits-per-byte = sum(nats) / (ln 2 * sum(bytes)), the
        tokenizer-independent measure: a model with a different vocabulary is compared fairly."""
        nats, n_tok, n_bytes = self._val_nats(model, self.val)
        res = {"val_loss": nats / max(n_tok, 1), "val_bpb": nats / (math.log(2) * max(n_bytes, 1))}
        if self.task_val is not None:
            nats, n_tok, n_bytes = self._val_nats(model, self.task_val)
            res["tasks_val_loss"] = nats / max(n_tok, 1)
            res["tasks_val_bpb"] = nats / (math.log(2) * max(n_bytes, 1))  # comparable across vocabularies
        return res

    def _val_nats(self, model, shards) -> tuple[float, float, float]:
        device = next(model.parameters()).device
        nats = n_tok = n_bytes = 0.0
        for x, y in shards.sequential(self.seq_len, self.cfg.eval_batches, self.cfg.batch_size):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nats += ce.sum().item()
            n_tok += y.numel()
            n_bytes += self.token_bytes[y.flatten().cpu()].sum().item()
        return nats, n_tok, n_bytes


def heldout_keys(dialogues_dir: str | None) -> list[str]:
    """The problem keys a `data dialogues` directory held out (its dialogues_meta.json), for --mix-exclude."""
    if not dialogues_dir:
        return []
    meta = Path(dialogues_dir) / "dialogues_meta.json"
    if not meta.exists():
        raise UserError(f"--mix-exclude {dialogues_dir}: no dialogues_meta.json (a `data dialogues` output directory)")
    m = json.loads(meta.read_text())
    if "heldout_problem_keys" not in m:
        raise UserError(f"--mix-exclude {meta}: it lists no heldout_problem_keys (built by an older chatsmith: "
                        f"rebuild it with `chatsmith data dialogues`)")
    return m["heldout_problem_keys"]


def prepare_task_shards(out: Path, tok: Tokenizer, n_docs: int, exclude: list[str] | None = None) -> Path:
    """OUT/tasks/{train,val}.jsonl (task text, 1 document in 20 held out for tasks_val_loss) and
    their token shards in OUT/data_tasks, reused when they exist for the same documents. `exclude`:
    problem keys left out of the text (the dialogues' held-out problems)."""
    shard_dir = out / "data_tasks"
    meta = shard_dir / "meta.json"
    exclude = sorted(exclude or [])
    key = {"task_documents": n_docs, "seed": MIX_SEED,
           "excluded": hashlib.sha256("\n".join(exclude).encode()).hexdigest()[:16] if exclude else None}
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get("inputs") == key and m.get("vocab_size") == tok.vocab_size:
            return shard_dir
    docs = task_documents(n_docs, MIX_SEED, exclude=frozenset(exclude))
    n_val = max(1, n_docs // 20)
    tdir = out / "tasks"
    tdir.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", docs[n_val:]), ("val", docs[:n_val])):
        atomic.write_text(tdir / f"{split}.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in part))
    m = write_shards({"train": [str(tdir / "train.jsonl")], "val": [str(tdir / "val.jsonl")]}, tok, shard_dir)
    m["inputs"] = key
    atomic.write_json(meta, m)
    return shard_dir


def prepare_data(inputs: list[str] | None, data: str | None, tokenizer: str | None, out: Path,
                 vocab_size: int) -> tuple[Path, Path]:
    """-> (token shard dir, tokenizer dir), building whatever is missing under `out`."""
    if data:
        d = Path(data)
        tok_dir = Path(tokenizer) if tokenizer else d / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            raise UserError(f"--data {d}: no tokenizer at {tok_dir}; pass --tokenizer DIR")
        meta = d / "meta.json"
        if not meta.exists():
            raise UserError(f"--data {d} holds no token shards (meta.json missing)")
        if json.loads(meta.read_text())["vocab_size"] != Tokenizer.load(tok_dir).vocab_size:
            raise UserError(f"--data {d} was tokenised with another tokenizer than {tok_dir}")
        return d, tok_dir
    if not inputs:
        raise UserError("pretrain needs --input PATH… (corpus files or a `data build` directory) or --data DIR")
    corpus = _corpus_splits(inputs, out)
    tok_dir = Path(tokenizer) if tokenizer else out / "tokenizer"
    if not tokenizer:
        if (tok_dir / "tokenizer.json").exists():
            print(f"using the tokenizer already at {tok_dir}", file=sys.stderr)
        else:
            print(f"training a {vocab_size}-token BPE tokenizer on {corpus['train'][0]}", file=sys.stderr)
            tok = train_tokenizer(iter_texts(corpus["train"]), vocab_size)
            tok.save(tok_dir)
            bpt = bytes_per_token(tok, iter_texts(corpus["val"]))
            print(f"tokenizer: {tok.vocab_size} tokens, {bpt:.3f} bytes/token on val", file=sys.stderr)
    tok = Tokenizer.load(tok_dir)
    shard_dir = out / "data"
    meta = shard_dir / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("inputs") == corpus:
        print(f"using the token shards already at {shard_dir}", file=sys.stderr)
    else:
        m = write_shards(corpus, tok, shard_dir)
        m["inputs"] = corpus
        atomic.write_json(meta, m)
    return shard_dir, tok_dir


def _corpus_splits(inputs: list[str], out: Path) -> dict[str, list[str]]:
    """A `data build` directory is used as split; raw files are cleaned and split into out/corpus."""
    if len(inputs) == 1 and (Path(inputs[0]) / "train.jsonl").exists():
        d = Path(inputs[0])
        if not (d / "val.jsonl").exists():
            raise UserError(f"{d} has train.jsonl but no val.jsonl")
        return {"train": [str(d / "train.jsonl")], "val": [str(d / "val.jsonl")]}
    cdir = out / "corpus"
    build_corpus(cdir, inputs=inputs, sources=[])
    return {"train": [str(cdir / "train.jsonl")], "val": [str(cdir / "val.jsonl")]}


def build_model(preset_name: str, tok: Tokenizer, seed: int, **overrides):
    # pad the vocabulary to a multiple of 64: matmul-friendly, and HF loads it unchanged
    vocab = (tok.vocab_size + 63) // 64 * 64
    mcfg = registry.preset(preset_name, vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                  pad_token_id=tok.pad_id, **overrides)
    torch.manual_seed(seed)
    return registry.build(mcfg)


def check_flags(cfg: TrainConfig, inputs, data, tokenizer, vocab_size: int, overrides: dict, mix: str | None = None,
                mix_docs: int = 20000, mix_exclude: str | None = None):
    """Everything the flags alone decide, before any tokenizer is trained or shard written."""
    parse_mix(mix)
    if mix_exclude and not mix:
        raise UserError("--mix-exclude needs --mix (it removes problems from the mixed-in task text)")
    heldout_keys(mix_exclude)
    if mix_docs < 20:
        raise UserError(f"--mix-docs must be at least 20 (1 in 20 is held out), got {mix_docs}")
    if not inputs and not data:
        raise UserError("pretrain needs --input PATH… (corpus files or a `data build` directory) or --data DIR")
    for p in [*(inputs or []), *([data] if data else []), *([tokenizer] if tokenizer else [])]:
        if not Path(p).exists():
            raise UserError(f"{p}: no such file or directory")
    if tokenizer and not (Path(tokenizer) / "tokenizer.json").exists():
        raise UserError(f"--tokenizer {tokenizer} holds no tokenizer.json")
    if not tokenizer and not data and vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size {vocab_size} is too small: the 256 byte tokens and "
                        f"{len(SPECIAL_TOKENS)} special tokens alone need {256 + len(SPECIAL_TOKENS)}")
    mcfg = registry.preset(cfg.preset, vocab_size=vocab_size, **overrides)  # a bad override fails here
    if cfg.seq_len is not None and cfg.seq_len > mcfg.max_seq_len:
        raise UserError(f"--seq-len {cfg.seq_len} is beyond the {cfg.preset} model's context of "
                        f"{mcfg.max_seq_len} tokens; lower it or raise --max-seq-len")
    runtime.resolve_device(cfg.device)  # --device cuda on a machine without one


def run(cfg: TrainConfig, inputs=None, data=None, tokenizer=None, vocab_size: int = 8192,
        model_overrides: dict | None = None, mix: str | None = None, mix_docs: int = 20000,
        mix_exclude: str | None = None) -> dict:
    """A run that fails before its first checkpoint leaves no --out behind (nor what it added to an
    existing one): no empty corpus/, no token shards without their meta.json. mix_exclude: a
    dialogues directory whose held-out problems the task text must not contain."""
    out = Path(cfg.out)
    check_flags(cfg, inputs, data, tokenizer, vocab_size, model_overrides or {}, mix, mix_docs, mix_exclude)
    return _provisional(cfg, lambda: _run(cfg, out, inputs, data, tokenizer, vocab_size, model_overrides,
                                          parse_mix(mix), mix_docs, heldout_keys(mix_exclude)))


def _provisional(cfg: TrainConfig, body):
    """body() with cfg.out provisional: a run that fails before its first checkpoint leaves no --out
    behind (nor what it added to an existing one), and a killed run's temporaries go first."""
    out = Path(cfg.out)
    if runtime.rank() != 0:  # rank 0 owns the folder: the others must not remove what it builds
        return body()
    if out.is_dir():
        atomic.remove_stale_temporaries(out)  # a killed run's corpus/.train.jsonl.tmp-PID, .tmp-* files
    with atomic.provisional_dir(out, has_results):
        return body()


def _run(cfg, out, inputs, data, tokenizer, vocab_size, model_overrides, mix=None, mix_docs=20000,
         exclude=None) -> dict:
    with runtime.rank0_first(cfg.device):  # under torchrun rank 0 builds tokenizer and shards, the others reuse them
        shard_dir, tok_dir = prepare_data(inputs, data, tokenizer, out, vocab_size)
        tok = Tokenizer.load(tok_dir)
        task_dir = prepare_task_shards(out, tok, mix_docs, exclude) if mix and "tasks" in mix else None
    model = build_model(cfg.preset, tok, cfg.seed, **(model_overrides or {}))
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    n = model.num_params()
    print(f"model: preset {cfg.preset}, {n / 1e6:.2f}M parameters "
          f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), {model.cfg.arch} shape, "
          f"vocab {model.cfg.vocab_size}, context {model.cfg.max_seq_len}", file=sys.stderr)
    stage = PretrainStage(shard_dir, cfg, seq_len, tok.token_bytes() + [0] * (model.cfg.vocab_size - tok.vocab_size),
                          mix=mix, task_dir=task_dir)
    extra = {"stage": "pretrain", **({"mix": mix} if mix else {})}
    trainer = Trainer(model, stage, cfg, tokenizer_dir=tok_dir, extra_config=extra)
    summary = trainer.fit()
    summary["params"] = n
    if mix:
        shares = stage.token_shares(trainer.step * cfg.grad_accum * runtime.world_size())
        summary["mix"] = {"weights": mix, "token_share": shares, "task_documents": mix_docs if task_dir else 0,
                          "excluded_problems": len(exclude or [])}
        print("token share per source: " + ", ".join(f"{k} {v:.1%} (weight {mix[k]:.0%})" for k, v in shares.items()),
              file=sys.stderr)
        if runtime.rank() == 0:
            atomic.write_json(out / "train_summary.json", summary)
    return summary


# --- the verb -------------------------------------------------------------------------------------
DEFAULTS = dict(out="runs/pretrain", preset="tiny")


def add_arguments(p):
    p.add_argument("--input", nargs="+", help="a `data build` directory, or raw .txt/.md/.jsonl files/folders")
    p.add_argument("--data", help="token shards from an earlier run (DIR with meta.json, train.bin, val.bin)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: train one on the input)")
    p.add_argument("--vocab-size", type=int, default=8192, help="when a tokenizer is trained")
    p.add_argument("--max-seq-len", type=int, default=None, help="override the preset's context length")
    p.add_argument("--arch", choices=["llama", "gpt2"], default=None, help="override the preset's shape")
    p.add_argument("--family", choices=["decoder", "gpt", "encoder", "bert"], default="decoder",
                   help="decoder (GPT, causal LM) or encoder (BERT, masked LM)")
    p.add_argument("--nsp", action="store_true", help="encoder: also next-sentence prediction (50%% real next segment)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="encoder: share of tokens chosen for prediction")
    p.add_argument("--lowercase", action="store_true", help="encoder: a lowercasing WordPiece tokenizer")
    p.add_argument("--mix", default=None, metavar="corpus=W,tasks=W",
                   help="decoder: mix task text (copy exercises, column arithmetic, number sense) into the "
                        "corpus with these weights, e.g. corpus=0.8,tasks=0.2 (token shares); none when left out")
    p.add_argument("--mix-docs", type=int, default=20000, help="--mix: task-text documents generated (8 exercises each)")
    p.add_argument("--mix-exclude", default=None, metavar="DIALOGUES_DIR",
                   help="--mix: leave the problems this `data dialogues` directory holds out (its dialogues_meta.json) "
                        "out of the task text, so its held-out evaluation stays unseen")
    # choices: a wrong preset is refused by argparse, before any tokenizer is trained or shard written
    presets = list(dict.fromkeys(registry.presets() + registry.presets("encoder")))
    add_train_flags(p, DEFAULTS, skip=(), choices={"preset": presets})
    p.epilog = (f"decoder presets: {', '.join(registry.presets())}; "
                f"encoder presets: {', '.join(registry.presets('encoder'))}")


def main(a):
    cfg = dataclass_from_args(TrainConfig, a)
    if registry.get(a.family).name == "encoder":
        if a.data or a.arch or a.mix:
            raise UserError(f"--{'data' if a.data else 'arch' if a.arch else 'mix'} is for decoders; an encoder "
                            f"reads --input")
        if not a.input:
            raise UserError("pretrain --family bert needs --input PATH… (a `data build` corpus directory or files)")
        registry.preset(cfg.preset, family="encoder")  # a bad --preset fails before any data work
        if a.vocab_size < 64:
            raise UserError(f"--vocab-size must be at least 64, got {a.vocab_size}")
        over = {"max_seq_len": a.max_seq_len} if a.max_seq_len else {}
        summary = _provisional(cfg, lambda: mlm.run(
            cfg, _corpus_splits(a.input, Path(cfg.out)), tokenizer=a.tokenizer, vocab_size=a.vocab_size, nsp=a.nsp,
            mask_prob=a.mask_prob, lowercase=a.lowercase, model_overrides=over))
        print(json.dumps(summary, indent=2))
        return
    overrides = {k: v for k, v in (("max_seq_len", a.max_seq_len), ("arch", a.arch)) if v is not None}
    summary = run(cfg, inputs=a.input, data=a.data, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                  model_overrides=overrides, mix=a.mix, mix_docs=a.mix_docs, mix_exclude=a.mix_exclude)
    print(json.dumps(summary, indent=2))


VERB = Verb("pretrain", "pretrain a base model (causal LM)", add_arguments, main)
