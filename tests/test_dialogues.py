"""The verifiable-task generator, answer checking, quiz syntax, and the built-in chat dataset
built from the real sources (families whose sources are not installed are skipped)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatsmith.data import dialogues as dlg
from chatsmith.data.tasks import (FAMILIES as TASK_FAMILIES, check_answer, extract_number,
                                  final_answer, generate_tasks, normalise)
from chatsmith.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_generate_tasks_is_deterministic_and_self_consistent(family):
    a = generate_tasks(family, 300, seed=7)
    assert a == generate_tasks(family, 300, seed=7)
    assert a[:50] == generate_tasks(family, 50, seed=7)  # a prefix of a longer run
    assert a != generate_tasks(family, 300, seed=8)
    for t in a:
        assert set(t) >= {"family", "question", "answer", "answers", "worked", "key"}
        assert t["family"] == family and t["answer"] in t["answers"]
        assert re.fullmatch(r"-?\d+", t["answer"])
        assert t["worked"].endswith((f"The answer is {t['answer']}.", f"答案是 {t['answer']}。"))
        assert check_answer(family, t["worked"], t["answers"])
        assert not check_answer(family, str(int(t["answer"]) + 1), t["answers"])


def test_arithmetic_answers_are_right():
    for d in (1, 2, 3):
        for t in generate_tasks("arithmetic", 500, seed=d, difficulty=d):
            a, op, b = re.fullmatch(r"arithmetic:(\d+)([-+×])(\d+)", t["key"]).groups()
            a, b = int(a), int(b)
            assert int(t["answer"]) == {"+": a + b, "-": a - b, "×": a * b}[op]
            assert re.findall(r"\d+", t["question"]) == [str(a), str(b)]
            if d == 1:
                assert a < 10 and b < 10
            if d < 3:
                assert int(t["answer"]) >= 0


def test_generate_tasks_rejects_bad_arguments():
    with pytest.raises(UserError, match="arithmetic"):
        generate_tasks("calculus", 3, 0)
    with pytest.raises(UserError):
        generate_tasks("arithmetic", -1, 0)
    with pytest.raises(UserError):
        generate_tasks("arithmetic", 3, 0, difficulty=9)


@pytest.mark.parametrize("reply,ok", [
    ("The answer is 85.", True), ("85", True), (" 85 ", True), ("85.", True), ("85.0", True),
    ("37 + 48 = 85. The answer is 85.", True), ("Answer: 85", True), ("答案是 85。", True),
    ("It is 85!", True), ("８５", True), ("The answer is **85**.", True),
    ("58", False), ("", False), ("eighty-five", False), ("850", False), ("1,085", False),
    ("The answer is 58. Hmm, 85 maybe", False), ("37 + 48 = 85. The answer is .", False),
    ("85 > 0。答案是 。", False),
])
def test_check_answer_numeric(reply, ok):
    assert check_answer("arithmetic", reply, ["85"]) is ok


def test_check_answer_edge_cases():
    assert check_answer("arithmetic", "The answer is -3.", ["-3"])
    assert check_answer("arithmetic", "5 - 8 = -3", ["-3"])
    assert not check_answer("arithmetic", "8-3", ["-3"])
    assert check_answer("word_problem", "That makes 1,234 apples.", ["1234"])
    assert check_answer("word_problem", "2.50", ["2.5"])
    assert not check_answer("arithmetic", None, ["1"])
    assert not check_answer("arithmetic", "1", [])
    # Text answers: case, spaces, punctuation, a leading article, an answer marker.
    assert check_answer("quiz", "  the NILE. ", ["Nile"])
    assert check_answer("quiz", "Nile", ["the Nile"])
    assert check_answer("quiz", "The answer is Paris.", ["Paris"])
    assert check_answer("quiz", "Yaoundé", ["Yaoundé", "Yaounde"])
    assert not check_answer("quiz", "London", ["Paris"])
    assert not check_answer("quiz", "Paris, London, Berlin", ["Paris"])
    # A quiz question with a number for an answer is graded numerically.
    assert check_answer("quiz", "The answer is 56.", ["56"])


def test_normalise_and_extraction():
    assert normalise("  Hello,   World!! ") == "hello, world"
    assert normalise("１２，３４５") == "12345"
    assert normalise("1,234,567.5") == "1234567.5"
    assert normalise("1,2,3") == "1,2,3"  # a list, not a thousands separator
    assert normalise("“Paris.”") == "paris"
    assert normalise("−7") == "-7"
    assert final_answer("So 3 + 4 = 7. The answer is 7. Done.").strip() == "7"
    assert extract_number("2 + 3 = 5") == "5"
    assert extract_number("no digits") is None


# --------------------------------------------------------------------------- quiz syntax

@pytest.mark.parametrize("field,expected", [
    ("{the }Nile|Nil", ["the Nile", "Nile", "Nil"]),
    ("Nile", ["Nile"]),
    ("Hen[ry|] [I|1]", ["Henry I", "Henry 1", "Hen I", "Hen 1"]),
    ("{J{ohn} }Adams", ["John Adams", "Adams", "J Adams"]),
    ("1789-{17}97", ["1789-1797", "1789-97"]),
    ("{James |Jim }{T. }Kirk", ["James T. Kirk", "Kirk", "T. Kirk", "James Kirk",
                                "James T. Kirk", "Jim Kirk", "Jim T. Kirk"]),
    ("large|big", ["large", "big"]),
    ("To be{,} or not to be{\\:}", ["To be, or not to be:", "To be or not to be",
                                      "To be or not to be:", "To be, or not to be"]),
])
def test_expand_quiz_answer(field, expected):
    got = dlg.expand_quiz_answer(field)
    assert got[0] == expected[0]
    assert set(got) == set(expected) and len(got) == len(set(got))


def test_quiz_canonical_and_alternatives():
    assert dlg.quiz_canonical("{the }Nile|Nil") == "the Nile"
    assert dlg.quiz_alternatives("{A{aron} }Burr|{G{eorge} }Clinton") == ["Aaron Burr", "George Clinton"]
    assert dlg.quiz_canonical("7{(integers)}") == "7"
    assert dlg.quiz_canonical("[N|n]one{ (1841-5)}") == "None"
    assert dlg.quiz_canonical("Hamlet{ III-i}") == "Hamlet"
    assert dlg.quiz_canonical("Yaound['\be|e\b'|e]") == "Yaoundé"
    assert "Yaounde" in dlg.expand_quiz_answer("Yaound['\be|e\b'|e]")
    for bad in ("{the Nile", "Nile]", "[a|b}"):
        with pytest.raises(dlg.QuizSyntaxError):
            dlg.expand_quiz_answer(bad)


def test_quiz_lines(tmp_path):
    assert dlg.split_quiz_line("a\\:b:c{\\:}:d") == ["a\\:b", "c{\\:}", "d"]
    f = tmp_path / "bard"
    f.write_text("To be{,} or not to be{\\:}:\\\nthat is the question:\\\nHamlet{ III-i}:\\\n"
                 "Hamlet\nAlgeria:Algiers\n\n")
    rows = dlg.read_quiz_lines(f)
    assert rows == [(1, ["To be{,} or not to be{\\:}", "that is the question", "Hamlet{ III-i}",
                         "Hamlet"]), (5, ["Algeria", "Algiers"])]


def test_quiz_from_small_files(tmp_path):
    (tmp_path / "index").write_text(f"{tmp_path}/africa:Africa{{n}}:cap{{ital}}\n"
                                    f"{tmp_path}/babies:baby:adult\n{tmp_path}/ed:function:ed\n")
    (tmp_path / "africa").write_text("Algeria:Algiers\nBroken{:Nowhere\nTogo:Lom['\be|e\b'|e]\n")
    (tmp_path / "babies").write_text("kitten:cat|fox\npup:seal|fox\n")
    (tmp_path / "ed").write_text("print:p\n")
    recs, stats = dlg.read_quiz(tmp_path)
    qa = {r["messages"][0]["content"]: (r["messages"][1]["content"], r["answers"]) for r in recs}
    assert qa["What is the capital of Algeria?"] == ("Algiers", ["Algiers"])
    assert qa["Algiers is the capital of which African country?"][0] == "Algeria"
    assert qa["What is the capital of Togo?"] == ("Lomé", ["Lomé", "Lome"])
    # One question asked by two rows: one record with both answers.
    assert qa["What is a young fox called?"] == ("kitten", ["kitten", "pup"])
    assert stats["files_skipped"] == ["ed"] and stats["rows_skipped"] >= 1


def test_parse_poem():
    entry = ("\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n"
             "举头望明月，低头思故乡。\n")
    assert dlg.parse_poem(entry) == ("静夜思", "李白", "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。")
    song = "题目:《春居杂兴》二首\n作者:王禹偁（９５４－１００１）\n\n   其一\n\n两株桃杏映篱斜。\n"
    assert dlg.parse_poem(song) == ("春居杂兴", "王禹偁", "其一\n\n两株桃杏映篱斜。")
    assert dlg.parse_poem("just a fortune\n") is None
    assert dlg.split_fortunes("a\n%\nb\nc\n%\n") == ["a", "b\nc"]


def test_split_links_shared_prompts_and_keys():
    def rec(fam, q, a, key=None):
        return dlg.record(fam, [q, a], "test", key=key)
    records = [rec("quiz", f"Question {i}?", str(i)) for i in range(200)]
    records += [rec("quiz", "Question 7?", "another reply")]          # same prompt as #7
    records += [rec("arithmetic", f"What is {i} + 1?", str(i + 1), key=f"k{i}") for i in range(100)]
    records += [rec("arithmetic", f"Compute {i} + 1.", str(i + 1), key=f"k{i}") for i in range(100)]
    train, held = dlg.split_records(records, seed=1, heldout_per_family=10, heldout_max_fraction=0.2)
    assert len(train) + len(held) == len(records)
    assert 10 <= sum(r["family"] == "quiz" for r in held) <= 12
    th = {dlg.prompt_hash(r["messages"]) for r in train}
    hh = {dlg.prompt_hash(r["messages"]) for r in held}
    assert not th & hh
    # Both phrasings of one problem are on the same side.
    side = {}
    for split, rs in (("t", train), ("h", held)):
        for r in rs:
            if r.get("_key"):
                assert side.setdefault(r["_key"], split) == split


# --------------------------------------------------------------------------- full build

SOURCES = REPO / ".sources"
AVAILABLE = {
    "chatterbot": dlg.find_chatterbot_wheel(SOURCES) is not None,
    "quiz": (dlg.QUIZ_DIR / "index").is_file(),
    "definition": (dlg.WORDNET_DIR / "index.noun").is_file(),
    "poem": (dlg.FORTUNES_DIR / "tang300").is_file(),
    "arithmetic": True, "word_problem": True, "number_sense": True, "identity": True,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dialogues")
    meta = dlg.build_dialogues(out, SOURCES, seed=1337, verbose=False)
    return out, meta


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_families_and_format(built):
    out, meta = built
    assert set(meta["families_built"]) == {f for f, ok in AVAILABLE.items() if ok}
    assert set(meta["families_skipped"]) == {f for f, ok in AVAILABLE.items() if not ok}
    assert json.loads((out / "dialogues_meta.json").read_text()) == meta
    train, held = _read(out / "train.jsonl"), _read(out / "heldout.jsonl")
    assert meta["records"] == {"train": len(train), "heldout": len(held)}
    if all(AVAILABLE.values()):
        assert 10_000 <= len(train) <= 20_000
    counts = {}
    for split, recs in (("train", train), ("heldout", held)):
        for r in recs:
            counts.setdefault(r["family"], {"train": 0, "heldout": 0})[split] += 1
            msgs = r["messages"]
            assert len(msgs) >= 2 and len(msgs) % 2 == 0
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
            assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
            assert not any(c in m["content"] for m in msgs for c in "\x1b\b")
            assert not any(k.startswith("_") for k in r)
            if r["family"] in dlg.CHECKABLE:
                # The reference reply passes the grader with the record's own answers.
                assert r["answers"] and check_answer(r["family"], msgs[-1]["content"], r["answers"])
            else:
                assert "answers" not in r
    assert counts == meta["families"]
    for fam in meta["families_built"]:
        assert counts[fam]["train"] > 0 and counts[fam]["heldout"] > 0, fam
    for fam in dlg.CHECKABLE & set(meta["families_built"]):
        assert 100 <= counts[fam]["heldout"] <= 102


def test_build_languages_and_identity(built):
    out, meta = built
    train = _read(out / "train.jsonl")
    sources = {r["source"] for r in train}
    if AVAILABLE["chatterbot"]:
        assert any(s.startswith("chatterbot/english/") for s in sources)
        assert any(s.startswith("chatterbot/chinese/") for s in sources)
        # The identity family alone says who the assistant is.
        assert not any(r["family"] == "chatterbot" and normalise(r["messages"][0]["content"])
                       in ("who are you", "你是谁") for r in train)
    ident = [r for r in train if r["family"] == "identity"]
    assert any("chatsmith" in r["messages"][-1]["content"] for r in ident)
    assert any(re.search(r"[\u4e00-\u9fff]", r["messages"][0]["content"]) for r in ident)


def test_heldout_disjoint_from_train(built):
    out, meta = built
    train, held = _read(out / "train.jsonl"), _read(out / "heldout.jsonl")
    th = {dlg.prompt_hash(r["messages"]) for r in train}
    hh = {dlg.prompt_hash(r["messages"]) for r in held}
    assert hh and not th & hh
    assert meta["heldout_prompt_hashes"] == sorted(hh)
    # the held-out generated problems are listed by key, for pretrain --mix-exclude: each + key's
    # operands and sum are in a held-out arithmetic record, and none is a training record's problem
    keys = meta["heldout_problem_keys"]
    assert keys == sorted(set(keys)) and {k.split(":")[0] for k in keys} >= {"arithmetic", "number_sense"}
    held_text = [" ".join(m["content"] for m in r["messages"]) for r in held if r["family"] == "arithmetic"]
    train_text = [" ".join(m["content"] for m in r["messages"]) for r in train if r["family"] == "arithmetic"]
    plus = [k.split(":")[1].split("+") for k in keys if k.startswith("arithmetic:") and "+" in k]
    assert plus
    for a, b in plus:
        said = f"{a} + {b} = {int(a) + int(b)}"
        assert any(said in t for t in held_text) and not any(said in t for t in train_text), said


def test_build_is_reproducible(built, tmp_path):
    out, _ = built
    # Another process with another string-hash seed: nothing may depend on set order.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    r = subprocess.run([sys.executable, "-m", "chatsmith", "data", "build", "--what", "chat",
                        "--out", tmp_path / "a", "--sources-dir", SOURCES, "--seed", "1337"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dialogues:" in r.stderr
    for name in ("train.jsonl", "heldout.jsonl", "dialogues_meta.json"):  # `data build` writes OUT/chat
        assert (tmp_path / "a" / "chat" / name).read_bytes() == (out / name).read_bytes(), name
    dlg.build_dialogues(tmp_path / "b", SOURCES, seed=1338, verbose=False,
                        families=["arithmetic", "identity"])
    c = dlg.build_dialogues(tmp_path / "c", SOURCES, seed=1337, verbose=False,
                            families=["arithmetic", "identity"])
    assert (tmp_path / "b" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    assert c["families_built"] == ["arithmetic", "identity"]


def test_missing_sources_are_skipped_by_name(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    meta = dlg.build_dialogues(tmp_path / "out", nowhere, quiz_dir=nowhere, wordnet_dir=nowhere,
                               fortunes_dir=nowhere, caps={"arithmetic": 300, "word_problem": 300,
                                                           "number_sense": 300}, verbose=False)
    assert meta["families_built"] == ["arithmetic", "word_problem", "number_sense", "identity"]
    assert set(meta["families_skipped"]) == {"chatterbot", "quiz", "definition", "poem"}
    err = capsys.readouterr().err
    for fam in ("chatterbot", "quiz", "definition", "poem"):
        assert f"dialogue family {fam!r} skipped" in err
    assert meta["families"]["arithmetic"]["train"] + meta["families"]["arithmetic"]["heldout"] == 300


def test_bad_arguments_leave_output_untouched(tmp_path):
    dlg.build_dialogues(tmp_path, SOURCES, families=["identity"], verbose=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="unknown dialogue family"):
        dlg.build_dialogues(tmp_path, SOURCES, families=["identity", "limericks"], verbose=False)
    with pytest.raises(UserError, match="cap"):
        dlg.build_dialogues(tmp_path, SOURCES, caps={"quiz": -1}, verbose=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert sorted(before) == ["dialogues_meta.json", "heldout.jsonl", "train.jsonl"]
