"""Classifier-free guidance β: validation, per-task table, and back-off when guided chunks get aggressive.

β = 1 samples the advantage-conditioned policy alone (no guidance); β > 1 sharpens toward high advantage,
v = v_u + β (v_c − v_u). The paper warns that high β pushes actions to the edge of their support, so only
β ∈ [1.5, 2.5] is allowed besides 1, and :class:`BetaBackoff` steps β down toward 1 when the server's chunk
statistics (peak joint velocity relative to the limit, distance to the joint limits) say the guided chunks
have become too aggressive. It steps back up toward the requested β after a run of calm chunks. ROS-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from recap_ros.station import BETA_MAX, BETA_MIN

BETA_OFF = 1.0


class BetaError(ValueError):
    """An invalid β; the message names the value and where it came from."""


def beta_problem(beta) -> str | None:
    """Why β is not allowed, or None if it is."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        return f"β must be a number, got {type(beta).__name__}"
    if not math.isfinite(beta):
        return f"β must be finite, got {beta}"
    if beta != BETA_OFF and not BETA_MIN <= beta <= BETA_MAX:
        return (f"β = {beta} is not allowed: use {BETA_OFF} (no guidance) or a value in "
                f"[{BETA_MIN}, {BETA_MAX}] (higher β pushes actions to the edge of their support)")
    return None


def validate_beta(beta, source: str) -> float:
    problem = beta_problem(beta)
    if problem:
        raise BetaError(f"{source}: {problem}")
    return float(beta)


def beta_for_task(table: Mapping[str, float], prompt: str, default: float) -> float:
    """β for a task: the per-task table entry for the prompt if there is one, else the default."""
    return float(table.get(prompt.strip(), default))


def step_down(beta: float, step: float) -> float:
    """One back-off step toward 1: below BETA_MIN there is no allowed value, so it goes straight to 1."""
    lower = beta - step
    return lower if lower >= BETA_MIN else BETA_OFF


def step_up(beta: float, step: float, target: float) -> float:
    """One recovery step toward the target (1 jumps to BETA_MIN first)."""
    higher = BETA_MIN if beta < BETA_MIN else beta + step
    return min(higher, target)


@dataclass(frozen=True)
class BackoffConfig:
    max_velocity_ratio: float = 0.9   # peak |Δq|/dt / max_velocity above this = aggressive
    min_limit_margin: float = 0.02    # distance to a joint limit / joint range below this = aggressive
    step: float = 0.25                # β change per back-off / recovery step
    patience: int = 2                 # consecutive aggressive guided chunks before backing off
    recover_after: int = 20           # consecutive calm chunks before stepping back up (0: never)

    def __post_init__(self):
        if self.max_velocity_ratio <= 0 or self.step <= 0 or self.patience < 1 or self.recover_after < 0:
            raise ValueError(f"invalid back-off configuration {self}")


@dataclass(frozen=True)
class BetaChange:
    old: float
    new: float
    reason: str


class BetaBackoff:
    """Tracks the requested β (from the parameter / task table) and the active β after back-off."""

    def __init__(self, config: BackoffConfig, requested: float = BETA_OFF):
        self.config = config
        self.requested = self.active = validate_beta(requested, "requested β")
        self._aggressive = self._calm = 0

    def request(self, beta: float, source: str) -> BetaChange | None:
        """A new requested β (parameter set, new task): active β follows it, counters restart."""
        beta = validate_beta(beta, source)
        old = self.active
        self.requested = self.active = beta
        self._aggressive = self._calm = 0
        return BetaChange(old, beta, f"requested by {source}") if beta != old else None

    def aggressive_reason(self, peak_velocity_ratio: float, min_limit_margin: float) -> str | None:
        c = self.config
        if not math.isfinite(peak_velocity_ratio) or peak_velocity_ratio > c.max_velocity_ratio:
            return f"peak velocity ratio {peak_velocity_ratio:.2f} > {c.max_velocity_ratio:.2f}"
        if not math.isfinite(min_limit_margin) or min_limit_margin < c.min_limit_margin:
            return f"limit margin {min_limit_margin:.3f} < {c.min_limit_margin:.3f}"
        return None

    def observe(self, beta: float, peak_velocity_ratio: float, min_limit_margin: float) -> BetaChange | None:
        """One chunk's stats. Only chunks sampled with the active β count (older ones are still in flight)."""
        if not math.isclose(beta, self.active, abs_tol=1e-6):
            return None
        reason = self.aggressive_reason(peak_velocity_ratio, min_limit_margin)
        c = self.config
        if reason is not None:
            self._calm = 0
            if self.active == BETA_OFF:
                return None
            self._aggressive += 1
            if self._aggressive < c.patience:
                return None
            old, self.active, self._aggressive = self.active, step_down(self.active, c.step), 0
            return BetaChange(old, self.active, f"backing off: {reason} for {c.patience} guided chunks")
        self._aggressive = 0
        if self.active >= self.requested or c.recover_after == 0:
            return None
        self._calm += 1
        if self._calm < c.recover_after:
            return None
        old, self.active, self._calm = self.active, step_up(self.active, c.step, self.requested), 0
        return BetaChange(old, self.active, f"recovering toward β = {self.requested} after "
                                            f"{c.recover_after} calm chunks")
