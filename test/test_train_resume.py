"""Resumable training runs: an interrupted run resumed from its last checkpoint reproduces the uninterrupted run
(losses, learning rates, final weights); metrics as CSV and as TensorBoard events read back by TensorBoard's own
reader; atomic checkpoints, the newest two kept; clear errors."""
import csv
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_recap_policy_training import SMALL, frames
from test_recap_value import synthetic_frames

from recap_ros.recap import train_policy as tp
from recap_ros.recap import train_value as tv
from recap_ros.recap import trainer
from recap_ros.recap.trainer import RunDir

torch.set_num_threads(1)
STEPS, EVERY, STOP = 6, 2, 5  # the interrupted run stops during step 5: its last checkpoint is after step 3
LR, WARMUP = 1e-3, 2


def hand_lr(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine from LR down to 0.1 LR over the remaining steps."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP))))


def value_run(f, run):
    return tv.train_value(f, steps=STEPS, batch_size=8, lr=LR, warmup=WARMUP, progress=False, device="cpu",
                          backbone_overrides={"depth": 1}, run=run)


def policy_run(f, run):
    return tp.train_policy(f, None, sft=True, steps=STEPS, batch_size=8, lr=LR, warmup=WARMUP, progress=False,
                           device="cpu", model_overrides=SMALL, run=run)


def interrupt_at(monkeypatch, loss_class, step: int) -> None:
    real = loss_class.forward

    def forward(self, batch):
        if batch.step == step:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(loss_class, "forward", forward)


def csv_rows(run_dir):
    with open(run_dir / trainer.METRICS, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind", ["value", "policy"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, kind):
    train, data, loss_class = ((value_run, synthetic_frames(n_eps=4, T=12, size=16), tv._ValueLoss)
                               if kind == "value" else (policy_run, frames(n_eps=4, T=12, size=16), tp._PolicyLoss))
    straight, straight_losses = train(data, RunDir(tmp_path / "a"))
    with monkeypatch.context() as m:
        interrupt_at(m, loss_class, STOP)
        with pytest.raises(KeyboardInterrupt):
            train(data, RunDir(tmp_path / "b", checkpoint_every=EVERY))
    assert [r["step"] for r in csv_rows(tmp_path / "b")] == ["0", "1", "2", "3", "4"]  # step 4 is past the checkpoint
    ckpts = sorted(p.name for p in (tmp_path / "b" / trainer.CHECKPOINTS).iterdir())
    assert ckpts == ["step-00000002.pt", "step-00000004.pt"]  # renamed into place: no temporary file left
    resumed, resumed_losses = train(data, RunDir(tmp_path / "b", checkpoint_every=EVERY, resume=True))

    np.testing.assert_array_equal(resumed_losses, straight_losses)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    rows = csv_rows(tmp_path / "b")
    assert [int(r["step"]) for r in rows] == list(range(STEPS))  # the interrupted run's step 4 row was replaced
    np.testing.assert_allclose([float(r["loss"]) for r in rows], straight_losses, rtol=1e-12)
    np.testing.assert_allclose([float(r["lr"]) for r in rows], [hand_lr(s) for s in range(STEPS)], rtol=1e-12)
    assert all(float(r["samples_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    # the newest two checkpoints (named by steps done): the one resumed from and the final one
    ckpts = sorted(p.name for p in (tmp_path / "b" / trainer.CHECKPOINTS).iterdir())
    assert ckpts == ["step-00000004.pt", "step-00000006.pt"]

    events = EventAccumulator(str(tmp_path / "b" / trainer.TENSORBOARD))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(STEPS))  # the purged step 4 of the interrupted run is gone
    np.testing.assert_allclose([e.value for e in loss], straight_losses, rtol=1e-6)  # float32 in the event file
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "grad_norm", "samples_per_s"}


def test_resume_errors_name_the_run(tmp_path):
    f = synthetic_frames(n_eps=2, T=8, size=16)
    with pytest.raises(FileNotFoundError, match=r"value: --resume given, but .*checkpoints holds no checkpoint"):
        value_run(f, RunDir(tmp_path / "r", resume=True))
    value_run(f, RunDir(tmp_path / "r"))
    with pytest.raises(ValueError, match="of a run with seed 0, this run has seed 3"):
        tv.train_value(f, steps=STEPS, batch_size=8, seed=3, progress=False, device="cpu",
                       backbone_overrides={"depth": 1}, run=RunDir(tmp_path / "r", resume=True))
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0 steps \\(got -1\\)"):
        RunDir(tmp_path / "r", checkpoint_every=-1)
