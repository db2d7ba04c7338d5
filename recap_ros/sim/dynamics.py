"""Joint dynamics of the simulated robot: a joint-position command drives each joint through a first-order lag
whose speed is capped at the joint's max velocity; commands and positions are clamped to the joint limits.

ROS-free.
"""
from __future__ import annotations

import numpy as np

LAG_TAU_S = 0.06  # time constant of the position servo (s)


class JointDynamics:
    def __init__(self, lower, upper, max_velocity, dt: float, tau: float = LAG_TAU_S):
        if dt <= 0 or tau <= 0:
            raise ValueError(f"dt and tau must be > 0 (dt={dt}, tau={tau})")
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        self.max_velocity = np.asarray(max_velocity, dtype=float)
        self.dt, self.tau = float(dt), float(tau)

    def step(self, q: np.ndarray, command: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One control tick: returns (new positions, velocities over the tick)."""
        target = np.clip(command, self.lower, self.upper)
        # exact discretisation of dq/dt = (target - q)/tau over dt, then the velocity cap
        v = (target - q) * (1.0 - np.exp(-self.dt / self.tau)) / self.dt
        v = np.clip(v, -self.max_velocity, self.max_velocity)
        q_new = np.clip(q + v * self.dt, self.lower, self.upper)
        return q_new, (q_new - q) / self.dt
