"""GGUF (llama.cpp's single-file format) in and out, with the `gguf` package.

Import: general.architecture "llama" (e.g. SmolLM2), tensors in F32, F16, BF16, Q8_0, Q4_0 or
Q4_1 dequantised to fp32; the tokenizer is rebuilt as a Hugging Face `tokenizers` byte-level BPE
from tokenizer.ggml.{tokens, merges, token_type, pre} and the chat template taken from
tokenizer.chat_template.

Export: the llama architecture with llama.cpp's metadata conventions (what its HF converter
writes), matrices in F32, F16 or Q8_0 (norms always F32).

Layout facts this module rests on:
- GGUF lists a tensor's dims fastest-first (ggml's ne), so a (out, in) torch weight is stored as
  ne = [in, out]; the reader's numpy arrays already have torch's (out, in) order.
- llama.cpp's converter permutes the rows of Q and K within each head from HF's rotary layout
  (the two halves of a head are the real/imaginary parts) to the interleaved one (pairs of
  adjacent rows) that ggml's rope kernel uses; we undo it on import and redo it on export.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from chatsmith.atomic import temp_file_beside
from chatsmith.checkpoint import load_model
from chatsmith.errors import UserError
from chatsmith.interop.common import build_model, write_imported
from chatsmith.model.decoder import DecoderConfig, to_hf_state_dict

SUPPORTED_IN = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")

# tokenizer.ggml.pre names -> the pre-tokenizer that reproduces llama.cpp's split regexes
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b", "command-r"}
_GPT2_PRE = {None, "default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "roberta-bpe"}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {"llama3": _LLAMA3_REGEX, "llama-bpe": _LLAMA3_REGEX, "smaug-bpe": _LLAMA3_REGEX,
              "falcon3": _LLAMA3_REGEX, "dbrx": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX,
              "deepseek-r1-qwen": _QWEN2_REGEX}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF support needs the `gguf` package: pip install gguf==0.19.0 "
                        "(scripts/setup.sh installs it)") from None
    return gguf


# --- rotary row order -------------------------------------------------------------------------
def hf_to_gguf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, rows [r0..r(D/2-1), i0..i(D/2-1)] (HF halves) -> [r0, i0, r1, i1, ...] (interleaved)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# --- reading ----------------------------------------------------------------------------------
def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _tensor_map(n_layer: int) -> dict[str, str]:
    m = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(n_layer):
        for g, h in names.items():
            for kind in ("weight", "bias"):
                m[f"blk.{i}.{g}.{kind}"] = f"model.layers.{i}.{h}.{kind}"
    return m


# what the gguf reader raises on a malformed file: a count of 2^60 entries runs off the end
# (IndexError) or reads later bytes as fields (a duplicate key: KeyError), bad strings, bad enums
_MALFORMED = (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, MemoryError, RuntimeError,
              struct.error)


def read_gguf(path: str | Path) -> tuple[DecoderConfig, dict[str, torch.Tensor], dict | None, dict]:
    """-> (config, tensors in HF Llama names, tokenizer files or None, metadata summary).
    Any malformed file is a UserError (the header, the metadata and the tensor data are all
    read lazily, so the whole read is guarded, not only the opening)."""
    p = Path(path)
    try:
        return _read_gguf(p)
    except _MALFORMED as e:
        raise UserError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _read_gguf(p: Path):
    gguf = _gguf()
    r = gguf.GGUFReader(str(p))
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise UserError(f"{p}: GGUF architecture {arch!r} is not supported; chatsmith imports 'llama' "
                        f"(Llama, SmolLM, Mistral-style models)")
    A = "llama."
    need = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [A + k for k in need if _field(r, A + k) is None]
    if missing:
        raise UserError(f"{p} lacks GGUF metadata {missing}")
    n_head = int(_field(r, A + "attention.head_count"))
    n_kv = int(_field(r, A + "attention.head_count_kv", n_head))
    d = int(_field(r, A + "embedding_length"))
    head_dim = d // n_head
    if int(_field(r, A + "rope.dimension_count", head_dim)) != head_dim:
        raise UserError(f"{p}: partial rotary (rope.dimension_count != head dim) is not supported")
    for k in ("attention.key_length", "attention.value_length"):
        if int(_field(r, A + k, head_dim)) != head_dim:
            raise UserError(f"{p}: {A + k} != embedding_length / head_count is not supported")
    scaling = _field(r, A + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise UserError(f"{p}: rope scaling {scaling!r} is not supported")
    tokens = _field(r, "tokenizer.ggml.tokens")
    names = {t.name for t in r.tensors}
    emb = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise UserError(f"{p} has no token_embd.weight tensor")
    vocab = int(_field(r, A + "vocab_size", len(tokens) if tokens else int(emb.shape[1])))
    n_layer = int(_field(r, A + "block_count"))
    has_bias = "blk.0.attn_q.bias" in names
    cfg = DecoderConfig(
        arch="llama", vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, d_model=d,
        d_ff=int(_field(r, A + "feed_forward_length")), max_seq_len=int(_field(r, A + "context_length", 2048)),
        rope_theta=float(_field(r, A + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(r, A + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names, bias=has_bias,
        bos_token_id=_int_or_none(_field(r, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_int_or_none(_field(r, "tokenizer.ggml.eos_token_id")),
        pad_token_id=_int_or_none(_field(r, "tokenizer.ggml.padding_token_id")),
    )
    bad = sorted({t.tensor_type.name for t in r.tensors} - set(SUPPORTED_IN))
    if bad:
        raise UserError(f"{p} holds tensors quantised as {', '.join(bad)}; chatsmith reads "
                        f"{', '.join(SUPPORTED_IN)} (requantise with llama.cpp's llama-quantize)")
    names_map = _tensor_map(n_layer)
    sd = {}
    for t in r.tensors:
        if t.name not in names_map:
            if t.name == "rope_freqs.weight":
                raise UserError(f"{p} has rope_freqs (Llama 3.1 rope scaling), which chatsmith does not implement")
            raise UserError(f"{p}: unexpected tensor {t.name} for the llama architecture")
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))  # ne is fastest-first
        w = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)  # a writable copy
        if ".attn_q." in t.name:
            w = gguf_to_hf_rope(w, n_head)
        elif ".attn_k." in t.name:
            w = gguf_to_hf_rope(w, n_kv)
        sd[names_map[t.name]] = w
    tok_files = gguf_tokenizer(r, p, cfg)
    meta = {"name": _field(r, "general.name"), "file_type": _field(r, "general.file_type"),
            "tensor_types": sorted({t.tensor_type.name for t in r.tensors})}
    return cfg, sd, tok_files, meta


def _int_or_none(v):
    return None if v is None else int(v)


def gguf_tokenizer(r, p: Path, cfg: DecoderConfig) -> dict | None:
    """tokenizer.json + tokenizer_config.json rebuilt from GGUF metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(r, "tokenizer.ggml.model")
    tokens = _field(r, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        return None
    if kind != "gpt2":
        print(f"warning: {p} has a {kind!r} tokenizer; chatsmith rebuilds only byte-level BPE ('gpt2') "
              f"tokenizers from GGUF, so the model is imported without one", file=sys.stderr)
        return None
    types = list(_field(r, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in (_field(r, "tokenizer.ggml.merges") or [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _field(r, "tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_PRE:
            print(f"warning: {p}: unknown tokenizer.ggml.pre {pre!r}; splitting text with GPT-2's "
                  f"pattern, which may tokenise some text differently from llama.cpp", file=sys.stderr)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>…) are special: matched whole, skipped by decode(skip_special);
    # user-defined ones are matched whole but are ordinary text
    added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4)]
    tok.add_tokens(added)

    def name(key):
        i = _field(r, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("tokenizer.ggml.bos_token_id"),
            "eos_token": name("tokenizer.ggml.eos_token_id"), "unk_token": name("tokenizer.ggml.unknown_token_id"),
            "pad_token": name("tokenizer.ggml.padding_token_id"),
            "add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(_field(r, "tokenizer.ggml.add_eos_token", False)),
            "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len,
            "gguf_pre": pre}
    tpl = _field(r, "tokenizer.chat_template")
    if tpl:
        tcfg["chat_template"] = tpl
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": {k: v for k, v in tcfg.items() if v is not None}}


def import_gguf(src: str | Path, out_dir: str | Path) -> Path:
    p = Path(src)
    cfg, sd, tok_files, meta = read_gguf(p)
    model = build_model(cfg, sd, str(p))
    return write_imported(out_dir, model, tok_files, str(p.resolve()),
                          extra={"gguf": {k: v for k, v in meta.items() if v is not None}})


# --- writing ----------------------------------------------------------------------------------
def _merges_of(tok_json: dict) -> list[str]:
    merges = tok_json.get("model", {}).get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _pre_name(tok_json: dict, tcfg: dict) -> str:
    """The llama.cpp pre-tokenizer name whose regex reproduces this tokenizer.json's splitting."""
    if tcfg.get("gguf_pre"):
        return tcfg["gguf_pre"]
    pre = tok_json.get("pre_tokenizer") or {}
    seq = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in seq]
    if types == ["Digits", "ByteLevel"] and seq[0].get("individual_digits"):
        return "smollm"  # = starcoder: each digit alone, then GPT-2's pattern (our own tokenizers)
    if types == ["ByteLevel"] and seq[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Split", "ByteLevel"]:
        pattern = (seq[0].get("pattern") or {}).get("Regex")
        for name, rx in (("llama-bpe", _LLAMA3_REGEX), ("qwen2", _QWEN2_REGEX)):
            if pattern == rx:
                return name
    raise UserError(f"the tokenizer's pre-tokenizer ({types}) has no llama.cpp equivalent chatsmith knows; "
                    f"GGUF export supports byte-level BPE tokenizers split like GPT-2, SmolLM/StarCoder, "
                    f"Llama 3 or Qwen2")


def gguf_vocab(model_dir: Path, vocab_size: int):
    """(tokens, token types, merges, tokenizer_config, pre name) for a byte-level BPE tokenizer.json,
    padded with unused tokens up to the model's (64-rounded) vocabulary, as llama.cpp's converter does."""
    f = model_dir / "tokenizer.json"
    if not f.exists():
        raise UserError(f"{model_dir} has no tokenizer.json; GGUF export needs the tokenizer")
    tj = json.loads(f.read_text())
    cf = model_dir / "tokenizer_config.json"
    tcfg = json.loads(cf.read_text()) if cf.exists() else {}
    m = tj.get("model", {})
    if m.get("type") != "BPE" or m.get("byte_fallback"):
        raise UserError(f"{f}: GGUF export supports byte-level BPE tokenizers only (got {m.get('type')})")
    id_to = {i: t for t, i in m["vocab"].items()}
    special, user = set(), set()
    for a in tj.get("added_tokens", []):
        id_to[a["id"]] = a["content"]
        (special if a.get("special") else user).add(a["id"])
    n = max(vocab_size, max(id_to) + 1)
    if n > vocab_size:
        raise UserError(f"{f} has {max(id_to) + 1} tokens but the model's vocabulary is {vocab_size}")
    tokens, types = [], []
    for i in range(n):
        if i in id_to:
            tokens.append(id_to[i])
            types.append(3 if i in special else 4 if i in user else 1)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
    return tokens, types, _merges_of(tj), tcfg, _pre_name(tj, tcfg)


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16") -> Path:
    """A chatsmith (Llama-shaped) model directory -> one GGUF file for llama.cpp / Ollama."""
    gguf = _gguf()
    d, out = Path(model_dir), Path(out)
    if qtype not in EXPORT_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(EXPORT_TYPES)}, got {qtype!r}")
    model = load_model(d)
    cfg = model.cfg
    if not isinstance(cfg, DecoderConfig):
        raise UserError(f"{d} is not a decoder (GPT) model; GGUF export is for decoder models")
    if cfg.arch != "llama":
        raise UserError(f"{d} is a GPT-2-shaped model; chatsmith writes GGUF for the Llama shape only "
                        f"(export it with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py)")
    tokens, types, merges, tcfg, pre = gguf_vocab(d, cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    qt = getattr(gguf.GGMLQuantizationType, qtype.upper())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(out)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(tcfg.get("name_or_path") or d.resolve().name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(ftype)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        ids = {k: _id_of(tcfg.get(f"{k}_token"), tokens) for k in ("bos", "eos", "unk", "pad")}
        ids["bos"] = ids["bos"] if ids["bos"] is not None else cfg.bos_token_id
        ids["eos"] = ids["eos"] if ids["eos"] is not None else cfg.eos_token_id
        for k, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
            if ids[k] is not None:
                fn(ids[k])
        # our own tokenizers always start a document with <|bos|>; imported ones say in their config
        native = "<|bos|>" in tokens and tcfg.get("bos_token") == "<|bos|>"
        w.add_add_bos_token(native or bool(tcfg.get("add_bos_token", False)))
        w.add_add_eos_token(False)
        tpl = tcfg.get("chat_template")
        if tpl:
            w.add_chat_template(tpl)
        names = {h: g for g, h in _tensor_map(cfg.n_layer).items()}
        for hname, t in to_hf_state_dict(model).items():
            if hname not in names:
                raise UserError(f"{d}: tensor {hname} has no GGUF llama name (a score head cannot be exported)")
            t = t.float()
            if hname.endswith("q_proj.weight"):
                t = hf_to_gguf_rope(t, cfg.n_head)
            elif hname.endswith("k_proj.weight"):
                t = hf_to_gguf_rope(t, cfg.n_kv_head)
            arr = t.numpy()
            # 1-D tensors (norms, biases) stay F32 as llama.cpp keeps them; the Q types need rows
            # of whole 32-value blocks, else F16 (llama.cpp's converter falls back the same way)
            tt = qt if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
            if qtype.startswith("q") and arr.ndim == 2 and arr.shape[-1] % 32:
                tt = gguf.GGMLQuantizationType.F16
            w.add_tensor(names[hname], gguf.quants.quantize(arr, tt), raw_dtype=tt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _id_of(tok, tokens):
    s = tok.get("content") if isinstance(tok, dict) else tok
    if s is None:
        return None
    try:
        return tokens.index(s)
    except ValueError:
        return None
