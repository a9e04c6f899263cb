"""`chatsmith serve MODEL`: the OpenAI-compatible API and the web chat page on one port."""

from __future__ import annotations

import os

from chatsmith.config import DEVICES
from chatsmith.engine import QUANTIZE
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.runtime import resolve_device
from chatsmith.serve.app import serve
from chatsmith.watermark import add_flags as add_watermark_flags, config_from_args as watermark_config


def add_arguments(p):
    p.add_argument("model", help="model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (1-65535)")
    p.add_argument("--api-key", default=os.environ.get("CHATSMITH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CHATSMITH_API_KEY, else no key)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 429")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is faster for small models on a busy machine)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="names the Host header may give ('*': any); default: loopback names, plus --host "
                        "when it is one address, any when it is 0.0.0.0 or ::")
    p.add_argument("--embeddings", default=None, metavar="ENCODER",
                   help="also answer POST /v1/embeddings with this encoder (a directory or minilm); a MODEL that "
                        "is itself an encoder is served for embeddings alone")
    p.add_argument("--embeddings-name", default=None,
                   help="the model id clients give for embeddings (default: the encoder's name)")
    p.add_argument("--tools", nargs="+", default=None, metavar="TOOL",
                   help="built-in tools the server runs inside generation for every chat request (calculator)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where to run the model")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="decode weights: none (fp32 as trained), int8 (CPU; a quarter of the bytes per token) "
                   "or bf16 (half the bytes; a CPU with native bf16 or a GPU)")
    p.add_argument("--moderation", default=None, metavar="lexicon|MODEL_DIR",
                   help="check requests and replies and answer POST /v1/moderations: 'lexicon' (word lists) or a "
                        "moderation classifier directory beside the lexicon (default: off)")
    p.add_argument("--watermark-key", default=None,
                   help="watermark every reply with this secret integer key (never sent to clients; default: off)")
    add_watermark_flags(p, switch=False)
    p.add_argument("--tgt", default=None, metavar="LANG",
                   help="translation models: the target language of requests for plain MODEL_NAME (default: the "
                        "model's only language, or for a zh+en model the one the source is not)")
    p.add_argument("--num-beams", type=int, default=None,
                   help="translation models: the beam width of requests that set neither temperature nor "
                        "num_beams (default 1: greedy)")


def main(a):
    if a.max_batch < 1 or (a.threads is not None and a.threads < 1):
        raise UserError("--max-batch and --threads must be at least 1")
    serve(a.model, a.host, a.port, a.api_key, a.model_name, a.max_queue, resolve_device(a.device),
          max_batch=a.max_batch, threads=a.threads, allowed_hosts=a.allowed_hosts, embeddings=a.embeddings,
          embeddings_name=a.embeddings_name, tools=a.tools, quantize=a.quantize, moderation=a.moderation,
          watermark=watermark_config(a) if a.watermark_key is not None else None, tgt=a.tgt, num_beams=a.num_beams)


VERB = Verb("serve", "OpenAI-compatible API server and web chat page", add_arguments, main)
