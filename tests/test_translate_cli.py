"""`chatsmith translate train | MODEL` and `chatsmith eval --tasks translation` end to end on a tiny
zh–en set, and their bad-input answers (exit 2, one line, the record named, nothing written)."""

import json
import random

import pytest
from conftest import cli

NUM_ZH = "零 一 二 三 四 五 六 七 八 九".split()
NUM_EN = "zero one two three four five six seven eight nine".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread


def _pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = [rng.randrange(10) for _ in range(rng.randint(1, 5))]
        out.append(("".join(NUM_ZH[i] for i in d), " ".join(NUM_EN[i] for i in d)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("translate")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"translation": {"zh": z, "en": e}, "source": "numbers"},
                                       ensure_ascii=False) + "\n" for z, e in _pairs(300)), encoding="utf-8")
    held = d / "test.jsonl"
    held.write_text("".join(json.dumps({"translation": {"zh": z, "en": e}, "source": "numbers"},
                                       ensure_ascii=False) + "\n" for z, e in _pairs(12, seed=1)), encoding="utf-8")
    out = d / "model"
    assert cli("translate", "train", "--data", data, "--src", "zh", "--tgt", "en", "--both", "--out", out,
               "--preset", "micro", "--vocab-size", 300, "--max-steps", 6, "--batch-size", 8, "--eval-every", 3,
               "--save-every", 3, "--log-every", 3, "--warmup-steps", 2) == 0
    return d, out, held


def test_train_writes_a_marian_directory(trained):
    _, out, _ = trained
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "marian" and cfg["chatsmith"]["family"] == "seq2seq"
    assert cfg["chatsmith"]["directions"] == [["zh", "en"], ["en", "zh"]]
    assert cfg["chatsmith"]["model"]["languages"] == ["en", "zh"]
    tok = json.loads((out / "tokenizer.json").read_text())
    assert {"<2en>", "<2zh>"} <= {t["content"] for t in tok["added_tokens"]}
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    transformers = pytest.importorskip("transformers")
    transformers.MarianMTModel.from_pretrained(out)  # loads as the standard class


def test_translate_text_greedy_and_beams(trained, capsys):
    _, out, _ = trained
    capsys.readouterr()
    assert cli("translate", out, "--text", "一二三", "--text", "四五", "--tgt", "en", "--src", "zh") == 0
    assert capsys.readouterr().out.count("\n") == 2  # one line per source (an untrained model may say "")
    assert cli("translate", out, "--text", "一二三", "--tgt", "zh", "--num-beams", 3, "--num-return-sequences", 2,
               "--json", "--max-new-tokens", 6) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["source"] == "一二三" and len(rec["translations"]) == 2
    assert rec["translations"][0]["score"] >= rec["translations"][1]["score"]


@pytest.mark.parametrize("args,msg", [
    (["--tgt", "de"], "does not translate into 'de'"),
    (["--src", "de", "--tgt", "en"], "not trained on de->en"),
    ([], "pass --tgt"),
    (["--tgt", "en", "--num-beams", 2, "--num-return-sequences", 3], "num_return_sequences cannot exceed"),
])
def test_translate_bad_direction_or_flags(trained, capsys, args, msg):
    _, out, _ = trained
    assert cli("translate", out, "--text", "一", *args) == 2
    assert msg in capsys.readouterr().err


def test_eval_translation_per_direction_and_source(trained, tmp_path, capsys):
    _, out, held = trained
    assert cli("eval", out, "--tasks", f"translation:{held}", "--out", tmp_path, "--limit", 5) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    r = m["tasks"][f"translation:{held}"]
    assert set(r["groups"]) == {"zh->en/numbers", "en->zh/numbers"}
    assert set(r["directions"]) == {"zh->en", "en->zh"}
    g = r["groups"]["en->zh/numbers"]
    assert g["n"] == 5 and g["bleu_signature"] == "tok:zh" and 0 <= g["bleu"] <= 100 and 0 <= g["chrf"] <= 100
    assert g["samples"][0]["source"] and "translation" in g["samples"][0]


def test_bad_pairs_refused_or_skipped(tmp_path, capsys):
    data = tmp_path / "bad.tsv"
    data.write_text("一二\tone two\n \tempty\n三\tthree\n" * 3, encoding="utf-8")
    args = ["translate", "train", "--data", data, "--src", "zh", "--tgt", "en", "--preset", "micro",
            "--vocab-size", 280, "--max-steps", 1, "--batch-size", 2]
    assert cli(*args, "--out", tmp_path / "a") == 2
    assert f"{data}:2: empty side" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert cli(*args, "--out", tmp_path / "b", "--skip-bad") == 0
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["data"]["bad_skipped"] == 3


def test_wrong_language_key_names_the_record(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"translation": {"zh": "一", "en": "one"}}\n', encoding="utf-8")
    assert cli("translate", "train", "--data", data, "--src", "zh", "--tgt", "fr", "--out", tmp_path / "o") == 2
    assert f"{data}:1: no 'fr' side" in capsys.readouterr().err


def test_decoder_verbs_refuse_a_seq2seq_model(trained, capsys):
    _, out, _ = trained
    assert cli("generate", out, "--prompt", "一") == 2
    assert "encoder-decoder (translation) model" in capsys.readouterr().err


def test_translate_reads_lines_on_stdin(trained, capsys, monkeypatch):
    import io
    _, out, _ = trained
    monkeypatch.setattr("sys.stdin", io.StringIO("一二\n\n三四五\n"))
    capsys.readouterr()
    assert cli("translate", out, "--tgt", "en", "--json") == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in recs] == ["一二", "三四五"]
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert cli("translate", out, "--tgt", "en") == 2
    assert "nothing to translate" in capsys.readouterr().err
