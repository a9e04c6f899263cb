"""`--tensorboard` on a training command: event files under OUT/tensorboard/ that TensorBoard's own
reader loads, holding the same numbers as metrics.jsonl."""

import json

import pytest

from conftest import PRETRAIN_FLAGS, cli


def test_pretrain_writes_readable_tensorboard_events(corpus_dir, tokenizer_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out,
               "--max-steps", 12, "--tensorboard", *PRETRAIN_FLAGS) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no event file written"
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens", "val_loss"} <= tags
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    want = {r["step"]: r["loss"] for r in rows if "loss" in r}
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert set(got) == set(want)
    for step, v in want.items():
        assert got[step] == pytest.approx(v, rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Scalars("val_loss")] == [r["step"] for r in rows if "val_loss" in r]


def test_no_tensorboard_folder_without_the_flag(corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "plain"
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out,
               "--max-steps", 2, *PRETRAIN_FLAGS) == 0
    assert not (out / "tensorboard").exists()
