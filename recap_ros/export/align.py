"""Resample one recorded episode onto the control clock (ROS-free, numpy only).

The grid is ``start + k / rate`` for every k with a tick <= end (``floor(duration * rate) + 1`` ticks), by
header stamps. Per tick:

- cameras: the index of the latest frame stamped at or before the tick (never a future frame); valid while
  that frame is at most ``camera_s`` old.
- joints (observation.state): linear interpolation between the samples bracketing the tick when they are at
  most ``joint_s`` apart, else the latest sample at or before the tick (``joint_mode='latest'`` always takes
  the latest); valid while the latest sample is at most ``joint_s`` old.
- action: the robot command in effect at the end of the tick's control period, i.e. the latest command
  stamped before ``tick + period`` (the command sent after observing the tick); valid while it is at
  most ``command_s`` old at that moment.
- intervention (``True``: the action came from a human input) and whether the policy drove: from the source
  of the command that gives the action (the mux names it in each JointState command's header.frame_id), so
  the flag describes exactly the command in the ``action`` column; bags whose commands name no source fall
  back to the latest ``/mux/intervention`` / ``/mux/active_source`` value at or before the tick (stamps of
  header-less messages are the bag's receive times). Policy command: the latest one, like the action.

Ticks whose required streams are too old are invalid. Invalid runs at the very start or end of the episode no
longer than ``edge_s`` are trimmed (streams start/stop a little apart); every other invalid run is a gap,
reported with the stream, its time span and the age that broke the tolerance. Nothing is padded: a caller
either skips the episode or keeps the valid segments (:func:`segments`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NS = 1_000_000_000


@dataclass(frozen=True)
class Tolerances:
    camera_s: float = 0.1   # a camera frame older than this at a tick is missing (3 frames at 30 fps)
    joint_s: float = 0.05   # joint samples further apart / older than this are missing (2.5 ticks at 50 Hz)
    command_s: float = 0.1  # the command in effect may be this old (the robot holds the last command)
    edge_s: float = 0.1     # invalid runs at the episode's start/end up to this long are trimmed, not gaps

    def __post_init__(self):
        for k in ("camera_s", "joint_s", "command_s", "edge_s"):
            v = getattr(self, k)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"tolerance {k} must be a finite number >= 0 (got {v!r})")


CAMERA_FRAMES = 3  # default camera tolerance in frame periods of the slowest camera (0.1 s at 30 fps)


def camera_tolerance_s(fps: list[float]) -> float:
    """Default camera tolerance for cameras at these rates: ``CAMERA_FRAMES`` periods of the slowest one, at
    least ``Tolerances.camera_s`` (a 15 fps camera's frame is 67 ms old just before the next: 0.2 s allows two
    late frames). No cameras: ``Tolerances.camera_s``."""
    return max([Tolerances.camera_s] + [CAMERA_FRAMES / f for f in fps])


@dataclass(frozen=True)
class Stream:
    """Time-stamped samples: stamps (n,) int64 ns sorted ascending, values (n, ...) indexable."""
    stamps: np.ndarray
    values: object

    @staticmethod
    def of(stamps, values) -> "Stream":
        s = np.asarray(stamps, dtype=np.int64)
        order = np.argsort(s, kind="stable")
        if not np.all(order == np.arange(len(s))):
            s = s[order]
            values = values[order] if isinstance(values, np.ndarray) else [values[i] for i in order]
        return Stream(s, values)

    def __len__(self) -> int:
        return len(self.stamps)


@dataclass(frozen=True)
class Gap:
    stream: str
    start_s: float      # seconds from the episode start
    end_s: float
    max_age_s: float    # worst sample age inside the run (inf: no sample at all yet)
    tolerance_s: float

    def __str__(self) -> str:
        age = "no sample yet" if not np.isfinite(self.max_age_s) else f"newest sample {self.max_age_s:.3f} s old"
        return (f"{self.stream}: gap at {self.start_s:.2f}..{self.end_s:.2f} s ({age}, "
                f"tolerance {self.tolerance_s:.3f} s)")


@dataclass
class Aligned:
    ticks: np.ndarray                       # (T,) int64 ns, the full grid
    camera_index: dict[str, np.ndarray]     # name -> (T,) index of the frame used (-1: none)
    state: np.ndarray                       # (T, J) float64
    action: np.ndarray                      # (T, J) float64
    policy_action: np.ndarray               # (T, J) float64, NaN while the policy drives or none is known
    intervention: np.ndarray                # (T,) bool
    valid: np.ndarray                       # (T,) bool, after trimming: usable ticks
    gaps: list[Gap] = field(default_factory=list)
    trimmed_start: int = 0                  # ticks trimmed at the start / end (within edge_s)
    trimmed_end: int = 0

    @property
    def num_ticks(self) -> int:
        return len(self.ticks)


def tick_grid(start_ns: int, end_ns: int, rate_hz: float) -> np.ndarray:
    """Ticks start, start + 1/rate, ... up to and including end: floor((end - start) * rate) + 1 ticks."""
    if rate_hz <= 0:
        raise ValueError(f"control rate must be > 0 Hz (got {rate_hz})")
    if end_ns < start_ns:
        raise ValueError(f"episode ends before it starts (start {start_ns} ns, end {end_ns} ns)")
    n = int(np.floor((end_ns - start_ns) * rate_hz / NS + 1e-9)) + 1
    return start_ns + np.rint(np.arange(n) * (NS / rate_hz)).astype(np.int64)


def latest(stream: Stream, ticks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the latest sample at or before each tick (-1: none) and its age in seconds (inf: none)."""
    idx = np.searchsorted(stream.stamps, ticks, side="right") - 1
    age = np.full(len(ticks), np.inf)
    has = idx >= 0
    age[has] = (ticks[has] - stream.stamps[idx[has]]) / NS
    return idx, age


