"""Training images decoded from the dataset's videos while training runs, instead of all up front (ROS-free).

:class:`DatasetImages` stands in for ``Frames.images`` (N, n_cams, S, S, 3) uint8: indexing it with sample
indices (an integer array or a slice) decodes those frames from the LeRobot dataset's mp4 files (videos kept
open; a seek to the keyframe before each run of nearby frames asked for); a boolean mask selects rows without
decoding (``Frames.subset``). Memory is the batch, not the dataset.

:class:`Prefetched` serves a planned sequence of batches (the trainer's sample order, known before training:
:func:`trainer_plan`) from a ``torch.utils.data.DataLoader`` whose ``workers`` processes decode ahead (``prefetch``
batches each; workers are spawned, not forked: a fork of a process that has decoded video or run torch can inherit a
held lock and hang). A resumed run's plan starts at its checkpoint's step and sample position (which a run resumed
with another global batch, e.g. on another number of ranks, does not reach by step x batch). A request that is a
later planned batch restarts the loader there; one that is not in the plan is decoded in place, so results never
depend on the plan; ``misses`` counts them, ``wait_s`` is the time the training process spent waiting for images
and ``startup_s`` the part of it spent on the first batch of a loader (starting its workers). Decoding is
deterministic, so every path gives bit-identical pixels to decoding whole episodes.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from recap_ros.recap.data import resize_views


def decode_views(ds, ep: int, key: str, ticks, size: int, resize: str) -> np.ndarray:
    """(len(ticks), size, size, 3) uint8: frames ``ticks`` of one episode's video (``ds``: a RecapDataset that
    decodes at the stored size), brought to the model's size by :func:`recap_ros.recap.data.resize_views` in mode
    ``resize``, i.e. :func:`recap_ros.imaging.fit`: the code the policy runtime, the remote client and the value
    monitor shape their views with, so the model trains on the pixels it is served (the video decoder's own scaler
    interpolates differently, and always stretches)."""
    frames = ds.frames(ep, key, ticks)
    return frames if frames.shape[1:3] == (size, size) else resize_views(frames, size, resize)


class DatasetImages:
    """Row i = frame ``tick[i]`` (0-based in its episode) of dataset episode ``episode[i]``, one view per key,
    shaped as :func:`decode_views` shapes it."""

    dtype = np.dtype(np.uint8)
    ndim = 5

    def __init__(self, root: str | Path, keys: list[str], size: int, episode: np.ndarray, tick: np.ndarray,
                 resize: str = "resize"):
        self.root, self.keys, self.size, self.resize = str(root), list(keys), int(size), resize
        self.episode = np.asarray(episode, np.int64).reshape(-1)
        self.tick = np.asarray(tick, np.int64).reshape(-1)
        if self.episode.shape != self.tick.shape:
            raise ValueError(f"{root}: {len(self.episode)} episode indices but {len(self.tick)} frame indices")
        self._ds = None

    def __getstate__(self) -> dict:  # DataLoader workers open the dataset themselves
        return {**self.__dict__, "_ds": None}

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.episode), len(self.keys), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.episode)

    def _dataset(self):
        if self._ds is None:
            from recap_ros.dataset.reader import RecapDataset

            self._ds = RecapDataset(self.root, cache_episodes=0, keep_open=True)
        return self._ds

    def decode(self, rows) -> np.ndarray:
        """(len(rows), n_cams, S, S, 3) uint8 for the given row indices (any order, repeats allowed)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows),) + self.shape[1:], np.uint8)
        ds, eps = self._dataset(), self.episode[rows]
        for ep in np.unique(eps):
            sel = np.flatnonzero(eps == ep)
            for k, key in enumerate(self.keys):
                out[sel, k] = decode_views(ds, int(ep), key, self.tick[rows[sel]], self.size, self.resize)
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.decode(np.arange(len(self))[index])
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {index.shape} for {len(self)} rows")
            return DatasetImages(self.root, self.keys, self.size, self.episode[index], self.tick[index],
                                 self.resize)
        if index.ndim == 0:
            return self.decode(index.reshape(1))[0]
        return self.decode(index)

    def __array__(self, dtype=None, copy=None):
        """Every row decoded (what np.asarray / np.concatenate see)."""
        out = self.decode(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)


