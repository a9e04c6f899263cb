"""`chatsmith import` / `chatsmith export`: pick the reader or writer for a source or a format."""

from __future__ import annotations

from pathlib import Path

from chatsmith.errors import UserError


def import_any(src: str, out_dir: str) -> Path:
    from chatsmith.interop.registry import KNOWN, packaged_file

    p = Path(src)
    if not p.exists() and src in KNOWN:
        p = packaged_file(src)
    if not p.exists():
        raise UserError(f"{src} does not exist (expected a Hugging Face model directory, a .gguf file, "
                        f"or one of: {', '.join(KNOWN)})")
    if Path(out_dir).resolve() == p.resolve():
        raise UserError("OUT_DIR must differ from the source")
    if p.is_dir():
        from chatsmith.interop.hf_import import import_hf

        return import_hf(p, out_dir)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from chatsmith.interop.gguf_io import import_gguf

        return import_gguf(p, out_dir)
    raise UserError(f"{p} is neither a directory (Hugging Face model) nor a GGUF file (no GGUF magic)")


def export(model_dir: str, fmt: str, out: str | None = None, gguf_type: str = "f16") -> Path:
    d = Path(model_dir)
    name = d.resolve().name
    if fmt == "hf":
        return export_hf(d, Path(out or f"{name}-hf"))
    if fmt == "gguf":
        from chatsmith.interop.gguf_io import export_gguf

        return export_gguf(d, Path(out or f"{name}-{gguf_type}.gguf"), gguf_type)
    raise UserError(f"--format must be hf or gguf, got {fmt!r}")


def export_hf(d: Path, out: Path) -> Path:
    """A clean Hugging Face directory: config, weights, tokenizer, generation config; no training
    state. Our checkpoints already are HF directories; this drops the rest and checks the load."""
    from chatsmith.atomic import atomic_dir
    from chatsmith.checkpoint import load_model, write_model_files

    if out.resolve() == d.resolve():
        raise UserError("--out must differ from the model directory")
    model = load_model(d)
    with atomic_dir(out) as tmp:
        write_model_files(tmp, model, tokenizer_dir=d, extra_config={"stage": "export"})
    return out
