"""The one training loop (chatsmith/train/trainer.py) driven directly by a toy stage over a micro
model built in-process: no corpus, no tokenizer, no checkpoint prepared beforehand.

The toy stage's batches are a pure function of (seed, step, micro, rank), as the stage protocol
requires, so two runs that should do the same arithmetic can be compared weight for weight."""

import json
import math
import re
import types

import pytest
import torch

from chatsmith.checkpoint import list_checkpoints, load_model
from chatsmith.config import TrainConfig
from chatsmith.model.registry import preset
from chatsmith.model.decoder import GPT
from chatsmith.train import trainer as trainer_mod
from chatsmith.train.trainer import Trainer

VOCAB, SEQ = 64, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread


def micro_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("micro", vocab_size=VOCAB, dropout=dropout))


class ToyStage:
    """Random-token language modelling. The global batch of a step is `global_batch` sequences drawn
    from a generator seeded by (seed, step, rank); micro-batch m takes the m-th slice of it, so
    grad_accum=2 with batch B sees exactly the sequences grad_accum=1 with batch 2B sees."""

    name = "toy"

    def __init__(self, batch_size: int, grad_accum: int = 1, seed: int = 0):
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.loss_calls = 0
        # what the stage learns as it goes (as RL's adaptive KL or baseline do): saved with checkpoints
        self.ema = torch.zeros(3)
        self.loaded = None

    def batch(self, step, micro, rank):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + rank)
        seqs = torch.randint(0, VOCAB, (self.batch_size * self.grad_accum, SEQ + 1), generator=g)
        part = seqs[micro * self.batch_size:(micro + 1) * self.batch_size]
        return {"x": part[:, :-1], "y": part[:, 1:], "step": step}

    def loss(self, model, batch):
        self.loss_calls += 1
        _, loss = model(batch["x"], batch["y"])
        self.ema = 0.9 * self.ema + 0.1 * torch.tensor([loss.item(), float(batch["step"]), 1.0])
        return loss, {"toy_stat": float(batch["x"].float().mean())}

    def tokens(self, batch):
        return batch["x"].numel()

    @torch.no_grad()
    def evaluate(self, model):
        g = torch.Generator().manual_seed(12345)
        x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
        _, loss = model(x[:, :-1], x[:, 1:])
        return {"val_loss": loss.item()}

    def state(self):
        return {"loss_calls": self.loss_calls}, {"ema": self.ema}

    def load_state(self, js, tensors):
        self.loaded = (dict(js), {k: v.clone() for k, v in tensors.items()})
        self.loss_calls = js["loss_calls"]
        self.ema = tensors["ema"].clone()


def config(out, **kw) -> TrainConfig:
    base = dict(out=str(out), device="cpu", dtype="fp32", batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2,
                eval_every=1000, eval_batches=1, save_every=1000, keep_last=2, log_every=1, seed=7)
    return TrainConfig(**{**base, **kw})


def fit(out, stage=None, model=None, **kw):
    cfg = config(out, **kw)
    stage = stage or ToyStage(cfg.batch_size, cfg.grad_accum)
    tr = Trainer(model or micro_model(), stage, cfg)
    summary = tr.fit()
    return tr, stage, summary


def metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out) -> list[dict]:
    return [r for r in metrics(out) if "loss" in r]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def untimed(rows):
    """Metrics rows without the fields that measure time (they legitimately differ run to run)."""
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed")} for r in rows]


# --------------------------------------------------------------------------- gradient accumulation

def test_grad_accum_matches_a_batch_twice_as_large(tmp_path):
    a, _, _ = fit(tmp_path / "accum", batch_size=4, grad_accum=2, max_steps=4)
    b, _, _ = fit(tmp_path / "big", batch_size=8, grad_accum=1, max_steps=4)
    start = weights(micro_model())
    wa, wb = weights(a.unwrapped), weights(b.unwrapped)
    assert wa.keys() == wb.keys()
    moved = 0.0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
        moved = max(moved, (wa[k] - start[k]).abs().max().item())
    assert moved > 1e-3  # the runs really trained (else equal weights would prove nothing)
    ra, rb = train_rows(tmp_path / "accum"), train_rows(tmp_path / "big")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        # Adam hides a gradient scaled by the accumulation factor; the logged loss and gradient norm do not
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["toy_stat"] == pytest.approx(y["toy_stat"], rel=1e-6)
        assert x["tokens"] == y["tokens"]
    assert ra[-1]["tokens"] == 4 * 8 * SEQ


