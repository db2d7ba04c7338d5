"""A recorded session as numbers (ROS-free): one row per recorded episode, and what the report plots.

Rows come from the episode bags' metadata (:mod:`recap_ros.recording.episodes`) or, for a dataset alone, from
its meta/episodes table. Per-tick curves (V, interventions) come from a dataset: the episodes exported from one
bag (its segments, ``recap/source_bag``) are put back on the bag's tick grid, NaN where a gap was left out.
V is the dataset column ``monitor.value`` when the dataset has it (the value monitor's output, recorded live),
else the prediction of a value bundle given to :func:`predict_value_curves`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from recap_ros.dataset.reader import RecapDataset
from recap_ros.export.exporter import SOURCE_BAG
from recap_ros.recording.episodes import EpisodeRecord

VALUE_COLUMN = "monitor.value"


@dataclass(frozen=True)
class EpisodeRow:
    key: str                 # bag directory name
    episode: int
    prompt: str
    outcome: str             # success | failure | unlabelled
    start_s: float           # wall-clock start (s since 1970)
    duration_s: float
    takeovers: int           # human-driven segments
    human_ticks: int         # robot commands from a human
    value: np.ndarray | None = field(default=None, repr=False)         # V per tick (NaN: not in the dataset)
    intervention: np.ndarray | None = field(default=None, repr=False)  # per tick


def rows_from_records(records: list[EpisodeRecord]) -> list[EpisodeRow]:
    return sorted((EpisodeRow(r.path.name, r.episode, r.prompt, r.outcome, r.start_ns / 1e9, r.duration_s,
                              r.interventions, r.intervention_ticks) for r in records),
                  key=lambda r: r.start_s)


def runs(flags: np.ndarray) -> int:
    """Number of runs of True (e.g. human-driven segments in an intervention column)."""
    f = np.asarray(flags, bool).reshape(-1)
    return int(np.count_nonzero(f[1:] & ~f[:-1]) + (1 if len(f) and f[0] else 0))


@dataclass
class Curves:
    """Per bag: V (or None) and interventions on the bag's tick grid."""
    value: dict[str, np.ndarray] = field(default_factory=dict)
    intervention: dict[str, np.ndarray] = field(default_factory=dict)


def _segments(ds: RecapDataset) -> dict[str, list[tuple[int, dict]]]:
    """bag name -> [(dataset episode, its meta)] in tick order."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for ep in range(ds.num_episodes):
        meta = ds.episode_meta(ep)
        out.setdefault(str(meta.get(SOURCE_BAG) or f"episode_{ep}"), []).append((ep, meta))
    return {k: sorted(v, key=lambda x: int(x[1].get("recap/first_tick") or 0)) for k, v in out.items()}


def _on_grid(ds: RecapDataset, segs: list[tuple[int, dict]], per_episode: dict[int, np.ndarray]) -> np.ndarray:
    """Per-segment arrays placed at their first tick on the bag's grid (NaN elsewhere)."""
    ticks = max(int(m.get("recap/episode_ticks") or 0) for _, m in segs)
    ticks = max(ticks, max(int(m.get("recap/first_tick") or 0) + len(per_episode[e]) for e, m in segs))
    grid = np.full(ticks, np.nan)
    for ep, meta in segs:
        lo = int(meta.get("recap/first_tick") or 0)
        grid[lo:lo + len(per_episode[ep])] = per_episode[ep]
    return grid


def dataset_rows(ds: RecapDataset) -> list[EpisodeRow]:
    """One row per source bag of a dataset (its segments together); outcome from recap/success."""
    rows = []
    for bag, segs in _segments(ds).items():
        meta0 = segs[0][1]
        inter = np.concatenate([ds.episode(ep)["intervention"].reshape(-1).astype(bool) for ep, _ in segs])
        ticks = int(meta0.get("recap/episode_ticks") or sum(int(m["length"]) for _, m in segs))
        start_ns = int(meta0.get("recap/start_ns") or 0) - int(meta0.get("recap/first_tick") or 0) * 1e9 / ds.fps
        success = meta0.get("recap/success")
        rows.append(EpisodeRow(bag, segs[0][0], ds.episode(segs[0][0])["task"],
                               "unlabelled" if success is None else ("success" if success else "failure"),
                               start_ns / 1e9, ticks / ds.fps, sum(runs(ds.episode(ep)["intervention"])
                                                                   for ep, _ in segs), int(inter.sum())))
    return sorted(rows, key=lambda r: r.start_s)


