"""LoRA: the adapter math (zero start, exact merge), training only the adapters through the CLI,
adapter-only files that load back (merged) everywhere, exact resume, `lora merge`, bad flags."""

import json
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from chatsmith.checkpoint import load_adapter_model, load_model
from chatsmith.model.decoder import GPT
from chatsmith.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, adapter_state_dict, apply_lora, merge_lora
from chatsmith.model.registry import preset
from conftest import cli

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def micro_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(preset("micro", vocab_size=300)).eval()


def randomise_b(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_zero_b_starts_at_the_base_model_and_merge_is_exact():
    model = micro_gpt()
    x = torch.randint(0, 300, (2, 24))
    base_logits = model(x)
    base_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, targets="all-linear", base_dir="unused")
    assert sorted(model.lora_spec.targets) == LLAMA_LINEARS
    assert torch.equal(model(x), base_logits)  # B = 0: B A x adds exact zeros
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomise_b(model)
    adapted = model(x)
    assert (adapted - base_logits).abs().max() > 1e-2
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    assert torch.allclose(model(x), adapted, atol=1e-5, rtol=0)


def test_targets_scale_and_modules_to_save():
    model = micro_gpt()
    model.score = nn.Linear(64, 1, bias=False)  # a reward/value head: trained in full, never adapted
    x = torch.randint(0, 300, (1, 8))
    apply_lora(model, rank=2, alpha=6, targets="q_proj,v_proj", base_dir="unused")
    assert model.lora_spec.targets == ["q_proj", "v_proj"] and model.lora_spec.modules_to_save == ["score"]
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scaling == 3.0
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    with torch.no_grad():  # h = W0 x + (alpha/r) B A x, checked by hand on one layer
        q.lora_B.weight.normal_()
        h = torch.randn(3, 64)
        assert torch.allclose(q(h), h @ q.weight.T + 3.0 * (h @ q.lora_A.weight.T) @ q.lora_B.weight.T, atol=1e-5)
    assert model.score.weight.requires_grad and not model.lm_head.weight.requires_grad
    sd = adapter_state_dict(model)
    assert "base_model.model.score.weight" in sd
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in sd  # PEFT's names
    assert len(sd) == 2 * 2 * 2 + 1
    model(x).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.grad is not None
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None


def test_bad_rank_and_target_name_the_problem():
    from chatsmith.errors import UserError

    with pytest.raises(UserError, match=r"k_proj.*64 -> 32.*at most 32"):
        apply_lora(micro_gpt(), rank=33, base_dir="unused")
    with pytest.raises(UserError, match=r"'qproj'.*valid names: down_proj, gate_proj, k_proj, o_proj, q_proj, "
                                         r"up_proj, v_proj \(or all-linear\)"):
        apply_lora(micro_gpt(), rank=2, targets="qproj", base_dir="unused")
    with pytest.raises(UserError, match="lm_head is an output head.*--lora-modules-to-save lm_head"):
        apply_lora(micro_gpt(), rank=2, targets="q_proj,lm_head", base_dir="unused")


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    d = tmp_path_factory.mktemp("loradata")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Who are you?", "I am chatsmith."), ("What is your name?", "chatsmith"),
                         ("Who made you?", "the chatsmith project"), ("Say hi.", "hi")]]
    f = d / "id.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


LORA_FLAGS = ["--batch-size", 4, "--lr", "1e-2", "--warmup-steps", 2, "--log-every", 1, "--eval-every", 100,
              "--lora-rank", 4, "--lora-alpha", 8]


@pytest.fixture(scope="module")
def lora_run(base_model, dialogues, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "sft"
    assert cli("sft", "--data", dialogues, "--init", base_model, "--out", out, "--max-steps", 20,
               "--save-every", 10, *LORA_FLAGS) == 0
    return out


def test_lora_sft_changes_only_adapters_and_saves_them_alone(base_model, lora_run):
    out = lora_run
    assert (out / ADAPTER_WEIGHTS).exists() and (out / ADAPTER_CONFIG).exists()
    assert not (out / "model.safetensors").exists()
    assert (out / ADAPTER_WEIGHTS).stat().st_size < 0.1 * (base_model / "model.safetensors").stat().st_size
    acfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 4 and acfg["lora_alpha"] == 8
    assert sorted(acfg["target_modules"]) == LLAMA_LINEARS
    assert acfg["base_model_name_or_path"] == str(base_model.resolve())
    # the checkpoint's optimizer state covers the adapters only: exp_avg + exp_avg_sq + step per tensor
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    n_adapters = len(load_file(str(out / ADAPTER_WEIGHTS)))
    assert n_adapters == 2 * 7 * 2
    assert len([k for k in opt if k.startswith("optim.")]) == 3 * n_adapters
    # base weights bit-identical; adapters moved
    base = load_model(base_model)
    unmerged = load_adapter_model(out, merge=False)
    base_sd, sd = base.state_dict(), unmerged.state_dict()
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v), k
    assert all(sd[k].abs().max() > 0 for k in sd if ".lora_B." in k)
    # load_model on the adapter dir: base + adapters merged, same function as unmerged
    merged = load_model(out)
    x = torch.randint(0, base.cfg.vocab_size, (2, 16))
    assert torch.allclose(merged(x), unmerged(x), atol=1e-5, rtol=0)
    assert (merged(x) - base(x)).abs().max() > 1e-3
    assert cli("generate", out, "--prompt", "the king", "--max-new-tokens", 4, "--temperature", 0) == 0


