"""The green-list watermark (chatsmith/watermark.py): green lists and z-scores equal to transformers'
WatermarkLogitsProcessor / WatermarkDetector, z-scores against hand-computed cases, and the engine's
watermarked sampling (batched, beam search, with top-k / top-p) detected as such."""

import dataclasses
import json
import math
import random

import pytest
import torch
from transformers import LlamaConfig
from transformers.generation import WatermarkDetector, WatermarkLogitsProcessor

from chatsmith.checkpoint import load_model
from chatsmith.engine import Engine, SamplingParams
from chatsmith.tokenizer import Tokenizer
from chatsmith.errors import UserError
from chatsmith.watermark import Watermark, WatermarkConfig, detect, p_value, parse_key, z_score
from tests.conftest import cli, cli_subprocess
from tests.test_engine_unit import LETTERS, TOK, VOCAB, make_engine

V = 1000


def hf_processor(cfg: WatermarkConfig, vocab=V):
    return WatermarkLogitsProcessor(vocab_size=vocab, device="cpu", greenlist_ratio=cfg.gamma, bias=cfg.delta,
                                    hashing_key=cfg.key, seeding_scheme=cfg.scheme, context_width=cfg.context_width)


@pytest.mark.parametrize("scheme,width", [("lefthash", 1), ("selfhash", 1), ("selfhash", 2), ("selfhash", 4)])
def test_green_lists_equal_transformers(scheme, width):
    cfg = WatermarkConfig(key=12345, gamma=0.3, context_width=width, scheme=scheme)
    ours, hf = Watermark(cfg, V), hf_processor(cfg)
    rng = random.Random(0)
    for _ in range(30):
        window = [rng.randrange(V) for _ in range(width)]
        want = hf._get_greenlist_ids(torch.tensor(window))
        assert torch.equal(ours.greenlist(window), want)
    assert len(want) == int(V * 0.3)


