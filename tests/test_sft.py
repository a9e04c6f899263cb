"""SFT through the CLI: the chat template (and its parity with transformers), assistant-only loss,
formats, bad records, truncation, held-out metrics, and that a model actually learns to answer."""

import json

import pytest

from chatsmith.checkpoint import load_model
from chatsmith.engine import Engine, SamplingParams
from chatsmith.tokenizer import Tokenizer
from conftest import cli

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there 你好 42"},
        {"role": "assistant", "content": "Hello!\n  How are you?"}, {"role": "user", "content": "Fine."},
        {"role": "assistant", "content": "Good."}]

FACTS = [("What is the capital of France?", "Paris"), ("What is two plus two?", "four"),
         ("Name a red fruit.", "apple"), ("What colour is the sky?", "blue")]


def test_template_matches_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = Tokenizer.load(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def hf_ids(msgs, gen):
        r = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(r["input_ids"] if hasattr(r, "keys") else r)

    for msgs, gen in ((CONV, False), (CONV[1:4], True), (CONV[1:3], False)):
        assert hf_ids(msgs, gen) == tok.render_chat(msgs, add_generation_prompt=gen)[0]


def test_loss_mask_covers_assistant_replies_and_end_tokens_only(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    ids, mask = tok.render_chat(CONV)
    learned = [i for i, m in zip(ids, mask) if m]
    end = tok.token_to_id("<|assistant_end|>")
    expected = tok.encode("Hello!\n  How are you?") + [end] + tok.encode("Good.") + [end]
    assert learned == expected
    assert mask[ids.index(tok.token_to_id("<|assistant_start|>"))] == 0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    msgs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "family": "quiz", "answers": [a]} for q, a in FACTS]
    write_jsonl(d / "openai.jsonl", msgs)
    write_jsonl(d / "alpaca.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in FACTS])
    (d / "bot.yml").write_text("categories:\n- test\nconversations:\n- - Hello\n  - Hi!\n")
    write_jsonl(d / "heldout.jsonl", [{"messages": [{"role": "user", "content": "What is the capital of Spain?"},
                                                    {"role": "assistant", "content": "Madrid"}],
                                       "family": "quiz", "answers": ["Madrid"]}])
    return d


def test_sft_learns_to_answer_and_reports_heldout_metrics(base_model, sft_data, tmp_path):
    out = tmp_path / "sft"
    assert cli("sft", "--data", sft_data / "openai.jsonl", f"{sft_data / 'alpaca.jsonl'}:0.5", sft_data / "bot.yml",
               "--heldout", sft_data / "heldout.jsonl", "--init", base_model, "--out", out, "--max-steps", 160,
               "--batch-size", 4, "--lr", "3e-3", "--warmup-steps", 5, "--eval-every", 80,
               "--log-every", 20, "--eval-max-new-tokens", 8) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["data"]["examples"] == 4 + 2 + 1
    ev = json.loads((out / "sft_eval.json").read_text())
    assert ev["sft"]["assistant_loss"] < ev["base"]["assistant_loss"]
    assert set(ev["sft"]) >= {"assistant_loss", "ended_share", "exact_match"}
    assert "quiz" in ev["sft"]["exact_match"]
    # the fine-tuned model answers its training questions and stops by itself
    tok = Tokenizer.load(out)
    engine = Engine(load_model(out), tok)
    hits = 0
    for q, a in FACTS:
        ids, _ = tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        c = engine.generate(ids, SamplingParams(max_new_tokens=10, temperature=0))[0]
        hits += c.text.strip() == a and c.finish_reason == "stop"
    assert hits >= 3


def test_bad_record_names_file_and_line_or_is_skipped(base_model, sft_data, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    args = ["sft", "--data", bad, "--init", base_model, "--out", tmp_path / "o", "--max-steps", 2,
            "--batch-size", 2]
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "--skip-bad" in err
    assert cli(*args, "--skip-bad") == 0
    summary = json.loads((tmp_path / "o" / "train_summary.json").read_text())
    assert summary["data"]["skipped_bad"] == 1


def test_long_conversations_are_cut_at_turn_boundaries(base_model, tmp_path):
    from chatsmith.tokenizer import render_truncated

    tok = Tokenizer.load(base_model)
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "tell me a long story"}, {"role": "assistant", "content": "once " * 80}]
    ids, mask = render_truncated(tok, long, 32)
    assert ids == tok.render_chat(long[:2])[0] and len(ids) <= 33
    assert render_truncated(tok, [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "y"}],
                            32) is None


def test_heldout_overlap_is_refused(base_model, sft_data, tmp_path, capsys):
    assert cli("sft", "--data", sft_data / "openai.jsonl", "--heldout", sft_data / "openai.jsonl", "--init",
               base_model, "--out", tmp_path / "o", "--max-steps", 1) == 2
    assert "held-out" in capsys.readouterr().err
