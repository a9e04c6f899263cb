"""Training under torchrun: 2 CPU processes (gloo) follow the loss curve of 1 process with the same
global batch, rank 0 alone writes, resume works, SFT and FSDP run the same way."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PRETRAIN_FLAGS, REPO, cli

FLAGS = [*PRETRAIN_FLAGS, "--batch-size", 4, "--eval-every", 4, "--save-every", 4, "--warmup-steps", 2]


def torchrun(n: int, *args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores: no oversubscription
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        "-m", "chatsmith", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out) -> list[float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), "every step logged once: only rank 0 writes"
    return [r["loss"] for r in rows if "loss" in r]


def test_two_processes_match_one_with_the_same_global_batch(corpus_dir, tokenizer_dir, tmp_path):
    common = ["--input", corpus_dir, "--tokenizer", tokenizer_dir, "--max-steps", 8, *FLAGS]
    assert cli("pretrain", "--out", tmp_path / "one", "--grad-accum", 2, *common) == 0
    r = torchrun(2, "pretrain", "--out", tmp_path / "two", "--grad-accum", 1, *common)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 8
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
    assert r.stderr.count("step 8/8") == 1  # one progress line per step: rank 0's
    assert json.loads((tmp_path / "two" / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


@pytest.mark.slow
def test_resume_under_torchrun(corpus_dir, tokenizer_dir, tmp_path):
    # a constant schedule after warmup, so a run stopped at step 4 and resumed to 8 follows the same
    # learning rates as one run of 8 steps
    common = ["--input", corpus_dir, "--tokenizer", tokenizer_dir, "--schedule", "constant", *FLAGS]
    torchrun(2, "pretrain", "--out", tmp_path / "full", "--max-steps", 8, *common)
    torchrun(2, "pretrain", "--out", tmp_path / "part", "--max-steps", 4, *common)
    r = torchrun(2, "pretrain", "--out", tmp_path / "part", "--max-steps", 8, "--resume", *common)
    assert "resumed from" in r.stderr
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(part) == 8 and max(abs(a - b) for a, b in zip(full, part)) <= 1e-6


@pytest.mark.slow
def test_sft_under_torchrun(base_model, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": str(2 * i)}) + "\n"
                            for i in range(40)))
    common = ["--data", data, "--init", base_model, "--max-steps", 6, "--batch-size", 4, "--log-every", 1,
              "--warmup-steps", 2, "--save-every", 3]
    assert cli("sft", "--out", tmp_path / "one", "--grad-accum", 2, *common) == 0
    torchrun(2, "sft", "--out", tmp_path / "two", "--grad-accum", 1, *common)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5


@pytest.mark.slow
def test_fsdp_on_gloo(corpus_dir, tokenizer_dir, tmp_path):
    """FSDP2 shards weights, gradients and optimizer moments across the 2 ranks; the arithmetic is
    DDP's, so the curve matches too; checkpoints hold full weights and resume re-shards them."""
    from chatsmith.checkpoint import load_model

    common = ["--input", corpus_dir, "--tokenizer", tokenizer_dir, "--schedule", "constant", *FLAGS]
    assert cli("pretrain", "--out", tmp_path / "one", "--grad-accum", 2, "--max-steps", 8, *common) == 0
    torchrun(2, "pretrain", "--out", tmp_path / "fsdp", "--max-steps", 4, "--fsdp", *common)
    torchrun(2, "pretrain", "--out", tmp_path / "fsdp", "--max-steps", 8, "--fsdp", "--resume", *common)
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert len(fsdp) == 8 and max(abs(a - b) for a, b in zip(one, fsdp)) <= 1e-5
    load_model(tmp_path / "fsdp")  # a complete, unsharded model directory
