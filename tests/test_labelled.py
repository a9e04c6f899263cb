"""Classification data readers (chatsmith.data.labelled): JSONL, pairs, CSV/TSV, and every kind of
bad record named by file:line."""

import json

import pytest

from chatsmith.data.labelled import iter_examples, read_eval, read_examples, read_train
from chatsmith.errors import UserError


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def test_jsonl_labels_sorted_ints_as_strings(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "good film", "label": "pos"}, "",
                                      {"text": "bad film", "label": "neg", "id": 7},
                                      {"text": "meh", "label": 1}, {"text": "ok", "label": "1"}])
    d = read_train(f)
    assert d.labels == ["1", "neg", "pos"] and not d.pairs
    assert [e.label for e in d.examples] == ["pos", "neg", "1", "1"]
    assert d.examples[1].where == f"{f}:3"  # the blank line 2 is skipped but counted


def test_pairs_and_mixing_refused(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"text": "a cat", "text_pair": "an animal", "label": "yes"},
                                      {"text": "a cat", "text_pair": "a car", "label": "no"}])
    d = read_train(f)
    assert d.pairs and d.examples[1].text_pair == "a car"
    g = _jsonl(tmp_path / "m.jsonl", [{"text": "a", "text_pair": "b", "label": "x"}, {"text": "c", "label": "y"}])
    with pytest.raises(UserError, match=r"m\.jsonl:2: has no \"text_pair\""):
        read_examples(g)


@pytest.mark.parametrize("line, msg", [
    ('{"text": "x", "label": "a"', r"bad\.jsonl:2: not valid JSON"),
    ('["x", "a"]', r"bad\.jsonl:2: the line is a list, not a JSON object"),
    ('{"label": "a"}', r"bad\.jsonl:2: the record has no \"text\" field"),
    ('{"text": "x"}', r"bad\.jsonl:2: the record has no \"label\" field"),
    ('{"text": "   ", "label": "a"}', r"bad\.jsonl:2: \"text\" is empty"),
    ('{"text": "x", "label": ""}', r"bad\.jsonl:2: \"label\" is empty"),
    ('{"text": 5, "label": "a"}', r"bad\.jsonl:2: \"text\" must be a string, not an integer"),
    ('{"text": "x", "label": true}', r"bad\.jsonl:2: \"label\" must be a string .*not a boolean"),
    ('{"text": "x", "label": 1.5}', r"bad\.jsonl:2: \"label\" must be a string .*not a number"),
    ('{"text": "x", "label": null}', r"bad\.jsonl:2: \"label\" must be a string .*not null"),
    ('{"text": "x", "label": ["a"]}', r"bad\.jsonl:2: \"label\" must be a string .*not a list"),
    ('{"text": "x", "text_pair": 3, "label": "a"}', r"bad\.jsonl:2: \"text_pair\" must be a string"),
    ('{"text": "x", "label": ' + "9" * 5000 + "}", r"bad\.jsonl:2: a number of more than 4300 digits"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, msg):
    f = _jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": "a"}, line, {"text": "z", "label": "b"}])
    with pytest.raises(UserError, match=msg):
        read_examples(f)


def test_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl:2: the file is not valid UTF-8"):
        read_examples(f)


def test_big_integer_label_is_a_name(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", ['{"text": "x", "label": 123456789012345678901234567890}',
                                      '{"text": "y", "label": 0}'])
    assert read_train(f).labels == ["0", "123456789012345678901234567890"]


def test_single_class_training_file_is_an_error(tmp_path):
    f = _jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    assert read_examples(f).labels == ["pos"]  # readable, e.g. as an eval file
    with pytest.raises(UserError, match=r"one\.jsonl: every record has the label 'pos'.*two classes"):
        read_train(f)


def test_empty_file_is_an_error(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        read_examples(f)


def test_unknown_label_at_eval_names_line_and_label(tmp_path):
    f = _jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}])
    with pytest.raises(UserError, match=r"test\.jsonl:2: unknown label 'neutral'; the model knows 'neg', 'pos'"):
        read_eval(f, ["neg", "pos"])
    ok = _jsonl(tmp_path / "ok.jsonl", [{"text": "a", "label": "pos"}])
    d = read_eval(ok, ["neg", "pos"])  # one class present is fine at eval; labels stay the model's
    assert d.labels == ["neg", "pos"]
    with pytest.raises(UserError, match="trained on text pairs"):
        read_eval(ok, ["neg", "pos"], pairs=True)


def test_csv_with_bom_quotes_multiline_and_column_order(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes('\ufefflabel,id,text\npos,1,"great, really great"\n\nneg,2,"two\nlines"\nneg,3,"say ""no"""\n'
                  .encode("utf-8"))
    d = read_train(f)
    assert [(e.text, e.label) for e in d.examples] == [("great, really great", "pos"), ("two\nlines", "neg"),
                                                       ('say "no"', "neg")]
    assert [e.where for e in d.examples] == [f"{f}:2", f"{f}:4", f"{f}:6"]


def test_tsv_pairs(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("text\ttext_pair\tlabel\nA man sleeps\tA person rests\tentailment\nA man sleeps\tHe runs\t"
                 "contradiction\n", encoding="utf-8")
    d = read_train(f)
    assert d.pairs and d.labels == ["contradiction", "entailment"] and d.examples[0].text_pair == "A person rests"


@pytest.mark.parametrize("body, msg", [
    ("sentence,label\nx,a\n", r"d\.csv:1: the header row has no 'text' column"),
    ("text,label\nx,a\ny,b,extra\n", r"d\.csv:3: 3 fields where the header has 2"),
    ("text,label\nx,a\n,b\n", r"d\.csv:3: \"text\" is empty"),
    ("text,label\nx,a\ny,\n", r"d\.csv:3: \"label\" is empty"),
    ("text,text_pair,label\nx,y,a\nx,,b\n", r"d\.csv:3: \"text_pair\" is empty"),
    ("text,label,text\nx,a,y\n", r"d\.csv:1: the header names 'text' twice"),
    ("", r"d\.csv: the CSV file is empty"),
])
def test_bad_csv_records(tmp_path, body, msg):
    f = tmp_path / "d.csv"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(UserError, match=msg):
        read_examples(f)


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        list(iter_examples(tmp_path / "nope.jsonl"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match="unsupported file type '.xlsx'"):
        list(iter_examples(tmp_path / "d.xlsx"))