def dataset_curves(ds: RecapDataset) -> Curves:
    """Interventions of every bag, and V where the dataset has the value monitor's column with values in it."""
    curves = Curves()
    has_value = VALUE_COLUMN in ds.features
    for bag, segs in _segments(ds).items():
        eps = {ep: ds.episode(ep) for ep, _ in segs}
        curves.intervention[bag] = _on_grid(ds, segs, {e: d["intervention"].reshape(-1).astype(float)
                                                       for e, d in eps.items()}) > 0.5
        if has_value:
            v = _on_grid(ds, segs, {e: d[VALUE_COLUMN].reshape(-1).astype(float) for e, d in eps.items()})
            if np.isfinite(v).sum() >= 2:  # NaN throughout: recorded without a running value monitor
                curves.value[bag] = v
    return curves


def predict_value_curves(dataset: str | Path, bundle: str | Path, stride: int = 1) -> dict[str, np.ndarray]:
    """V of a value bundle on every ``stride``-th frame of each dataset episode (and its last), interpolated in
    between, on the bag's tick grid."""
    from recap_ros.recap.dataset_io import load_frames
    from recap_ros.recap.value import load_value, predict_values

    model = load_value(bundle)
    frames = load_frames(dataset, model.cfg.backbone.image_size, stride=stride, progress=False)
    v = predict_values(model, frames.images, frames.state, frames.prompts, frames.task_index)
    ds = RecapDataset(dataset)
    out = {}
    for bag, segs in _segments(ds).items():
        per = {}
        for ep, meta in segs:
            m = frames.episode_index == ep
            per[ep] = np.interp(np.arange(int(meta["length"])), frames.frame_index[m], v[m])
        out[bag] = _on_grid(ds, segs, per)
    return out


def with_curves(rows: list[EpisodeRow], curves: Curves) -> list[EpisodeRow]:
    return [replace(r, value=curves.value.get(r.key), intervention=curves.intervention.get(r.key)) for r in rows]


@dataclass(frozen=True)
class SessionStats:
    episodes: int
    successes: int
    failures: int
    span_s: float            # first start to last end
    recorded_s: float        # sum of the episodes' durations
    takeovers: int
    human_ticks: int
    helped: int              # episodes with a takeover

    @property
    def success_rate(self) -> float:
        labelled = self.successes + self.failures
        return self.successes / labelled if labelled else float("nan")

    @property
    def successes_per_hour(self) -> float:
        return self.successes / (self.span_s / 3600) if self.span_s > 0 else float("nan")


def session_stats(rows: list[EpisodeRow]) -> SessionStats:
    span = max((r.start_s + r.duration_s for r in rows), default=0.0) - min((r.start_s for r in rows), default=0.0)
    return SessionStats(len(rows), sum(r.outcome == "success" for r in rows),
                        sum(r.outcome == "failure" for r in rows), span, sum(r.duration_s for r in rows),
                        sum(r.takeovers for r in rows), sum(r.human_ticks for r in rows),
                        sum(r.takeovers > 0 for r in rows))


def over_time(rows: list[EpisodeRow], window: int = 10) -> dict[str, np.ndarray]:
    """For the session plot, at each labelled episode's end: minutes since the session started, the success
    rate so far, over the last ``window`` labelled episodes, and successes per hour so far."""
    lab = [r for r in sorted(rows, key=lambda r: r.start_s + r.duration_s) if r.outcome != "unlabelled"]
    if not lab:
        return {k: np.zeros(0) for k in ("minutes", "rate", "rolling", "per_hour")}
    t0 = min(r.start_s for r in rows)
    end = np.array([r.start_s + r.duration_s - t0 for r in lab])
    ok = np.array([r.outcome == "success" for r in lab], float)
    n = np.arange(1, len(ok) + 1)
    cum = np.cumsum(ok)
    rolling = np.array([ok[max(0, i + 1 - window):i + 1].mean() for i in range(len(ok))])
    return {"minutes": end / 60, "rate": cum / n, "rolling": rolling,
            "per_hour": np.divide(cum * 3600, end, out=np.full(len(end), np.nan), where=end > 0)}
