"""Generation: determinism, greedy, sampling filters, stop strings, beams, streaming, the CLI."""

import pytest
import torch

from chatsmith.checkpoint import load_model
from chatsmith.engine import Engine, SamplingParams, StopMatcher, process_logits
from chatsmith.errors import UserError
from chatsmith.tokenizer import Tokenizer
from conftest import cli


@pytest.fixture(scope="module")
def engine(base_model):
    return Engine(load_model(base_model), Tokenizer.load(base_model))


def prompt(engine, text="The king said"):
    return engine.tok.encode(text, bos=True)


def test_same_seed_same_text(engine):
    p = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    a = engine.generate(prompt(engine), p)[0].text
    assert engine.generate(prompt(engine), p)[0].text == a
    others = {engine.generate(prompt(engine), SamplingParams(max_new_tokens=20, temperature=1.0, seed=s))[0].text
              for s in range(5)}
    assert len(others) > 1


def test_greedy_is_argmax_without_cache(engine):
    ids = prompt(engine)
    c = engine.generate(ids, SamplingParams(max_new_tokens=12, temperature=0))[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(len(c.token_ids)):
            seq.append(int(engine.model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(ids):] == c.token_ids
    # top_k=1 sampling is greedy too
    k1 = engine.generate(ids, SamplingParams(max_new_tokens=12, temperature=1.3, top_k=1, seed=3))[0]
    assert k1.token_ids == c.token_ids


def test_process_logits_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    k2 = process_logits(logits, SamplingParams(top_k=2, temperature=1.0), None)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    probs = logits.softmax(-1)[0]  # ~[.64, .24, .09, .03, .01]
    p = process_logits(logits, SamplingParams(top_p=0.8, temperature=1.0), None)
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all() and probs[0] < 0.8
    rep = process_logits(torch.tensor([[2.0, -2.0, 1.0]]), SamplingParams(repetition_penalty=2.0, temperature=1.0),
                         torch.tensor([[0, 1]]))
    assert rep.tolist() == [[1.0, -4.0, 1.0]]
    hot = process_logits(logits, SamplingParams(temperature=2.0), None)
    assert torch.allclose(hot, logits / 2)


def test_stop_strings_are_cut_and_never_streamed(engine):
    ids = prompt(engine)
    free = engine.generate(ids, SamplingParams(max_new_tokens=40, temperature=0))[0].text
    stop = free[5:8]
    assert stop.strip(), free
    c = engine.generate(ids, SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]))[0]
    assert c.finish_reason == "stop" and c.text == free[:free.find(stop)] and stop not in c.text
    streamed = "".join(t for _, t in engine.stream(ids, SamplingParams(max_new_tokens=40, temperature=0,
                                                                          stop=["zzz-never", stop])))
    assert streamed == c.text


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["User:"])
    assert m.safe_len("hello Us") == len("hello ")
    assert m.safe_len("hello") == 5
    assert m.find("a User: b") == 2


def test_stream_equals_generate_and_length_reason(engine):
    p = SamplingParams(max_new_tokens=15, temperature=0.9, seed=11)
    text = "".join(t for _, t in engine.stream(prompt(engine), p))
    c = engine.generate(prompt(engine), p)[0]
    assert text == c.text
    assert c.finish_reason in ("length", "stop") and len(c.token_ids) <= 15


def test_num_return_sequences_and_beams(engine):
    outs = engine.generate(prompt(engine), SamplingParams(max_new_tokens=10, num_return_sequences=3, seed=1))
    assert len(outs) == 3
    beams = engine.generate(prompt(engine), SamplingParams(max_new_tokens=8, num_beams=4, num_return_sequences=3))
    assert len(beams) == 3 and beams[0].score >= beams[1].score >= beams[2].score
    # a single beam is greedy search
    one = engine._beam(prompt(engine), SamplingParams(max_new_tokens=8, num_beams=1))[0]
    greedy = engine.generate(prompt(engine), SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert one.token_ids == greedy.token_ids[:len(one.token_ids)]


def test_prompt_beyond_context_is_a_user_error(engine):
    with pytest.raises(UserError, match="context"):
        engine.generate(list(range(1, 80)), SamplingParams())
    with pytest.raises(UserError, match="top_p"):
        engine.generate(prompt(engine), SamplingParams(top_p=0))


def test_cli_generate_streams_and_is_reproducible(base_model, capsys):
    args = ["generate", base_model, "--prompt", "The queen", "--max-new-tokens", 12, "--seed", 5]
    assert cli(*args) == 0
    first = capsys.readouterr().out
    assert first.startswith("The queen")
    assert cli(*args) == 0
    assert capsys.readouterr().out == first
    assert cli("generate", base_model, "--prompt", "The queen", "--num-beams", 3, "--num-return-sequences", 2,
               "--max-new-tokens", 6) == 0
    assert capsys.readouterr().out.count("--- [") == 2
    assert cli("generate", base_model, "--prompt", "x", "--temperature", -1) == 2
