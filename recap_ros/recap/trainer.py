"""Shared training loop for the value function and the policy: DDP under ``torchrun``, one process otherwise.

* **Data order** (DistributedSampler-style): epoch e of the sample stream is a permutation of all samples seeded
  by (seed, e), the same on every rank; each step takes the next ``world x batch_size`` samples of the stream (the
  global batch) and rank r trains on its r-th share. N ranks with batch B thus see exactly the samples of one
  process with batch N x B.
* **Randomness**: every random draw of step s (indicator dropout, flow noise and time, augmentation) comes from a
  generator seeded by (seed, s), the same on every rank, drawn for the whole global batch and cut to the rank's rows
  (:class:`Batch`). A run is a function of (seed, step): N ranks draw what one process with N times the batch draws,
  and a resumed run redraws what the uninterrupted one drew, with no generator state to save.
* **Unused parameters**: before DDP wraps the model, one probe forward/backward on two samples finds the
  parameters the loss does not reach (e.g. the policy's last backbone layer past its keys/values and
  ``prefix.norm``, which feed only the goal head); they are frozen for the run (no gradient, no optimizer state),
  so DDP needs no ``find_unused_parameters`` graph search and does not fail at step 2.
* **Non-finite loss**: each step all-reduces every rank's loss before the backward pass; a non-finite one raises
  :class:`FloatingPointError` naming the rank on every rank, so all stop together.
* **Only rank 0 writes** (checkpoints, ``metrics.csv``, TensorBoard events). Checkpoints hold the unwrapped
  model's state dict (no ``module.`` prefix), so they load on any number of ranks; the data position is kept in
  samples, so a run resumed on another number of ranks continues the same stream.

NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import atexit
import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

CHECKPOINTS = "checkpoints"
METRICS = "metrics.csv"
TENSORBOARD = "tensorboard"
KEEP = 2  # newest checkpoints kept (the one before the last survives a crash while the last is written)
COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_s")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1; pick the device (cuda:LOCAL_RANK when present)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        # leave the group before the interpreter tears down: a gloo group destroyed by the C++ static destructors
        # while another rank still works aborted a finished rank ("terminate called without an active exception")
        atexit.register(_leave_group)
    return Dist(rank, world, dev)


def _leave_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_rows(rank: int, batch_size: int) -> slice:
    """This rank's rows of a global batch (``world`` x ``batch_size`` samples, rank by rank)."""
    return slice(rank * batch_size, (rank + 1) * batch_size)


@dataclass(frozen=True)
class Batch:
    """One step's samples: the global batch over all ranks (``samples``) and this rank's ``rows`` of it.

    A loss draws its randomness for the whole global batch from ``rng`` and keeps :meth:`mine` of it."""
    samples: np.ndarray
    rng: np.random.Generator
    rows: slice = field(default_factory=lambda: slice(None))
    step: int = 0

    @property
    def idx(self) -> np.ndarray:
        """This rank's sample indices."""
        return self.samples[self.rows]

    def mine(self, drawn):
        """This rank's rows of something drawn for the whole global batch."""
        return drawn[self.rows]


