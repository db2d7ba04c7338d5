"""Joint position, velocity and acceleration limits: the one limiter in front of the robot (ROS-free).

Both command paths use it: the policy's chunk executor (:mod:`recap_ros.control.stitching`, inside
policy_server's tick process) and the teleop mux (:mod:`recap_ros.control.mux`, the last hop to the robot).
:class:`Limiter` moves its output from the previous output toward a target, each joint on its own:

* **position**: the target is clamped into ``[lower, upper]``;
* **velocity**: a step is at most ``max_velocity * dt``, where ``dt`` is the time since the previous output and
  never more than one control period, so a late or missed tick never adds up to a multi-tick step;
* **acceleration**: a step that speeds a joint up or reverses it differs from the previous step by at most
  ``max_acceleration * period**2`` (steps are control-period setpoints); slowing down toward standstill is
  never limited, so a hold stops at once (the ros2_control convention) and the output never overshoots.

The output always lies between the previous output and the (clamped) target, so it never leaves the position
limits and converges without oscillating. A target that is within all limits is returned bit for bit (a source
that respects the limits is forwarded unchanged: ``a + (b - a)`` need not equal ``b`` in floating point).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT_TOL = 1e-12  # a step this close to the wanted one counts as unlimited (the target is returned itself)


@dataclass(frozen=True)
class JointLimits:
    lower: np.ndarray
    upper: np.ndarray
    max_velocity: np.ndarray      # per joint, per second
    max_acceleration: np.ndarray  # per joint, per second²
    dt: float                     # control period (s)

    @classmethod
    def from_robot(cls, robot) -> "JointLimits":
        """From a :class:`recap_ros.station.Robot` (joint, velocity and acceleration limits, control period)."""
        def arr(values):
            return np.asarray(values, dtype=np.float64)

        return cls(arr(robot.lower), arr(robot.upper), arr(robot.max_velocity), arr(robot.max_acceleration),
                   float(robot.period_s))

    @property
    def n(self) -> int:
        return len(self.lower)

    @property
    def max_step(self) -> np.ndarray:
        """Largest allowed per-tick change of each joint."""
        return self.max_velocity * self.dt

    @property
    def max_step_change(self) -> np.ndarray:
        """Largest allowed change between consecutive steps of a joint that speeds up or reverses."""
        return self.max_acceleration * self.dt ** 2

    def clamp(self, q: np.ndarray) -> np.ndarray:
        return np.clip(q, self.lower, self.upper)


class Limiter:
    """The output of one command stream: the previous output and step, and the limited next output.

    Not thread-safe (one owner). :meth:`reset` must give a start position before the first :meth:`step`."""

    def __init__(self, limits: JointLimits):
        self.limits = limits
        self.position: np.ndarray | None = None
        self.last_step = np.zeros(limits.n)

    def reset(self, q) -> None:
        """Start (again) at rest at ``q`` (clamped into the limits): the robot's measured position."""
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (self.limits.n,) or not np.all(np.isfinite(q)):
            raise ValueError(f"start position must be {self.limits.n} finite values, got {q.tolist()}")
        self.position = self.limits.clamp(q)
        self.last_step = np.zeros(self.limits.n)

    def step(self, target, dt: float | None = None) -> np.ndarray:
        """The next output toward ``target``, ``dt`` seconds after the previous one (default and at most one
        control period). Raises ValueError for a target that is not ``n`` finite values (nothing is changed)."""
        lim = self.limits
        if self.position is None:
            raise ValueError("no start position: reset() first")
        target = np.asarray(target, dtype=np.float64)
        if target.shape != (lim.n,) or not np.all(np.isfinite(target)):
            raise ValueError(f"target must be {lim.n} finite values, got {target.tolist()}")
        dt = lim.dt if dt is None else min(max(dt, 0.0), lim.dt)
        target = lim.clamp(target)
        want = target - self.position
        reach = lim.max_velocity * dt
        step = np.clip(want, -reach, reach)
        change, prev = lim.max_step_change, self.last_step
        lo = np.where(prev > 0, np.minimum(prev - change, 0.0), prev - change)  # braking toward 0 is free
        hi = np.where(prev < 0, np.maximum(prev + change, 0.0), prev + change)
        step = np.clip(step, lo, hi)
        out = np.where(np.abs(step - want) <= EXACT_TOL, target, self.position + step)
        self.last_step = out - self.position
        self.position = out
        return out.copy()