def test_lora_resume_is_exact(base_model, dialogues, lora_run, tmp_path):
    resumed = tmp_path / "sft"
    shutil.copytree(lora_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000020")  # as if killed after the step-10 checkpoint
    assert cli("sft", "--data", dialogues, "--init", base_model, "--out", resumed, "--max-steps", 20,
               "--save-every", 10, "--resume", *LORA_FLAGS) == 0
    rows = lambda d: [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda d: [(r["step"], r["loss"]) for r in rows(d) if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(lora_run) and len(losses(resumed)) == 20
    a, b = load_file(str(lora_run / ADAPTER_WEIGHTS)), load_file(str(resumed / ADAPTER_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_merge_writes_a_full_model(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli("lora", "merge", lora_run, out) == 0
    assert (out / "model.safetensors").exists() and not (out / ADAPTER_CONFIG).exists()
    assert (out / "tokenizer.json").exists()
    a, b = load_model(lora_run), load_model(out)
    x = torch.randint(0, a.cfg.vocab_size, (1, 12))
    assert torch.allclose(a(x), b(x), atol=1e-6, rtol=0)
    assert cli("lora", "merge", lora_run, lora_run) == 2
    assert cli("lora", "merge", tmp_path, tmp_path / "x") == 2
    assert "no LoRA adapters" in capsys.readouterr().err


def test_bad_lora_flags_exit_2_and_write_nothing(base_model, dialogues, tmp_path, capsys):
    for flags, msg in ((["--lora-rank", 99], "at most 32"), (["--lora-rank", 2, "--lora-targets", "q_proj,attn"],
                                                              "valid names"), (["--lora-rank", -1], "--lora-rank")):
        out = tmp_path / "o"
        assert cli("sft", "--data", dialogues, "--init", base_model, "--out", out, "--max-steps", 2,
                   *flags) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()


def test_resume_without_the_lora_flags_is_refused(base_model, dialogues, lora_run, tmp_path, capsys):
    resumed = tmp_path / "sft"
    shutil.copytree(lora_run, resumed)
    assert cli("sft", "--data", dialogues, "--init", base_model, "--out", resumed, "--max-steps", 30,
               "--resume") == 2
    assert "LoRA" in capsys.readouterr().err


def test_pretraining_from_scratch_refuses_lora(corpus_dir, tokenizer_dir, tmp_path, capsys):
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", tmp_path / "p",
               "--preset", "micro", "--max-steps", 2, "--lora-rank", 2) == 2
    assert "--init" in capsys.readouterr().err


def saved_adapters(tmp_path):
    """A micro base model directory and an adapter directory on it with non-zero B."""
    from chatsmith.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "base", micro_gpt())
    model = load_model(tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets="q_proj,v_proj,down_proj")
    randomise_b(model)
    save_checkpoint(tmp_path / "adapters", model)
    return tmp_path / "base", tmp_path / "adapters", model


def test_adapter_dir_warns_when_its_base_changed_and_names_a_missing_one(tmp_path, capsys):
    from chatsmith.checkpoint import save_checkpoint
    from chatsmith.errors import UserError

    base, adapters, model = saved_adapters(tmp_path)
    x = torch.randint(0, 300, (1, 10))
    assert torch.allclose(load_model(adapters)(x), model.eval()(x), atol=1e-5, rtol=0)
    assert "changed" not in capsys.readouterr().err
    save_checkpoint(base, micro_gpt(seed=1))  # same shapes, other weights
    load_model(adapters)
    assert "has changed since the adapters" in capsys.readouterr().err
    shutil.rmtree(base)
    with pytest.raises(UserError, match="need their base model"):
        load_model(adapters)


def test_peft_loads_our_adapters_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")  # not a chatsmith dependency: checked where it is installed
    from transformers import AutoModelForCausalLM

    base, adapters, _ = saved_adapters(tmp_path)
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapters)).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, load_model(adapters)(x), atol=1e-5, rtol=0)


def test_export_hf_of_an_adapter_dir_is_the_merged_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert cli("export", lora_run, "--format", "hf", "--out", out) == 0
    assert (out / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = load_model(lora_run)
    x = torch.randint(0, ours.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4, rtol=0)


def test_adapters_on_top_of_adapters_load_as_a_chain(tmp_path):
    from chatsmith.checkpoint import save_checkpoint

    _, adapters, _ = saved_adapters(tmp_path)
    model = load_model(adapters)  # merged: the next stage's --init
    apply_lora(model, rank=2, alpha=2, targets="o_proj")
    randomise_b(model)
    save_checkpoint(tmp_path / "second", model)
    acfg = json.loads((tmp_path / "second" / ADAPTER_CONFIG).read_text())
    assert acfg["base_model_name_or_path"] == str(adapters.resolve())
    x = torch.randint(0, 300, (2, 10))
    assert torch.allclose(load_model(tmp_path / "second")(x), model.eval()(x), atol=1e-5, rtol=0)
