"""The bf16 autocast path and torch.compile path of the trainer."""

import json

import pytest

from conftest import PRETRAIN_FLAGS, cli


def test_bf16_autocast_trains(corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "bf16"
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out, "--max-steps", 20,
               "--dtype", "bf16", *PRETRAIN_FLAGS) == 0
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
