"""Pretraining corpus: built-in sources and/or user files -> cleaned, deduplicated,
train/val-split JSONL.

``build_corpus(out_dir)`` writes::

    out_dir/train.jsonl       {"text": ..., "source": ...} one document per line
    out_dir/val.jsonl
    out_dir/corpus_meta.json  documents/chars per source per split, duplicates, seed, inputs

The pipeline, one document at a time (nothing but a set of 16-byte hashes is kept per
document, so corpora larger than memory work):

1. read: built-in sources (:mod:`chatsmith.data.sources`) or user ``.txt``/``.md`` (one
   document per file) and ``.jsonl`` (one document per line, its ``text`` field);
2. clean: Unicode NFC, line endings to ``\\n``, control characters removed, trailing
   whitespace per line stripped, runs of blank lines collapsed to one blank line;
3. chunk: a document longer than ``max_doc_chars`` is cut at paragraph boundaries (or, for
   a paragraph that is itself too long, at line / sentence / word boundaries) into balanced
   chunks of at most ``max_doc_chars`` characters; each chunk is a document from here on;
4. pack: items of sources whose items are tiny (fortune cookies) are packed, consecutively,
   into documents of about ``Source.pack_chars`` characters;
5. filter: documents shorter than ``min_doc_chars`` are dropped, exact duplicates too;
6. split: a keyed hash of the text decides train or val (see :func:`split_score`).

Files are written under temporary names in ``out_dir`` and renamed into place only when the
whole build succeeded: a failed build leaves an earlier corpus intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
import unicodedata
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

from chatsmith.errors import UserError
from chatsmith.data import sources as builtin

INPUT_SUFFIXES = (".txt", ".md", ".jsonl")
MIN_DOC_CHARS = 20
PROGRESS_EVERY = 1000    # documents between progress checks
PROGRESS_SECONDS = 2.0  # ... and at most one progress line per this many seconds

# --------------------------------------------------------------------------- cleaning

# C0/C1 control characters except tab and newline, DEL, BOM / zero-width no-break space.
# Lone surrogates (only reachable through JSON "\\ud800" escapes) cannot be written as UTF-8.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85]")


def clean_line(line: str) -> str:
    """One line (no newline inside) in canonical form: NFC, no control characters, no
    trailing whitespace."""
    if not line.isascii() and not unicodedata.is_normalized("NFC", line):
        line = unicodedata.normalize("NFC", line)
    if _CONTROL.search(line):
        line = _CONTROL.sub("", line)
    return line.rstrip()


def iter_paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Cleaned paragraphs from raw lines (which may still carry ``\\r``/``\\n``). Blank or
    whitespace-only lines separate paragraphs; any run of them counts as one break."""
    cur: list[str] = []
    for raw in lines:
        for line in _LINE_BREAKS.sub("\n", raw).split("\n"):
            line = clean_line(line)
            if line.strip():
                cur.append(line)
            elif cur:
                yield "\n".join(cur)
                cur = []
    if cur:
        yield "\n".join(cur)


def clean_text(text: str) -> str:
    """The common cleaning of one document, as a single string."""
    return "\n\n".join(iter_paragraphs([text])).strip()


# --------------------------------------------------------------------------- chunking

# Split points, coarse to fine, used on a paragraph longer than the chunk limit. Each
# pattern matches the separator that stays at the end of the piece before the split.
_SPLITTERS = (
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?;:。！？；…])[\"'”’)\]]*\s+|(?<=[。！？；])"),
    re.compile(r"\s+"),
)


def _pack(pieces: list[str], max_chars: int, joiner: str) -> list[str]:
    """Group consecutive pieces (each <= max_chars) into few, evenly sized groups of at
    most max_chars: greedy towards total/ceil(total/max) per group, then the last two
    groups are evened out so that no crumb (a lone "[Exit.]") is left at the end."""
    jl = len(joiner)

    def size(g: list[str]) -> int:
        return sum(len(p) for p in g) + jl * max(0, len(g) - 1)

    total = size(pieces)
    if total <= max_chars:
        return [joiner.join(pieces)]
    target = math.ceil(total / math.ceil(total / max_chars))
    groups: list[list[str]] = []
    cur: list[str] = []
    n = 0
    for p in pieces:
        add = len(p) + (jl if cur else 0)
        if cur and n + add > target:
            # Close before or after this piece, whichever lands nearer the target.
            if n + add <= max_chars and (n + add - target) < (target - n):
                cur.append(p)
                groups.append(cur)
                cur, n = [], 0
                continue
            groups.append(cur)
            cur, n = [], 0
            add = len(p)
        cur.append(p)
        n += add
    if cur:
        groups.append(cur)
    if len(groups) >= 2:
        a, b = groups[-2], groups[-1]
        if size(a) + jl + size(b) <= max_chars:
            groups[-2:] = [a + b]
        else:
            # Move pieces from the end of a to the front of b while that evens them out.
            while len(a) > 1 and size(b) + jl + len(a[-1]) <= max_chars and \
                    abs((size(a) - len(a[-1]) - jl) - (size(b) + len(a[-1]) + jl)) < \
                    abs(size(a) - size(b)):
                b.insert(0, a.pop())
    return [joiner.join(g) for g in groups]


