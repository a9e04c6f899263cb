"""Mid-training mixture (`pretrain --mix`): the task text is right, the weights are parsed strictly,
and a tiny run draws each source's share of tokens as its weight says."""

import json
import random

import pytest

from chatsmith.data.task_text import digit_by_digit, task_documents
from chatsmith.data.tasks import check_answer
from chatsmith.errors import UserError
from chatsmith.train.pretrain import parse_mix
from conftest import PRETRAIN_FLAGS, cli


def test_column_arithmetic_by_hand_and_always_right():
    assert digit_by_digit(37, "+", 48) == ("7 + 8 = 15, write 5 carry 1; 3 + 4 + 1 = 8, write 8. "
                                           "So 37 + 48 = 85. The answer is 85.")
    assert digit_by_digit(402, "-", 57).startswith("2 + 10 - 7 = 5, write 5 borrow 1; 0 - 1 + 10 - 5 = 4")
    assert digit_by_digit(3, "-", 5) is None and digit_by_digit(3, "×", 5) is None
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        assert check_answer("arithmetic", digit_by_digit(a, "+", b), [str(a + b)])
        hi, lo = max(a, b), min(a, b)
        assert check_answer("arithmetic", digit_by_digit(hi, "-", lo), [str(hi - lo)])


def test_task_documents_are_deterministic_and_hold_every_kind():
    docs = task_documents(40, seed=1)
    assert docs == task_documents(40, seed=1) and docs != task_documents(40, seed=2)
    text = "\n".join(docs)
    assert all(len(d.splitlines()) == 8 for d in docs)
    for marker in ("Repeat: ", "times: ", "carry 1", "The answer is", "comes"):
        assert marker in text, marker


def test_excluded_problems_never_appear_in_the_task_text():
    """--mix-exclude: the dialogues' held-out problems are left out (and without it they are there,
    so the check can fail)."""
    import re
    said = re.compile(r"So (\d+) \+ (\d+) = ")  # a column addition's conclusion names its problem
    seen = {f"arithmetic:{a}+{b}" for d in task_documents(200, seed=7) for a, b in said.findall(d)}
    assert len(seen) > 50
    exclude = set(sorted(seen)[::2])
    again = {f"arithmetic:{a}+{b}" for d in task_documents(200, seed=7, exclude=exclude) for a, b in said.findall(d)}
    assert again and not again & exclude


def test_mix_exclude_errors(tmp_path, corpus_dir, tokenizer_dir, capsys):
    base = ["pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", *PRETRAIN_FLAGS]
    assert cli(*base, "--mix-exclude", tmp_path) == 2
    assert "--mix-exclude needs --mix" in capsys.readouterr().err
    assert cli(*base, "--mix", "corpus=0.8,tasks=0.2", "--mix-exclude", tmp_path) == 2
    assert f"--mix-exclude {tmp_path}: no dialogues_meta.json" in capsys.readouterr().err
    (tmp_path / "dialogues_meta.json").write_text("{}")
    assert cli(*base, "--mix", "corpus=0.8,tasks=0.2", "--mix-exclude", tmp_path) == 2
    assert "heldout_problem_keys" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec, words", [("corpus=0.8,task=0.2", "unknown source"), ("corpus", "NAME=WEIGHT"),
                                         ("corpus=1,corpus=2", "twice"), ("corpus=-1", ">= 0"),
                                         ("corpus=0,tasks=0", "positive"), ("tasks=x", "number")])
def test_bad_mix_specs(spec, words):
    with pytest.raises(UserError, match=words):
        parse_mix(spec)


def test_mix_weights_are_normalised():
    assert parse_mix("tasks=1,corpus=3") == {"corpus": 0.75, "tasks": 0.25}
    assert parse_mix(None) is None


def test_mixture_weights_are_honoured_on_a_tiny_run(corpus_dir, tokenizer_dir, tmp_path, one_torch_thread):
    out = tmp_path / "mix"
    flags = [f for f in PRETRAIN_FLAGS]
    flags[flags.index("--batch-size") + 1] = 16
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out, "--max-steps", 30,
               "--save-every", 1000, *flags, "--mix", "corpus=0.7,tasks=0.3", "--mix-docs", 200) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    share = summary["mix"]["token_share"]
    # 480 rows of 32 tokens: the share's standard deviation is about 0.02
    assert share["tasks"] == pytest.approx(0.3, abs=0.08) and share["corpus"] + share["tasks"] == pytest.approx(1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["mix_share/tasks"] for r in rows if "mix_share/tasks" in r]
    assert len(logged) == 30 and sum(logged) / 30 == pytest.approx(share["tasks"])  # log and summary agree
    assert any("tasks_val_loss" in r and r["tasks_val_bpb"] > 0 for r in rows) and (out / "data_tasks" / "meta.json").exists()
    assert json.loads((out / "config.json").read_text())["chatsmith"]["mix"] == {"corpus": 0.7, "tasks": 0.3}
    # the rows drawn from the task shard are task text
    from chatsmith.config import TrainConfig
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.train.pretrain import PretrainStage
    tok = Tokenizer.load(tokenizer_dir)
    stage = PretrainStage(out / "data", TrainConfig(batch_size=16, seed=0), 32, tok.token_bytes(),
                          mix={"corpus": 0.7, "tasks": 0.3}, task_dir=out / "data_tasks")
    digits = {0: [], 1: []}  # per source: does the row's text hold a digit
    for step in range(5):
        b = stage.batch(step, 0, 0)
        for x, src in zip(b["x"], b["source"].tolist()):
            digits[src].append(any(c.isdigit() for c in tok.decode(x.tolist())))
    task_rate, corpus_rate = (sum(v) / len(v) for v in (digits[1], digits[0]))
    assert task_rate >= 0.9 and task_rate > corpus_rate + 0.3, (task_rate, corpus_rate)


def test_a_corpus_only_mix_reads_the_unmixed_stream(corpus_dir, tokenizer_dir, tmp_path):
    """Source j reads its own window stream, the corpus the one an unmixed run reads: --mix corpus=1
    trains on exactly the batches of a run without --mix."""
    from chatsmith.config import TrainConfig
    from chatsmith.data.shards import write_shards
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.train.pretrain import PretrainStage
    tok = Tokenizer.load(tokenizer_dir)
    write_shards({"train": [str(corpus_dir / "train.jsonl")], "val": [str(corpus_dir / "val.jsonl")]}, tok,
                 tmp_path / "data")
    cfg = TrainConfig(batch_size=4, seed=5)
    plain = PretrainStage(tmp_path / "data", cfg, 16, tok.token_bytes())
    mixed = PretrainStage(tmp_path / "data", cfg, 16, tok.token_bytes(), mix={"corpus": 1.0})
    for step in range(3):
        assert plain.batch(step, 0, 0)["x"].equal(mixed.batch(step, 0, 0)["x"])
    assert mixed.token_shares(3) == {"corpus": 1.0}
