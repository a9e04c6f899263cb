"""The bf16 autocast path and torch.compile path of the trainer."""

import json

import pytest

from conftest import PRETRAIN_FLAGS, cli


def test_bf16_autocast_trains(corpus_dir, tokenizer_dir, tmp_path, monkeypatch, capsys):
    """--dtype bf16: the training forward runs its matmuls in bf16 under autocast, the weights (and
    so the optimizer's master copy) stay fp32, and the model still learns."""
    import torch
    from torch import nn

    from chatsmith.train import pretrain

    seen = {"autocast": set(), "linear_out": set(), "weights": set()}
    loss = pretrain.PretrainStage.loss

    def observed_loss(self, model, batch):
        dev = batch["x"].device.type  # the trainer moved the batch to its device
        seen["autocast"].add(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)

        def hook(m, inputs, output):
            seen["linear_out"].add(output.dtype)
            seen["weights"].add(m.weight.dtype)

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            return loss(self, model, batch)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(pretrain.PretrainStage, "loss", observed_loss)
    out = tmp_path / "bf16"
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out, "--max-steps", 20,
               "--dtype", "bf16", *PRETRAIN_FLAGS) == 0
    assert "bf16 autocast" in capsys.readouterr().err
    assert seen["autocast"] == {torch.bfloat16}
    assert seen["linear_out"] == {torch.bfloat16}  # every projection computed in bf16
    assert seen["weights"] == {torch.float32}  # on fp32 weights
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_compiled_training_matches_eager(corpus_dir, tokenizer_dir, tmp_path):
    losses = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        extra = ["--compile"] if mode == "compiled" else []
        assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out,
                   "--max-steps", 8, *PRETRAIN_FLAGS, *extra) == 0
        losses[mode] = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in ln]
    assert losses["eager"] == pytest.approx(losses["compiled"], rel=1e-3)


def test_bf16_on_a_cpu_without_native_bf16_is_said(monkeypatch, capsys):
    """bf16 is never a CPU default, and asking for it where the CPU emulates it gets a warning."""
    import torch

    from chatsmith import runtime

    cpu = torch.device("cpu")
    assert runtime.autocast_dtype("auto", cpu) is None
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert "without native bf16" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    runtime.autocast_dtype("bf16", cpu)
    assert capsys.readouterr().err == ""