def split_long(text: str, max_chars: int, level: int = 0) -> list[str]:
    """Cut one over-long paragraph into pieces of at most max_chars at the coarsest
    boundaries that do the job (lines, then sentences, then words, then anywhere)."""
    if len(text) <= max_chars:
        return [text]
    if level >= len(_SPLITTERS):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    cuts = [m.end() for m in _SPLITTERS[level].finditer(text) if 0 < m.end() < len(text)]
    segments = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)]) if b > a]
    pieces: list[str] = []
    for seg in segments:
        if len(seg) > max_chars:
            pieces.extend(split_long(seg, max_chars, level + 1))
        else:
            pieces.append(seg)
    # Pieces keep their trailing separator; stripping after packing loses only whitespace
    # at chunk edges.
    return [g.strip() for g in _pack(pieces, max_chars, "") if g.strip()]


def chunk_paragraphs(paragraphs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Documents of at most max_chars made of whole paragraphs joined by blank lines.
    Streams: at most ~3*max_chars of text is buffered."""
    buf: deque[str] = deque()
    size = 0  # length of "\n\n".join(buf)

    def flush_all() -> Iterator[str]:
        nonlocal size
        if buf:
            yield from _pack(list(buf), max_chars, "\n\n")
            buf.clear()
            size = 0

    for par in paragraphs:
        if len(par) > max_chars:
            yield from flush_all()
            yield from split_long(par, max_chars)
            continue
        size += len(par) + (2 if buf else 0)
        buf.append(par)
        while size > 2 * max_chars:
            # Far more than one chunk is waiting: emit a full greedy chunk from the front;
            # what remains at the end is balanced by flush_all.
            out = [buf.popleft()]
            n = len(out[0])
            while buf and n + 2 + len(buf[0]) <= max_chars:
                n += 2 + len(buf[0])
                out.append(buf.popleft())
            size = sum(len(p) for p in buf) + 2 * max(0, len(buf) - 1)
            yield "\n\n".join(out)
    yield from flush_all()


# --------------------------------------------------------------------------- hashing

def doc_hash(text: str) -> bytes:
    """Identity of a document for exact deduplication."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_score(text: str, seed: int) -> float:
    """Uniform in [0, 1), a pure function of (seed, text): a document goes to val when its
    score is below val_fraction, whatever order the documents arrive in."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8,
                        key=f"chatsmith-split-{seed}".encode())
    return int.from_bytes(h.digest(), "big") / 2.0 ** 64


# --------------------------------------------------------------------------- user inputs

def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) from a UTF-8 file, or a UserError naming the byte."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: the file is not valid UTF-8 (bad byte "
                    f"0x{raw[e.start]:02x} at byte offset {offset + e.start}). chatsmith reads "
                    f"UTF-8 text only; convert it first, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`.") from None
            offset += len(raw)
            yield lineno, line


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its line end) of a UTF-8 text file, a leading byte-order mark
    dropped; lines end at "\\n" only, so the numbers are the ones an editor shows."""
    for lineno, line in _read_lines(path):
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield lineno, line.rstrip("\r\n")


def check_file(p: Path, what: str, missing: str = "") -> None:
    """p is a regular file, or a UserError saying what it is instead. A FIFO (or a device) would
    block the read forever, or stream without end, so it is refused before anything is opened."""
    if p.is_file():
        return
    if p.is_dir():
        raise UserError(f"{p}: is a folder, not a {what}")
    if p.exists() or p.is_symlink():
        kind = "a broken symbolic link" if not p.exists() else (
            "a FIFO (named pipe)" if p.is_fifo() else "a socket" if p.is_socket() else "a device")
        raise UserError(f"{p}: is {kind}, not a regular file; chatsmith reads a {what} from a regular file")
    raise UserError(f"{p}: no such {what}{missing}")


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def lone_surrogate_at(value) -> str | None:
    """The JSON path (``messages[0].content``, ``<key>`` for a key) of the first string in a parsed
    JSON value that holds a lone surrogate, or None. JSON may spell one as an escape ("\\ud800"),
    but it is no Unicode text: UTF-8 cannot encode it, so the tokenizer (and any UTF-8 file write)
    would fail on it later, far from the line that holds it. Iterative: the value may be deep."""
    stack = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return path or "the value"
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):  # (YAML keys may be null)
                    return f"{path + '.' if path else ''}<key {k!r}>"
                # a plain key dotted, any other quoted (a key may hold a newline or a quote)
                step = (f".{k}" if path else k) if isinstance(k, str) and k.isidentifier() else f"[{k!r}]"
                stack.append((x, path + step))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in reversed(list(enumerate(v))))
    return None


