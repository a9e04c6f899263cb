"""Atomic writes: a file or a directory appears complete or not at all.

Every writer fills a temporary sibling (same directory, so the final `os.replace` is a rename on
one filesystem), fsyncs it, renames it into place and fsyncs the parent directory. A crash or a
kill at any instant leaves either the old file or the new one, never a half-written mix, and a
failed write leaves no temporary behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it


def temp_file_beside(path: Path) -> str:
    """An empty temporary file next to `path`, with the mode a plain `open` would give it (mkstemp
    makes 0600 files, so every output renamed from one would be unreadable to the user's group)."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return tmp


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kw):
    """Yields an open file on a temporary sibling of `path`; on success it is fsynced and renamed to
    `path`, on failure removed. Text mode defaults to UTF-8 with "\\n" line ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kw.setdefault("encoding", "utf-8")
        open_kw.setdefault("newline", "\n")
    tmp = temp_file_beside(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str):
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2):
    """JSON (UTF-8, non-ASCII kept as is) plus a final newline, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows) -> int:
    """One JSON object per line, atomically; returns the number of lines."""
    n = 0
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def copy_file(src: str | os.PathLike, dst: str | os.PathLike):
    """Copy src to dst so that dst is at every instant the old file or the complete new one."""
    with atomic_file(dst, "wb") as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yields a temporary sibling directory to fill; on success every file in it is fsynced and it
    is renamed to `path` (an old `path` is moved aside first and removed); on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700: the published folder gets the usual mode
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# what the writers here (and the corpus writer's ".train.jsonl.tmp-PID") leave behind when killed:
# ".tmp-NAME-RANDOM" siblings, ".old-NAME-PID" directories moved aside, ".NAME.tmp-PID" files
_STALE = re.compile(r"^\.(?:tmp-.+|old-.+|.+\.tmp-\d+)$")


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale_temporaries(root: str | os.PathLike, depth: int = 2) -> list[Path]:
    """Delete the temporaries a killed writer left in root and the folders `depth` levels below it
    (out/checkpoints, out/corpus, ...): a killed checkpoint write leaves a whole model's worth. Only
    for a directory this process owns (an output folder at the start of its run): a live writer's
    temporaries would go too. Returns what was removed."""
    gone, root = [], Path(root)
    for d, dirs, files in os.walk(root):
        if len(Path(d).relative_to(root).parts) >= depth:
            dirs[:] = []
        for name in [*dirs, *files]:
            if _STALE.match(name):
                _remove(Path(d) / name)
                gone.append(Path(d) / name)
        dirs[:] = [n for n in dirs if not _STALE.match(n)]
    return gone


@contextlib.contextmanager
def provisional_dir(path: str | os.PathLike, complete=lambda _path: False):
    """An output folder (created here, with its parents) that only stays if it holds something
    complete: when the body fails and complete(path) is false, everything the body added is removed
    (the folder and the parents this call created, if it created them), so a failed run leaves no
    half-made --out behind and its corrected rerun is not refused."""
    path = Path(path)
    created = [q for q in (path, *path.parents) if not q.exists()]
    before = set(os.listdir(path)) if path.is_dir() else None
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if path.is_dir() and not complete(path):
            if before is None:
                shutil.rmtree(created[-1], ignore_errors=True)
            else:
                for name in set(os.listdir(path)) - before:
                    _remove(path / name)
        raise


__all__ = ["atomic_file", "atomic_dir", "write_text", "write_json", "write_jsonl", "copy_file", "fsync_dir",
           "remove_stale_temporaries", "provisional_dir", "temp_file_beside"]
