"""Moderation (chatsmith/moderation/): the lexicon through the evasions, ordinary text left alone,
crisis phrases, the learned layer behind the same interface, the data builder's split, the
`moderate` verb and `chat --moderation`."""

import json

import pytest

from chatsmith.checkpoint import load_model
from chatsmith.data.moderation import build_moderation, read_fortunes
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.moderation import CATEGORIES, CRISIS_REPLY, OPENAI_CATEGORIES, REFUSAL, Moderator, calibrate, load_moderator
from chatsmith.moderation.lexicon import Lexicon, words_of
from chatsmith.chat import ChatSession
from chatsmith.tokenizer import Tokenizer
from tests.conftest import cli, synthetic_docs

EVASIONS = ["fuck", "FUCK", "FuCk", "f u c k", "f.u.c.k", "f-u-c-k", "f_u_c_k", "fuuuuuck", "ｆｕｃｋ", "sh1t", "$hit",
            "sh!t", "b1tch", "a$$hole", "@sshole", "motherfucker", "shit!", "(bullshit)", "p0rn", "傻逼", "傻 逼",
            "傻.逼", "他媽的", "他妈的", "操你妈", "幹你娘"]
CLEAN = ["What a lovely morning by the river.", "The class passed the assessment.", "Scunthorpe is a town.",
         "God bless you, and go to hell with your worries.", "He killed the engine and drank a cocktail.",
         "In 2024 there were 5 apples and 3 pears.", "I'll be fine, thanks!", "春眠不觉晓，处处闻啼鸟。",
         "我们今天去公园散步。", "Shall I speak ill of him that is my husband?", "He analysed the analysis.",
         "Mr. A. B. Smith signed it.", "A bass guitar and a glass of water."]


@pytest.fixture(scope="module")
def mod():
    return load_moderator("lexicon")


def test_the_lexicon_sees_through_the_evasions(mod):
    missed = [t for t, v in zip(EVASIONS, mod.check(EVASIONS)) if not v.flagged]
    assert not missed
    assert all(v.categories["offensive"] and v.scores["offensive"] == 1.0 for v in mod.check(EVASIONS))


def test_ordinary_text_is_left_alone(mod):
    flagged = [(t, v.hits) for t, v in zip(CLEAN, mod.check(CLEAN)) if v.flagged]
    assert not flagged
    # on the synthetic corpus (plain English words and a Chinese poem): nothing at all
    assert not any(v.flagged for v in mod.check(synthetic_docs(200, seed=5)))


def test_words_of_undoes_spacing_and_leetspeak_but_keeps_numbers():
    assert "fuck" in words_of("f u c k you")
    assert words_of("In 2024 I had 5 apples") == ["in", "2024", "i", "had", "5", "apples"]
    assert "shit" in words_of("Sh1t!") and "hello" in words_of("(hello)")


def test_crisis_phrases_are_self_harm_not_offensive(mod):
    texts = ["I want to kill myself", "sometimes i think about ending my life", "我真的不想活了", "我想自殺",
             "The soldier killed the dragon"]
    v = mod.check(texts)
    assert [x.crisis for x in v] == [True, True, True, True, False]
    assert v[0].categories["self-harm"] and v[0].categories["self-harm/intent"] and not v[0].categories["offensive"]
    assert "988" in CRISIS_REPLY and v[0].flagged and not v[4].flagged


def test_results_carry_every_openai_category(mod):
    r = mod.check(["shit"])[0].result()
    assert set(r["categories"]) == set(r["category_scores"]) == set(CATEGORIES)
    assert set(r["category_applied_input_types"]) == set(OPENAI_CATEGORIES)
    assert not any(r["categories"][c] for c in OPENAI_CATEGORIES) and r["categories"]["offensive"]


