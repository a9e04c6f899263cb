"""The model-family seam: the registry, heads as modules, and checkpoints written before families
existed (tests/data/legacy_decoder, written by chatsmith at commit 357ad88) loading unchanged."""

import json
from pathlib import Path

import pytest
import torch

from chatsmith.checkpoint import load_model, read_config, save_checkpoint
from chatsmith.errors import UserError
from chatsmith.model import registry
from chatsmith.model.decoder import GPT, DecoderConfig
from chatsmith.model.lora import apply_lora

LEGACY = Path(__file__).parent / "data" / "legacy_decoder"


@pytest.mark.parametrize("name", ["llama_score", "gpt2"])
def test_a_checkpoint_from_before_families_loads_with_the_same_outputs(name):
    d = LEGACY / name
    exp = json.loads((d / "expected.json").read_text())
    model = load_model(d)
    assert isinstance(model, GPT) and registry.family_of(model).name == "decoder"
    x = torch.tensor(exp["input"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tensor(exp["logits"]), rtol=0, atol=1e-6)
        if "score" in exp:
            assert model.heads == ("lm", "score")
            torch.testing.assert_close(model(x, head="score"), torch.tensor(exp["score"]), rtol=0, atol=1e-6)
        else:
            assert model.heads == ("lm",)


def test_saving_records_the_family_and_heads_and_round_trips(tmp_path):
    model = load_model(LEGACY / "llama_score")
    save_checkpoint(tmp_path / "m", model)
    block = json.loads((tmp_path / "m" / "config.json").read_text())["chatsmith"]
    assert block["family"] == "decoder" and block["model"]["heads"] == ["lm", "score"]
    assert "score_head" not in block["model"]
    again = load_model(tmp_path / "m")
    assert again.cfg == model.cfg == read_config(tmp_path / "m")
    x = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        lm, score = again(x, head=("lm", "score"))
        torch.testing.assert_close(lm, model(x))
        torch.testing.assert_close(score, model(x, head="score"))


def test_heads_are_registered_modules():
    model = registry.build(registry.preset("micro", vocab_size=64))
    assert model.heads == ("lm",) and not hasattr(model, "score")
    with pytest.raises(UserError, match="no 'score' head"):
        model(torch.tensor([[1, 2]]), head="score")
    model.add_head("score", std=0.0)  # a value function: starts at 0
    assert model.heads == ("lm", "score") and model.cfg.score_head
    assert torch.count_nonzero(model.head("score").weight) == 0
    assert model.add_head("score") is model and model.heads == ("lm", "score")  # idempotent
    with pytest.raises(UserError, match="heads must include 'lm'"):
        DecoderConfig(heads=("lm", "nonsense"))


def test_an_unknown_family_in_config_json_is_a_clear_error(tmp_path):
    d = tmp_path / "m"
    save_checkpoint(d, registry.build(registry.preset("micro", vocab_size=64)))
    raw = json.loads((d / "config.json").read_text())
    raw["chatsmith"]["family"] = "perceiver"
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="unknown model family 'perceiver'"):
        load_model(d)


def test_trainer_pieces_ask_the_model():
    """FSDP's unit and LoRA's all-linear come from blocks(); heads are never LoRA targets."""
    model = registry.build(registry.preset("micro", vocab_size=64)).add_head("score")
    assert model.blocks() == list(model.model.layers)
    apply_lora(model, rank=2, base_dir="unused")
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")})
    assert adapted == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert model.lm_head.weight.requires_grad is False and model.score.weight.requires_grad  # saved in full
