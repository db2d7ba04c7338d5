"""Value-drop alerts (ROS-free): V falling by more than ``drop`` within ``window_s`` marks a likely mistake.

RECAP's value function estimates progress as V in [-1, 0] (minus the normalised steps to go); on a failing
episode it falls towards -1 (the paper's Fig. 4). :class:`ValueAlert` watches the stream of (time, V) the live
monitor produces and raises an :class:`Alert` when the newest V lies more than ``drop`` below the highest V of
the last ``window_s`` seconds. After an alert the window restarts at the alerting sample, so one fall raises
one alert, and a further fall of ``drop`` raises the next. :meth:`ValueAlert.reset` forgets everything (a new
episode: the robot was reset and V jumps).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Alert:
    t_s: float        # time of the sample that raised it
    v: float          # its V
    peak_t_s: float   # time of the highest V in the window before it
    peak_v: float     # that V

    @property
    def drop(self) -> float:
        return self.peak_v - self.v

    def text(self) -> str:
        return (f"value dropped {self.drop:.3f} in {self.t_s - self.peak_t_s:.2f} s "
                f"(V {self.peak_v:.3f} -> {self.v:.3f})")


class ValueAlert:
    def __init__(self, drop: float, window_s: float):
        if not (0.0 < drop <= 1.0):
            raise ValueError(f"drop must be in (0, 1] (V lies in [-1, 0]); got {drop!r}")
        if not (window_s > 0.0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be a positive number of seconds; got {window_s!r}")
        self.drop, self.window_s = float(drop), float(window_s)
        self._samples: deque[tuple[float, float]] = deque()  # (t, V), times increasing, V decreasing (a max-queue)

    def reset(self) -> None:
        self._samples.clear()

    def update(self, t_s: float, v: float) -> Alert | None:
        """Feed one sample (times must not go back; a sample older than the newest is refused)."""
        if not math.isfinite(v):
            raise ValueError(f"V must be finite; got {v!r} at t={t_s}")
        if self._samples and t_s < self._samples[-1][0]:
            raise ValueError(f"sample time went back: {t_s} after {self._samples[-1][0]}")
        while self._samples and self._samples[0][0] < t_s - self.window_s:
            self._samples.popleft()
        alert = None
        if self._samples and self._samples[0][1] - v > self.drop:
            alert = Alert(t_s, v, *self._samples[0])
            self._samples.clear()
        while self._samples and self._samples[-1][1] <= v:
            self._samples.pop()
        self._samples.append((t_s, v))
        return alert