def json_line(text: str):
    """json.loads for one record; a ValueError whose message says what is wrong, for
    file:line errors. Beyond JSONDecodeError: Python refuses integers of more than 4300 digits
    (ValueError) and deep nesting (RecursionError), both otherwise a traceback; and a string with a
    lone surrogate is refused (see :func:`lone_surrogate_at`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        if "digits" not in str(e):
            raise ValueError(f"not valid JSON ({e})") from None
        raise ValueError("a number of more than 4300 digits, which chatsmith does not read") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    where = lone_surrogate_at(value)
    if where is not None:
        raise ValueError(f"{where} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which "
                         f"is not Unicode text")
    return value


def _is_hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def collect_input_files(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, str]]:
    """Every file to read, as (path, source name), checked before any work starts.

    Folders are searched recursively (sorted, hidden files and folders skipped) for
    .txt/.md/.jsonl. Source names: a .jsonl file is named by its file name; .txt/.md files
    by the input they came from (the file's name, or the folder's name for files found in
    a folder), so a folder of 10,000 notes is one source, not 10,000.
    """
    files: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UserError(f"{p}: no such file or folder. Pass existing .txt, .md or .jsonl "
                            f"files, or folders that contain them.")
        if not p.is_dir():
            check_file(p, "corpus input")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES
                           and not _is_hidden(f, p))
            if not found:
                raise UserError(f"{p}: the folder holds no usable files (searched it and its "
                                f"subfolders for {', '.join(INPUT_SUFFIXES)}; hidden files "
                                f"are skipped).")
            name = p.resolve().name or str(p)
            for f in found:
                files.append((f, f.name if f.suffix.lower() == ".jsonl" else name))
        elif p.suffix.lower() in INPUT_SUFFIXES:
            files.append((p, p.name))
        else:
            raise UserError(f"{p}: unsupported file type {p.suffix or '(no extension)'!r}. "
                            f"Corpus inputs are .txt or .md (one document per file) or "
                            f".jsonl (one JSON object with a \"text\" string per line).")
    return files


def iter_jsonl(path: Path, what: str = "JSONL file") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a UTF-8 JSONL file, streamed;
    a UserError naming file:line for a line that is not JSON (or not UTF-8)."""
    for lineno, line in _read_lines(path):
        if lineno == 1 and line.startswith("\ufeff"):  # a byte-order mark is not part of the data
            line = line[1:]
        if not line.strip():
            continue
        try:
            obj = json_line(line)
        except ValueError as e:
            hint = f". Each line of a {what} must be one JSON object" if str(e).startswith("not valid JSON") else ""
            raise UserError(f"{path}:{lineno}: {e}{hint}.") from None
        yield lineno, obj


def _iter_jsonl_texts(path: Path) -> Iterator[str]:
    for lineno, obj in iter_jsonl(path, "JSONL corpus file (such as {\"text\": \"...\"})"):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            what = ("has no \"text\" field" if isinstance(obj, dict) and "text" not in obj
                    else "has a \"text\" field that is not a string" if isinstance(obj, dict)
                    else f"is a JSON {type(obj).__name__}, not an object")
            raise UserError(f"{path}:{lineno}: the line {what}. Each line of a .jsonl corpus "
                            f"file must be a JSON object with the document as a string in "
                            f"\"text\"; other fields are ignored.")
        yield obj["text"]


