"""The bsdgames quiz(6) file format: ``:``-separated fields, each a pattern of accepted
answers (``{x}`` optional, ``[a|b]`` a group of alternatives, ``a|b`` alternatives, ``\\c`` a
literal c), and the ``index`` that names every file's columns."""

from __future__ import annotations

import re
from pathlib import Path

from chatsmith.data.sources import read_text_file, resolve_overstrike


class QuizSyntaxError(ValueError):
    pass


def _parse_quiz_alt(s: str, pos: int = 0, closer: str = "") -> tuple[list, int]:
    """Parse quiz(6) answer syntax into alternatives: a list of sequences, each a list of
    literal characters and ``("opt"|"grp", alternatives)`` items. ``{x}`` is optional,
    ``[a|b]`` a group of alternatives, ``a|b`` alternatives, ``\\c`` a literal c."""
    seqs: list[list] = [[]]
    while pos < len(s):
        c = s[pos]
        if c == "\\" and pos + 1 < len(s):
            seqs[-1].append(s[pos + 1])
            pos += 2
        elif c == "|":
            seqs.append([])
            pos += 1
        elif c in "{[":
            inner, pos = _parse_quiz_alt(s, pos + 1, "}" if c == "{" else "]")
            seqs[-1].append(("opt" if c == "{" else "grp", inner))
        elif c in "}]":
            if c != closer:
                raise QuizSyntaxError(f"unexpected {c!r} at {pos} in {s!r}")
            return seqs, pos + 1
        else:
            seqs[-1].append(c)
            pos += 1
    if closer:
        raise QuizSyntaxError(f"missing {closer!r} in {s!r}")
    return seqs, pos


def _tidy(s: str) -> str:
    if "\b" in s:
        # Accents drawn as terminal overstrikes: "e\b'" is é. Ø and Å are not in the
        # overstrike table, so they are done here.
        for pair, char in (("o\b/", "ø"), ("/\bo", "ø"), ("°\bA", "Å"), ("A\b°", "Å")):
            s = s.replace(pair, char)
        s = resolve_overstrike(s)
    return re.sub(r"\s+", " ", s).strip()


def _expand_seqs(seqs: list, limit: int) -> list[str]:
    out: list[str] = []
    for seq in seqs:
        out.extend(_expand_seq(seq, limit))
    return out[:limit]


def _expand_seq(seq: list, limit: int) -> list[str]:
    results = [""]
    for item in seq:
        if isinstance(item, str):
            results = [r + item for r in results]
            continue
        kind, inner = item
        options = _expand_seqs(inner, limit)
        if kind == "opt":
            options = [""] + options
        results = [r + o for r in results for o in options][:limit]
    return results


def _full_seq(seq: list) -> str:
    # Every optional part included, the first of every set of alternatives.
    return "".join(item if isinstance(item, str) else _full_seq(item[1][0]) for item in seq)


def quiz_alternatives(field: str) -> list[str]:
    """The top-level alternatives of a quiz field, each in its canonical form:
    ``"{the }Nile|Nil"`` -> ``["the Nile", "Nil"]``."""
    seqs, _ = _parse_quiz_alt(field)
    return [c for c in (_canonical(_full_seq(s)) for s in seqs) if c]


def expand_quiz_answer(field: str, limit: int = 256) -> list[str]:
    """Every string a quiz field accepts, first the canonical one, without duplicates:
    ``"{the }Nile|Nil"`` -> ``["the Nile", "Nile", "Nil"]``; ``"Hen[ry|] [I|1]"`` ->
    ``["Henry I", "Henry 1", "Hen I", "Hen 1"]``. Raises QuizSyntaxError on unbalanced
    brackets."""
    seqs, _ = _parse_quiz_alt(field)
    out, seen = [], set()
    firsts = [_canonical(_full_seq(s)) for s in seqs]
    for s in firsts + [_tidy(x) for x in _expand_seqs(seqs, limit)]:
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


_ANNOTATION = re.compile(r"\s*\([^()]*\)$")   # "7(integers)", "None (1841-5)"
_ACT_SCENE = re.compile(r"\s+[IVX]+-[ivx]+$")   # "Hamlet III-i"


def _canonical(s: str) -> str:
    s = _tidy(s)
    for pat in (_ANNOTATION, _ACT_SCENE):
        t = pat.sub("", s)
        if t:
            s = t
    return s


def quiz_canonical(field: str) -> str:
    """The clean form of a quiz field used in questions and replies: the first alternative
    with its optional parts, minus trailing annotations (``"7{(integers)}"`` -> ``"7"``,
    ``"Hamlet{ III-i}"`` -> ``"Hamlet"``)."""
    alts = quiz_alternatives(field)
    return alts[0] if alts else ""


def split_quiz_line(line: str) -> list[str]:
    """Split on unescaped ':' (``\\:`` is a literal colon and stays escaped)."""
    fields, cur, i = [], [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur.append(line[i:i + 2])
            i += 2
            continue
        if c == ":":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    fields.append("".join(cur))
    return fields


def read_quiz_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) per entry; a line ending in a backslash continues on the next."""
    out, buf, start = [], "", 0
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not buf:
            start = n
        if line.endswith("\\") and not line.endswith("\\\\"):
            buf += line[:-1]
            continue
        buf += line
        if buf.strip():
            out.append((start, split_quiz_line(buf)))
        buf = ""
    if buf.strip():
        out.append((start, split_quiz_line(buf)))
    return out


def read_quiz_index(quiz_dir: Path) -> dict[str, list[str]]:
    """file name -> its column names from the quiz ``index`` ("africa" -> ["African", "capital"])."""
    out = {}
    index = quiz_dir / "index"
    if not index.is_file():
        return out
    for line in read_text_file(index).splitlines():
        fields = split_quiz_line(line.strip())
        if len(fields) < 3:
            continue
        try:
            out[Path(fields[0]).name] = [quiz_canonical(f) for f in fields[1:]]
        except QuizSyntaxError:
            continue
    return out
