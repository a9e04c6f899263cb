"""`chatsmith generate`: one prompt, sampled by the engine, streamed to stdout.

Every SamplingParams field is a flag (--temperature 0 is greedy; --num-beams, --num-return-sequences,
--stop, --seed ...). `--quantize int8|bf16` decodes with int8 or bf16 weights (see GPT.fuse_decode_weights).
"""

from __future__ import annotations

import sys

import torch

from chatsmith.checkpoint import load_model
from chatsmith.config import DEVICES
from chatsmith.engine import QUANTIZE, Engine, SamplingParams
from chatsmith.flags import Verb, add_dataclass_flags, dataclass_from_args
from chatsmith.runtime import resolve_device
from chatsmith.tokenizer import Tokenizer
from chatsmith.watermark import Watermark, add_flags as add_watermark_flags, config_from_args as watermark_config


SAMPLING_HELP = {
    "max_new_tokens": "longest continuation (tokens)",
    "temperature": "sampling temperature (0 = greedy)",
    "top_k": "keep the K likeliest tokens (0 = off)",
    "top_p": "nucleus sampling: keep the likeliest tokens up to this probability mass",
    "repetition_penalty": "divide the logits of tokens already present by this (1 = off)",
    "seed": "seed the sampling (default: a fresh seed)",
    "num_return_sequences": "continuations to print",
    "num_beams": "beam search with this many beams (1 = sampling)",
    "length_penalty": "beam search: a beam's score is its log-probability / length**this",
    "logprobs": "report each generated token's log-probability and N alternatives (default: off)",
    "prompt_logprobs": "the same for every prompt token (default: off)",
}


def add_arguments(p):
    p.add_argument("model", help="model directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    # logit_bias: the API's; tool_hook: chat / serve / eval --tools; watermark: the flags below
    add_dataclass_flags(p, SamplingParams, skip=("stop", "logit_bias", "tool_hook", "watermark"), help=SAMPLING_HELP)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (auto: cuda, else mps, else cpu)")
    p.add_argument("--no-stream", action="store_true", help="print only when finished")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="decode weights: none (fp32 as trained), int8 (CPU; a quarter of the bytes per token) "
                   "or bf16 (half the bytes; a CPU with native bf16 or a GPU)")
    add_watermark_flags(p)


def main(a):
    cfg = watermark_config(a) if a.watermark else None
    params = dataclass_from_args(SamplingParams, a, stop=a.stop, watermark=None)  # --watermark is the switch
    params.validate()
    model = load_model(a.model, device=resolve_device(a.device))
    tok = Tokenizer.load(a.model)
    if cfg is not None:
        params.watermark = Watermark(cfg, tok.vocab_size)
    engine = Engine(model, tok, max_batch=1, quantize=a.quantize)
    ids = tok.encode(a.prompt, bos=True, special=True)
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


VERB = Verb("generate", "sample from a model", add_arguments, main)
