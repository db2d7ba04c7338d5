"""Value-over-an-episode plots in the style of the paper's Fig. 4 (matplotlib, Agg, PNG).

The predicted value V(o_t) is drawn as a line whose segments are coloured by their change: green where the
value rises (progress), red where it drops (a mistake), grey when flat; human-intervention steps are shaded,
and the empirical normalised return is drawn dashed for reference.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection

RISE, DROP, FLAT = "#2ca02c", "#d62728", "#9e9e9e"


def segment_colours(value: np.ndarray, smooth: int = 5, tol: float = 1e-3) -> list[str]:
    """Colour of each of the len(value) - 1 segments from the sign of the smoothed change."""
    v = np.asarray(value, np.float64)
    if smooth > 1 and len(v) >= smooth:
        v = np.convolve(np.pad(v, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"),
                        np.ones(smooth) / smooth, mode="valid")
    d = np.diff(v)
    return [RISE if x > tol else DROP if x < -tol else FLAT for x in d]


def plot_episode_value(value: np.ndarray, path: str | Path, return_normalized: np.ndarray | None = None,
                       intervention: np.ndarray | None = None, rate_hz: float = 50.0, title: str = "",
                       success: bool | None = None) -> Path:
    """Write the value curve of one episode to ``path`` (PNG) and return the path."""
    v = np.asarray(value, np.float64)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"need a 1-D value sequence of at least 2 steps (got shape {v.shape})")
    t = np.arange(len(v)) / rate_hz
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    if intervention is not None:
        iv = np.asarray(intervention, bool)
        edges = np.flatnonzero(np.diff(np.r_[0, iv.astype(int), 0]))
        for k, (a, b) in enumerate(zip(edges[::2], edges[1::2])):
            ax.axvspan(t[a], t[min(b, len(t) - 1)], color="#1f77b4", alpha=0.12,
                       label="human intervention" if k == 0 else None)
    pts = np.stack([t, v], 1)
    ax.add_collection(LineCollection(np.stack([pts[:-1], pts[1:]], 1), colors=segment_colours(v), linewidths=2))
    if return_normalized is not None:
        ax.plot(t, return_normalized, "--", color="black", lw=1, alpha=0.6, label="empirical return")
    ax.plot([], [], color=RISE, lw=2, label="value rises")
    ax.plot([], [], color=DROP, lw=2, label="value drops")
    ax.set_xlim(t[0], t[-1])
    ax.set_ylim(-1.05, 0.05)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("V(o_t) (normalised)")
    outcome = "" if success is None else (" — success" if success else " — failure")
    ax.set_title(f"{title}{outcome}", fontsize=10)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