# --------------------------------------------------------------------------- exact resume

class Killed(Exception):
    """Stands in for a SIGKILL: nothing in the trainer handles it, so nothing is saved."""


class KillableStage(ToyStage):
    def __init__(self, *a, kill_at=None, **k):
        super().__init__(*a, **k)
        self.kill_at = kill_at

    def loss(self, model, batch):
        if batch["step"] == self.kill_at:
            raise Killed
        return super().loss(model, batch)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, optimizer):
    N = 8
    # eval every 2 steps, so last_eval and the eval rows are part of what has to come back; dropout,
    # so the RNG state has to come back too; Muon: both optimizers' moments come back
    common = dict(max_steps=N, save_every=3, eval_every=2, schedule="cosine", warmup_steps=2, optimizer=optimizer)
    full, full_stage, full_summary = fit(tmp_path / "full", model=micro_model(dropout=0.1), **common)

    out = tmp_path / "resumed"
    killed = KillableStage(4, kill_at=4)  # dies inside step index 4 (the 5th), after the step-3 checkpoint
    with pytest.raises(Killed):
        fit(out, stage=killed, model=micro_model(dropout=0.1), **common)
    assert [c.name for c in list_checkpoints(out)] == ["step-00000003"]
    assert max(r["step"] for r in metrics(out)) == 4  # a row (the step-4 eval) was logged past the checkpoint

    # a fresh process: new model with other initial weights, new stage, new Trainer with resume=True
    stage = ToyStage(4)
    tr, stage, summary = fit(out, stage=stage, model=micro_model(seed=99, dropout=0.1), resume=True, **common)
    assert tr.step == N
    wf, wr = weights(full.unwrapped), weights(tr.unwrapped)
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k
    # metrics.jsonl: the killed run's row past its checkpoint was dropped and redone, so the
    # resumed file is the uninterrupted one (timings aside)
    assert untimed(metrics(out)) == untimed(metrics(tmp_path / "full"))
    for key in ("steps", "max_steps", "tokens", "val_loss"):
        assert summary[key] == full_summary[key], key
    # the optimizer's step counters came back too: the final checkpoints hold the same moments
    opt_full = load_optimizer(tmp_path / "full")
    opt_res = load_optimizer(out)
    assert opt_full.keys() == opt_res.keys()
    for k in opt_full:
        if not k.startswith("rng."):
            assert torch.equal(opt_full[k], opt_res[k]), k


def load_optimizer(out):
    from safetensors.torch import load_file

    return load_file(str(list_checkpoints(out)[-1] / "optimizer.safetensors"))


def test_stage_state_round_trips_through_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = dict(max_steps=8, save_every=4, schedule="constant")  # the 4-step reference run sees the same lrs
    killed = KillableStage(4, kill_at=5)
    with pytest.raises(Killed):
        fit(out, stage=killed, **common)
    ckpt = list_checkpoints(out)[-1]
    assert ckpt.name == "step-00000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["stage_state"] == {"loss_calls": 4} and state["step"] == 4 and state["stage"] == "toy"

    # what the stage held when the checkpoint was written: replay the first 4 steps' bookkeeping
    ref = ToyStage(4)
    _, ref, _ = fit(tmp_path / "ref", stage=ref, **{**common, "max_steps": 4})
    assert ref.loss_calls == 4

    fresh = ToyStage(4)
    assert fresh.loss_calls == 0 and torch.equal(fresh.ema, torch.zeros(3))
    _, fresh, _ = fit(out, stage=fresh, resume=True, **common)
    js, tensors = fresh.loaded  # load_state was called once, with what state() returned at step 4
    assert js == {"loss_calls": 4}
    assert set(tensors) == {"ema"} and torch.equal(tensors["ema"], ref.ema)
    # and training went on from that state: 4 restored + 4 new calls, as an uninterrupted run
    assert fresh.loss_calls == 8
    whole = ToyStage(4)
    fit(tmp_path / "whole", stage=whole, **common)
    assert torch.equal(fresh.ema, whole.ema)


# --------------------------------------------------------------------------- schedules

def lr_by_step(out) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in train_rows(out)}


