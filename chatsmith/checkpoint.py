"""The one checkpoint format: a Hugging Face style directory, for every model family.

    config.json              HF config (the family's keys) + a "chatsmith" block {"family", "model", ...}
    model.safetensors        weights in HF names
    tokenizer.json, tokenizer_config.json
    generation_config.json
    trainer_state.json       step, schedule, data position, config  (training checkpoints)
    optimizer.safetensors    optimizer moments + RNG states           (training checkpoints)

Never pickle. Directories are written atomically: into a temporary sibling, every file fsynced,
then renamed into place, so a kill at any instant leaves either the old or the new checkpoint.

The family (chatsmith/model/registry.py) says how its config and tensors map to Hugging Face's;
nothing here knows a concrete model class. A LoRA adapter directory (chatsmith/model/lora.py's
files) loads as its base model with the adapters merged in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chatsmith import atomic
from chatsmith.atomic import atomic_dir
from chatsmith.errors import UserError
from chatsmith.model import registry
from chatsmith.model.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, apply_lora, has_lora, is_adapter_dir,
                                  load_adapter_state_dict, merge_lora, read_adapter_config, weights_fingerprint,
                                  write_adapter_files)

MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")  # the last: clip's images


def write_model_files(d: Path, model, tokenizer_dir: Path | None = None, extra_config: dict | None = None):
    """Model, config, generation config and tokenizer files into directory d (not atomic by itself)."""
    cfg, family = model.cfg, registry.family_of(model)
    if has_lora(model):  # LoRA: the adapters alone (+ a pointer to the base), not the full weights
        extra_config = {**(extra_config or {}), "lora": write_adapter_files(d, model)}
    else:
        state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
                 for k, v in family.to_hf_state_dict(model).items()}
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["chatsmith"] = {"family": family.name, "model": cfg.to_dict(), **(extra_config or {})}
    atomic.write_json(d / "config.json", hf)
    gen = model.generation_config()
    if gen is not None:
        atomic.write_json(d / "generation_config.json", gen)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (d / name).resolve():
                shutil.copyfile(src, d / name)


def save_checkpoint(path: str | os.PathLike, model, tokenizer_dir=None, trainer_state: dict | None = None,
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


def has_results(out: Path) -> bool:
    """Whether an output folder holds something worth keeping after a failure: a training checkpoint
    (to --resume from) or a published model."""
    return bool(list_checkpoints(out)) or (Path(out) / "config.json").exists()


def prune_checkpoints(out: Path, keep: int):
    for p in list_checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def read_config(path: str | os.PathLike):
    """The model config of a directory: the "chatsmith" block when there is one (any family; a
    checkpoint from before families is a decoder), else the HF keys by model_type."""
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
    block = raw.get("chatsmith") or {}
    try:
        return registry.config_from_block(block) if block.get("model") else registry.config_from_hf(raw)
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


def model_from_hf_state(cfg, hf_sd: dict[str, torch.Tensor], where: str):
    """A model of cfg's family holding `hf_sd` (HF tensor names) in fp32; every missing, unexpected or
    misshapen tensor is a UserError naming `where`, raised before any real weights are allocated."""
    family = registry.family_of(cfg)
    try:
        sd = family.from_hf_state_dict(cfg, hf_sd)
    except KeyError as e:
        raise UserError(f"{where}: tensor {e} is missing for this {family.name} config") from None
    with torch.device("meta"):
        expected = family.model(cfg).state_dict()
    check_state_dict(expected, sd, where, "config.json")
    model = family.model(cfg)  # real init: buffers (rotary tables) are built here
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    model.tie_weights()
    return model


def load_hf_weights(model, hf_sd: dict[str, torch.Tensor]):
    """Copy tensors in HF names (a checkpoint's model.safetensors) into an existing model (resume)."""
    model.load_state_dict(registry.family_of(model).from_hf_state_dict(model.cfg, hf_sd), strict=True)
    model.tie_weights()


def load_model(path: str | os.PathLike, device="cpu", dtype=torch.float32):
    """The model of a checkpoint directory, any family, with every file checked and named on
    failure. A LoRA adapter directory loads its base model with the adapters merged in."""
    d = Path(path)
    if is_adapter_dir(d):
        return load_adapter_model(d).to(device=device, dtype=dtype).eval()
    cfg = read_config(d)
    model = model_from_hf_state(cfg, load_tensors(d / "model.safetensors"), str(d / "model.safetensors"))
    model.source_dir = str(d.resolve())  # where LoRA finds its base model (chatsmith/model/lora.py)
    return model.to(device=device, dtype=dtype).eval()


# --- LoRA adapter directories ------------------------------------------------------------------------

def _chatsmith_block(d: Path) -> dict:
    try:
        return json.loads((d / "config.json").read_text()).get("chatsmith") or {}
    except (OSError, json.JSONDecodeError):
        return {}


def load_adapter_model(path, merge: bool = True, _depth: int = 0):
    """Base model + adapters from an adapter directory: merged into a plain model (default), or with the
    LoRA layers in place (merge=False, e.g. to continue training them). fp32 on the CPU."""
    d = Path(path)
    acfg = read_adapter_config(d)
    base_dir = Path(acfg["base_model_name_or_path"])
    if not base_dir.is_absolute():
        base_dir = d / base_dir
    if not (base_dir / "config.json").exists() and not is_adapter_dir(base_dir):
        raise UserError(f"the LoRA adapters in {d} need their base model {base_dir}, which is not there; "
                        f"put it back or point base_model_name_or_path in {d / ADAPTER_CONFIG} at a copy")
    if _depth > 8 or base_dir.resolve() == d.resolve():
        raise UserError(f"{d / ADAPTER_CONFIG}: base_model_name_or_path leads back to itself")
    want = (_chatsmith_block(d).get("lora") or {}).get("base_fingerprint")
    if want and weights_fingerprint(base_dir) != want:
        print(f"warning: the base model {base_dir} has changed since the adapters in {d} were trained on it; "
              f"the result will not be the fine-tuned model", file=sys.stderr)
    weights = load_tensors(d / ADAPTER_WEIGHTS)
    base = (load_adapter_model(base_dir, True, _depth + 1) if is_adapter_dir(base_dir)
            else load_model(base_dir))
    # a PEFT-written adapter dir has no config.json: the model is the base's shape
    cfg = read_config(d) if (d / "config.json").exists() else base.cfg
    model = base
    if cfg != base.cfg:  # e.g. a reward model: the base's trunk + a `score` head the adapters file holds
        model = registry.build(cfg)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        own = {k.removeprefix(PEFT_PREFIX) for k in weights}
        if unexpected or set(missing) - own:
            raise UserError(f"{d / 'config.json'} does not fit the base model {base_dir}: missing "
                            f"{sorted(set(missing) - own)[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
    apply_lora(model, acfg["r"], acfg.get("lora_alpha", acfg["r"]), acfg["target_modules"],
               acfg.get("lora_dropout", 0.0), acfg.get("modules_to_save") or [], base_dir=str(base_dir))
    load_adapter_state_dict(model, weights, where=str(d / ADAPTER_WEIGHTS))
    if merge:
        merge_lora(model)
    model.source_dir = str(d.resolve())
    return model.eval()


def merge_adapters(adapter_dir, out_dir) -> Path:
    """`chatsmith lora merge ADAPTER_DIR OUT_DIR`: base + adapters -> a full model directory, written
    atomically (a failure leaves OUT_DIR as it was)."""
    d, out = Path(adapter_dir), Path(out_dir)
    if not is_adapter_dir(d):
        raise UserError(f"{d} holds no LoRA adapters ({ADAPTER_CONFIG} is missing)")
    acfg = read_adapter_config(d)
    base = Path(acfg["base_model_name_or_path"])
    if out.resolve() in (d.resolve(), base.resolve()):
        raise UserError(f"OUT_DIR {out} would overwrite the adapters or their base model: choose a new directory")
    model = load_model(d)
    extra = {k: v for k, v in _chatsmith_block(d).items() if k not in ("family", "model", "lora")}
    extra["merged_lora"] = {"adapters": str(d.resolve()), "base": str(base.resolve()), "r": acfg["r"],
                            "lora_alpha": acfg.get("lora_alpha"), "target_modules": acfg["target_modules"]}
    tok = d if (d / "tokenizer.json").exists() else base
    with atomic_dir(out) as tmp:
        write_model_files(tmp, model, tokenizer_dir=tok, extra_config=extra)
    return out
