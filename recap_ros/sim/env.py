"""SimEnv: the simulated station without ROS, for the sim_robot node and for fast policy roll-outs.

    env = SimEnv(load_station("sim"))
    task = env.reset()                 # or reset(seed=17): deterministic episode
    while not env.status.done:
        images = env.images()          # [base, left_wrist, right_wrist] HxWx3 uint8 RGB
        env.step(command)              # (14,) joint-position command, station order; one control tick
    env.status                         # Status(state, reason, detail)

Time is simulated (steps * control period): a roll-out runs as fast as the CPU allows.
"""
from __future__ import annotations

import numpy as np

from recap_ros.sim.dynamics import JointDynamics
from recap_ros.sim.kinematics import Bimanual
from recap_ros.sim.render import Renderer
from recap_ros.sim.task import Status, Task, sample_task
from recap_ros.station import CAMERA_ROLES, Station


def check_command(command, n_joints: int) -> np.ndarray:
    """A joint-position command as a float array; ValueError naming the problem otherwise."""
    q = np.asarray(command, dtype=float)
    if q.shape != (n_joints,):
        raise ValueError(f"command must have {n_joints} joint positions, got shape {q.shape}")
    bad = np.flatnonzero(~np.isfinite(q))
    if bad.size:
        raise ValueError(f"command has non-finite values at joints {bad.tolist()}: {q[bad].tolist()}")
    return q


class SimEnv:
    def __init__(self, station: Station, seed: int | None = None):
        if station.sim is None:
            raise ValueError(f"{station.file}: robot.type is '{station.robot.type}', SimEnv needs a sim station")
        self.station = station
        self.kin = Bimanual(station.robot, station.file)
        self.dt = station.robot.period_s
        self.timeout_s = station.sim.episode_timeout_s
        self.dynamics = JointDynamics(self.kin.lower, self.kin.upper, self.kin.max_velocity, self.dt)
        self.renderer = Renderer(station, self.kin)
        self.base_seed = station.sim.seed if seed is None else int(seed)
        self.episode = -1
        self.task: Task | None = None
        self.status = Status()
        self.steps = 0
        self._q = self.kin.home()
        self._v = np.zeros_like(self._q)

    def episode_seed(self, episode: int) -> int:
        """Seed of episode k of this env (distinct streams for distinct base seeds)."""
        return int(np.random.default_rng([self.base_seed, episode]).integers(2**31 - 1))

    def reset(self, seed: int | None = None) -> Task:
        """Start the next episode (its seed derived from the base seed, or `seed`); returns the task."""
        self.episode += 1
        self.task = sample_task(self.episode_seed(self.episode) if seed is None else int(seed), self.kin)
        self._q = np.array(self.task.q0)
        self._v = np.zeros_like(self._q)
        self.steps = 0
        self.status = Status()
        return self.task

    @property
    def time_s(self) -> float:
        """Simulated time since the episode started."""
        return self.steps * self.dt

    @property
    def state(self) -> np.ndarray:
        """Joint positions (14, station order); a copy."""
        return self._q.copy()

    @property
    def velocity(self) -> np.ndarray:
        return self._v.copy()

    def tips(self) -> dict[str, np.ndarray]:
        return self.kin.tips(self._q)

    def step(self, command) -> np.ndarray:
        """Apply a joint-position command for one control tick; returns the new state."""
        if self.task is None or self.status.done:
            raise RuntimeError("SimEnv.step() needs a running episode: call reset() first")
        command = check_command(command, len(self._q))
        self._q, self._v = self.dynamics.step(self._q, command)
        self.steps += 1
        self.status = self.task.evaluate(self.tips(), self.time_s, self.timeout_s)
        return self.state

    def render(self, role: str, q: np.ndarray | None = None) -> np.ndarray:
        """Camera image (HxWx3 uint8 RGB) for role base / left_wrist / right_wrist, at q (default: now)."""
        return self.renderer.render(role, self._q if q is None else q, self.task)

    def images(self) -> list[np.ndarray]:
        return [self.render(role) for role in CAMERA_ROLES]
