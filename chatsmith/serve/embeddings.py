"""POST /v1/embeddings in OpenAI's schema, over an encoder (chatsmith/encoder_engine.py).

    {"model": "minilm", "input": "text" | ["text", …] | [ids…] | [[ids…], …],
     "encoding_format": "float" | "base64", "dimensions": d, "user": "…"}
    -> {"object": "list", "model", "data": [{"object": "embedding", "index", "embedding"}],
        "usage": {"prompt_tokens", "total_tokens"}}

As OpenAI's API: an empty string, an empty list or an input longer than the model's context is a
400 (nothing is silently truncated), at most 2,048 inputs and 300,000 tokens per request; base64 is
the little-endian float32 bytes of the vector. Vectors are the attention-masked mean of the last
hidden states, L2-normalised, so `dimensions` other than the model's own width is refused (these
models were not trained to be cut, unlike OpenAI's text-embedding-3). Token-id inputs are the
tokenizer's ids without [CLS]/[SEP], which are added as for text.

Encoding runs on a worker thread, one request at a time, so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import base64
import threading

from chatsmith.encoder_engine import EncoderEngine
from chatsmith.serve.protocol import APIError

MAX_INPUTS = 2048
MAX_TOTAL_TOKENS = 300_000


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v, where: str) -> str:
    if not v:
        raise APIError(400, f"{where} is an empty string; every input must have text", param="input")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where} contains a lone surrogate (not valid Unicode text)", param="input") from None
    return v


def parse_input(value, vocab: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """-> (texts, None) or (None, token-id lists), every case of the schema's oneOf checked."""
    if isinstance(value, str):
        return [_text(value, "'input'")], None
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a non-empty string, a list of strings, a list of token ids or a "
                       "list of token-id lists", param="input", code="invalid_type")
    if len(value) > MAX_INPUTS:
        raise APIError(400, f"'input' has {len(value)} items; at most {MAX_INPUTS} per request", param="input")
    if all(isinstance(v, str) for v in value):
        return [_text(v, f"'input[{i}]'") for i, v in enumerate(value)], None
    rows = [value] if all(_is_int(v) for v in value) else value
    for i, r in enumerate(rows):
        if not isinstance(r, list) or not r or not all(_is_int(t) for t in r):
            raise APIError(400, f"'input[{i}]' must be a non-empty list of token ids (all items of 'input' of one kind)",
                           param="input", code="invalid_type")
        bad = next((t for t in r if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"'input[{i}]' holds token id {bad}, outside the vocabulary [0, {vocab})",
                           param="input", code="invalid_value")
    return None, rows


class Embedder:
    def __init__(self, engine: EncoderEngine, name: str):
        self.engine, self.name = engine, name
        self.dim = engine.model.cfg.d_model
        self.lock = threading.Lock()

    def card(self, created: int) -> dict:
        return {"id": self.name, "object": "model", "created": created, "owned_by": "chatsmith"}

    def _compute(self, texts, ids, fmt: str) -> dict:
        with self.lock:  # one encoding at a time: the model is not re-entrant across threads' batches
            eng = self.engine
            rows = ids if ids is not None else eng.tok.pieces(texts)
            n_tok = [len(r) + 2 for r in rows]  # + [CLS], [SEP]
            for i, n in enumerate(n_tok):
                if n > eng.max_len:
                    raise APIError(400, f"input {i} is {n} tokens, beyond this model's maximum of {eng.max_len}; "
                                   f"shorten or split it", param="input", code="context_length_exceeded")
            if sum(n_tok) > MAX_TOTAL_TOKENS:
                raise APIError(400, f"the inputs hold {sum(n_tok)} tokens; at most {MAX_TOTAL_TOKENS} per request",
                               param="input")
            vecs = eng.embed(ids=rows).numpy().astype("<f4")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()}
                for i, v in enumerate(vecs)]
        return {"object": "list", "model": self.name, "data": data,
                "usage": {"prompt_tokens": sum(n_tok), "total_tokens": sum(n_tok)}}

    async def create(self, body: dict) -> dict:
        model = body.get("model")
        if model is None:
            raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
        if model != self.name:
            raise APIError(404, f"the model '{model}' does not exist or does not make embeddings; this server's "
                           f"embeddings model is '{self.name}'", param="model", code="model_not_found")
        if "input" not in body:
            raise APIError(400, "'input' is required", param="input", code="missing_required_parameter")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format",
                           code="invalid_value")
        dims = body.get("dimensions")
        if dims is not None and (not _is_int(dims) or dims != self.dim):
            raise APIError(400, f"this model makes {self.dim}-dimensional embeddings and does not support "
                           f"'dimensions'={dims!r}", param="dimensions", code="invalid_value")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise APIError(400, "'user' must be a string", param="user", code="invalid_type")
        unknown = sorted(set(body) - {"model", "input", "encoding_format", "dimensions", "user"})
        if unknown:
            raise APIError(400, f"unknown parameter '{unknown[0]}'", param=unknown[0], code="unknown_parameter")
        texts, ids = parse_input(body["input"], self.engine.tok.vocab_size)
        return await asyncio.to_thread(self._compute, texts, ids, fmt)


__all__ = ["Embedder", "parse_input", "MAX_INPUTS", "MAX_TOTAL_TOKENS"]
