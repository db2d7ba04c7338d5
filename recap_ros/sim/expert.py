"""Scripted IK expert for the sim task: the demonstrator and the simulated human corrector.

The named arm's tool tip follows a Cartesian reference: up to a safe travel height (when low and away from the
target), across to above the target, then straight down onto the marker, with the tool pointing down. The
reference moves at a bounded speed that eases into each waypoint; damped-least-squares IK (warm-started from
the previous command) turns it into joint positions, rate-limited below the joints' max velocity. The other arm
and both grippers return to the home pose. The decision depends only on the reference, so the expert can take
over from any state (the corrector's case): it re-anchors on the measured pose at reset and when it is pushed
away from its own reference.

ROS-free.
"""
from __future__ import annotations

import numpy as np

from recap_ros.sim.kinematics import Bimanual
from recap_ros.sim.task import KEEP_OUT_MAX, MARKER_HEIGHT, Task

TRAVEL_Z = KEEP_OUT_MAX[2] + 0.05  # tip height while travelling (m)
TOUCH_Z = MARKER_HEIGHT + 0.005     # tip height aimed at on the marker (m)
TRAVEL_SPEED = 0.25                 # m/s
DESCEND_SPEED = 0.15                # m/s
EASE_GAIN = 6.0                     # 1/s: speed <= gain * distance to the waypoint
ABOVE_TOL = 0.02                    # m: xy distance at which the descent starts
LIFT_TOL = 0.02                     # m below TRAVEL_Z at which a far-away tip first goes up
RESYNC_DIST = 0.08                  # m: measured tip this far from the commanded one -> re-anchor
VELOCITY_MARGIN = 0.9               # fraction of max velocity the commands may use
IK_ITERS = 4


class Expert:
    def __init__(self, kin: Bimanual, dt: float):
        self.kin, self.dt = kin, float(dt)
        self.home = kin.home()
        self.max_step = VELOCITY_MARGIN * kin.max_velocity * self.dt
        self.task: Task | None = None
        self._q: np.ndarray | None = None   # last command
        self._p: np.ndarray | None = None   # reference tip of the named arm

    def reset(self, task: Task) -> None:
        """Start on a task; the next act() anchors on the measured state."""
        self.task, self._q, self._p = task, None, None

    def waypoint(self, p: np.ndarray) -> tuple[np.ndarray, float]:
        """The point the named arm's tip heads for from p, and the speed limit on the way."""
        target = self.task.target
        d_xy = float(np.linalg.norm(p[:2] - target[:2]))
        if d_xy > ABOVE_TOL:
            if p[2] < TRAVEL_Z - LIFT_TOL and d_xy > 1.5 * ABOVE_TOL:
                return np.array([p[0], p[1], TRAVEL_Z]), DESCEND_SPEED  # lift clear of the table first
            return np.array([target[0], target[1], TRAVEL_Z]), TRAVEL_SPEED
        return np.array([target[0], target[1], TOUCH_Z]), DESCEND_SPEED

    def act(self, q: np.ndarray) -> np.ndarray:
        """The next joint-position command (station order) given the measured joint positions q."""
        if self.task is None:
            raise RuntimeError("Expert.act() before reset(task)")
        side = self.task.arm
        arm, sl = self.kin.arms[side], self.kin.arm_slice(side)
        if self._q is None or np.linalg.norm(arm.tip(self._q[sl]) - arm.tip(q[sl])) > RESYNC_DIST:
            self._q = np.asarray(q, dtype=float).copy()
            self._p = arm.tip(self._q[sl])
        goal, speed = self.waypoint(self._p)
        delta = goal - self._p
        dist = float(np.linalg.norm(delta))
        step = min(speed, EASE_GAIN * dist) * self.dt
        if dist > 1e-9:
            self._p = self._p + delta * min(1.0, step / dist)
        wanted = self.home.copy()
        wanted[sl], _ = arm.ik(self._p, self._q[sl], iters=IK_ITERS)
        self._q = self._q + np.clip(wanted - self._q, -self.max_step, self.max_step)
        return self._q.copy()


def run_expert_episode(env, seed: int | None = None) -> tuple[object, int]:
    """Roll the expert out on a SimEnv until the episode ends: (final status, steps)."""
    task = env.reset(seed)
    expert = Expert(env.kin, env.dt)
    expert.reset(task)
    while not env.status.done:
        env.step(expert.act(env.state))
    return env.status, env.steps

