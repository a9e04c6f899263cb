"""One entry point: the table of verbs. Exit codes: 0 success, 2 user error, 1 anything else.

Each verb lives with the module that does its job (`flags.Verb`: name, help, add_arguments, main);
this file only lists them. A two-word name ("data build") is an action of a verb group.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chatsmith import chat, clip_verbs, embed, generate, report, runtime, speedrun, tokenizer, watermark
from chatsmith.data import build as data_build
from chatsmith.errors import UserError
from chatsmith.eval import harness, ngram, runner
from chatsmith.flags import HelpFormatter, Parser
from chatsmith.interop import convert
from chatsmith.interop.registry import KNOWN, resolve
from chatsmith.moderation import verb as moderate
from chatsmith.serve import verb as serve_verb
from chatsmith.train import classify, clip, dpo, pretrain, qa, reward, rlhf, sft, translate

VERBS = [
    data_build.VERB, dpo.PAIRS_VERB,
    tokenizer.VERB,
    pretrain.VERB, sft.VERB, reward.VERB, dpo.VERB, rlhf.VERB,
    classify.TRAIN_VERB, classify.EVAL_VERB, classify.PREDICT_VERB, qa.TRAIN_VERB, qa.EVAL_VERB, qa.PREDICT_VERB,
    clip.TRAIN_VERB, clip_verbs.CLASSIFY_VERB, clip_verbs.SEARCH_VERB, clip_verbs.EMBED_VERB,
    translate.TRAIN_VERB, translate.RUN_VERB,
    chat.VERB, serve_verb.VERB, generate.VERB, embed.VERB, embed.FILL_VERB,
    runner.VERB, ngram.TRAIN_VERB, ngram.EVAL_VERB, harness.VERB, report.VERB,
    convert.MERGE_VERB, convert.IMPORT_VERB, convert.EXPORT_VERB,
    watermark.DETECT_VERB, moderate.VERB,
    speedrun.VERB,
]
GROUPS = {"data": "build corpora, dialogues and preference pairs", "tokenizer": "train a byte-level BPE tokenizer",
          "ngram": "n-gram baseline (interpolated modified Kneser-Ney)",
          "lora": "LoRA adapters (train them with --lora-rank on any training verb)",
          "classify": "sentence (pair) classification with an encoder: train, eval, predict",
          "clip": "image-text models (CLIP): train, zero-shot classify, search images by text, embed",
          "qa": "extractive question answering with an encoder (SQuAD format): train, eval, predict",
          "translate": "encoder-decoder translation: train, or translate with `chatsmith translate MODEL`",
          "watermark": "detect the green-list watermark of generated text"}


def build_parser() -> Parser:
    fmt = HelpFormatter
    top = Parser(prog="chatsmith", description="Build your own ChatGPT: tokenizer, pretraining, "
                 "fine-tuning, alignment, evaluation and serving in plain PyTorch.")
    sub = top.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    groups: dict[str, argparse._SubParsersAction] = {}
    for verb in VERBS:
        group, _, action = verb.name.partition(" ")
        if action:
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS[group], formatter_class=fmt)
                groups[group] = g.add_subparsers(dest=f"{group}_action", metavar="ACTION", parser_class=Parser)
                groups[group].required = True
            p = groups[group].add_parser(action, help=verb.help, formatter_class=fmt)
        else:
            p = sub.add_parser(verb.name, help=verb.help, formatter_class=fmt)
        verb.add_arguments(p)
        p.set_defaults(_main=verb.main)
    return top


def _resolve_model_names(a):
    """A known model name (smollm2) in place of a model directory: imported once into the cache."""
    for attr, name_attr in (("model", "model_name"), ("init", None), ("embeddings", "embeddings_name"),
                           ("tokenizer", None)):
        v = getattr(a, attr, None)
        if isinstance(v, str) and v in KNOWN and not Path(v).exists():
            setattr(a, attr, resolve(v))
            if a.verb == "serve" and name_attr and getattr(a, name_attr, 1) is None:
                setattr(a, name_attr, v)  # clients ask for "smollm2", not the cache directory's name


def shorthand(argv: list[str]) -> list[str]:
    """The command line's shorthands spelled out: `chatsmith translate MODEL …` is `translate run MODEL …`."""
    argv = list(argv)
    if argv[:1] == ["translate"] and len(argv) > 1 and argv[1] not in translate.ACTIONS and not argv[1].startswith("-"):
        argv.insert(1, "run")
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = shorthand(sys.argv[1:] if argv is None else argv)
    try:
        a = build_parser().parse_args(argv)
        if a.verb != "ngram":
            _resolve_model_names(a)
        if runtime.rank() > 0:  # under torchrun rank 0 alone prints results
            sys.stdout = open(os.devnull, "w")
        a._main(a)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # a loss or reward went NaN/inf: say so, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `chatsmith generate … | head` closed the pipe: not an error
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
