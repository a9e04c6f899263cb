"""The pretraining corpus builder and the built-in source readers."""

import json
import re
from pathlib import Path

import pytest

from chatsmith.data import sources as S
from chatsmith.data.corpus import build_corpus, chunk_paragraphs, clean_text
from chatsmith.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def read_split(out: Path, split: str) -> list[dict]:
    with open(out / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_docs(out: Path) -> list[dict]:
    return read_split(out, "train") + read_split(out, "val")


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return path


def sentences(n: int, tag: str) -> list[str]:
    return [f"Document {tag} number {i}: the quick brown fox jumps over the lazy dog."
            for i in range(n)]


# --------------------------------------------------------------------------- user inputs

def test_txt_md_jsonl_round_trip(tmp_path):
    data = tmp_path / "notes"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("First paragraph of a.\n\n\n\n\nSecond paragraph of a.  \n",
                                encoding="utf-8")
    (data / "b.md").write_text("# Title\r\n\r\nSome *markdown* body text here.\r\n",
                               encoding="utf-8")
    write_jsonl(data / "sub" / "c.jsonl", sentences(5, "c"))
    (data / "ignored.csv").write_text("x,y\n1,2\n")
    out = tmp_path / "out"
    meta = build_corpus(out, inputs=[data], val_fraction=0.3, seed=1)

    docs = all_docs(out)
    texts = sorted(d["text"] for d in docs)
    expected = sorted(["First paragraph of a.\n\nSecond paragraph of a.",
                       "# Title\n\nSome *markdown* body text here.", *sentences(5, "c")])
    assert texts == expected
    by_source = {d["text"]: d["source"] for d in docs}
    assert by_source[sentences(5, "c")[0]] == "c.jsonl"
    assert by_source["# Title\n\nSome *markdown* body text here."] == "notes"
    assert meta["documents"] == 7 == (meta["splits"]["train"]["documents"]
                                      + meta["splits"]["val"]["documents"])
    assert meta["splits"]["val"]["documents"] >= 1
    assert meta["inputs"] == [str(data)]
    assert json.loads((out / "corpus_meta.json").read_text()) == meta
    assert meta["chars"] == sum(len(t) for t in texts)


def test_nfc_and_control_characters(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", ["Cafe\u0301 au lait, s'il vous plai\u0302t\x07.",
                                             "Another document that is long enough."])
    build_corpus(tmp_path / "out", inputs=[src])
    texts = [d["text"] for d in all_docs(tmp_path / "out")]
    assert "Café au lait, s'il vous plaît." in texts


def test_exact_duplicates_dropped(tmp_path):
    dup = "The same document appears more than once in the inputs."
    a = write_jsonl(tmp_path / "a.jsonl", [dup, "A unique document number one.", dup])
    b = tmp_path / "b.txt"
    b.write_text(dup + "\n", encoding="utf-8")
    meta = build_corpus(tmp_path / "out", inputs=[a, b])
    texts = [d["text"] for d in all_docs(tmp_path / "out")]
    assert texts.count(dup) == 1
    assert meta["duplicates_dropped"] == 2
    assert meta["documents"] == 2