def split_files(inputs: list[str], split: str) -> list[str]:
    """A `data build` corpus directory (one holding train.jsonl) stands for its train.jsonl
    (split="train") or val.jsonl (split="val"); anything else is used as given."""
    out = []
    for p in inputs:
        d = Path(p)
        if d.is_dir() and (d / "train.jsonl").exists():
            f = d / f"{split}.jsonl"
            if not f.exists():
                raise UserError(f"{d} is a corpus directory (it has train.jsonl) but has no {split}.jsonl")
            out.append(str(f))
        else:
            out.append(str(p))
    return out


def iter_input_documents(inputs: Iterable[str | os.PathLike]) -> Iterator[tuple[str, str]]:
    """(source, text) of every document in .txt/.md/.jsonl files or folders, as written (no
    cleaning): how the tokenizer trainer and the shard writer read a corpus. Streams."""
    for path, source in collect_input_files(inputs):
        if path.suffix.lower() == ".jsonl":
            for text in _iter_jsonl_texts(path):
                yield source, text
        else:
            yield source, "".join(line for _, line in _read_lines(path))


# --------------------------------------------------------------------------- the build

class _Writer:
    """Dedup, filter, split and write documents; keeps the counts for the meta file."""

    def __init__(self, out_dir: Path, seed: int, val_fraction: float, min_chars: int):
        self.seed, self.val_fraction, self.min_chars = seed, val_fraction, min_chars
        tag = f".tmp-{os.getpid()}"
        self.tmp = {s: out_dir / f".{s}.jsonl{tag}" for s in ("train", "val")}
        self.tmp_meta = out_dir / f".corpus_meta.json{tag}"
        self.files = {s: open(p, "w", encoding="utf-8", newline="\n")
                      for s, p in self.tmp.items()}
        self.seen: set[bytes] = set()
        self.stats = {s: {"documents": 0, "chars": 0, "by_source": {}} for s in self.tmp}
        self.duplicates: dict[str, int] = {}
        self.too_short: dict[str, int] = {}
        # Fallbacks for a split that leaves one side empty (see build_corpus): the train
        # document with the lowest score and the val one with the highest, with their
        # line numbers in the written files.
        self.min_train: tuple[float, int] | None = None
        self.max_val: tuple[float, int] | None = None
        self.written = 0
        self.t0 = self.last_progress = time.time()

    def seen_before(self, source: str, text: str) -> bool:
        h = doc_hash(text)
        if h in self.seen:
            self.duplicates[source] = self.duplicates.get(source, 0) + 1
            return True
        self.seen.add(h)
        return False

    def add(self, source: str, text: str) -> None:
        if len(text) < self.min_chars:
            self.too_short[source] = self.too_short.get(source, 0) + 1
            return
        if self.seen_before(source, text):
            return
        score = split_score(text, self.seed)
        split = "val" if score < self.val_fraction else "train"
        st = self.stats[split]
        if split == "train" and (self.min_train is None or score < self.min_train[0]):
            self.min_train = (score, st["documents"])
        if split == "val" and (self.max_val is None or score > self.max_val[0]):
            self.max_val = (score, st["documents"])
        self.files[split].write(json.dumps({"text": text, "source": source},
                                           ensure_ascii=False) + "\n")
        self._count(split, source, 1, len(text))
        self.written += 1
        if self.written % PROGRESS_EVERY == 0 and \
                time.time() - self.last_progress >= PROGRESS_SECONDS:
            self.last_progress = time.time()
            chars = self.stats["train"]["chars"] + self.stats["val"]["chars"]
            print(f"corpus: {self.written:,} documents, {chars / 1e6:.1f}M chars "
                  f"({source}, {time.time() - self.t0:.0f}s)", file=sys.stderr, flush=True)

    def _count(self, split: str, source: str, docs: int, chars: int) -> None:
        st = self.stats[split]
        st["documents"] += docs
        st["chars"] += chars
        bs = st["by_source"].setdefault(source, {"documents": 0, "chars": 0})
        bs["documents"] += docs
        bs["chars"] += chars
        if bs["documents"] == 0:
            del st["by_source"][source]

    def close(self) -> None:
        for f in self.files.values():
            if not f.closed:
                f.close()

    def move_line(self, src: str, dst: str, lineno: int) -> None:
        """Move document number ``lineno`` (0-based) of split src to the end of dst, by
        streaming src into a new temp file without it."""
        self.close()
        rewritten = self.tmp[src].with_name(self.tmp[src].name + ".2")
        moved = None
        with open(self.tmp[src], encoding="utf-8") as fin, \
                open(rewritten, "w", encoding="utf-8", newline="\n") as fout:
            for i, line in enumerate(fin):
                if i == lineno:
                    moved = line
                else:
                    fout.write(line)
        os.replace(rewritten, self.tmp[src])
        with open(self.tmp[dst], "a", encoding="utf-8", newline="\n") as f:
            f.write(moved)
        doc = json.loads(moved)
        self._count(src, doc["source"], -1, -len(doc["text"]))
        self._count(dst, doc["source"], 1, len(doc["text"]))

    def discard(self) -> None:
        self.close()
        for p in [*self.tmp.values(), self.tmp_meta,
                  *(p.with_name(p.name + ".2") for p in self.tmp.values())]:
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def _documents(paragraphs: Iterable[str], max_chars: int) -> Iterator[str]:
    for chunk in chunk_paragraphs(paragraphs, max_chars):
        chunk = chunk.strip()
        if chunk:
            yield chunk