def test_schedules_in_metrics(tmp_path):
    """Row `step` s logs the lr its update used, i.e. the schedule at step index s - 1."""
    common = dict(max_steps=12, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1)
    fit(tmp_path / "cos", schedule="cosine", **common)
    cos = lr_by_step(tmp_path / "cos")
    assert sorted(cos) == list(range(1, 13))
    assert cos[1] == pytest.approx(5e-3) and cos[2] == pytest.approx(1e-2)  # linear warmup
    assert cos[3] == pytest.approx(1e-2)  # cosine starts at the peak
    assert cos[8] == pytest.approx(0.55e-2)  # halfway through the 10 decay steps: (1 + 0.1) / 2
    assert cos[12] == pytest.approx(1e-3 + 0.45e-2 * (1 + math.cos(math.pi * 0.9)))
    assert all(cos[s] > cos[s + 1] for s in range(3, 12))

    fit(tmp_path / "wsd", schedule="wsd", decay_fraction=0.25, **common)
    wsd = lr_by_step(tmp_path / "wsd")
    # decay over the last 25% of 12 steps: indices 9, 10, 11 -> rows 10, 11, 12
    assert [wsd[s] for s in range(3, 11)] == [pytest.approx(1e-2)] * 8
    assert wsd[11] == pytest.approx(1e-2 - 0.9e-2 / 3)
    assert wsd[12] == pytest.approx(1e-2 - 0.9e-2 * 2 / 3)

    fit(tmp_path / "const", schedule="constant", **common)
    const = lr_by_step(tmp_path / "const")
    assert const[1] == pytest.approx(5e-3)
    assert [const[s] for s in range(2, 13)] == [pytest.approx(1e-2)] * 11


# --------------------------------------------------------------------------- time budget

