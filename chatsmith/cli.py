"""One entry point, one verb per stage. Exit codes: 0 success, 2 user error, 1 anything else."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from chatsmith.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (bad/unknown flag) are user errors too
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip=()):
    """Every dataclass field becomes --field-name, typed from its default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in t:
            p.add_argument(flag, type=_bool, nargs="?", const=True, default=default,
                           help=f"(default: {default})")
        elif "int" in t:
            p.add_argument(flag, type=int, default=default, help=f"(default: {default})")
        elif "float" in t:
            p.add_argument(flag, type=float, default=default, help=f"(default: {default})")
        else:
            p.add_argument(flag, type=str, default=default, help=f"(default: {default})")


def dataclass_from_args(cls, args, **extra):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(extra)
    return cls(**kw)


def build_parser() -> Parser:
    from chatsmith.config import PRESETS, TrainConfig
    from chatsmith.engine import SamplingParams

    fmt = argparse.ArgumentDefaultsHelpFormatter
    top = Parser(prog="chatsmith", description="Build your own ChatGPT: tokenizer, pretraining, "
                 "fine-tuning, alignment, evaluation and serving in plain PyTorch.")
    sub = top.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True

    # data
    data = sub.add_parser("data", help="build corpora", formatter_class=fmt)
    dsub = data.add_subparsers(dest="data_verb", metavar="ACTION", parser_class=Parser)
    dsub.required = True
    b = dsub.add_parser("build", help="the built-in corpus, or your own files, as cleaned train/val JSONL",
                        formatter_class=fmt)
    b.add_argument("--out", default="data/corpus", help="output directory")
    b.add_argument("--input", nargs="+", help="your own .txt/.md/.jsonl files or folders instead of the built-in sources")
    b.add_argument("--sources-dir", default=os.environ.get("CHATSMITH_SOURCES", ".sources"),
                   help="where scripts/setup.sh put the raw source packages")
    b.add_argument("--val-fraction", type=float, default=0.01)
    b.add_argument("--seed", type=int, default=1337)
    b.add_argument("--max-doc-chars", type=int, default=20000, help="longer documents are cut at paragraphs")

    # tokenizer
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", formatter_class=fmt)
    tsub = tk.add_subparsers(dest="tok_verb", metavar="ACTION", parser_class=Parser)
    tsub.required = True
    t = tsub.add_parser("train", help="train on corpus files", formatter_class=fmt)
    t.add_argument("--input", nargs="+", required=True, help="corpus .jsonl/.txt/.md files or folders, or a `data build` dir")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    t.add_argument("--out", required=True)

    # pretrain
    pt = sub.add_parser("pretrain", help="pretrain a base model (causal LM)", formatter_class=fmt)
    pt.add_argument("--input", nargs="+", help="a `data build` directory, or raw .txt/.md/.jsonl files/folders")
    pt.add_argument("--data", help="token shards from an earlier run (DIR with meta.json, train.bin, val.bin)")
    pt.add_argument("--tokenizer", help="tokenizer directory (default: train one on the input)")
    pt.add_argument("--vocab-size", type=int, default=8192, help="when a tokenizer is trained")
    pt.add_argument("--max-seq-len", type=int, default=None, help="override the preset's context length")
    pt.add_argument("--arch", choices=["llama", "gpt2"], default=None, help="override the preset's shape")
    add_dataclass_flags(pt, TrainConfig)
    pt.set_defaults(preset="tiny")
    pt.epilog = f"presets: {', '.join(PRESETS)}"

    # generate
    g = sub.add_parser("generate", help="sample from a model", formatter_class=fmt)
    g.add_argument("model", help="model directory")
    g.add_argument("--prompt", required=True)
    add_dataclass_flags(g, SamplingParams, skip=("stop",))
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-stream", action="store_true", help="print only when finished")

    # speedrun
    s = sub.add_parser("speedrun", help="the whole chain on the built-in corpus under a time budget",
                       formatter_class=fmt)
    s.add_argument("--minutes", type=float, default=10.0, help="total time budget")
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--vocab-size", type=int, default=8192)
    s.add_argument("--sources-dir", default=os.environ.get("CHATSMITH_SOURCES", ".sources"))
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--resume", action="store_true", help="continue an interrupted speedrun")
    return top


def cmd_data_build(a):
    from chatsmith.data.corpus import build_corpus

    if not 0 <= a.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    meta = build_corpus(a.out, inputs=a.input, sources_dir=a.sources_dir, val_fraction=a.val_fraction,
                        seed=a.seed, max_doc_chars=a.max_doc_chars)
    print(json.dumps(meta, indent=2, ensure_ascii=False))


def _expand_corpus_dirs(paths: list[str], split: str = "train") -> list[str]:
    out = []
    for p in paths:
        d = Path(p)
        out.append(str(d / f"{split}.jsonl") if (d / "train.jsonl").exists() else p)
    return out


def cmd_tokenizer_train(a):
    from chatsmith.tokenizer import train_command

    val = [str(Path(p) / "val.jsonl") for p in a.input if (Path(p) / "val.jsonl").exists()]
    stats = train_command(_expand_corpus_dirs(a.input), a.vocab_size, a.out, val=val or None,
                          max_chars=a.max_chars, min_frequency=a.min_frequency)
    if "val_bytes_per_token" in stats:
        print(f"val bytes/token: {stats['val_bytes_per_token']:.3f}")
    print(f"saved {stats['vocab_size']}-token tokenizer to {a.out}")


def cmd_pretrain(a):
    from chatsmith.config import TrainConfig
    from chatsmith.train import pretrain

    cfg = dataclass_from_args(TrainConfig, a)
    overrides = {k: v for k, v in (("max_seq_len", a.max_seq_len), ("arch", a.arch)) if v is not None}
    summary = pretrain.run(cfg, inputs=a.input, data=a.data, tokenizer=a.tokenizer,
                           vocab_size=a.vocab_size, model_overrides=overrides)
    print(json.dumps(summary, indent=2))


def cmd_generate(a):
    import torch

    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.train.trainer import resolve_device

    params = dataclass_from_args(SamplingParams, a, stop=a.stop)
    params.validate()
    model = load_model(a.model, device=resolve_device(a.device))
    tok = Tokenizer.load(a.model)
    engine = Engine(model, tok)
    ids = tok.encode(a.prompt, bos=True)
    torch.manual_seed(params.seed if params.seed is not None else torch.seed())
    n = params.num_return_sequences
    if a.no_stream or params.num_beams > 1 or n > 1:
        for i, c in enumerate(engine.generate(ids, params)):
            if n > 1:
                print(f"--- [{i + 1}/{n}] ({c.finish_reason}{'' if c.score is None else f', score {c.score:.3f}'})")
            print(a.prompt + c.text)
        return
    sys.stdout.write(a.prompt)
    for _, piece in engine.stream(ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_speedrun(a):
    from chatsmith.speedrun import run

    run(a)


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        handler = {
            "data": lambda: cmd_data_build(a),
            "tokenizer": lambda: cmd_tokenizer_train(a),
            "pretrain": lambda: cmd_pretrain(a),
            "generate": lambda: cmd_generate(a),
            "speedrun": lambda: cmd_speedrun(a),
        }[a.verb]
        handler()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `chatsmith generate … | head` closed the pipe: not an error
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
