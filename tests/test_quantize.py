"""int8 and bf16 decode weights (`--quantize int8|bf16`): what they cost in accuracy, and that bad requests for
them are refused before any work."""

import pytest
import torch

from chatsmith.checkpoint import load_model
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.model.decoder import GPT, Bf16Linear, Int8Linear
from chatsmith.model.registry import preset
from chatsmith.tokenizer import Tokenizer
from conftest import cli

PROMPTS = ["The king said", "In 1805 there were", "Love is", "she was the queen of the river", "春眠不觉晓",
           "The night", "war and peace and", "It was the best of times"]


def test_int8_linear_is_close_to_fp32():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(5, 64)
    ref = x @ w.t()
    got = Int8Linear(w)(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert ((got - ref).norm() / ref.norm()) < 0.03  # 8-bit weights, 7-bit activations


def test_bf16_linear_is_close_to_fp32():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(5, 64)
    ref = x @ w.t()
    got = Bf16Linear(w)(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert ((got - ref).norm() / ref.norm()) < 0.01  # 8-bit mantissas, fp32 accumulation


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantized_decode_logits_and_greedy_tokens_agree_with_fp32(base_model, mode, monkeypatch):
    """The stated tolerance: decode logits within 5% (relative L2) of fp32's, and greedy decoding
    of 8 prompts x 24 tokens gives the same tokens for at least 90% of positions before the first
    divergence, summed over prompts (a flip on a near-tie changes everything after it). bf16 is
    checked for its numbers on any CPU (emulated where the CPU lacks it: slow, but the same values)."""
    if mode == "bf16":
        monkeypatch.setattr("chatsmith.engine.cpu_has_native_bf16", lambda: True)
    model, tok = load_model(base_model), Tokenizer.load(base_model)
    ids = [tok.encode(t, bos=True) for t in PROMPTS]
    p = SamplingParams(max_new_tokens=24, temperature=0)
    fp = Engine(model, tok).generate_many(ids, p)
    q8 = Engine(model, tok, quantize=mode).generate_many(ids, p)
    agree = total = 0
    for a, b in zip(fp, q8):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
        agree, total = agree + n, total + len(a.token_ids)
    assert agree / total >= 0.9, (agree, total)
    # the logits of one decode step, same cache contents
    fused, fused8 = model.fuse_decode_weights(), model.fuse_decode_weights(mode)
    caches = [model.new_slot_cache(len(ids), 64) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            for r, x in enumerate(ids):
                model(torch.tensor([x]), cache=c.row_view(r))
                c.lens[r] = len(x)
        nxt = torch.tensor([a.token_ids[0] for a in fp])
        ref = model.decode_step(nxt, caches[0], fused=fused)
        got = model.decode_step(nxt, caches[1], fused=fused8)
    assert ((got - ref).norm() / ref.norm()) < 0.05


def test_int8_is_refused_where_it_cannot_run(base_model, capsys, monkeypatch):
    gpt2 = GPT(preset("micro", arch="gpt2", vocab_size=64))
    with pytest.raises(UserError, match="Llama-shaped"):
        Engine(gpt2, Tokenizer.load(base_model), quantize="int8")
    with pytest.raises(UserError, match="--quantize must be one of"):
        Engine(load_model(base_model), Tokenizer.load(base_model), quantize="int4")
    # bf16 decode weights where the CPU would emulate bf16 (~100x slower than fp32): refused, said why
    monkeypatch.setattr("chatsmith.engine.cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserError, match="--quantize bf16: this CPU has no native bf16"):
        Engine(load_model(base_model), Tokenizer.load(base_model), quantize="bf16")
    # from the command line: argparse's choices name the flag
    assert cli("generate", base_model, "--prompt", "Hi", "--quantize", "int3") == 2
    assert "--quantize" in capsys.readouterr().err


def test_generate_with_int8_from_the_cli(base_model, capsys):
    assert cli("generate", base_model, "--prompt", "The king", "--temperature", "0", "--max-new-tokens", "8",
               "--quantize", "int8") == 0
    assert capsys.readouterr().out.startswith("The king")


def test_decode_weights_are_rebuilt_only_when_the_weights_change(base_model):
    """The int8 snapshot is reused across requests, and retaken after an in-place update (RL
    trains the policy between rollouts: the rollouts must use the new weights)."""
    model, tok = load_model(base_model), Tokenizer.load(base_model)
    eng = Engine(model, tok, quantize="int8")
    p = SamplingParams(max_new_tokens=4, temperature=0)
    ids = tok.encode("The king", bos=True)
    eng.generate(ids, p)
    first = eng._fused
    eng.generate(ids, p)
    assert eng._fused is first
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    eng.generate(ids, p)
    assert eng._fused is not first