class FakeClock:
    """The trainer's `time` module, replaced: time passes only when the stage says so."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self):
        return self.now


class SlowStage(ToyStage):
    def __init__(self, *a, clock, seconds_per_loss, **k):
        super().__init__(*a, **k)
        self.clock, self.dt = clock, seconds_per_loss

    def loss(self, model, batch):
        self.clock.now += self.dt
        return super().loss(model, batch)


def test_time_budget_stops_the_run(tmp_path, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(time=clock.time))
    out = tmp_path / "budget"
    stage = SlowStage(4, clock=clock, seconds_per_loss=10.0)
    # 1 minute, 10 s a step, a fixed 100-step schedule: the budget, not max_steps, ends the run
    tr, _, summary = fit(out, stage=stage, max_minutes=1.0, max_steps=100, save_every=1000)
    err = capsys.readouterr().err
    assert "time budget of 1 min reached at step 7" in err  # 70 s > 60 s after step 7, not after 6
    assert summary["steps"] == 7 and summary["max_steps"] == 100 and not summary["interrupted"]
    assert summary["seconds"] == pytest.approx(70.0)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 7
    assert [c.name for c in list_checkpoints(out)] == ["step-00000007"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["elapsed_seconds"] == pytest.approx(70.0)
    assert train_rows(out)[-1]["step"] == 7
    assert "val_loss" in summary  # the run was evaluated where the budget stopped it


def test_time_budget_fits_the_schedule(tmp_path, monkeypatch, capsys):
    """--max-minutes without --max-steps: the schedule length is fitted to the measured step time,
    stored, and the run ends at its fitted length inside the budget."""
    clock = FakeClock()
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(time=clock.time))
    out = tmp_path / "fitted"
    stage = SlowStage(4, clock=clock, seconds_per_loss=1.0)
    tr, _, summary = fit(out, stage=stage, max_minutes=0.5, max_steps=None, eval_every=10**6, eval_batches=1)
    err = capsys.readouterr().err
    # every (re)fit plans a schedule that ends inside 30 s at 1 s/step, less a margin
    plans = [int(m) for m in re.findall(r"time budget 0\.5 min: 1\.000s/step -> (\d+) steps", err)]
    assert plans and all(20 <= n <= 30 for n in plans), plans
    assert summary["max_steps"] == plans[-1] and summary["steps"] == summary["max_steps"]
    assert summary["seconds"] <= 30
    assert "reached at step" not in err  # the schedule ended first: the cut-off was not needed
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["max_steps"] == summary["max_steps"]
    # the fitted schedule was used: the cosine decayed to (nearly) its floor by the last step
    rows = train_rows(out)
    assert rows[-1]["step"] == summary["steps"] and rows[-1]["lr"] < 0.15 * 3e-3


# --------------------------------------------------------------------------- checkpoints

def test_keep_last_prunes_old_checkpoints(tmp_path):
    out = tmp_path / "k2"
    fit(out, max_steps=7, save_every=2, keep_last=2)
    # saves at 2, 4, 6 and the final 7; the two newest survive, each complete
    assert [c.name for c in list_checkpoints(out)] == ["step-00000006", "step-00000007"]
    for c in list_checkpoints(out):
        assert {"config.json", "model.safetensors", "trainer_state.json", "optimizer.safetensors"} <= \
               {p.name for p in c.iterdir()}
    out3 = tmp_path / "k3"
    fit(out3, max_steps=7, save_every=2, keep_last=3)
    assert [c.name for c in list_checkpoints(out3)] == ["step-00000004", "step-00000006", "step-00000007"]
    # the published model is the last checkpoint, without the optimizer state
    assert (out / "model.safetensors").exists() and not (out / "optimizer.safetensors").exists()
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 7


class NanStage(ToyStage):
    def __init__(self, *a, nan_at, **k):
        super().__init__(*a, **k)
        self.nan_at = nan_at

    def loss(self, model, batch):
        loss, stats = super().loss(model, batch)
        if batch["step"] == self.nan_at:
            loss = loss * float("nan")
        return loss, stats


def test_non_finite_loss_raises_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    cfg = config(out, max_steps=10, save_every=2)
    model = micro_model()
    tr = Trainer(model, NanStage(4, nan_at=4), cfg)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 4.*last checkpoint is intact"):
        tr.fit()
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    # the step-4 checkpoint is complete and holds the weights the model has now: the step that
    # produced the NaN (index 4) never reached backward or the optimizer
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == 4
    saved = load_model(ckpts[-1]).state_dict()
    for k, v in tr.unwrapped.state_dict().items():
        assert torch.equal(saved[k], v), k
    assert all(torch.isfinite(v).all() for v in saved.values())
    # and it resumes: the run continues from step 4 to the end with a healthy stage
    tr2, _, summary = fit(out, resume=True, max_steps=10, save_every=2)
    assert summary["steps"] == 10


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    from chatsmith.errors import UserError

    out = tmp_path / "run"
    fit(out, max_steps=2)
    with pytest.raises(UserError, match="already holds checkpoints"):
        fit(out, max_steps=2)


# --------------------------------------------------------------------------- Muon

def test_muon_takes_the_block_matrices_and_adamw_the_rest(tmp_path):
    from chatsmith.train.optim import Fp32Muon, MuonAdamW

    tr = Trainer(micro_model(), ToyStage(4), config(tmp_path / "m", optimizer="muon"))
    opt = tr.optimizer
    assert isinstance(opt, MuonAdamW) and isinstance(opt.parts[1], Fp32Muon)  # on a CPU
    names = {id(p): n for n, p in tr.model.named_parameters()}
    muon = {names[id(p)] for g in opt.parts[1].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.parts[0].param_groups for p in g["params"]}
    assert muon and all(".layers." in n and n.endswith("weight") and "norm" not in n for n in muon)
    assert "model.embed_tokens.weight" in adamw and any("norm" in n for n in adamw)
    assert not muon & adamw and len(muon | adamw) == len(list(tr.model.parameters()))


def test_cpu_muon_is_torchs_muon_in_fp32():
    """Fp32Muon (the CPU's Muon) takes the same steps as torch.optim.Muon, whose Newton-Schulz runs
    in bf16: equal to bf16 rounding, on a tall and a wide matrix, over steps that use the momentum."""
    from chatsmith.train.optim import Fp32Muon

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 40)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    a, b = Fp32Muon(ours, **kw), torch.optim.Muon(ref, **kw)
    for _ in range(3):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        a.step(), b.step()
    for p, q, p0 in zip(ours, ref, start):
        moved = (q - p0).norm()
        assert moved > 0.1 and (p - q).norm() < 0.02 * moved, (moved, (p - q).norm())
        assert torch.allclose(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
    # the checkpoint layout is torch's: a state dict of one loads into the other
    b.load_state_dict(a.state_dict())


class RepeatStage(ToyStage):
    """Each row repeats one random token: learnable (the next token is the current one)."""

    def batch(self, step, micro, rank):
        b = super().batch(step, micro, rank)
        x = b["x"][:, :1].expand(-1, SEQ)
        return {"x": x, "y": x, "step": step}


def test_muon_learns_and_refuses_lora(tmp_path):
    fit(tmp_path / "m", stage=RepeatStage(8), optimizer="muon", max_steps=40, lr=1e-2, batch_size=8)
    loss = [r["loss"] for r in train_rows(tmp_path / "m")]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    with pytest.raises(Exception, match="--optimizer muon with --lora-rank"):
        config(tmp_path / "l", optimizer="muon", lora_rank=4)
