"""Pretraining through the CLI: outputs, metrics, checkpoints, exact resume after SIGKILL, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from chatsmith.checkpoint import list_checkpoints, load_model
from chatsmith.tokenizer import Tokenizer
from conftest import PRETRAIN_FLAGS, REPO, cli


def metrics(d):
    return [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_writes_a_loadable_model_and_learns(base_model):
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "trainer_state.json", "metrics.jsonl", "train_summary.json"):
        assert (base_model / f).exists(), f
    rows = [r for r in metrics(base_model) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all({"lr", "tok_per_s", "elapsed", "tokens"} <= r.keys() for r in rows)
    evals = [r for r in metrics(base_model) if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    # keep_last=2 checkpoints, each complete
    ckpts = list_checkpoints(base_model)
    assert [c.name for c in ckpts] == ["step-00000040", "step-00000060"]
    assert load_model(ckpts[-1]) is not None


def test_shards_are_uint16_and_hold_the_corpus(base_model, tokenizer_dir, corpus_dir):
    meta = json.loads((base_model / "data" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    data = np.memmap(base_model / "data" / "val.bin", dtype=np.uint16, mode="r")
    tok = Tokenizer.load(tokenizer_dir)
    first = json.loads((corpus_dir / "val.jsonl").read_text().splitlines()[0])["text"]
    want = [tok.bos_id, *tok.encode(first)]
    assert data[:len(want)].tolist() == want
    assert len(data) == meta["splits"]["val"]["tokens"]


def _run(out, corpus_dir, tokenizer_dir, *extra):
    return [sys.executable, "-m", "chatsmith", "pretrain", "--input", str(corpus_dir), "--tokenizer",
            str(tokenizer_dir), "--out", str(out), "--max-steps", "80", "--save-every", "10",
            "--keep-last", "3", *map(str, PRETRAIN_FLAGS), *extra]


def test_resume_after_sigkill_is_exact(corpus_dir, tokenizer_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_run(ref, corpus_dir, tokenizer_dir), check=True, capture_output=True, env=env, cwd=REPO)
    killed = tmp_path / "killed"
    p = subprocess.Popen(_run(killed, corpus_dir, tokenizer_dir), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and p.poll() is None:
        f = killed / "metrics.jsonl"
        if f.exists():
            lines = f.read_text().splitlines()
            step = json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else step
            if step >= 25:
                break
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 25 <= step < 80
    r = subprocess.run(_run(killed, corpus_dir, tokenizer_dir, "--resume"), capture_output=True, text=True,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    a = [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics(ref)]
    b = [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics(killed)]
    assert a == b  # every step's loss identical, not merely close


def test_existing_run_needs_resume_flag(base_model, corpus_dir, tokenizer_dir, capsys):
    code = cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", base_model,
               "--max-steps", 5, *PRETRAIN_FLAGS)
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_corrupt_checkpoint_is_skipped_on_resume_and_named_on_load(base_model, corpus_dir, tokenizer_dir,
                                                                   tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_model, run)
    newest = list_checkpoints(run)[-1]
    (newest / "model.safetensors").write_bytes(b"\x00garbage")
    assert cli("generate", newest, "--prompt", "x") == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", run,
               "--max-steps", 62, "--resume", *PRETRAIN_FLAGS) == 0
    err = capsys.readouterr().err
    assert "unreadable" in err and "resumed from" in err and "step-00000040" in err
    (run / "config.json").unlink()
    assert cli("generate", run, "--prompt", "x") == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--preset", "enormous"], "invalid choice: 'enormous'"),
    (["--seq-len", "500"], "beyond"),
    (["--schedule", "linear"], "--schedule"),
    (["--max-steps", "abc"], "--max-steps"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags_exit_2_with_a_message(args, message, corpus_dir, tokenizer_dir, tmp_path, capsys):
    code = cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o",
               "--preset", "micro", "--max-steps", 2, *args)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_corpus_inputs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("pretrain", "--input", empty, "--out", tmp_path / "o", "--preset", "micro") == 2
    assert "no usable files" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe broken\n")
    assert cli("pretrain", "--input", bad, "--out", tmp_path / "o2", "--preset", "micro") == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert cli("pretrain", "--input", tmp_path / "missing.txt", "--out", tmp_path / "o3") == 2
    assert "no such file" in capsys.readouterr().err


def test_wsd_schedule_and_time_budget(corpus_dir, tokenizer_dir, tmp_path, monkeypatch, capsys):
    """--max-minutes without --max-steps fits a WSD schedule to the budget, and the budget cuts the
    run off when a step runs long. The trainer's clock is a fake one that a training step advances
    by 0.1 s (and one stalled step near the end by 10 s), so what is checked does not depend on how
    fast this machine is."""
    import types

    from chatsmith.train import pretrain, trainer as trainer_mod

    clock = types.SimpleNamespace(now=1e6)
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(time=lambda: clock.now))
    running = []
    fit = trainer_mod.Trainer.fit
    monkeypatch.setattr(trainer_mod.Trainer, "fit", lambda self: running.append(self) or fit(self))
    loss = pretrain.PretrainStage.loss
    stalled = []

    def timed_loss(self, model, batch):
        tr = running[0]
        clock.now += 0.1
        # one stall after the last refit (refits stop at 95% of the schedule), before its end
        if not stalled and tr.max_steps and 0.96 * tr.max_steps <= tr.step + 1 < tr.max_steps:
            stalled.append(tr.step + 1)
            clock.now += 10.0
        return loss(self, model, batch)

    monkeypatch.setattr(pretrain.PretrainStage, "loss", timed_loss)
    out = tmp_path / "budget"
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out,
               "--max-minutes", 0.1, "--schedule", "wsd", "--save-every", 1000, *PRETRAIN_FLAGS) == 0
    err = capsys.readouterr().err
    state = json.loads((out / "trainer_state.json").read_text())
    summary = json.loads((out / "train_summary.json").read_text())
    n = state["max_steps"]
    # the schedule was fitted to the budget: 6 s at 0.1 s/step, less the fitter's margins
    assert f"time budget 0.1 min: 0.107s/step -> {n} steps" in err
    assert 40 <= n <= 60
    # and the budget stopped the run: the stalled step took it past 6 s before the schedule's end
    (k,) = stalled
    assert f"time budget of 0.1 min reached at step {k}" in err
    assert state["step"] == summary["steps"] == k < n and summary["max_steps"] == n
    assert not summary["interrupted"] and summary["seconds"] == pytest.approx(k * 0.1 + 10, abs=0.2)

    # WSD in metrics.jsonl: warmup, constant at --lr, then a linear decay over the last 20% of the
    # fitted schedule towards min_lr (0.1 x lr); row s logs the lr of step index s - 1
    rows = [m for m in metrics(out) if "lr" in m]
    assert [r["step"] for r in rows] == list(range(1, k + 1))
    lr, lo, warmup = 3e-3, 3e-4, 5
    lrs = [r["lr"] for r in rows]
    assert lrs[:warmup] == pytest.approx([lr * (i + 1) / warmup for i in range(warmup)])
    decay_start = int(n * 0.8)
    assert lrs[warmup:decay_start + 1] == pytest.approx([lr] * (decay_start + 1 - warmup))
    decay = lrs[decay_start:]
    assert len(decay) >= 5
    slope = (lr - lo) / (n - decay_start)
    assert [a - b for a, b in zip(decay, decay[1:])] == pytest.approx([slope] * (len(decay) - 1))


def test_schedules():
    from chatsmith.config import TrainConfig
    from chatsmith.train.trainer import lr_at

    cos = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cos, 100) == pytest.approx(0.1) and lr_at(9, cos, 100) == pytest.approx(1.0)
    assert lr_at(55, cos, 100) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_at(100, cos, 100) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd, 100) == 1.0 and lr_at(79, wsd, 100) == 1.0
    assert lr_at(90, wsd, 100) == pytest.approx(0.5) and lr_at(100, wsd, 100) == pytest.approx(0.0)
