"""What every importer shares: tensors in HF names -> a checked model -> an atomically written
chatsmith directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from chatsmith.atomic import atomic_dir
from chatsmith.checkpoint import model_from_hf_state, write_model_files
from chatsmith.errors import UserError
from chatsmith.model.family import FamilyModel


def build_model(cfg, hf_sd: dict[str, torch.Tensor], source: str) -> FamilyModel:
    """A model of cfg's family holding `hf_sd` (HF tensor names); every missing, unexpected or misshapen tensor is a
    UserError naming `source`, raised before anything is written; so is a tensor holding NaN or Inf
    (corrupt bytes: such a model answers NaN, and no trained model has them)."""
    for name, w in hf_sd.items():
        if w.is_floating_point() and not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise UserError(f"{source}: tensor {name} holds {bad} non-finite (NaN or Inf) values of {w.numel()}; "
                            f"the weights are corrupt")
    return model_from_hf_state(cfg, hf_sd, f"{source}: the weights").eval()


def write_imported(out_dir: str | Path, model: FamilyModel, tokenizer_files: dict[str, bytes | str | dict] | None,
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