def test_the_data_builder_splits_by_text_and_the_learned_layer_loads(tmp_path, corpus_dir, encoder_dir):
    fort = tmp_path / "fortunes"
    for sub, name, lines in (("off/es/off", "varios.fortunes", [f"chiste grosero número {i} con palabrotas" for i in range(40)]),
                             ("off/it", "varie-o", [f"barzelletta volgare {i} e offensiva" for i in range(30)]),
                             ("es", "amistad.fortunes", [f"un amigo fiel es un tesoro {i}" for i in range(40)]),
                             ("it", "amicizia", [f"chi trova un amico trova un tesoro {i}" for i in range(40)])):
        (fort / sub).mkdir(parents=True, exist_ok=True)
        (fort / sub / name).write_bytes("\n%\n".join(lines).encode("latin-1" if sub.startswith("off/es") else "utf-8"))
    assert read_fortunes(fort / "off/es/off/varios.fortunes")[3] == "chiste grosero número 3 con palabrotas"
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"How many apples are {i} and 3?"},
                                                          {"role": "assistant", "content": f"{i} and 3 make {i + 3}."}]})
                                 + "\n" for i in range(30)))
    meta = build_moderation(tmp_path / "out", corpus_dir, fortunes=fort, dialogues=dialogues)
    rows = {s: [json.loads(x) for x in (tmp_path / "out/moderation" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "dev", "test")}
    assert {r["label"] for r in rows["train"]} == {r["label"] for r in rows["dev"]} == {"clean", "offensive"}
    texts = {s: {r["text"] for r in rs} for s, rs in rows.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["dev"] and not texts["dev"] & texts["test"]
    off_test = sum(r["label"] == "offensive" for r in rows["test"])
    assert off_test == round(0.2 * 70) and meta["counts"]["test"]["fortunes-es-off"] + meta["counts"]["test"][
        "fortunes-it-off"] == off_test
    assert sum(r["label"] == "offensive" for r in rows["dev"]) == round(0.1 * 70)
    # ordinary text reaches every split (picked apart from the split's rank, so not all into test)
    for split in ("train", "dev", "test"):
        assert meta["counts"][split].get("corpus", 0) > 0 and meta["counts"][split].get("dialogues", 0) > 0, split
    again = build_moderation(tmp_path / "again", corpus_dir, fortunes=fort, dialogues=dialogues)
    assert again == meta and (tmp_path / "again/moderation/test.jsonl").read_text() == \
        (tmp_path / "out/moderation/test.jsonl").read_text()
    clf = tmp_path / "clf"
    assert cli("classify", "train", "--data", tmp_path / "out/moderation/train.jsonl", "--init", encoder_dir,
               "--out", clf, "--max-steps", 3, "--batch-size", 8, "--max-len", 24) == 0
    learned = load_moderator(str(clf))
    ctx = learned.classifier.model.cfg.max_seq_len
    assert learned.threshold == 0.5 and learned.classifier.max_len == min(128, ctx)  # not calibrated yet
    v = learned.check(["chiste grosero número 7", "shit"])
    assert 0.0 <= v[0].scores["offensive"] <= 1.0 and v[1].flagged  # the lexicon still answers beside it
    with pytest.raises(Exception, match="lexicon"):
        load_moderator(str(tmp_path / "nope"))
    # the operating threshold: set on dev, stored beside the classifier, used by every loader
    dev = tmp_path / "out/moderation/dev.jsonl"
    assert cli("moderate", "--calibrate", dev, "--moderation", clf, "--target-fpr", 0.3, "--max-len", 16) == 0
    cal = json.loads((clf / "moderation.json").read_text())
    assert cal["max_len"] == 16 and cal["dev"]["fpr_ordinary_added"] <= 0.3 and cal["target_fpr"] == 0.3
    learned = load_moderator(str(clf))
    assert learned.threshold == cal["threshold"] and learned.classifier.max_len == 16
    assert load_moderator(str(clf), threshold=0.9).threshold == 0.9  # an explicit threshold wins
    dev_rows = rows["dev"]
    p = learned.classifier.classify([r["text"] for r in dev_rows])[:, learned.offensive_index]
    ordinary = [i for i, r in enumerate(dev_rows) if r["source"] in ("corpus", "dialogues")]
    lex = [bool(learned.lexicon.hits(dev_rows[i]["text"])) for i in ordinary]
    above = [float(p[i]) >= cal["threshold"] for i in ordinary]
    assert sum(a or b for a, b in zip(lex, above)) / len(ordinary) == pytest.approx(cal["dev"]["fpr_ordinary"])
    assert sum(b and not a for a, b in zip(lex, above)) / len(ordinary) == pytest.approx(cal["dev"]["fpr_ordinary_added"])
    assert sum(lex) / len(ordinary) == pytest.approx(cal["dev"]["fpr_ordinary_lexicon"])
    # a tighter target never gives a lower threshold; the lexicon's own false positives never make it fail
    tight = calibrate(learned, dev_rows, target_fpr=0.01)
    assert tight["threshold"] >= cal["threshold"] and tight["dev"]["fpr_ordinary_added"] <= 0.01
    noisy = dev_rows + [{"text": "shit happens", "label": "clean", "source": "corpus"}] * len(dev_rows)
    assert calibrate(learned, noisy, target_fpr=0.01)["dev"]["fpr_ordinary_lexicon"] > 0.3
    assert cli("moderate", "--calibrate", dev, "--moderation", "lexicon") == 2
    (clf / "moderation.json").write_text("{broken")
    with pytest.raises(UserError, match="moderation.json"):
        load_moderator(str(clf))


def test_the_moderate_verb(capsys, tmp_path):
    assert cli("moderate", "hello there", "you sh!t") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok") and out[1].startswith("FLAGGED") and "shit" in out[1]
    f = tmp_path / "t.txt"
    f.write_text("fine words\n\n傻逼\n")
    assert cli("moderate", "--file", f, "--json") == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["flagged"] for r in rows] == [False, True]
    assert cli("moderate") == 2 and cli("moderate", "  ") == 2


def test_chat_with_moderation(base_model):
    tok = Tokenizer.load(base_model)
    engine = Engine(load_model(base_model), tok, max_batch=1)
    p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=11)
    session = ChatSession(engine, p, moderator=load_moderator("lexicon"))
    text, _, _ = session.reply("you are a f.u.c.k.i.n.g idiot")
    assert text == REFUSAL and session.filtered and session.history[-1]["content"] == REFUSAL
    text, _, _ = session.reply("i want to kill myself")
    assert text == CRISIS_REPLY and session.filtered
    # a reply stops where the lexicon flags it: a lexicon of one word this reply says, past its start
    plain = ChatSession(engine, p).reply("Tell me about it")[0]
    word = next(w for w in plain.split()[3:] if w.isalpha() and w.islower() and len(w) >= 3)
    lex = Lexicon()
    lex.single, lex.phrases, lex.zh, lex._zh_re = {word}, set(), [], None
    cut = ChatSession(engine, p, moderator=Moderator(lex))
    text, _, _ = cut.reply("Tell me about it")
    assert cut.filtered and plain.startswith(text) and word not in text.split() and len(text) < len(plain)
    assert not engine.num_active  # the stopped reply's request was cancelled
