"""The model: presets, parity with transformers, the KV cache."""

import pytest
import torch

from chatsmith.checkpoint import load_model, save_checkpoint
from chatsmith.errors import UserError
from chatsmith.model.decoder import GPT
from chatsmith.model.registry import preset

SHAPES = {
    "llama": {},
    "llama-gqa-untied": {"n_kv_head": 1, "tie_embeddings": False},
    "gpt2": {"arch": "gpt2"},
}


@pytest.mark.parametrize("name", SHAPES)
def test_checkpoint_loads_in_transformers_with_same_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = GPT(preset("micro", vocab_size=320, **SHAPES[name])).eval()
    save_checkpoint(tmp_path / "ck", model)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    x = torch.randint(0, 320, (2, 48))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
        reloaded = load_model(tmp_path / "ck")(x)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours, reloaded)


@pytest.mark.parametrize("name", SHAPES)
def test_kv_cache_matches_full_forward(name):
    torch.manual_seed(0)
    model = GPT(preset("micro", vocab_size=320, **SHAPES[name])).eval()
    x = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 64)
        parts = [model(x[:, :17], cache=cache), model(x[:, 17:30], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(30, 40)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_presets_have_the_documented_sizes():
    tiny = GPT(preset("tiny", vocab_size=8192))
    assert 5e6 <= tiny.num_params() <= 10e6
    assert GPT(preset("micro", vocab_size=512)).num_params() < 1e6
    g = preset("gpt2-124m")
    assert g.arch == "gpt2" and g.vocab_size == 50257 and g.n_layer == 12 and g.d_model == 768
    with pytest.raises(UserError, match="unknown preset"):
        preset("huge")


def test_context_overflow_is_an_error():
    model = GPT(preset("micro", vocab_size=320))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_masked_logprobs_equal_the_full_forward_on_the_mask():
    """The LM head read at the reply's positions only (RL, DPO, the retention check) gives the full
    forward's token log-probabilities there and 0 elsewhere, the same gradient, and PPO's values."""
    from chatsmith.batching import masked_logprobs, token_logprobs
    torch.manual_seed(0)
    model = GPT(preset("micro", vocab_size=320)).add_head("score")
    x, y = torch.randint(0, 320, (3, 12)), torch.randint(0, 320, (3, 12))
    mask = torch.zeros(3, 12)
    mask[0, 4:], mask[1, 9:11], mask[2, :] = 1, 1, 1
    full = token_logprobs(model(x), y) * mask
    lp, logits = masked_logprobs(model, x, y, mask)
    assert logits.shape == (int(mask.sum()), 320)
    assert torch.allclose(lp, full, atol=1e-5) and (lp[mask == 0] == 0).all()
    g_full = torch.autograd.grad(full.sum(), model.lm_head.weight)[0]
    g = torch.autograd.grad(masked_logprobs(model, x, y, mask)[0].sum(), model.lm_head.weight)[0]
    assert torch.allclose(g, g_full, atol=1e-5)
    _, values = model(x, head=("lm", "score"))
    lp2, _, v = masked_logprobs(model, x, y, mask, head=("lm", "score"))
    assert torch.allclose(lp2, full, atol=1e-5) and torch.allclose(v, values * mask, atol=1e-6)


def test_loss_mask_ignores_positions():
    torch.manual_seed(0)
    model = GPT(preset("micro", vocab_size=320))
    x = torch.randint(0, 320, (2, 16))
    y = torch.randint(0, 320, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[:, 8:] = 1
    _, masked = model(x, y, loss_mask=mask)
    logits, _ = model(x, y)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 320), y[:, 8:].reshape(-1))
    assert torch.allclose(masked, ref, atol=1e-6)