def interpolate(stream: Stream, ticks: np.ndarray, max_gap_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Values at the ticks: linear between bracketing samples at most max_gap_s apart, else the latest.

    Returns (values (T, D) float64 with NaN where no sample precedes the tick, age of the latest sample)."""
    vals = np.asarray(stream.values, dtype=np.float64)
    idx, age = latest(stream, ticks)
    out = np.full((len(ticks),) + vals.shape[1:], np.nan)
    has = idx >= 0
    out[has] = vals[idx[has]]
    nxt = idx + 1
    can = has & (nxt < len(stream.stamps))
    if np.any(can):
        t0 = stream.stamps[idx[can]]
        t1 = stream.stamps[nxt[can]]
        close = (t1 - t0) <= max_gap_s * NS
        sel = np.flatnonzero(can)[close]
        if len(sel):
            a = ((ticks[sel] - stream.stamps[idx[sel]]) / (stream.stamps[idx[sel] + 1] - stream.stamps[idx[sel]]))
            a = a.reshape((-1,) + (1,) * (vals.ndim - 1))
            out[sel] = (1 - a) * vals[idx[sel]] + a * vals[idx[sel] + 1]
    return out, age


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) runs of True in a boolean array."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    d = np.diff(m.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def segments(valid: np.ndarray, min_ticks: int = 1) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) runs of valid ticks at least min_ticks long."""
    return [(lo, hi) for lo, hi in _runs(valid) if hi - lo >= min_ticks]


def _drivers_from_commands(source: Stream, times: np.ndarray, human_inputs: frozenset[str],
                           policy_input: str) -> tuple[np.ndarray, np.ndarray]:
    """(human drove, policy drove) per time, from the source named by the command in effect then."""
    idx, _ = latest(source, times)
    src = np.asarray(source.values, dtype=object)[np.maximum(idx, 0)]
    return (idx >= 0) & np.isin(src, list(human_inputs)), (idx >= 0) & (src == policy_input)


def _drivers_from_state(intervention: Stream | None, active_source: Stream | None, ticks: np.ndarray,
                        policy_input: str) -> tuple[np.ndarray, np.ndarray]:
    """(human drove, policy drove) per tick from the mux's latched state topics (bags without command
    sources)."""
    if intervention is not None and len(intervention):
        iidx, _ = latest(intervention, ticks)
        iv = np.asarray(intervention.values, dtype=bool)
        inter = np.where(iidx >= 0, iv[np.maximum(iidx, 0)], False)
    else:
        inter = np.zeros(len(ticks), dtype=bool)
    if active_source is not None and len(active_source):
        aidx, _ = latest(active_source, ticks)
        names = np.asarray(active_source.values, dtype=object)
        return inter, np.where(aidx >= 0, names[np.maximum(aidx, 0)] == policy_input, ~inter)
    return inter, ~inter


def align_episode(start_ns: int, end_ns: int, rate_hz: float, *, cameras: dict[str, Stream], joints: Stream,
                  command: Stream, policy: Stream | None = None, intervention: Stream | None = None,
                  active_source: Stream | None = None, policy_input: str = "policy",
                  command_source: Stream | None = None, human_inputs: frozenset[str] = frozenset(),
                  tol: Tolerances = Tolerances(), joint_mode: str = "interpolate") -> Aligned:
    """Align one episode's streams on the control clock; see the module docstring for the rules."""
    if joint_mode not in ("interpolate", "latest"):
        raise ValueError(f"joint_mode must be 'interpolate' or 'latest' (got {joint_mode!r})")
    ticks = tick_grid(start_ns, end_ns, rate_hz)
    period_ns = int(round(NS / rate_hz))
    checks: list[tuple[str, np.ndarray, float]] = []  # (stream name, age per tick, tolerance)

    camera_index = {}
    for name, cam in cameras.items():
        idx, age = latest(cam, ticks)
        camera_index[name] = idx
        checks.append((name, age, tol.camera_s))

    state, jage = interpolate(joints, ticks, tol.joint_s if joint_mode == "interpolate" else -1.0)
    checks.append(("joint_states", jage, tol.joint_s))

    action, cage = interpolate(command, ticks + period_ns - 1, -1.0)  # -1: never interpolate, latest only
    checks.append(("command", cage, tol.command_s))

    if command_source is not None and len(command_source):
        inter, policy_drives = _drivers_from_commands(command_source, ticks + period_ns - 1, human_inputs,
                                                      policy_input)
    else:
        inter, policy_drives = _drivers_from_state(intervention, active_source, ticks, policy_input)
    if policy is not None and len(policy):
        pact, page = interpolate(policy, ticks + period_ns - 1, -1.0)
        pact[page > tol.command_s] = np.nan  # the policy was not producing commands then
    else:
        pact = np.full_like(action, np.nan)
    pact[policy_drives] = np.nan

    ok = np.ones(len(ticks), dtype=bool)
    for _, age, limit in checks:
        ok &= age <= limit + 1e-9
    valid = ok.copy()
    trimmed_start = trimmed_end = 0
    runs = _runs(~ok)
    edge = int(np.floor(tol.edge_s * rate_hz + 1e-9))
    if runs and runs[0][0] == 0 and runs[0][1] - runs[0][0] <= edge and runs[0][1] < len(ticks):
        trimmed_start = runs[0][1]
        runs = runs[1:]
    if runs and runs[-1][1] == len(ticks) and runs[-1][1] - runs[-1][0] <= edge:
        trimmed_end = runs[-1][1] - runs[-1][0]
        runs = runs[:-1]
    valid[:trimmed_start] = False
    valid[len(ticks) - trimmed_end:] = False

    gaps = []
    for lo, hi in runs:
        for name, age, limit in checks:
            bad = age[lo:hi] > limit + 1e-9
            if np.any(bad):
                gaps.append(Gap(name, (ticks[lo] - start_ns) / NS, (ticks[hi - 1] - start_ns) / NS,
                                float(np.max(age[lo:hi][bad])), limit))
    return Aligned(ticks=ticks, camera_index=camera_index, state=state, action=action, policy_action=pact,
                   intervention=inter, valid=valid, gaps=gaps, trimmed_start=trimmed_start,
                   trimmed_end=trimmed_end)