def _feed_builtin(w: _Writer, names: list[str], sources_dir: Path, max_chars: int) -> None:
    for name in names:
        src = builtin.SOURCES[name]
        print(f"corpus: reading {name} ({src.description})", file=sys.stderr, flush=True)
        if src.pack_chars is None:
            for source, text in src.read(sources_dir):
                for doc in _documents(iter_paragraphs([text]), max_chars):
                    w.add(source, doc)
            continue
        # Tiny items (one fortune each): dedup them one by one, then pack consecutive
        # survivors into documents of about pack_chars (never above max_chars).
        target = min(src.pack_chars, max_chars)
        group: list[str] = []
        size = 0
        for source, text in src.read(sources_dir):
            item = clean_text(text)
            if not item:
                continue
            if len(item) > target:  # long enough to stand alone (add() dedups it)
                for doc in _documents(iter_paragraphs([item]), max_chars):
                    w.add(source, doc)
                continue
            if w.seen_before(source, item):
                continue
            if group and size + 2 + len(item) > max_chars:
                w.add(source, "\n\n".join(group))
                group, size = [], 0
            group.append(item)
            size += len(item) + (2 if len(group) > 1 else 0)
            if size >= target:
                w.add(source, "\n\n".join(group))
                group, size = [], 0
        if group:
            w.add(src.name, "\n\n".join(group))


def _feed_user(w: _Writer, files: list[tuple[Path, str]], max_chars: int) -> None:
    for i, (path, source) in enumerate(files):
        if len(files) <= 20 or i % 100 == 0:
            print(f"corpus: reading {path} ({i + 1}/{len(files)})", file=sys.stderr, flush=True)
        if path.suffix.lower() == ".jsonl":
            for text in _iter_jsonl_texts(path):
                for doc in _documents(iter_paragraphs([text]), max_chars):
                    w.add(source, doc)
        else:
            lines = (line for _, line in _read_lines(path))
            for doc in _documents(iter_paragraphs(lines), max_chars):
                w.add(source, doc)