class _PlannedBatches:
    """Map-style dataset for the DataLoader: item s = the decoded images of planned batch s."""

    def __init__(self, images: DatasetImages, plan: list[np.ndarray]):
        self.images, self.plan = images, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, s: int) -> np.ndarray:
        return self.images.decode(self.plan[s])


def _as_is(x):
    return x


class Prefetched:
    """``images`` with the batches of ``plan`` decoded ahead by ``workers`` DataLoader processes (0: decoded in
    this process when asked for, which is still the DataLoader path)."""

    def __init__(self, images: DatasetImages, plan, workers: int = 2, prefetch: int = 4):
        if workers < 0:
            raise ValueError(f"--workers must be >= 0 (got {workers})")
        self.images, self.plan = images, [np.asarray(p, np.int64) for p in plan]
        self.workers, self.prefetch = int(workers), prefetch
        self.wait_s, self.startup_s, self.misses, self.served = 0.0, 0.0, 0, 0
        self._start(0)

    def _start(self, pos: int) -> None:
        """Decode the plan from batch ``pos`` on (a new DataLoader and workers)."""
        import torch.utils.data

        loader = torch.utils.data.DataLoader(_PlannedBatches(self.images, self.plan[pos:]), batch_size=None,
                                             shuffle=False, num_workers=self.workers, collate_fn=_as_is,
                                             prefetch_factor=self.prefetch if self.workers else None,
                                             multiprocessing_context="spawn" if self.workers else None)
        self._it, self._next, self._fresh = iter(loader), pos, True

    def _find(self, rows: np.ndarray) -> int | None:
        """The planned batch that equals ``rows``, looking from the next one on first (a resumed run starts
        mid-plan)."""
        for j in [*range(self._next, len(self.plan)), *range(self._next)]:
            if np.array_equal(rows, self.plan[j]):
                return j
        return None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.images.shape

    dtype, ndim = DatasetImages.dtype, DatasetImages.ndim

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        rows = np.asarray(index) if not isinstance(index, slice) else None
        if rows is None or rows.dtype == bool or rows.ndim != 1:
            return self.images[index]
        t0 = time.perf_counter()
        at = self._find(rows) if len(rows) else None
        if at is not None and at != self._next:
            self._start(at)
        if at is not None:
            out = next(self._it)
            self._next += 1
            self.served += 1
        else:
            out = self.images.decode(rows)
            self.misses += 1
        waited = time.perf_counter() - t0
        self.wait_s += waited
        if at is not None and self._fresh:  # the first batch of a loader includes starting its workers
            self.startup_s += waited
            self._fresh = False
        return out

    def __array__(self, dtype=None, copy=None):
        return self.images.__array__(dtype)

    def close(self) -> None:
        """Stop the workers (the iterator's processes end when it is dropped)."""
        self._it = iter(())


def trainer_plan(num_samples: int, steps: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """The sample indices :func:`recap_ros.recap.trainer.fit` gives this rank at steps ``start[0]`` .. ``steps`` - 1
    (its sample stream from position ``start[1]`` on: ``world`` x ``batch_size`` samples a step, this rank's share
    of them). ``start``: :func:`recap_ros.recap.trainer.resume_point`."""
    from recap_ros.recap.trainer import SampleStream, rank_rows

    stream, size = SampleStream(num_samples, seed), world * batch_size
    rows, (step, position) = rank_rows(rank, batch_size), start
    return [stream.take(position + (s - step) * size, size)[rows] for s in range(step, steps)]


def prefetched(frames, steps: int, batch_size: int, seed: int, workers: int, rank: int = 0, world: int = 1,
               prefetch: int = 4, start: tuple[int, int] = (0, 0)):
    """``frames`` with lazily decoded images served by :class:`Prefetched` in the trainer's order from ``start``
    (step, stream position: :func:`recap_ros.recap.trainer.resume_point`); frames whose images are already decoded
    come back as they are."""
    from dataclasses import replace

    if not isinstance(frames.images, DatasetImages):
        return frames
    plan = trainer_plan(len(frames), steps, batch_size, seed, rank, world, start)
    return replace(frames, images=Prefetched(frames.images, plan, workers, prefetch))