class SampleStream:
    """Epoch e: a permutation of range(num_samples) seeded by (seed, e); the stream is the epochs back to back."""

    def __init__(self, num_samples: int, seed: int):
        self.n, self.seed, self.epoch, self.perm = num_samples, seed, -1, np.zeros(0, np.int64)

    def _epoch(self, e: int) -> np.ndarray:
        if e != self.epoch:
            self.epoch, self.perm = e, np.random.default_rng((self.seed, e)).permutation(self.n)
        return self.perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Positions start .. start + count - 1 of the stream."""
        pos = np.arange(start, start + count)
        out = np.empty(count, np.int64)
        for e in np.unique(pos // self.n):
            sel = pos // self.n == e
            out[sel] = self._epoch(int(e))[pos[sel] % self.n]
        return out


@dataclass(frozen=True)
class RunDir:
    """Where a run keeps its checkpoints and metrics. ``checkpoint_every`` steps (0: only at the end) a checkpoint
    is written; ``resume`` continues from the newest one (a fresh run removes the old run's files)."""
    path: Path
    checkpoint_every: int = 0
    resume: bool = False

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise ValueError(f"{self.path}: checkpoint_every must be >= 0 steps (got {self.checkpoint_every})")

    @property
    def checkpoints(self) -> Path:
        return Path(self.path) / CHECKPOINTS

    def latest(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step-*.pt"))
        return found[-1] if found else None


def probe_unused(loss_fn: nn.Module, num_samples: int) -> list[str]:
    """Names of the trainable parameters that get no gradient from the loss (one forward/backward on two samples,
    randomness from its own generator); :func:`fit` freezes them."""
    named = [(n, p) for n, p in loss_fn.named_parameters() if p.requires_grad]
    loss = loss_fn(Batch(np.arange(min(2, num_samples)), np.random.default_rng(0)))
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is None]


def rank_losses(loss: torch.Tensor, dist: Dist) -> np.ndarray:
    """Every rank's loss of this step, on every rank (one all-reduce of a vector with one slot per rank)."""
    slots = torch.zeros(dist.world, dtype=torch.float32, device=loss.device)
    slots[dist.rank] = loss.detach().float()
    if dist.world > 1:
        torch.distributed.all_reduce(slots)
    return slots.cpu().numpy()


class Metrics:
    """Rank 0's per-step metrics: ``metrics.csv`` and TensorBoard events (the tensorboard package's writer) in the
    run directory. From ``start`` on: rows of an interrupted run at or past the resumed step are dropped."""

    def __init__(self, path: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        path.mkdir(parents=True, exist_ok=True)
        self.csv_path = path / METRICS
        kept = []
        if start and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) < start]
        self.file = open(self.csv_path, "w", newline="")
        self.csv = csv.DictWriter(self.file, COLUMNS)
        self.csv.writeheader()
        self.csv.writerows(kept)
        self.tb = SummaryWriter(str(path / TENSORBOARD), purge_step=start or None)

    def write(self, row: dict) -> None:
        self.csv.writerow(row)
        self.file.flush()
        for k in COLUMNS[1:]:
            self.tb.add_scalar(k, row[k], row["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _clear(run: RunDir) -> None:
    """A fresh run in ``run.path``: the previous run's checkpoints, metrics and events go."""
    for p in (run.checkpoints.glob("step-*.pt") if run.checkpoints.exists() else []):
        p.unlink()
    (Path(run.path) / METRICS).unlink(missing_ok=True)
    tb = Path(run.path) / TENSORBOARD
    for p in (tb.glob("events.out.tfevents.*") if tb.exists() else []):
        p.unlink()


def save_checkpoint(run: RunDir, state: dict) -> Path:
    """``step-<step>.pt`` written to a temporary file and renamed (a crash never leaves a torn checkpoint); the
    newest :data:`KEEP` are kept."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    path = run.checkpoints / f"step-{state['step']:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(run.checkpoints.glob("step-*.pt"))[:-KEEP]:
        old.unlink()
    return path


def load_checkpoint(run: RunDir, seed: int, desc: str, mmap: bool = False) -> dict:
    path = run.latest()
    if path is None:
        raise FileNotFoundError(f"{desc}: --resume given, but {run.checkpoints} holds no checkpoint (step-*.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if state["seed"] != seed:
        raise ValueError(f"{desc}: checkpoint {path} is of a run with seed {state['seed']}, this run has seed {seed} "
                         "(the data order and every random draw depend on it)")
    return state


def resume_point(run: RunDir | None, seed: int, desc: str) -> tuple[int, int]:
    """(step, samples of the stream consumed before it) where :func:`fit` starts: (0, 0), or with ``run.resume``
    the newest checkpoint's (memory-mapped: the weights are not read). The sample position is not always step x
    global batch: a run resumed with another global batch (ranks x batch size) continues the stream where the
    checkpoint left it."""
    if run is None or not run.resume:
        return 0, 0
    state = load_checkpoint(run, seed, desc, mmap=True)
    return int(state["step"]), int(state["samples"])


def fit(model: nn.Module, num_samples: int, steps: int, batch_size: int, lr: float, dist: Dist, seed: int = 0,
        desc: str = "train", weight_decay: float = 1e-4, warmup: int = 50, progress: bool = True,
        run: RunDir | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss per step (mean over the ranks), the resumed
    run's earlier steps included. ``batch_size`` is per rank.

    ``model(batch)`` (its forward, so DDP can hook it) returns the loss of a :class:`Batch`. ``run``: checkpoints,
    resume and metrics files (none without it)."""
    if num_samples <= 0:
        raise ValueError("no training samples")
    if warmup < 0:
        raise ValueError(f"{desc}: warm-up steps must be >= 0 (got {warmup})")
    model.to(dist.device).train()
    unused = set(probe_unused(model, num_samples))
    frozen = [p for n, p in model.named_parameters() if n in unused]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _loop(model, num_samples, steps, batch_size, lr, dist, seed, desc, weight_decay, warmup, progress,
                     run, sorted(unused))
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _loop(model, num_samples, steps, batch_size, lr, dist, seed, desc, weight_decay, warmup, progress, run,
          frozen: list[str]) -> list[float]:
    module = model
    if dist.world > 1:
        module = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.9 + 0.1

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, position, losses = 0, 0, []
    if run is not None and run.resume:
        state = load_checkpoint(run, seed, desc)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, position, losses = state["step"], state["samples"], list(state["losses"])
    elif run is not None and dist.main:
        _clear(run)
    metrics = Metrics(Path(run.path), start) if run is not None and dist.main else None
    stream = SampleStream(num_samples, seed)
    size = dist.world * batch_size
    rows = rank_rows(dist.rank, batch_size)
    bar = tqdm(range(start, steps), desc=desc, disable=not (progress and dist.main), dynamic_ncols=True,
               initial=start, total=steps)
    if frozen and dist.main and progress:
        bar.write(f"{desc}: {len(frozen)} parameter tensors get no gradient from this loss, frozen for the run: "
                  f"{', '.join(frozen)}")
    t0 = time.perf_counter()
    try:
        for step in bar:
            batch = Batch(stream.take(position, size), np.random.default_rng((seed, step)), rows, step)
            loss = module(batch)
            each = rank_losses(loss, dist)
            bad = np.flatnonzero(~np.isfinite(each))
            if bad.size:
                raise FloatingPointError(f"{desc}: loss became {each[bad[0]]} on rank {bad[0]} at step {step}; all "
                                         f"{dist.world} rank(s) stop")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            rate = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            position += size
            losses.append(float(each.mean()))
            t1 = time.perf_counter()
            row = {"step": step, "loss": losses[-1], "lr": rate, "grad_norm": grad_norm,
                   "samples_per_s": size / max(t1 - t0, 1e-9)}
            t0 = t1
            bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{row['samples_per_s']:.0f}")
            if metrics is not None:
                metrics.write(row)
            last = step + 1 == steps
            if run is not None and dist.main and (last or (run.checkpoint_every and
                                                           (step + 1) % run.checkpoint_every == 0)):
                save_checkpoint(run, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                      "scheduler": sched.state_dict(), "step": step + 1, "samples": position,
                                      "losses": losses, "seed": seed, "world": dist.world})
    finally:
        if metrics is not None:
            metrics.close()
    return losses


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()
