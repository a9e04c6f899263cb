"""What every importer shares: tensors in HF names -> a checked GPT -> an atomically written
chatsmith directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from chatsmith.atomic import atomic_dir
from chatsmith.checkpoint import check_state_dict, write_model_files
from chatsmith.config import ModelConfig
from chatsmith.errors import UserError
from chatsmith.model.gpt import GPT
from chatsmith.model.hf import from_hf_state_dict


def build_model(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT holding `hf_sd` (HF tensor names); every missing, unexpected or misshapen tensor is a
    UserError naming `source`, raised before anything is written."""
    try:
        sd = from_hf_state_dict(cfg, hf_sd)
    except KeyError as e:
        raise UserError(f"{source}: tensor {e} is missing for a {cfg.arch} model with {cfg.n_layer} layers") from None
    with torch.device("meta"):
        expected = GPT(cfg).state_dict()
    check_state_dict(expected, sd, f"{source}: the weights", "the config")
    model = GPT(cfg)  # a real init (rotary tables and any other buffers built as the model builds them)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def write_imported(out_dir: str | Path, model: GPT, tokenizer_files: dict[str, bytes | str | dict] | None,
                   source: str, extra: dict | None = None) -> Path:
    """Model + tokenizer files into OUT_DIR, atomically: on any failure nothing appears there."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_model_files(tmp, model, extra_config={"stage": "import", "imported_from": source, **(extra or {})})
        for name, content in (tokenizer_files or {}).items():
            p = tmp / name
            if isinstance(content, dict):
                p.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
            elif isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
        if not tokenizer_files:
            print(f"warning: {source} has no tokenizer chatsmith can read; {out} holds the weights only "
                  f"(generate/chat/serve need a tokenizer.json there)", file=sys.stderr)
    return out
