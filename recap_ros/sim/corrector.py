"""Decision logic of the scripted (simulated human) corrector, ROS-free.

It watches the joint positions during an episode and takes over from the policy when
  * the named arm's tip has made no progress toward the target (PROGRESS_M closer than its best so far)
    for `patience_s`, or
  * a tip, extrapolated LOOKAHEAD_S ahead at its current velocity, would break a keep-out rule
    (below the table, inside the keep-out box, touching a wrong marker) on CONFIRM consecutive samples;
then it drives with the scripted expert until the episode ends.

The prediction extrapolates the joints at the robot's own measured velocity (JointState.velocity) and
takes the tips of that pose. Without a velocity it differences positions by the joint states' own stamps
(when the robot measured them), never by when a callback received them: a burst of messages delivered
together must not look like a fast motion; a sample that is not newer than the previous one, or more than
MAX_GAP_S after it, then makes no prediction.
"""
from __future__ import annotations

import numpy as np

from recap_ros.sim.expert import Expert
from recap_ros.sim.kinematics import Bimanual
from recap_ros.sim.task import SUCCESS_RADIUS, Task

PROGRESS_M = 0.01     # m: a new best distance must beat the old one by this much to count as progress
LOOKAHEAD_S = 0.25    # s: horizon of the keep-out prediction
MAX_GAP_S = 0.1       # s: samples further apart than this are not differenced into a velocity
CONFIRM = 3           # consecutive samples that must predict a violation (60 ms at 50 Hz): one jittery
                      # velocity sample (a command applied twice or skipped on the way) is no reason to grab


class Corrector:
    def __init__(self, kin: Bimanual, dt: float, patience_s: float, lookahead_s: float = LOOKAHEAD_S):
        if patience_s <= 0:
            raise ValueError(f"patience_s must be > 0, got {patience_s}")
        self.kin, self.patience_s, self.lookahead_s = kin, float(patience_s), float(lookahead_s)
        self.expert = Expert(kin, dt)
        self.task: Task | None = None
        self.active = False
        self.reason = ""
        self._best = np.inf
        self._last_progress_t = 0.0
        self._prev: tuple[float, dict[str, np.ndarray]] | None = None
        self._alarms = 0  # consecutive samples predicting a violation

    def start(self, task: Task, t: float) -> None:
        """A new episode began at time t (seconds, any clock that observe() also uses)."""
        self.task, self.active, self.reason = task, False, ""
        self._best, self._last_progress_t, self._prev, self._alarms = np.inf, float(t), None, 0
        self.expert.reset(task)

    def end(self) -> bool:
        """The episode ended; returns whether the corrector was driving (then control goes back)."""
        was_active = self.active
        self.task, self.active, self._prev = None, False, None
        return was_active

    def observe(self, q: np.ndarray, t: float, v: np.ndarray | None = None) -> str | None:
        """Feed a joint state measured at time t (its stamp, seconds), with the measured joint velocities v
        when the robot reports them. Returns the reason when the corrector takes over now."""
        if self.task is None or self.active:
            return None
        tips = self.kin.tips(q)
        dist = float(np.linalg.norm(tips[self.task.arm] - self.task.target))
        if dist < self._best - PROGRESS_M or not np.isfinite(self._best):
            self._best, self._last_progress_t = dist, float(t)
        reason = None
        prev, self._prev = self._prev, (float(t), tips)
        predicted = None  # tip positions lookahead_s ahead; none when about to succeed
        if dist > 2 * SUCCESS_RADIUS:
            if v is not None and np.shape(v) == np.shape(q) and np.all(np.isfinite(v)):
                ahead = np.clip(np.asarray(q) + np.asarray(v) * self.lookahead_s, self.kin.lower, self.kin.upper)
                predicted = self.kin.tips(ahead)
            elif prev is not None and 0 < t - prev[0] <= MAX_GAP_S:
                k = self.lookahead_s / (t - prev[0])
                predicted = {s: p + k * (p - prev[1][s]) for s, p in tips.items()}
        why = self.task.violation(predicted) if predicted is not None else None
        self._alarms = self._alarms + 1 if why else 0
        if self._alarms >= CONFIRM:
            reason = f"about to break keep-out: {why}"
        if reason is None and t - self._last_progress_t > self.patience_s:
            reason = f"no progress toward the {self.task.colour} marker for {t - self._last_progress_t:.1f} s"
        if reason:
            self.active, self.reason = True, reason
        return reason

    def command(self, q: np.ndarray) -> np.ndarray:
        """The corrector's joint-position command while it drives."""
        if not self.active:
            raise RuntimeError("Corrector.command() while the policy drives")
        return self.expert.act(q)
