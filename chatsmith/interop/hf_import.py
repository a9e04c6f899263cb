"""Import a Hugging Face model directory (what `save_pretrained` writes): a Llama- or GPT-2-family
decoder, or a BERT encoder (BertModel, e.g. all-MiniLM-L6-v2, or a Bert*For* task model).

Weights come from model.safetensors, sharded safetensors (model.safetensors.index.json), or
pytorch_model.bin (also sharded) read with torch.load(weights_only=True): never unpickled code.
The tokenizer is carried over as tokenizer.json + tokenizer_config.json, with the chat template and
special tokens that transformers keeps in side files (chat_template.jinja, special_tokens_map.json)
folded into tokenizer_config.json, since that is where chatsmith.tokenizer reads them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from chatsmith.model.decoder import DecoderConfig
from chatsmith.model.encoder import EncoderConfig
from chatsmith.errors import UserError
from chatsmith.interop.common import build_model, write_imported

# buffers old checkpoints saved next to the weights; our model rebuilds them
_DROP_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # not c_attn.bias


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{f} cannot be read as JSON ({e})") from None


def read_hf_config(d: Path) -> DecoderConfig | EncoderConfig:
    raw = _read_json(d / "config.json")
    mt = raw.get("model_type")
    if mt not in ("llama", "gpt2", "bert"):
        raise UserError(f"{d / 'config.json'} has model_type={mt!r}; chatsmith imports 'llama', 'gpt2' "
                        f"(decoders) and 'bert' (encoders)")
    if mt == "bert":
        try:
            return EncoderConfig.from_hf(raw)
        except (KeyError, TypeError) as e:
            raise UserError(f"{d / 'config.json'} lacks or has unexpected fields ({e})") from None
    if mt == "llama":
        if raw.get("hidden_act", "silu") != "silu":
            raise UserError(f"{d}: hidden_act={raw['hidden_act']!r} is not supported (Llama uses silu)")
        if bool(raw.get("attention_bias", False)) != bool(raw.get("mlp_bias", False)):
            raise UserError(f"{d}: attention_bias != mlp_bias is not supported (chatsmith has one bias switch)")
    else:
        act = raw.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"{d}: activation_function={act!r} is not supported (GPT-2 uses gelu_new)")
        for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if raw.get(k):
                raise UserError(f"{d}: {k}=true is not supported")
        if raw.get("scale_attn_weights") is False:
            raise UserError(f"{d}: scale_attn_weights=false is not supported")
    try:
        return DecoderConfig.from_hf(raw)
    except (KeyError, TypeError) as e:
        raise UserError(f"{d / 'config.json'} lacks or has unexpected fields ({e})") from None


def read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_one(f: Path) -> dict[str, torch.Tensor]:
        if not f.exists():
            raise UserError(f"{d} is incomplete: {f.name} is missing")
        try:
            if f.suffix == ".safetensors":
                return load_file(str(f))
            return torch.load(f, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
            raise UserError(f"{f} cannot be read ({e}); the file is truncated or corrupt") from None

    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / index).exists():
            shards = sorted(set(_read_json(d / index).get("weight_map", {}).values()))
            sd = {}
            for s in shards:
                sd.update(load_one(d / s))
            return sd
        if (d / single).exists():
            return load_one(d / single)
    raise UserError(f"{d} holds no weights: expected model.safetensors, pytorch_model.bin or a sharded index")


def read_hf_tokenizer(d: Path, model_max_length: int | None = None) -> dict[str, str | dict] | None:
    """tokenizer.json + a tokenizer_config.json that names the special tokens and holds the chat
    template; None when the directory has no tokenizer chatsmith can use."""
    cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
    if (d / "special_tokens_map.json").exists():  # older save_pretrained output keeps them apart
        for k, v in _read_json(d / "special_tokens_map.json").items():
            cfg.setdefault(k, v)
    if (d / "chat_template.jinja").exists():  # transformers >= 4.50 writes the template beside
        cfg.setdefault("chat_template", (d / "chat_template.jinja").read_text())
    elif (d / "chat_template.json").exists():
        cfg.setdefault("chat_template", _read_json(d / "chat_template.json").get("chat_template"))
    if (d / "tokenizer.json").exists():
        tok_json = (d / "tokenizer.json").read_text()
    elif (d / "vocab.json").exists() and (d / "merges.txt").exists():
        tok_json = _gpt2_tokenizer_json(d)  # GPT-2's original files: byte-level BPE
        cfg.setdefault("eos_token", "<|endoftext|>")
        cfg.setdefault("bos_token", "<|endoftext|>")
    else:
        return None
    # what chatsmith.tokenizer needs to know; fill what transformers leaves implicit
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if model_max_length and not isinstance(cfg.get("model_max_length"), int):
        cfg["model_max_length"] = model_max_length
    added = {t["content"] for t in json.loads(tok_json).get("added_tokens", [])}
    if not cfg.get("eos_token") and "<|endoftext|>" in added:
        cfg["eos_token"] = "<|endoftext|>"
    return {"tokenizer.json": tok_json, "tokenizer_config.json": cfg}


def _gpt2_tokenizer_json(d: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    bpe = models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id("<|endoftext|>") is not None:
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok.to_str()


def import_hf(src: str | Path, out_dir: str | Path) -> Path:
    d = Path(src)
    if not (d / "config.json").exists():
        raise UserError(f"{d} is not a Hugging Face model directory: config.json is missing")
    cfg = read_hf_config(d)
    raw = read_hf_weights(d)
    sd = {k: v for k, v in raw.items() if not k.endswith(_DROP_SUFFIXES)}
    if isinstance(cfg, EncoderConfig):
        # a BertModel may have been saved without its pooler (add_pooling_layer=False)
        has_pooler = any(k.endswith("pooler.dense.weight") for k in sd)
        cfg = dataclasses.replace(cfg, pooler=has_pooler) if not cfg.heads else cfg
    elif cfg.arch == "llama":
        # LlamaModel saved without its LM head wrapper has no "model." prefix
        if "embed_tokens.weight" in sd:
            sd = {("model." + k if not k.startswith("lm_head") else k): v for k, v in sd.items()}
    model = build_model(cfg, sd, str(d))
    tok = read_hf_tokenizer(d, cfg.max_seq_len)
    return write_imported(out_dir, model, tok, str(d.resolve()))
