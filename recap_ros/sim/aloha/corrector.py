"""When the scripted expert drives the ALOHA sim, ROS-free.

The expert (:class:`recap_ros.sim.aloha.expert.AlohaExpert`) reads the MuJoCo physics, so it runs inside the
``aloha_sim`` node's process. :class:`ExpertDriver` decides, once per control tick after the physics step,
whether it drives:

* ``always``: from each episode's start (demonstrations, expert evaluation, CI);
* otherwise as the simulated human corrector: it takes over when the episode's highest reward stage
  (gym-aloha's 0..4) has not risen for ``patience_s``, and then drives until the episode ends.

The expert is reset at every episode start even while it does not drive, so a take-over mid-episode acts from
whatever state the policy left the robot in.
"""
from __future__ import annotations

import numpy as np


class ExpertDriver:
    def __init__(self, expert, patience_s: float, always: bool = False):
        if patience_s <= 0:
            raise ValueError(f"patience_s must be > 0, got {patience_s}")
        self.expert, self.patience_s, self.always = expert, float(patience_s), bool(always)
        self.active = False
        self.running = False
        self.reason = ""
        self._best = 0
        self._progress_t = 0.0

    def start(self, physics, task: str, seed: int, t: float) -> None:
        """An episode of ``task`` / ``seed`` began at sim time t (seconds)."""
        self.expert.reset(physics, task, seed)
        self.running, self.active = True, self.always
        self.reason = "scripted expert drives every episode" if self.always else ""
        self._best, self._progress_t = 0, float(t)

    def end(self) -> bool:
        """The episode ended; returns whether the expert was driving."""
        was_active = self.active
        self.running = self.active = False
        return was_active

    def observe(self, reward: int, t: float) -> str | None:
        """The reward stage after the step at sim time t; returns the reason when the expert takes over now."""
        if not self.running or self.active:
            return None
        if reward > self._best:
            self._best, self._progress_t = int(reward), float(t)
            return None
        if t - self._progress_t >= self.patience_s:
            self.active = True
            self.reason = f"no new reward stage for {t - self._progress_t:.1f} s (highest {self._best})"
            return self.reason
        return None

    def command(self, physics) -> np.ndarray:
        """The expert's joint-position targets (14, station order) while it drives."""
        if not self.active:
            raise RuntimeError("ExpertDriver.command() while the expert does not drive")
        return np.asarray(self.expert.act(physics), dtype=float)