def build_corpus(out_dir: str | os.PathLike, inputs: list[str | os.PathLike] | None = None,
                 sources_dir: str | os.PathLike = ".sources", val_fraction: float = 0.01,
                 seed: int = 1337, max_doc_chars: int = 20000,
                 sources: list[str] | None = None,
                 min_doc_chars: int = MIN_DOC_CHARS) -> dict:
    """Build the pretraining corpus into out_dir and return its meta dict.

    What goes in: with ``inputs`` None, the built-in sources (``sources`` names which;
    default all that are installed, missing ones skipped with a warning). With ``inputs``,
    the user's files/folders only, plus the built-in ``sources`` if that is given too.

    The split: a document goes to val when ``split_score(text, seed) < val_fraction``, so
    the split depends only on the seed and the text, not on input order. If that leaves val
    empty although there are at least 2 documents and ``val_fraction > 0``, the train
    document with the lowest score (the one nearest to being val) moves to val; if it
    leaves train empty, the val document with the highest score moves to train. Both
    choices are again order-independent.

    Raises UserError for bad inputs (missing path, folder without usable files, invalid
    UTF-8, bad JSONL line, unknown source name) and for an empty corpus; the files already
    in out_dir are untouched then.
    """
    t0 = time.time()
    out = Path(out_dir)
    sdir = Path(sources_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if max_doc_chars < 100:
        raise UserError(f"max_doc_chars must be at least 100, got {max_doc_chars}.")
    if sources is not None:
        unknown = [s for s in sources if s not in builtin.SOURCES]
        if unknown:
            raise UserError(f"unknown built-in source(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(builtin.SOURCES)}.")
    files = collect_input_files(inputs) if inputs is not None else []
    wanted = list(sources) if sources is not None else ([] if inputs is not None
                                                        else list(builtin.SOURCES))
    present = set(builtin.available_sources(sdir))
    used = [s for s in wanted if s in present]
    missing = [s for s in wanted if s not in present]
    for s in missing:
        builtin.warn(f"built-in source {s!r} is not installed (skipped); run "
                     f"scripts/setup.sh or: {builtin.SOURCES[s].hint}")
    if not files and not used:
        raise UserError(f"nothing to build a corpus from: none of the built-in sources "
                        f"({', '.join(wanted) or 'none requested'}) is installed under "
                        f"{sdir} or the system, and no input files were given. Run "
                        f"scripts/setup.sh from the repository root, or pass your own "
                        f".txt/.md/.jsonl files.")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output folder.")
    out.mkdir(parents=True, exist_ok=True)
    if used:
        print(f"corpus: built-in sources: {', '.join(used)}"
              + (f" (missing: {', '.join(missing)})" if missing else ""), file=sys.stderr)
    if files:
        print(f"corpus: {len(files)} input file(s)", file=sys.stderr)

    w = _Writer(out, seed, val_fraction, min_doc_chars)
    try:
        _feed_builtin(w, used, sdir, max_doc_chars)
        _feed_user(w, files, max_doc_chars)
        w.close()
        n_train, n_val = w.stats["train"]["documents"], w.stats["val"]["documents"]
        if n_train + n_val == 0:
            raise UserError(
                "the corpus is empty after cleaning: every document was empty, shorter than "
                f"{min_doc_chars} characters, or a duplicate (inputs: "
                f"{', '.join(str(p) for p in (inputs or [])) or ', '.join(used)}).")
        if n_val == 0 and n_train >= 2 and val_fraction > 0:
            w.move_line("train", "val", w.min_train[1])
        elif n_train == 0:
            w.move_line("val", "train", w.max_val[1])

        meta = {
            "format": "jsonl",
            "fields": ["text", "source"],
            "seed": seed,
            "val_fraction": val_fraction,
            "max_doc_chars": max_doc_chars,
            "min_doc_chars": min_doc_chars,
            "inputs": [str(p) for p in inputs] if inputs is not None else None,
            "sources_dir": str(sdir),
            "builtin_sources": used,
            "builtin_sources_missing": missing,
            "languages": {s: builtin.SOURCES[s].lang for s in used},
            "documents": w.stats["train"]["documents"] + w.stats["val"]["documents"],
            "chars": w.stats["train"]["chars"] + w.stats["val"]["chars"],
            "splits": {s: _sorted_stats(w.stats[s]) for s in ("train", "val")},
            "duplicates_dropped": sum(w.duplicates.values()),
            "duplicates_by_source": dict(sorted(w.duplicates.items())),
            "too_short_dropped": sum(w.too_short.values()),
            "too_short_by_source": dict(sorted(w.too_short.items())),
        }
        with open(w.tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(w.tmp["train"], out / "train.jsonl")
        os.replace(w.tmp["val"], out / "val.jsonl")
        os.replace(w.tmp_meta, out / "corpus_meta.json")
    except BaseException:
        w.discard()
        raise
    _print_summary(meta, time.time() - t0)
    return meta


def _sorted_stats(st: dict) -> dict:
    return {"documents": st["documents"], "chars": st["chars"],
            "by_source": dict(sorted(st["by_source"].items()))}


def _print_summary(meta: dict, seconds: float) -> None:
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    lines = [f"corpus: {meta['documents']:,} documents, {meta['chars']:,} chars "
             f"(train {tr['documents']:,} / val {va['documents']:,}) in {seconds:.1f}s; "
             f"{meta['duplicates_dropped']:,} duplicates and {meta['too_short_dropped']:,} "
             f"too-short documents dropped"]
    names = sorted(set(tr["by_source"]) | set(va["by_source"]))
    width = max([len(n) for n in names] + [6])
    lines.append(f"  {'source':<{width}}  {'docs':>8}  {'chars':>12}  {'val docs':>8}")
    for n in names:
        t = tr["by_source"].get(n, {"documents": 0, "chars": 0})
        v = va["by_source"].get(n, {"documents": 0, "chars": 0})
        lines.append(f"  {n:<{width}}  {t['documents'] + v['documents']:>8,}  "
                     f"{t['chars'] + v['chars']:>12,}  {v['documents']:>8,}")
    print("\n".join(lines), file=sys.stderr, flush=True)
