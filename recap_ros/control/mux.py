"""Joint-space teleop-override multiplexer: which source drives the robot, and what is sent each tick.

ROS-free arbitration core of the ``teleop_mux`` node (which only wires topics and timers to it). Times are
seconds on one monotonic clock supplied by the caller; every message is judged by its receive time (as
twist_mux does), never by its header stamp.

Who drives (evaluated every tick, first match wins)
---------------------------------------------------
1. Nothing is output until a position is known (the first ``/joint_states``): that position is the first
   hold target.
2. The *candidate* is ``override_input`` while the override Bool (deadman) is true, else the input chosen by
   the mode topic (an input name or ``"hold"``; starts at ``default_input``; unknown names are rejected and
   leave the mode unchanged).
3. ``"hold"`` mode -> hold.
4. An engaged lock whose priority is >= the candidate's priority masks it -> hold. A lock is engaged while its
   last Bool was true, or (with ``heartbeat_timeout_s``) while no Bool arrived within the timeout, including
   before the first one. A lock's Bool stays in force until the next Bool on its topic: nothing else (mode,
   override, input traffic, time) releases it, so a *latching* lock (the e-stop, priority 255: it masks every
   input) holds through mode and override changes until an explicit ``false`` arrives; with a heartbeat, a
   lost heartbeat engages it as well and only a new message (``false``) releases it.
5. The candidate has no valid command (none yet, or its last message was rejected) or its newest valid
   command is older than its ``timeout_s`` -> hold.
6. Otherwise the candidate drives.

Priorities and the mode combine like this: the mode picks the input; priorities do not silently override
that choice (a teleop device that publishes all the time, e.g. ALOHA leader arms, must not keep the policy
from ever driving). The one exception is *preemption*: a ``human`` input whose priority is higher than the
selected input's, that *starts* publishing (its first valid message after being silent for longer than its
timeout, or ever), takes the mode as if its name had been published on the mode topic -- the expert grabbing
the controls takes over at once. It keeps the mode when it goes quiet (-> explicit hold, never a silent
fall-back to the policy); control goes back only through an explicit mode message. ``"hold"`` mode is never
preempted (an explicit operator stop), and an input masked by an engaged lock does not preempt.

What is sent
------------
The mux follows the measured position (``/joint_states``) for as long as it runs:

* Holding holds the measured position taken when the hold began (not the last command: after a stop the
  robot stays where it is).
* Every resume (hold -> an input, a hand-over between inputs) starts from the measured position and moves
  toward the new source at the velocity limits.
* When the output is farther than ``max_velocity * tracking_tolerance_s`` from the measured position on any
  joint (the robot was moved by hand, reset, lost power under an e-stop, its driver restarted), the output is
  re-anchored at the measured position first (counted as a re-anchor, logged): the robot never receives a
  command that is not a velocity-limited step from where it is.
* No joint state for ``joint_state_timeout_s`` -> hold (the last output; the position is unknown).

A command that is NaN/inf, has the wrong number of joints or lies outside a joint limit is dropped and counted
for its input, and that input is treated as having no command (hold) until its next valid message. The output
is step-limited on every tick: each joint moves at most ``max_velocity * dt`` (dt = time since the previous
tick, at most one control period) towards the target, so a handover never jumps and converges to the new
source, and an extra tick between two regular ones never exceeds the velocity limits; a source that respects
the velocity limits is forwarded unchanged. ``intervention`` is true while a ``human`` input is the active
source; every :class:`Tick` names the source its command came from.

When to tick
------------
The caller ticks on a fixed grid at the control rate, and once more at once whenever :attr:`switch_pending`
is set (a mode / override / lock change or a preemption since the last tick), so the new source's first
command goes out without waiting for the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from recap_ros.station import Mux, MuxInput, MuxLock, Robot

HOLD = "hold"


@dataclass
class _InputState:
    spec: MuxInput
    positions: np.ndarray | None = None  # newest valid command (None: none yet or the last one was rejected)
    received_s: float = -math.inf  # receive time of the newest valid command
    rejected_reason: str = ""
    received: int = 0
    dropped: int = 0

    def age(self, now: float) -> float:
        return now - self.received_s

    def live(self, now: float) -> bool:
        return self.positions is not None and self.age(now) <= self.spec.timeout_s


@dataclass
class _LockState:
    spec: MuxLock
    value: bool = False  # the newest Bool: it stays in force until the next one (twist_mux semantics)
    last_msg_s: float = -math.inf

    def engaged_reason(self, now: float) -> str:
        """Why the lock is engaged, or "" when it is released."""
        if self.value:
            if self.spec.latching:
                return f"lock '{self.spec.name}' latched (publish false on {self.spec.topic} to release)"
            return f"lock '{self.spec.name}' engaged"
        hb = self.spec.heartbeat_timeout_s
        if hb is not None and now - self.last_msg_s > hb:
            since = "never received" if math.isinf(self.last_msg_s) else f"silent {now - self.last_msg_s:.3f} s"
            return f"lock '{self.spec.name}' heartbeat lost ({since} > {hb} s)"
        return ""


@dataclass(frozen=True)
class Tick:
    """Result of one control tick."""
    positions: np.ndarray | None  # the command to publish (None: no position known yet, publish nothing)
    source: str  # the active input name, or "hold"
    intervention: bool
    reason: str  # why holding ("" while an input drives)
    converging: bool  # the output is still being step-limited towards the target
    source_changed: bool  # source or intervention differ from the previous tick (publish them)


@dataclass
class MuxStats:
    ticks: int = 0
    hold_ticks: int = 0
    switches: int = 0
    rejected_modes: int = 0
    preemptions: int = 0
    reanchors: int = 0  # output moved to the measured position (it was farther than the tracking tolerance)
    events: list[str] = field(default_factory=list)  # log lines since the last drain


class TeleopMux:
    """The arbitration state machine. Call the ``on_*`` methods from subscriptions and :meth:`tick` from the
    control loop (and at once while :attr:`switch_pending`); none of them raises on bad input (they return /
    record a reason instead). Not thread-safe: the caller serialises all calls."""

    def __init__(self, mux: Mux, robot: Robot):
        self.mux, self.robot = mux, robot
        self.names = robot.joint_names
        self.lower = np.asarray(robot.lower, dtype=np.float64)
        self.upper = np.asarray(robot.upper, dtype=np.float64)
        self.max_velocity = np.asarray(robot.max_velocity, dtype=np.float64)
        self.tolerance = self.max_velocity * mux.tracking_tolerance_s  # per joint
        self.period_s = robot.period_s
        self.inputs = {i.name: _InputState(i) for i in mux.inputs}
        self.locks = {lk.name: _LockState(lk) for lk in mux.locks}
        self.mode = mux.default_input
        self.override = False
        self.stats = MuxStats()
        self.output: np.ndarray | None = None
        self.measured: np.ndarray | None = None  # newest joint state (clamped into the limits)
        self.measured_s = -math.inf  # its receive time
        self.hold_target: np.ndarray | None = None  # what a hold holds: the measured position when it began
        self.source = HOLD
        self.intervention = False
        self.reason = "no joint state received yet"
        self.converging = False
        self._last_tick_s: float | None = None
        self.switch_pending = False  # a mode / override / lock change or a preemption since the last tick

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def ready(self) -> bool:
        return self.output is not None

    def on_joint_state(self, positions, now: float) -> str | None:
        """A measured position (every ``/joint_states`` message); returns an error or None. The first one is
        the initial hold position. Positions slightly outside a limit are clamped into it (a command must never
        leave the limits)."""
        q = np.asarray(positions, dtype=np.float64)
        if q.shape != (len(self.names),) or not np.all(np.isfinite(q)):
            return f"joint state not usable as a measured position: {q.tolist()}"
        clamped = np.clip(q, self.lower, self.upper)
        self.measured, self.measured_s = clamped, now
        if self.ready:
            return None
        self.output, self.hold_target = clamped.copy(), clamped.copy()
        self._event(f"initial hold position from joint states: {np.round(clamped, 4).tolist()}")
        moved = [f"{n} {a:.4f}->{b:.4f}" for n, a, b in zip(self.names, q, clamped) if a != b]
        if moved:
            self._event(f"joint state outside limits, hold position clamped: {', '.join(moved)}")
        self.reason = "starting"
        return None

    def validate(self, positions) -> str | None:
        """Why a command must not reach the robot, or None when it is acceptable."""
        q = np.asarray(positions, dtype=np.float64)
        if q.shape != (len(self.names),):
            return f"expected {len(self.names)} joint positions, got {q.size}"
        if not np.all(np.isfinite(q)):
            bad = [self.names[i] for i in np.flatnonzero(~np.isfinite(q))]
            return f"non-finite position for {', '.join(bad)}"
        out = np.flatnonzero((q < self.lower) | (q > self.upper))
        if out.size:
            return "outside limits: " + ", ".join(
                f"{self.names[i]}={q[i]:.4f} not in [{self.lower[i]}, {self.upper[i]}]" for i in out)
        return None

    def on_command(self, name: str, positions, now: float) -> str | None:
        """A command from input ``name``. Returns the rejection reason (the command was dropped) or None."""
        st = self.inputs[name]
        why = self.validate(positions)
        if why is not None:
            return self.reject(name, why)
        was_live = st.live(now)
        st.positions = np.asarray(positions, dtype=np.float64).copy()
        st.received_s = now
        st.rejected_reason = ""
        st.received += 1
        if not was_live:
            self._maybe_preempt(st, now)
        return None

    def reject(self, name: str, why: str) -> str:
        """Drop a command of input ``name`` (also used by the node when a message cannot be converted)."""
        st = self.inputs[name]
        st.dropped += 1
        st.positions = None
        st.rejected_reason = why
        return f"{name}: command dropped: {why}"

    def _maybe_preempt(self, st: _InputState, now: float) -> None:
        if not st.spec.human or self.mode in (HOLD, st.spec.name):
            return
        if st.spec.priority <= self.inputs[self.mode].spec.priority or self._mask_reason(st.spec, now):
            return
        self.stats.preemptions += 1
        self._event(f"{st.spec.name} (human, priority {st.spec.priority}) started publishing: it preempts "
                    f"mode '{self.mode}' (priority {self.inputs[self.mode].spec.priority})")
        self.mode = st.spec.name
        self.switch_pending = True

    def on_mode(self, text: str) -> str | None:
        """A mode request (input name or "hold"). Returns the rejection reason or None."""
        if text != HOLD and text not in self.inputs:
            self.stats.rejected_modes += 1
            return f"mode '{text}' rejected: not 'hold' or one of {sorted(self.inputs)}"
        if text != self.mode:
            self._event(f"mode {self.mode} -> {text}")
            self.mode = text
            self.switch_pending = True
        return None

    def on_override(self, value: bool) -> None:
        value = bool(value)
        if value != self.override:
            self._event(f"override {'on' if value else 'off'}: "
                        f"{self.mux.override_input if value else self.mode} selected")
            self.override = value
            self.switch_pending = True

    def on_lock(self, name: str, value: bool, now: float) -> None:
        lk = self.locks[name]
        value = bool(value)
        was = bool(lk.engaged_reason(now))
        lk.last_msg_s = now
        lk.value = value
        now_engaged = bool(lk.engaged_reason(now))
        if now_engaged != was:
            self._event(f"lock '{name}' {'engaged' if now_engaged else 'released'}")
            self.switch_pending = True

    # ------------------------------------------------------------------------------------------ arbitration
    def _mask_reason(self, spec: MuxInput, now: float) -> str:
        for lk in self.locks.values():
            why = lk.engaged_reason(now)
            if why and lk.spec.priority >= spec.priority:
                return f"{why}, masks {spec.name} (lock priority {lk.spec.priority} >= {spec.priority})"
        return ""

    def candidate(self) -> str:
        return self.mux.override_input if self.override else self.mode

    def arbitrate(self, now: float) -> tuple[str, str]:
        """(active source, why holding) at time ``now``; the source is "hold" when nothing may drive."""
        name = self.candidate()
        via = " (override)" if self.override else ""
        if name == HOLD:
            return HOLD, "mode hold"
        st = self.inputs[name]
        mask = self._mask_reason(st.spec, now)
        if mask:
            return HOLD, mask
        if st.positions is None:
            if st.rejected_reason:
                return HOLD, f"{name}{via}: last command rejected: {st.rejected_reason}"
            return HOLD, f"{name}{via}: no command received yet"
        if not st.live(now):
            return HOLD, f"{name}{via}: stale (last command {st.age(now):.3f} s ago > timeout {st.spec.timeout_s} s)"
        return name, ""

    def tick(self, now: float) -> Tick:
        """One control tick: the command to publish now (the hold position while holding)."""
        if not self.ready:
            return Tick(None, HOLD, False, self.reason, False, False)
        source, reason = self.arbitrate(now)
        measured_age = now - self.measured_s
        known = measured_age <= self.mux.joint_state_timeout_s
        if not known:
            source, reason = HOLD, (f"joint states stale (last {measured_age:.3f} s ago > "
                                    f"{self.mux.joint_state_timeout_s} s): robot position unknown")
        began = source != self.source
        if known:
            far = np.flatnonzero(np.abs(self.output - self.measured) > self.tolerance)
            if far.size:
                self.stats.reanchors += 1
                self._event("output re-anchored at the measured position: " + ", ".join(
                    f"{self.names[i]} commanded {self.output[i]:.3f}, measured {self.measured[i]:.3f}"
                    for i in far[:4]) + (f" (+{far.size - 4} joints)" if far.size > 4 else ""))
                self.output, began = self.measured.copy(), True
            elif began:  # a resume or hand-over starts where the robot is
                self.output = self.measured.copy()
        if source == HOLD:
            if began:
                self.hold_target = self.output.copy()
            target = self.hold_target
        else:
            target = self.inputs[source].positions
        dt = self.period_s if self._last_tick_s is None else min(max(now - self._last_tick_s, 0.0), self.period_s)
        step = self.max_velocity * dt
        delta = target - self.output
        # within the limit: the target itself (bit for bit: a + (b - a) need not equal b in floating point)
        out = np.where(np.abs(delta) <= step, target, self.output + np.clip(delta, -step, step))
        self.converging = bool(np.any(np.abs(target - out) > 1e-12))
        self.output = out
        self._last_tick_s = now
        self.switch_pending = False
        intervention = source != HOLD and self.inputs[source].spec.human
        changed = source != self.source or intervention != self.intervention
        if changed:
            self.stats.switches += 1
            self._event(f"active source {self.source} -> {source}" + (f" ({reason})" if reason else ""))
        self.source, self.intervention, self.reason = source, intervention, reason
        self.stats.ticks += 1
        self.stats.hold_ticks += source == HOLD
        return Tick(out.copy(), source, intervention, reason, self.converging, changed)

    # ------------------------------------------------------------------------------------------ reporting
    def status(self, now: float) -> dict[str, str]:
        """Key/values for diagnostics: active source, why holding, per-input counts, locks."""
        kv = {"active_source": self.source, "intervention": str(self.intervention), "mode": self.mode,
              "override": str(self.override), "hold_reason": self.reason, "converging": str(self.converging),
              "ticks": str(self.stats.ticks), "hold_ticks": str(self.stats.hold_ticks),
              "switches": str(self.stats.switches), "preemptions": str(self.stats.preemptions),
              "reanchors": str(self.stats.reanchors),
              "joint_state_age_s": "never" if math.isinf(self.measured_s) else f"{now - self.measured_s:.3f}",
              "rejected_modes": str(self.stats.rejected_modes)}
        for name, st in self.inputs.items():
            kv[f"{name}.received"] = str(st.received)
            kv[f"{name}.dropped"] = str(st.dropped)
            kv[f"{name}.age_s"] = "never" if math.isinf(st.received_s) else f"{st.age(now):.3f}"
            if st.rejected_reason:
                kv[f"{name}.last_rejection"] = st.rejected_reason
        for name, lk in self.locks.items():
            kv[f"lock.{name}"] = lk.engaged_reason(now) or "released"
        return kv

    def drain_events(self) -> list[str]:
        ev, self.stats.events = self.stats.events, []
        return ev

    def _event(self, text: str) -> None:
        self.stats.events.append(text)
