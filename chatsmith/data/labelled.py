"""Readers for sentence-classification data: texts (or text pairs) with a label.

Formats, chosen by the file's suffix:

- ``.jsonl`` (or ``.json``): one object per line, ``{"text": ..., "label": ...}`` or, for
  pair tasks (entailment, paraphrase, question/answer match), ``{"text": ..., "text_pair":
  ..., "label": ...}``. Other keys are ignored (an ``id`` may ride along). A label is a
  string; an integer label is accepted and read as its decimal string (``1`` and ``"1"`` are
  one class), since a label is a name, not a quantity: floats and booleans are refused.
- ``.csv`` / ``.tsv``: a header row naming the columns ``text``, ``label`` and optionally
  ``text_pair`` (any order, other columns ignored), RFC 4180 quoting (a quoted field may span
  lines), a UTF-8 byte-order mark allowed.

Every record is checked as it is read; the first bad one raises a
:class:`~chatsmith.errors.UserError` naming ``file:line`` (the line the record starts on) and
what is wrong. A file is all pairs or all single texts, never a mix, so a model never meets a
shape it was not trained on. The label set is the sorted set of labels in the training file:
sorted, so the class index of a label depends only on which labels exist, not on the order
the file lists them in.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chatsmith.data.corpus import iter_jsonl
from chatsmith.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json")
DELIMITERS = {".csv": ",", ".tsv": "\t"}
FORMAT_HINT = ('one JSON object per line ({"text": ..., "label": ...}, optionally "text_pair"), '
               'or a .csv/.tsv file with a header row naming text[,text_pair],label')


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_pair: str | None = None
    where: str = ""  # "file:line", for messages about this record later (eval, predict)


@dataclass(frozen=True)
class LabelledData:
    examples: list[Example]
    labels: list[str]  # sorted, distinct
    pairs: bool        # every example has a text_pair


def _label(value, where: str) -> str:
    # bool is a subclass of int: `true` must not become the class "True".
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: \"label\" must be a string (or an integer), not "
                        f"{_json_type(value)}")
    label = str(value).strip()
    if not label:
        raise UserError(f"{where}: \"label\" is empty")
    return label


def _text(value, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: \"{key}\" must be a string, not {_json_type(value)}")
    if not value.strip():
        raise UserError(f"{where}: \"{key}\" is empty")
    return value


def _json_type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _example(row: dict, where: str) -> Example:
    for key in ("text", "label"):
        if key not in row:
            raise UserError(f"{where}: the record has no \"{key}\" field. Expected {FORMAT_HINT}.")
    pair = row.get("text_pair")
    return Example(text=_text(row["text"], "text", where), label=_label(row["label"], where),
                   text_pair=None if pair is None else _text(pair, "text_pair", where), where=where)


def _iter_jsonl(path: Path) -> Iterator[Example]:
    for lineno, obj in iter_jsonl(path, "classification file"):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: the line is {_json_type(obj)}, not a JSON object. "
                            f"Expected {FORMAT_HINT}.")
        yield _example(obj, where)


def _iter_csv(path: Path, delimiter: str) -> Iterator[Example]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: the file is not valid UTF-8 (bad byte "
                        f"0x{raw[e.start]:02x}); convert it to UTF-8 first") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: the {kind} file is empty; it needs a header row naming "
                            f"text[,text_pair],label")
        cols = [c.strip().lower() for c in header]
        missing = [c for c in ("text", "label") if c not in cols]
        if missing:
            raise UserError(f"{path}:1: the header row has no {' or '.join(map(repr, missing))} "
                            f"column (it has {', '.join(map(repr, cols))}); a {kind} file needs a "
                            f"header naming text[,text_pair],label")
        dup = sorted({c for c in cols if cols.count(c) > 1 and c in ("text", "text_pair", "label")})
        if dup:
            raise UserError(f"{path}:1: the header names {dup[0]!r} twice")
        idx = {c: cols.index(c) for c in ("text", "text_pair", "label") if c in cols}
        start = reader.line_num + 1
        for fields in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if len(fields) != len(cols):
                raise UserError(f"{where}: {len(fields)} fields where the header has {len(cols)} "
                                f"(an unquoted {'tab' if delimiter == chr(9) else 'comma'} in a "
                                f"text? quote the field)")
            row = {c: fields[i] for c, i in idx.items()}
            if "text_pair" in row and not row["text_pair"].strip():
                raise UserError(f"{where}: \"text_pair\" is empty")
            yield _example(row, where)
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not a valid {kind} record ({e})") from None


def iter_examples(path: str | Path) -> Iterator[Example]:
    """The records of one classification file, checked, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file. Expected {FORMAT_HINT}.")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _iter_jsonl(path)
    if suffix in DELIMITERS:
        return _iter_csv(path, DELIMITERS[suffix])
    raise UserError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
                    f"use .jsonl, .csv or .tsv")


def read_examples(path: str | Path) -> LabelledData:
    """Every record of a file, its sorted label set, and whether it is a pair task."""
    examples = list(iter_examples(path))
    if not examples:
        raise UserError(f"{path}: no records. Expected {FORMAT_HINT}.")
    pairs = examples[0].text_pair is not None
    for ex in examples:
        if (ex.text_pair is not None) != pairs:
            first = examples[0].where
            raise UserError(f"{ex.where}: {'has no' if pairs else 'has a'} \"text_pair\" while "
                            f"the first record ({first}) {'has one' if pairs else 'has none'}; "
                            f"a file is all text pairs or all single texts")
    return LabelledData(examples, sorted({ex.label for ex in examples}), pairs)


def read_train(path: str | Path) -> LabelledData:
    """A training file: at least two classes, or there is nothing to learn."""
    data = read_examples(path)
    if len(data.labels) < 2:
        raise UserError(f"{path}: every record has the label {data.labels[0]!r}; a classifier "
                        f"needs at least two classes to learn from")
    return data


def read_eval(path: str | Path, labels: list[str], pairs: bool | None = None) -> LabelledData:
    """An evaluation file scored against a model that knows ``labels`` (and, when ``pairs``
    is given, was trained on pairs or on single texts): a label the model has never seen is
    an error naming its line, since no prediction could ever be right."""
    data = read_examples(path)
    known = set(labels)
    for ex in data.examples:
        if ex.label not in known:
            raise UserError(f"{ex.where}: unknown label {ex.label!r}; the model knows "
                            f"{', '.join(map(repr, labels))}")
    if pairs is not None and data.pairs != pairs:
        raise UserError(f"{path}: the records are {'text pairs' if data.pairs else 'single texts'} "
                        f"but the model was trained on {'text pairs' if pairs else 'single texts'}")
    return LabelledData(data.examples, list(labels), data.pairs)


__all__ = ["Example", "LabelledData", "iter_examples", "read_examples", "read_train", "read_eval"]