def test_split_is_deterministic_and_order_independent(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sentences(40, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", sentences(40, "b"))

    def val_texts(out, inputs):
        build_corpus(out, inputs=inputs, val_fraction=0.2, seed=7)
        return sorted(d["text"] for d in read_split(out, "val"))

    v1 = val_texts(tmp_path / "o1", [a, b])
    v2 = val_texts(tmp_path / "o2", [a, b])
    v3 = val_texts(tmp_path / "o3", [b, a])
    assert v1 == v2 == v3
    assert 0 < len(v1) < 80
    assert (tmp_path / "o1" / "train.jsonl").read_bytes() == \
        (tmp_path / "o2" / "train.jsonl").read_bytes()
    # Another seed gives another split.
    build_corpus(tmp_path / "o5", inputs=[a, b], val_fraction=0.2, seed=8)
    assert sorted(d["text"] for d in read_split(tmp_path / "o5", "val")) != v1


def test_val_never_empty_with_two_documents(tmp_path):
    src = write_jsonl(tmp_path / "two.jsonl", sentences(2, "t"))
    meta = build_corpus(tmp_path / "out", inputs=[src], val_fraction=0.001)
    assert meta["splits"]["train"]["documents"] == 1
    assert meta["splits"]["val"]["documents"] == 1
    assert len(read_split(tmp_path / "out", "val")) == 1
    one = write_jsonl(tmp_path / "one.jsonl", sentences(1, "o"))
    meta = build_corpus(tmp_path / "out1", inputs=[one], val_fraction=0.999)
    assert meta["splits"]["train"]["documents"] == 1


def test_long_documents_are_chunked_at_paragraphs(tmp_path):
    paras = [f"Paragraph {i} " + "word " * (i % 17 + 5) for i in range(200)]
    paras = [p.strip() for p in paras]
    (tmp_path / "long.txt").write_text("\n\n".join(paras), encoding="utf-8")
    build_corpus(tmp_path / "out", inputs=[tmp_path / "long.txt"], max_doc_chars=500)
    docs = all_docs(tmp_path / "out")
    assert len(docs) > 10
    assert all(20 <= len(d["text"]) <= 500 for d in docs)
    got = sorted(p for d in docs for p in d["text"].split("\n\n"))
    assert got == sorted(paras)  # every paragraph kept whole, none twice

    # A single paragraph longer than the limit is cut at sentence ends.
    one_par = " ".join(f"Sentence {i} goes on." for i in range(300))
    chunks = list(chunk_paragraphs([one_par], 400))
    assert all(len(c) <= 400 for c in chunks) and len(chunks) > 5
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == one_par


def test_clean_text():
    assert clean_text("  a\r\nb  \r\n\r\n\r\n\r\nc\t\n\n\n") == "a\nb\n\nc"


# --------------------------------------------------------------------------- bad input

def test_bad_jsonl_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "a fine first document here"}\n{"text": oops}\n',
                   encoding="utf-8")
    with pytest.raises(UserError) as e:
        build_corpus(tmp_path / "out", inputs=[src])
    assert f"{src}:2" in str(e.value)
    src.write_text('{"text": "a fine first document here"}\n\n{"body": "x"}\n',
                   encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{src}:3")):
        build_corpus(tmp_path / "out", inputs=[src])
    src.write_text('{"text": 42}\n', encoding="utf-8")
    with pytest.raises(UserError, match="not a string"):
        build_corpus(tmp_path / "out", inputs=[src])


def test_non_utf8_file_names_file_and_offset(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("first line is fine\n".encode() + "caf\u00e9".encode("latin-1") + b"\n")
    with pytest.raises(UserError) as e:
        build_corpus(tmp_path / "out", inputs=[src])
    msg = str(e.value)
    assert str(src) in msg and "UTF-8" in msg and "byte offset 22" in msg


def test_missing_path_empty_folder_and_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_corpus(tmp_path / "out", inputs=[tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="no usable files"):
        build_corpus(tmp_path / "out", inputs=[tmp_path / "empty"])
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    with pytest.raises(UserError, match="empty after cleaning"):
        build_corpus(tmp_path / "out", inputs=[tmp_path / "blank.txt"])
    with pytest.raises(UserError, match="unknown built-in source"):
        build_corpus(tmp_path / "out", sources=["wikipedia"])


def test_failed_build_leaves_existing_corpus_untouched(tmp_path):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", sentences(30, "g"))
    build_corpus(out, inputs=[good], val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    # Many good lines first, so the failure comes after documents were written.
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(50, "b"))
                   + "not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{bad}:51")):
        build_corpus(out, inputs=[bad])
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # same files (no temp files left behind), same bytes


# --------------------------------------------------------------------------- source cleaning

def test_brown_detokenize():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, "
           "Mr./np Allen/np Jr./np ./.\n\tIt/pps cost/vbd $/$ 5/cd (/( net/jj )/) "
           ";/. ;/. why/wrb ?/.\n\n\nHeadline/nn-hl here/rb-hl\nNext/ap line/nn ./.\n")
    assert S.clean_brown(raw) == ('The jury said "no evidence", Mr. Allen Jr. It cost $5 '
                                  '(net); why?\n\nHeadline here\n\nNext line.')


def test_fortune_cleaning():
    assert S.resolve_overstrike("a *___\b\b\btwo* b, Ren'\be, _\bx") == "a *two* b, René, x"
    assert S.fix_mojibake("don\u00e2\u0080\u0099t \u00c2\u00a35 caf\u00e9") == \
        "don\u2019t \u00a35 caf\u00e9"
    assert S.split_fortunes("one\n%\ntwo\nlines\n%\n\n%\n") == ["one", "two\nlines"]


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of Hamlet\n\nRelease Date: 1998\n\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nProduced by someone\n"
            "from a Project Gutenberg etext.\n\nACT I.\n\nWho's there?\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nLicence terms...\n")
    assert S.strip_gutenberg(text).strip() == "ACT I.\n\nWho's there?"


# --------------------------------------------------------------------------- built-in sources

@pytest.mark.skipif(not (REPO / ".sources").is_dir(),
                    reason="built-in sources not fetched (run scripts/setup.sh)")
def test_builtin_corpus(tmp_path):
    if not (S.FORTUNES_DIR / "chinese").is_file():
        pytest.skip("fortunes-zh is not installed (run scripts/setup.sh)")
    meta = build_corpus(tmp_path / "out", sources_dir=REPO / ".sources")
    used = meta["builtin_sources"]
    langs = [S.SOURCES[s].lang for s in used]
    assert langs.count("en") >= 3 and langs.count("zh") >= 1
    assert meta["splits"]["val"]["documents"] > 0

    docs = all_docs(tmp_path / "out")
    per_source = {}
    for d in docs:
        per_source.setdefault(d["source"], []).append(d["text"])
        assert len(d["text"]) <= meta["max_doc_chars"]
    assert set(per_source) == set(used)
    for text in per_source.get("shakespeare", []):
        assert "Project Gutenberg" not in text and "*** START" not in text
        assert "{" not in text and "@@@" not in text
    brown_tag = re.compile(r"\w/(nn|at|in|vbd|vbn|jj|np|nns|cc|rb|cd|pps|nn-tl|np-tl)\b|``")
    for text in per_source.get("brown", []):
        assert not brown_tag.search(text), brown_tag.search(text)
    for texts in per_source.values():
        for text in texts:
            assert "\x1b" not in text and "\b" not in text
    if "fortunes-zh" in per_source:
        assert any("床前明月光" in t for t in per_source["fortunes-zh"])
