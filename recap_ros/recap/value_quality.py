"""How good a value function is, measured on held-out episodes (ROS-free, numpy).

- Ranking: Spearman's rho between V(o_t) and the true return of each frame, R_t / M (the reward-to-go in V's
  units, not clipped), separately over the frames of successful and of failed episodes. Within a success it
  says whether V rises as the end nears; within failures whether V sees progress that C_fail's clip to -1 hides
  from its targets (with C_fail >= M every failure frame's target is bin 0).
- Calibration: V against its own target, the normalised return clip(R_t / M, -1, 0): mean absolute error, bias
  (mean V - mean target) and, per band of V, the mean target of the frames V put there.

The episodes to hold out are chosen per outcome by :func:`holdout_episodes`.
"""
from __future__ import annotations

import numpy as np

CALIBRATION_EDGES = (-1.0, -0.8, -0.6, -0.4, -0.2, 0.0)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / counts[inv]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation; NaN when either side is constant or has fewer than 2 values."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length (got {x.shape} and {y.shape})")
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def holdout_episodes(episode_index: np.ndarray, success: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Frame mask of held-out episodes: ``fraction`` of the successful and of the failed episodes each
    (rounded, at least one), drawn at random; an outcome with a single episode keeps it for training."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1) (got {fraction})")
    ep, succ = np.asarray(episode_index), np.asarray(success, bool)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for outcome in (True, False):
        eps = np.unique(ep[succ == outcome])
        if fraction == 0.0 or len(eps) < 2:
            continue
        k = min(len(eps) - 1, max(1, round(fraction * len(eps))))
        held += rng.choice(eps, k, replace=False).tolist()
    return np.isin(ep, held)


def report(value: np.ndarray, ret: np.ndarray, max_len: np.ndarray, episode_index: np.ndarray,
           success: np.ndarray) -> dict:
    """Ranking per outcome and calibration of ``value`` on the given frames (all arrays per frame)."""
    v, R = np.asarray(value, np.float64), np.asarray(ret, np.float64)
    true = R / np.asarray(max_len, np.float64)
    target = np.clip(true, -1.0, 0.0)
    ep, succ = np.asarray(episode_index), np.asarray(success, bool)
    out: dict = {}
    for name, m in (("successes", succ), ("failures", ~succ)):
        out[name] = {"episodes": int(len(np.unique(ep[m]))), "frames": int(m.sum()),
                     "spearman": spearman(v[m], true[m]) if m.any() else float("nan")}
    bands = []
    for lo, hi in zip(CALIBRATION_EDGES[:-1], CALIBRATION_EDGES[1:]):
        m = (v >= lo) & ((v < hi) if hi < 0.0 else (v <= hi))
        if m.any():
            bands.append({"v": [lo, hi], "frames": int(m.sum()), "mean_v": float(v[m].mean()),
                          "mean_target": float(target[m].mean())})
    out["calibration"] = {"mae": float(np.abs(v - target).mean()) if len(v) else float("nan"),
                          "bias": float((v - target).mean()) if len(v) else float("nan"), "bands": bands}
    return out


def format_report(rep: dict) -> list[str]:
    """The report as text lines (the CLI prints them and the value bundle's README holds them)."""
    lines = []
    for name in ("successes", "failures"):
        r = rep[name]
        lines.append(f"Spearman rho(V, R_t/M) on held-out {name}: {r['spearman']:.3f} "
                     f"({r['episodes']} episodes, {r['frames']} frames)")
    c = rep["calibration"]
    lines.append(f"calibration of V against clip(R_t/M, -1, 0): mean |error| {c['mae']:.3f}, bias {c['bias']:+.3f}")
    for b in c["bands"]:
        lines.append(f"  V in [{b['v'][0]:+.1f}, {b['v'][1]:+.1f}]: {b['frames']} frames, mean V {b['mean_v']:+.3f}, "
                     f"mean target {b['mean_target']:+.3f}")
    return lines