@pytest.mark.parametrize("scheme,width", [("lefthash", 1), ("selfhash", 1), ("selfhash", 3)])
def test_biased_logits_equal_transformers(scheme, width):
    cfg = WatermarkConfig(key=777, gamma=0.25, delta=2.0, context_width=width, scheme=scheme)
    ours, hf = Watermark(cfg, V), hf_processor(cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ctx = torch.randint(0, V, (6,), generator=g)
        logits = torch.randn(V, generator=g)
        want = hf(ctx[None], logits[None].clone())[0]
        got = ours.apply(ctx.tolist(), logits)
        assert torch.equal(got, want)  # bit for bit
        assert float((got - logits).max()) == pytest.approx(2.0, abs=1e-5)  # something was boosted, by delta


@pytest.mark.parametrize("scheme,width", [("lefthash", 1), ("lefthash", 3), ("selfhash", 1), ("selfhash", 2)])
def test_batched_bias_is_transformers_row_by_row(scheme, width):
    """add_bias (one scatter for the batch, what the engine calls each step) gives every row exactly
    what transformers' processor gives it alone; rows not named are left untouched."""
    cfg = WatermarkConfig(key=4242, gamma=0.25, delta=2.0, context_width=width, scheme=scheme)
    ours, hf = Watermark(cfg, V), hf_processor(cfg)
    g = torch.Generator().manual_seed(2)
    B = 7
    ctx = torch.randint(0, V, (B, 5), generator=g)
    logits = torch.randn(B, V + 24, generator=g)  # a padded model vocabulary: the padding is never boosted
    rows = [0, 2, 3, 6]
    got = ours.add_bias([ctx[r].tolist() for r in rows], logits.clone(), rows)
    for r in range(B):
        if r in rows and (scheme == "selfhash" or width == 1):  # transformers seeds left-hash from the last id
            want = hf(ctx[r][None], logits[r, :V][None].clone())[0]
            assert torch.equal(got[r, :V], want), r
        if r in rows:
            assert torch.equal(got[r], ours.apply(ctx[r].tolist(), logits[r]))
            assert int((got[r] != logits[r]).sum()) > 0
        else:
            assert torch.equal(got[r], logits[r])
        assert torch.equal(got[r, V:], logits[r, V:])
    every = ours.add_bias([c.tolist() for c in ctx], logits.clone())  # all rows: the one-scatter path
    assert all(torch.equal(every[r], ours.apply(ctx[r].tolist(), logits[r])) for r in range(B))


@pytest.mark.parametrize("scheme,width,ignore", [("lefthash", 1, False), ("lefthash", 1, True),
                                                 ("selfhash", 1, False), ("selfhash", 3, True)])
def test_z_scores_equal_transformers_detector(scheme, width, ignore):
    cfg = WatermarkConfig(key=15485863, gamma=0.25, delta=2.0, context_width=width, scheme=scheme)
    wm = Watermark(cfg, V)
    hf = WatermarkDetector(LlamaConfig(vocab_size=V, bos_token_id=V + 1), "cpu", dict(
        greenlist_ratio=cfg.gamma, bias=cfg.delta, hashing_key=cfg.key, seeding_scheme=scheme, context_width=width),
        ignore_repeated_ngrams=ignore)
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    strong = Watermark(dataclasses.replace(cfg, delta=10.0), V)
    # half the texts biased towards green (a watermark), half not; with repeats so ignore_repeated matters
    for k in range(6):
        ids = [rng.randrange(V) for _ in range(width)]
        for _ in range(60):
            if k % 2 and rng.random() < 0.8:
                ids.append(int(strong.apply(ids, torch.randn(V, generator=g)).argmax()))
            else:
                ids.append(ids[-3] if rng.random() < 0.2 and len(ids) > 3 else rng.randrange(V))
        ours = detect(ids, wm, ignore_repeated_ngrams=ignore, min_tokens=1)
        theirs = hf(torch.tensor([ids]), return_dict=True)
        assert ours.scored == theirs.num_tokens_scored[0] and ours.green == theirs.num_green_tokens[0]
        assert ours.z == pytest.approx(float(theirs.z_score[0]), abs=1e-9)
        assert ours.p == pytest.approx(float(theirs.p_value[0]), rel=1e-6, abs=1e-12)


def _chain(wm: Watermark, pattern: str, start: int = 7) -> list[int]:
    """Ids whose k-th scored token is green where pattern[k] == 'g', red where 'r' (left-hash, width 1)."""
    ids = [start]
    for c in pattern:
        green = set(wm.greenlist(ids[-1:]).tolist())
        ids.append(next(t for t in range(wm.vocab_size) if (t in green) == (c == "g")))
    return ids


def test_z_scores_match_hand_computed_cases():
    wm = Watermark(WatermarkConfig(gamma=0.25), V)
    # all 16 green: z = (16 - 4) / sqrt(16 * 0.25 * 0.75) = 12 / sqrt(3)
    d = detect(_chain(wm, "g" * 16), wm)
    assert (d.scored, d.green) == (16, 16) and d.z == pytest.approx(12 / math.sqrt(3)) and d.watermarked
    # 4 green of 16: exactly what chance gives, z = 0, p = 1/2
    d = detect(_chain(wm, "grrr" * 4), wm)
    assert d.green == 4 and d.z == pytest.approx(0.0) and d.p == pytest.approx(0.5) and not d.watermarked
    # none green of 16: z = -4 / sqrt(3)
    d = detect(_chain(wm, "r" * 16), wm)
    assert d.green == 0 and d.z == pytest.approx(-4 / math.sqrt(3))
    # 40 of 100 at gamma 0.25: z = 15 / sqrt(18.75) = 3.464; above the 1% threshold 2.326, below 0.01%'s 3.719
    ids = _chain(wm, ("g" * 40 + "r" * 60))
    assert detect(ids, wm).z == pytest.approx(15 / math.sqrt(18.75))
    assert detect(ids, wm, fpr=0.01).watermarked and not detect(ids, wm, fpr=0.0001).watermarked
    assert z_score(10, 20, 0.5) == pytest.approx(0.0) and p_value(1.6448536) == pytest.approx(0.05, abs=1e-6)


def test_repeated_ngrams_can_be_ignored():
    wm = Watermark(WatermarkConfig(gamma=0.25), V)
    ids = _chain(wm, "g")  # one green bigram ...
    ids = ids * 10  # ... repeated: 19 bigrams, only 2 distinct (a, b) and (b, a)
    full = detect(ids, wm, min_tokens=1)
    once = detect(ids, wm, ignore_repeated_ngrams=True, min_tokens=1)
    assert full.scored == 19 and once.scored == 2


def test_too_short_text_gets_no_verdict():
    wm = Watermark(WatermarkConfig(), V)
    d = detect(_chain(wm, "g" * 10), wm, min_tokens=16)
    assert d.watermarked is None and d.z is None and "too short" in d.note and d.scored == 10
    assert detect([5], wm).scored == 0 and detect([5], wm).watermarked is None


def test_bad_keys_and_settings_are_user_errors():
    for bad in ("abc", "-3", "1.5", ""):
        with pytest.raises(UserError, match="key"):
            parse_key(bad)
    assert parse_key("0x10") == 16 and parse_key(" 42 ") == 42
    for kw in (dict(key="42"), dict(gamma=1.0), dict(delta=-1.0), dict(context_width=0), dict(scheme="rot13")):
        with pytest.raises(UserError):
            WatermarkConfig(**kw).validate()
    with pytest.raises(UserError, match="fpr"):
        detect([1, 2, 3], Watermark(WatermarkConfig(), V), fpr=0)


# --------------------------------------------------------------------------- in the engine

def _wm_engine():
    engine = make_engine(max_batch=8, max_seq_len=128, peak=1.0)
    return engine, Watermark(WatermarkConfig(gamma=0.25, delta=4.0), VOCAB)


def _fraction_green(wm, prompt, out):
    ids = prompt[-1:] + out
    return sum(wm.is_green(ids[i - 1:i], ids[i]) for i in range(1, len(ids))) / len(out)


def test_engine_sampling_is_watermarked_and_detected():
    engine, wm = _wm_engine()
    prompt = TOK.encode("hello", bos=True)
    p = SamplingParams(max_new_tokens=80, temperature=1.0, seed=1)
    (plain,) = engine.generate(prompt, p)
    (marked,) = engine.generate(prompt, dataclasses.replace(p, watermark=wm))
    # the mock model only gives the 26 letters finite logits: of them about a quarter are green,
    # so the plain text hits about gamma; delta 4 makes nearly every sampled letter green
    assert _fraction_green(wm, prompt, plain.token_ids) < 0.5 < 0.8 < _fraction_green(wm, prompt, marked.token_ids)
    d_marked = detect(prompt[-1:] + marked.token_ids, wm)
    d_plain = detect(prompt[-1:] + plain.token_ids, wm)
    assert d_marked.watermarked and d_marked.z > 6 and not d_plain.watermarked
    assert marked.logprobs is None and plain.text != marked.text


def test_watermark_composes_with_batching_top_k_top_p_and_beams():
    engine, wm = _wm_engine()
    prompts = [TOK.encode(w, bos=True) for w in ("one", "two", "three", "four", "five")]
    for extra in (dict(top_k=5), dict(top_p=0.9), dict(temperature=0.7)):
        p = SamplingParams(**{"max_new_tokens": 40, "temperature": 1.0, "seed": 5, "watermark": wm, **extra})
        batched = engine.generate_many(prompts, p, max_batch=3)
        for i, (prompt, c) in enumerate(zip(prompts, batched)):
            assert _fraction_green(wm, prompt, c.token_ids) > 0.7, extra
            # a row's watermark comes from its own context, whatever shares the batch
            alone = engine.generate_many([prompts[j] for j in range(i + 1)], p, max_batch=1)[i]
            assert alone.token_ids == c.token_ids
    greedy = engine.generate(prompts[1], SamplingParams(max_new_tokens=30, temperature=0, watermark=wm))[0]
    assert _fraction_green(wm, prompts[1], greedy.token_ids) > 0.7
    assert set(greedy.token_ids) <= set(LETTERS)


def test_watermark_in_beam_search(base_model):
    tok = Tokenizer.load(base_model)
    engine = Engine(load_model(base_model), tok, max_batch=2)
    prompt = tok.encode("The king said", bos=True)
    p = SamplingParams(max_new_tokens=30, num_beams=3, num_return_sequences=2, temperature=0)
    plain = engine.generate(prompt, p)
    # the micro model's plain beam is repetitive: take a key under which it is mostly red
    wm = next(w for k in range(1, 200) if _fraction_green(w := Watermark(WatermarkConfig(key=k, delta=6.0),
                                                                         tok.vocab_size), prompt, plain[0].token_ids) < 0.3)
    beams = engine.generate(prompt, dataclasses.replace(p, watermark=wm))
    assert len(beams) == 2 and all(_fraction_green(wm, prompt, b.token_ids) > 0.7 for b in beams)


# --------------------------------------------------------------------------- the command line

def test_generate_and_detect_on_the_command_line(base_model, tmp_path, capsys):
    assert cli("generate", base_model, "--prompt", "The king", "--max-new-tokens", "60", "--temperature", "1",
               "--seed", "3", "--watermark", "--watermark-key", "99", "--watermark-delta", "8", "--no-stream") == 0
    text = capsys.readouterr().out[len("The king"):]
    f = tmp_path / "reply.txt"
    f.write_text(text)
    r = cli_subprocess("watermark", "detect", "--tokenizer", base_model, "--key", "99", "--file", f)
    assert r.returncode == 0, r.stderr
    assert "verdict:       watermarked" in r.stdout and "z-score" in r.stdout
    # wrong keys see chance: z about 0 on average (one key alone can be lucky at 1% FPR)
    zs = []
    for key in (1, 98, 100, 5000, 77777, 99):
        assert cli("watermark", "detect", "--tokenizer", base_model, "--key", key, "--file", f, "--json") == 0
        zs.append(json.loads(capsys.readouterr().out)["z"])
    right = zs.pop()
    assert sum(zs) / len(zs) < 1.5 and right > 5, (zs, right, text)
    r = cli_subprocess("watermark", "detect", "--tokenizer", base_model, "--key", "99", "The king said")
    assert r.returncode == 0 and "verdict:       none (too short" in r.stdout
    r = cli_subprocess("watermark", "detect", "--tokenizer", base_model, "--key", "secret", "some text")
    assert r.returncode == 2 and "key must be a non-negative integer" in r.stderr
