"""Data-parallel training under ``torchrun --nproc-per-node 2`` (gloo, CPU) against one process.

Two ranks with batch B train on the same global batches, with the same random draws, as one process with batch
2 B (recap_ros.recap.trainer), so the two loss curves differ only by float32 rounding: the global batch's loss and
gradient are a mean of 2 B per-sample terms, summed in another order (two rank means of B, then gloo's
all-reduce of the two gradient halves, instead of one mean of 2 B). Each such sum is exact to a few float32 ulps
(eps = 1.2e-7); Adam steps of 3e-3 on parameters that differ by that much keep the losses of an 8-step run within
a few ulps too (measured: at most 3e-7 relative). TOL = 1e-5 relative (~80 ulps) bounds that with room, and is
over 10^3 times smaller than how much the loss changes from one step to the next (other samples, other random
draws: asserted), so a rank training on anything but its share of the global batch fails it.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from test_recap_policy_training import SMALL, frames
from test_recap_value import synthetic_frames

from recap_ros.recap import cli, trainer
from recap_ros.recap.data import save_frames

torch.set_num_threads(1)
TOL = 1e-5
STEPS, BATCH = 8, 4  # per rank; the single process trains with 2 * BATCH
HERE = Path(__file__).resolve().parent
TRAIN = ["--steps", str(STEPS), "--lr", "3e-3", "--warmup", "2", "--threads", "1"]


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a free rendezvous port on localhost); a run still going
    after ``timeout`` s (a hang) is killed and fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s (a rank hangs):\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def script(name: str) -> str:
    """A console script of this environment (beside its python)."""
    return str(Path(sys.executable).parent / name)


def losses(run_dir: Path) -> np.ndarray:
    rows = np.genfromtxt(run_dir / trainer.METRICS, delimiter=",", names=True)
    np.testing.assert_array_equal(rows["step"], np.arange(len(rows)))
    return rows["loss"]


def check_same_curve(one: np.ndarray, ddp: np.ndarray) -> None:
    assert len(one) == len(ddp) == STEPS
    np.testing.assert_allclose(ddp, one, rtol=TOL, atol=0)
    jump = np.abs(np.diff(one)).max()
    assert jump > 1e3 * TOL * np.abs(one).max(), f"the loss barely changes between steps ({one}): a weak comparison"


def only_rank_0_wrote(run_dir: Path) -> None:
    events = list((run_dir / trainer.TENSORBOARD).glob("events.out.tfevents.*"))
    assert len(events) == 1, events


def test_sample_stream_is_epochs_of_permutations_shared_out_by_rank():
    stream = trainer.SampleStream(10, seed=1)
    first, second = stream.take(0, 10), stream.take(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and list(first) != list(second)
    np.testing.assert_array_equal(stream.take(7, 6), np.concatenate([first[7:], second[:3]]))  # across an epoch end
    rng = np.random.default_rng(0)
    shares = [trainer.Batch(first[:6], rng, slice(r * 3, (r + 1) * 3)).idx for r in range(2)]  # 2 ranks x 3
    np.testing.assert_array_equal(np.concatenate(shares), first[:6])


def test_value_ddp_matches_one_process_with_twice_the_batch_and_resumes_on_one(tmp_path):
    save_frames(synthetic_frames(n_eps=4, T=12, size=16), tmp_path / "f.npz")
    common = [str(tmp_path / "f.npz"), "--image-size", "16", "--holdout", "0", *TRAIN]
    r = torchrun(script("recap-train-value"), *common, "--out", str(tmp_path / "ddp"), "--batch-size", str(BATCH),
                 "--checkpoint-every", str(STEPS // 2))
    assert r.returncode == 0, r.stdout[-3000:]
    assert cli.train_value_main([*common, "--out", str(tmp_path / "one"), "--batch-size", str(2 * BATCH)]) == 0
    ddp_run = tmp_path / "ddp.run"
    check_same_curve(losses(tmp_path / "one.run"), losses(ddp_run))
    only_rank_0_wrote(ddp_run)
    # the 2-rank checkpoint of the half-way step continues on one rank with the same global batch
    ckpts = sorted((ddp_run / trainer.CHECKPOINTS).glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000004.pt", "step-00000008.pt"]
    ddp_losses = losses(ddp_run)
    ckpts[-1].unlink()
    assert cli.train_value_main([*common, "--out", str(tmp_path / "ddp"), "--batch-size", str(2 * BATCH),
                                 "--resume"]) == 0
    np.testing.assert_allclose(losses(ddp_run), ddp_losses, rtol=TOL, atol=0)


def test_policy_ddp_matches_one_process_with_twice_the_batch(tmp_path):
    """From scratch without a goal head: the backbone's last layer past its keys/values and prefix.norm get no
    gradient (DDP used to fail at step 2 on them); the run completes and matches one process."""
    import json

    save_frames(frames(n_eps=4, T=12, size=16), tmp_path / "f.npz")
    common = [str(tmp_path / "f.npz"), "--sft", "--model", json.dumps(SMALL), *TRAIN]
    r = torchrun(script("recap-train-policy"), *common, "--out", str(tmp_path / "ddp"), "--batch-size", str(BATCH))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "7 parameter tensors get no gradient" in r.stdout
    assert cli.train_policy_main([*common, "--out", str(tmp_path / "one"), "--batch-size", str(2 * BATCH)]) == 0
    check_same_curve(losses(tmp_path / "one.run"), losses(tmp_path / "ddp.run"))
    only_rank_0_wrote(tmp_path / "ddp.run")


def test_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path):
    save_frames(synthetic_frames(n_eps=2, T=8, size=16), tmp_path / "f.npz")
    r = torchrun(str(HERE / "ddp_nan_worker.py"), str(tmp_path / "f.npz"), "--image-size", "16", "--holdout", "0",
                 "--out", str(tmp_path / "v"), "--batch-size", "2", *TRAIN, timeout=90)
    assert r.returncode != 0
    said = "recap-train-value: value: loss became nan on rank 1 at step 2; all 2 rank(s) stop"
    assert r.stdout.count(said) == 2, r.stdout[-3000:]  # each rank says it
    assert not (tmp_path / "v").exists()  # no bundle from a failed run
