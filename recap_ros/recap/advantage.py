"""RECAP advantages, per-task thresholds and the improvement indicator I_t (ROS-free, numpy).

Everything is in the value function's units: rewards and returns divided by the episode's own maximum length M
(its task's, stored per episode by the export and carried per frame in :class:`recap_ros.recap.data.Frames`), so
a reward r_t enters as r_t / M. ``max_len`` below is one M per frame (or one for all frames).

- Post-training (N-step, N = 50):  A_t = sum_{t'=t}^{t+N-1} r_t' / M + V(o_{t+N}) - V(o_t),
  with V(o_{t+N}) = 0 when t + N runs past the episode end (the episode is over; the reward sum is truncated
  at the last step, which carries 0 on success and -C_fail on failure). The reward sum is computed from the
  reward-to-go as R_t - R_{t+N}, so subsampled frames work.
- Pre-training (whole episode, Monte-Carlo): A_t = sum_{t'>=t} r_t' / M - V(o_t) = R_t / M - V(o_t), not
  clipped (one value call per sample); see :func:`episode_advantage`.
- Threshold: eps_l per task is the (1 - positive_fraction) quantile of that task's advantages over the
  autonomous (non-intervention) steps, estimated on at most ``max_samples`` of them (the paper uses ~10k), so
  about ``positive_fraction`` of them get I_t = 1 (30 % pre-training, ~40 % fine-tuning).
- I_t = 1(A_t > eps_l); human-intervention steps are always positive.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

N_STEP = 50
PRETRAIN_POSITIVE_FRACTION = 0.30
FINETUNE_POSITIVE_FRACTION = 0.40


def _episode_slices(episode_index: np.ndarray) -> list[slice]:
    """Contiguous runs of one episode index (frames of an episode are stored together, in order)."""
    ep = np.asarray(episode_index)
    if ep.ndim != 1:
        raise ValueError(f"episode_index must be 1-D (got shape {ep.shape})")
    if ep.size == 0:
        return []
    cuts = np.flatnonzero(ep[1:] != ep[:-1]) + 1
    bounds = np.concatenate([[0], cuts, [ep.size]])
    slices = [slice(int(a), int(b)) for a, b in pairwise(bounds)]
    seen = ep[bounds[:-1]]
    if len(np.unique(seen)) != len(seen):
        raise ValueError("frames of one episode are not contiguous in episode_index")
    return slices


def _lengths(max_len: int | np.ndarray, shape: tuple) -> np.ndarray:
    """M per frame as float64 (one given length broadcast to every frame)."""
    M = np.asarray(max_len, np.float64)
    if M.ndim and M.shape != shape:
        raise ValueError(f"max_len has shape {M.shape}, the frames {shape}")
    if np.any(M <= 0):
        raise ValueError(f"max episode length must be > 0 (got {M.min():g})")
    return np.broadcast_to(M, shape)


def n_step_advantage(ret: np.ndarray, value: np.ndarray, episode_index: np.ndarray, frame_index: np.ndarray,
                     max_len: int | np.ndarray, n: int = N_STEP) -> np.ndarray:
    """A_t = sum_{t'=t}^{t+n-1} r_t'/M + V(o_{t+n}) - V(o_t) per episode, from the reward-to-go R:
    the reward sum is (R_t - R_{t+n}) / M, and R and V past the episode's last frame are 0.

    Frames may be a subsample of the ticks (``frame_index`` = tick). When tick t + n is not a frame, the
    bootstrap uses the last frame before it, t + k (k < n): A_t = (R_t - R_{t+k}) / M + V(o_{t+k}) - V(o_t),
    the same estimator with the horizon the data has; with a stride dividing n it is exactly the n-step form."""
    ret, value = np.asarray(ret, np.float64), np.asarray(value, np.float64)
    fi = np.asarray(frame_index, np.int64)
    if ret.shape != value.shape or ret.ndim != 1 or fi.shape != ret.shape:
        raise ValueError(f"return {ret.shape}, value {value.shape} and frame_index {fi.shape} must be equal 1-D")
    if n < 1:
        raise ValueError(f"N must be >= 1 (got {n})")
    M = _lengths(max_len, ret.shape)
    out = np.empty_like(value)
    for s in _episode_slices(episode_index):
        t, R, v, m = fi[s], ret[s], value[s], M[s]
        if np.any(np.diff(t) <= 0):
            raise ValueError(f"frame_index of episode {np.asarray(episode_index)[s.start]} is not increasing")
        inside = t + n <= t[-1]
        boot = np.searchsorted(t, t + n, side="right") - 1   # last frame at or before t + n
        out[s] = np.where(inside, (R - R[boot]) / m + v[boot], R / m) - v
    return out


def episode_advantage(ret: np.ndarray, value: np.ndarray, max_len: int | np.ndarray) -> np.ndarray:
    """Pre-training form (the paper's): A_t = sum_{t'>=t} r_t' / M - V(o_t) = R_t / M - V(o_t), R_t the
    undiscounted reward-to-go to the episode's end and M the episode's own maximum length.

    Where it differs from the fine-tuning form (:func:`n_step_advantage`): no bootstrap V(o_{t+N}), the whole
    remaining episode's rewards instead (Monte-Carlo: one value call per sample rather than two, which is what
    the paper gives for the pre-training form; more variance than the N-step form), and the reward sum is not
    clipped. The clip to [-1, 0] belongs to V's targets (the bins); here it would flatten every failure frame to
    -1 - V. Unclipped, a failure frame's A includes -C_fail / M and its remaining steps, so it ranks below the
    same frame of a success. The N-step form never clips either: its reward sum is (R_t - R_{t+N}) / M, at most
    N steps plus C_fail."""
    R, v = np.asarray(ret, np.float64), np.asarray(value, np.float64)
    if R.shape != v.shape:
        raise ValueError(f"return {R.shape} and value {v.shape} shapes differ")
    return R / _lengths(max_len, R.shape) - v


def task_thresholds(advantage: np.ndarray, task_index: np.ndarray, positive_fraction: float,
                    intervention: np.ndarray | None = None, max_samples: int = 10_000,
                    seed: int = 0) -> dict[int, float]:
    """eps_l per task: the (1 - positive_fraction) quantile of the task's autonomous-step advantages."""
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive fraction must be in (0, 1) (got {positive_fraction})")
    A, task = np.asarray(advantage, np.float64), np.asarray(task_index)
    if A.shape != task.shape:
        raise ValueError(f"advantage {A.shape} and task_index {task.shape} shapes differ")
    auto = np.ones(A.shape, bool) if intervention is None else ~np.asarray(intervention, bool)
    rng = np.random.default_rng(seed)
    eps: dict[int, float] = {}
    for k in np.unique(task):
        a = A[(task == k) & auto]
        if a.size == 0:  # every step of this task was a human correction: all positive anyway
            eps[int(k)] = float("inf")
            continue
        if a.size > max_samples:
            a = rng.choice(a, max_samples, replace=False)
        eps[int(k)] = float(np.quantile(a, 1.0 - positive_fraction))
    return eps


