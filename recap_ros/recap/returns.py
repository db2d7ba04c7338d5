"""RECAP rewards, returns and return bins (ROS-free, numpy). Used by export (labels per step) and training.

Paper facts (RECAP.md): r_t = -1 each step; at the last step T: 0 on success, -C_fail on failure; no discount.
R_t = sum_{t' >= t} r_t'. Values are normalised to (-1, 0) by the task's maximum episode length, and the value
function predicts a distribution over B = 201 bins of the normalised return.

Conventions here:
- An episode of T steps has indices 0..T-1; step T-1 is the final step (it carries 0 or -C_fail, not -1).
- normalised return = clip(R_t / max_len, -1, 0), max_len = the task's maximum episode length in steps: a
  success's return is -(steps remaining) / max_len; with C_fail >= max_len every step of a failure sits at -1,
  the bottom of the value range.
- bins are uniform over [-1, 0]: centre of bin b is v(b) = -1 + b / (B - 1); a return maps to its nearest centre.
"""
from __future__ import annotations

import numpy as np

NUM_BINS = 201


def rewards(num_steps: int, success: bool, c_fail: float) -> np.ndarray:
    if num_steps <= 0:
        raise ValueError(f"an episode needs at least one step (got {num_steps})")
    if c_fail < 0:
        raise ValueError(f"C_fail must be >= 0 (got {c_fail})")
    r = np.full(num_steps, -1.0)
    r[-1] = 0.0 if success else -float(c_fail)
    return r


def returns(r: np.ndarray) -> np.ndarray:
    """Undiscounted reward-to-go R_t = sum_{t' >= t} r_t'."""
    return np.cumsum(np.asarray(r, dtype=np.float64)[::-1])[::-1].copy()


def normalise(R: np.ndarray, max_len: int | np.ndarray) -> np.ndarray:
    """clip(R / max_len, -1, 0); ``max_len`` one length or one per step."""
    M = np.asarray(max_len)
    if np.any(M <= 0):
        raise ValueError(f"max episode length must be > 0 (got {M.min()})")
    return np.clip(np.asarray(R, dtype=np.float64) / M, -1.0, 0.0)


def bin_values(num_bins: int = NUM_BINS) -> np.ndarray:
    """v(b): the normalised return each bin stands for."""
    if num_bins < 2:
        raise ValueError(f"need at least 2 bins (got {num_bins})")
    return np.linspace(-1.0, 0.0, num_bins)


def to_bins(R_norm: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    x = np.clip(np.asarray(R_norm, dtype=np.float64), -1.0, 0.0)
    return np.rint((x + 1.0) * (num_bins - 1)).astype(np.int64)


def episode_labels(num_steps: int, success: bool, max_len: int, c_fail: float,
                   num_bins: int = NUM_BINS) -> dict[str, np.ndarray]:
    """All per-step labels of one episode: reward, return, normalised return, return bin."""
    r = rewards(num_steps, success, c_fail)
    R = returns(r)
    Rn = normalise(R, max_len)
    return {"reward": r, "return": R, "return_normalized": Rn, "return_bin": to_bins(Rn, num_bins)}
