"""State / action normalisation with openpi's ``norm_stats.json`` format.

File: ``{"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]}, "actions": {...}}}``.
Modes (bundle config ``normalization``): ``quantile`` (π0.5: (x − q01) / (q99 − q01) · 2 − 1, so the
1–99 % range maps to [−1, 1]) and ``zscore`` (π0: (x − mean) / std). Actions are ABSOLUTE joint
positions in robot units (radians, grippers 0..1), the same space as the state, station joint order.

A joint that never moved in the training data (a gripper held at one value) has a ~0 range; dividing by it
would turn a 1e-4 deviation at run time into a normalised value of ~100, far outside anything the model saw.
So ranges are floored at MIN_SPAN (robot units) and normalised values are clipped to ±NORM_CLIP, identically
in training and at run time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recap_ros.policy.errors import PolicyError

MIN_SPAN = 1e-2  # robot units (rad, gripper fraction): smallest q99 − q01 (and 2·std) used for scaling
NORM_CLIP = 3.0  # normalised values are clipped to ±NORM_CLIP
KEYS = ("state", "actions")
FIELDS = ("mean", "std", "q01", "q99")


@dataclass(frozen=True)
class Stats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def _scale(self, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """(offset, half-range): normalised = (x − offset) / half-range."""
        if mode == "quantile":
            return (self.q01 + self.q99) / 2.0, np.maximum(self.q99 - self.q01, MIN_SPAN) / 2.0
        return self.mean, np.maximum(self.std, MIN_SPAN / 2.0)

    def normalize(self, x: np.ndarray, mode: str) -> np.ndarray:
        offset, half = self._scale(mode)
        return np.clip((x - offset) / half, -NORM_CLIP, NORM_CLIP)

    def unnormalize(self, x: np.ndarray, mode: str) -> np.ndarray:
        offset, half = self._scale(mode)
        return x * half + offset

    def to_json(self) -> dict:
        return {f: getattr(self, f).astype(float).tolist() for f in FIELDS}


def stats_from_array(x: np.ndarray, name: str = "array") -> Stats:
    """Per-dimension mean / std / 1 % / 99 % quantiles of an (N, D) or (N, H, D) array (actions chunks ok)."""
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise PolicyError(f"{name}: need a non-empty (N, D) array to compute statistics, got shape {x.shape}")
    x = x.reshape(-1, x.shape[-1])
    if not np.isfinite(x).all():
        raise PolicyError(f"{name}: contains NaN or inf")
    return Stats(mean=x.mean(0), std=x.std(0), q01=np.quantile(x, 0.01, axis=0), q99=np.quantile(x, 0.99, axis=0))


def compute_norm_stats(state: np.ndarray, actions: np.ndarray) -> dict[str, Stats]:
    """Stats for the bundle from training arrays: state (N, D), actions (N, D) or chunks (N, H, D)."""
    return {"state": stats_from_array(state, "state"), "actions": stats_from_array(actions, "actions")}


def save_norm_stats(stats: dict[str, Stats], path: Path) -> None:
    Path(path).write_text(json.dumps({"norm_stats": {k: stats[k].to_json() for k in KEYS}}, indent=1))


def load_norm_stats(path: Path) -> dict[str, Stats]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PolicyError(f"{path}: norm stats file is missing") from None
    except (OSError, ValueError) as e:
        raise PolicyError(f"{path}: not readable JSON ({e})") from None
    data = data.get("norm_stats", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected {{'norm_stats': {{'state': ..., 'actions': ...}}}}")
    out = {}
    for key in KEYS:
        entry = data.get(key)
        if not isinstance(entry, dict):
            raise PolicyError(f"{path}: norm_stats.{key} is missing")
        arrays = {}
        for f in FIELDS:
            try:
                a = np.asarray(entry[f], np.float64)
            except (KeyError, TypeError, ValueError):
                raise PolicyError(f"{path}: norm_stats.{key}.{f} is missing or not a list of numbers") from None
            if a.ndim != 1 or not np.isfinite(a).all():
                raise PolicyError(f"{path}: norm_stats.{key}.{f} must be a finite 1-D list, got shape {a.shape}")
            arrays[f] = a
        dims = {f: a.shape[0] for f, a in arrays.items()}
        if len(set(dims.values())) != 1:
            raise PolicyError(f"{path}: norm_stats.{key} fields have different lengths {dims}")
        out[key] = Stats(**arrays)
    return out