def indicators(advantage: np.ndarray, task_index: np.ndarray, thresholds: dict[int, float],
               intervention: np.ndarray | None = None) -> np.ndarray:
    """I_t = 1(A_t > eps_l), forced True on human-intervention steps."""
    A, task = np.asarray(advantage, np.float64), np.asarray(task_index)
    missing = set(np.unique(task).tolist()) - set(thresholds)
    if missing:
        raise ValueError(f"no threshold for task index(es) {sorted(missing)}")
    eps = np.array([thresholds[int(k)] for k in task], np.float64) if A.size else np.zeros(0)
    out = A > eps
    if intervention is not None:
        out |= np.asarray(intervention, bool)
    return out


@dataclass(frozen=True)
class Labels:
    advantage: np.ndarray   # (N,) float64
    indicator: np.ndarray   # (N,) bool
    thresholds: dict[int, float]
    mode: str

    def positive_fraction(self, mask: np.ndarray | None = None) -> float:
        ind = self.indicator if mask is None else self.indicator[np.asarray(mask, bool)]
        return float(ind.mean()) if ind.size else float("nan")


def label(value: np.ndarray, episode_index: np.ndarray, task_index: np.ndarray, intervention: np.ndarray,
          max_len: int | np.ndarray, mode: str, positive_fraction: float | None = None, ret: np.ndarray | None = None,
          frame_index: np.ndarray | None = None, n: int = N_STEP, seed: int = 0) -> Labels:
    """Advantages + thresholds + indicators for a whole dataset. mode: 'finetune' (N-step) or 'pretrain'.
    ``ret``: the unnormalised reward-to-go per frame; ``max_len``: each frame's episode M (``Frames.max_len``)."""
    if mode not in ("finetune", "pretrain"):
        raise ValueError(f"unknown advantage mode '{mode}' (finetune, pretrain)")
    if ret is None:
        raise ValueError(f"{mode} advantages need the per-step returns")
    if mode == "finetune":
        if frame_index is None:
            raise ValueError("finetune (N-step) advantages need the frame indices")
        A = n_step_advantage(ret, value, episode_index, frame_index, max_len, n)
        frac = FINETUNE_POSITIVE_FRACTION if positive_fraction is None else positive_fraction
    else:
        A = episode_advantage(ret, value, max_len)
        frac = PRETRAIN_POSITIVE_FRACTION if positive_fraction is None else positive_fraction
    eps = task_thresholds(A, task_index, frac, intervention, seed=seed)
    return Labels(A, indicators(A, task_index, eps, intervention), eps, mode)

