"""The one checkpoint format: a Hugging Face style directory.

    config.json              HF config (Llama or GPT-2 keys) + a "chatsmith" block
    model.safetensors        weights in HF names
    tokenizer.json, tokenizer_config.json
    generation_config.json
    trainer_state.json       step, schedule, data position, config  (training checkpoints)
    optimizer.safetensors    optimizer moments + RNG states           (training checkpoints)

Never pickle. Directories are written atomically: into a temporary sibling, every file fsynced,
then renamed into place, so a kill at any instant leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chatsmith import atomic
from chatsmith.atomic import atomic_dir
from chatsmith.config import ModelConfig
from chatsmith.errors import UserError
from chatsmith.model.gpt import GPT
from chatsmith.model.hf import from_hf_state_dict, to_hf_state_dict
from chatsmith.model.lora import ADAPTER_CONFIG, has_lora, is_adapter_dir, load_adapter_model, write_adapter_files

MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_model_files(d: Path, model: GPT, tokenizer_dir: Path | None = None, extra_config: dict | None = None):
    """Model, config, generation config and tokenizer files into directory d (not atomic by itself)."""
    cfg = model.cfg
    if has_lora(model):  # LoRA: the adapters alone (+ a pointer to the base), not the full weights
        extra_config = {**(extra_config or {}), "lora": write_adapter_files(d, model)}
    else:
        state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
                 for k, v in to_hf_state_dict(model).items()}
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["chatsmith"] = {"model": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, **(extra_config or {})}
    atomic.write_json(d / "config.json", hf)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "pad_token_id": cfg.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
           "max_new_tokens": 256}
    atomic.write_json(d / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (d / name).resolve():
                shutil.copyfile(src, d / name)


def save_checkpoint(path: str | os.PathLike, model: GPT, tokenizer_dir=None, trainer_state: dict | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, extra_config: dict | None = None) -> Path:
    """Atomically write a complete checkpoint directory at `path` (replacing any old one)."""
    with atomic_dir(path) as tmp:
        write_model_files(tmp, model, tokenizer_dir, extra_config)
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / "optimizer.safetensors"))
        if trainer_state is not None:
            atomic.write_json(tmp / "trainer_state.json", trainer_state)
    return Path(path)


def publish(src: Path, out: Path, names=None):
    """Copy a finished checkpoint's files into `out` (the user-facing model dir), one atomic
    replace per file, config.json last so a half-published dir never looks loadable."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted((p for p in src.iterdir() if p.is_file() and (names is None or p.name in names)),
                   key=lambda p: (p.name == "config.json", p.name == ADAPTER_CONFIG))
    for f in files:
        atomic.copy_file(f, out / f.name)


_STEP_RE = re.compile(r"^step-(\d+)$")


def list_checkpoints(out: Path) -> list[Path]:
    """Training checkpoints under out/checkpoints, oldest first."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(out: Path, keep: int):
    for p in list_checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def read_config(path: str | os.PathLike) -> ModelConfig:
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"model directory {d} does not exist")
    f = d / "config.json"
    if not f.exists():
        raise UserError(f"{d} is not a model directory: config.json is missing")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt") from None
    own = (raw.get("chatsmith") or {}).get("model")
    try:
        return ModelConfig(**own) if own else ModelConfig.from_hf(raw)
    except (TypeError, KeyError) as e:
        raise UserError(f"{f} lacks or has unexpected fields ({e}); the checkpoint is corrupt") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"{path.parent} is incomplete: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); the file is truncated or corrupt") from None


def check_state_dict(expected: dict, sd: dict, where: str, config_name: str):
    """UserError naming `where` unless `sd` has exactly the tensors, and shapes, that `expected` (the
    state dict of a model built from the config) has."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where} does not match {config_name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{where}: tensor {k} has shape {tuple(sd[k].shape)}, {config_name} implies "
                            f"{tuple(v.shape)}")


def load_model(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> GPT:
    """A GPT from a checkpoint directory, with every file checked and named on failure.
    A LoRA adapter directory loads its base model with the adapters merged in."""
    d = Path(path)
    if is_adapter_dir(d):
        return load_adapter_model(d).to(device=device, dtype=dtype).eval()
    cfg = read_config(d)
    sd = from_hf_state_dict(cfg, load_tensors(d / "model.safetensors"))
    with torch.device("meta"):
        model = GPT(cfg)
    check_state_dict(model.state_dict(), sd, str(d / "model.safetensors"), "config.json")
    model = GPT(cfg)  # real init: buffers (rotary tables) are built here
    model.load_state_dict(sd, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.source_dir = str(d.resolve())  # where LoRA finds its base model (chatsmith/model/lora.py)
    return model.to(device=device, dtype=dtype).eval()
