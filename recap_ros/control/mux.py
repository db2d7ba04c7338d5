"""Joint-space teleop-override multiplexer: which source drives the robot, and what is sent when.

ROS-free arbitration core of the ``teleop_mux`` node (which only wires topics and timers to it). Times are
seconds on one monotonic clock supplied by the caller. A message's age counts from when it was *taken*: its
receive time, or its header stamp when that is older (:mod:`recap_ros.control.freshness`, the caller converts;
a clock running ahead never makes a message look fresh).

Who drives (evaluated on every event and every tick, first match wins)
----------------------------------------------------------------------
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
6. No joint state for ``joint_state_timeout_s`` -> hold (the robot's position is unknown).
7. The candidate's newest command is farther than the tracking tolerance (per joint ``max_velocity *
   tracking_tolerance_s``) from the measured position on any joint -> hold, reported as a *tracking error*
   (:attr:`TeleopMux.tracking_error` names the joints and values; the node raises a diagnostics ERROR). The
   source drives again with its first command within the tolerance (a policy re-planned from the measured
   position, a teleoperator who matched the robot's pose).
8. Otherwise the candidate drives.

Priorities and the mode combine like this: the mode picks the input; priorities do not silently override
that choice (a teleop device that publishes all the time, e.g. ALOHA leader arms, must not keep the policy
from ever driving). The one exception is *preemption*: a ``human`` input whose priority is higher than the
selected input's, that *starts* publishing (its first valid message after being silent for longer than its
timeout, or ever), takes the mode as if its name had been published on the mode topic -- the expert grabbing
the controls takes over at once. It keeps the mode when it goes quiet (-> explicit hold, never a silent
fall-back to the policy); control goes back only through an explicit mode message. ``"hold"`` mode is never
preempted (an explicit operator stop), and an input masked by an engaged lock does not preempt.

What is sent, and when (event-driven, as twist_mux)
---------------------------------------------------
:meth:`TeleopMux.tick` is called on every event (``grid=False``: a command, a joint state, a mode / override
/ lock message) and on a fixed grid at the control rate (``grid=True``):

* an accepted command of the active input is limited and output at once, by the event that brought it
  (each command exactly once; a switch to an input outputs that input's newest command at once);
* while holding, the grid outputs the hold position every tick (the ros2_control convention of a steady
  command stream), and the event that starts a hold outputs it at once, as does a joint state that shows the
  robot farther than the tracking tolerance from the held position (re-anchored there);
* the grid also enforces the timeouts and heartbeats (a source that went silent holds at the next tick).

The output follows the measured position (``/joint_states``) for as long as the mux runs: every change of
source (a resume, a hand-over, the start of a hold) starts from the measured position at rest, and a hold
holds the measured position taken when it began. When the output is farther than the tracking tolerance from
the measured position (the robot was moved by hand, reset, lost power under an e-stop, its driver restarted),
it is re-anchored there first (counted, logged; a hold re-anchors on a stale joint state as well: a robot
driver that restarted elsewhere may report old stamps, and its newest report is still the best word on where
it is): the robot never receives a command that is not a limited step from where it is. Every output passes the station's one limiter (:mod:`recap_ros.control.limits`:
position, velocity and acceleration limits; the velocity limit counts the time since the previous output, at
most one control period), so a source within the limits is forwarded bit for bit and nothing jumps.

A command that is NaN/inf, has the wrong number of joints or lies outside a joint limit is dropped and counted
for its input, and that input is treated as having no command (hold) until its next valid message.
``intervention`` is true while a ``human`` input is the active source; every :class:`Tick` names the source
its command came from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from recap_ros.control.limits import JointLimits, Limiter
from recap_ros.station import Mux, MuxInput, MuxLock, Robot

HOLD = "hold"


@dataclass
class _InputState:
    spec: MuxInput
    positions: np.ndarray | None = None  # newest valid command (None: none yet or the last one was rejected)
    received_s: float = -math.inf  # when the newest valid command was taken (receive time or older stamp)
    sent: bool = False  # the newest command was output
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
    positions: np.ndarray | None  # the command to publish now (None: publish nothing)
    source: str  # the active input name, or "hold"
    intervention: bool
    reason: str  # why holding ("" while an input drives)
    converging: bool  # the output is still being limited towards the target
    source_changed: bool  # source or intervention differ from the previous tick (publish them)


@dataclass
class MuxStats:
    ticks: int = 0  # outputs
    hold_ticks: int = 0
    forwarded: int = 0  # input commands output
    tracking_errors: int = 0  # holds because a command was farther than the tracking tolerance
    switches: int = 0
    rejected_modes: int = 0
    preemptions: int = 0
    reanchors: int = 0  # output moved to the measured position (it was farther than the tracking tolerance)
    events: list[str] = field(default_factory=list)  # log lines since the last drain


class TeleopMux:
    """The arbitration state machine. Call the ``on_*`` methods from subscriptions, then :meth:`tick` (an
    event), and :meth:`tick` with ``grid=True`` from the control loop; none of them raises on bad input (they
    return / record a reason instead). Not thread-safe: the caller serialises all calls."""

    def __init__(self, mux: Mux, robot: Robot):
        self.mux, self.robot = mux, robot
        self.names = robot.joint_names
        self.limits = JointLimits.from_robot(robot)
        self.lower, self.upper = self.limits.lower, self.limits.upper
        self.tolerance = self.limits.max_velocity * mux.tracking_tolerance_s  # per joint
        self.out = Limiter(self.limits)  # the output (its position is None until the first joint state)
        self.inputs = {i.name: _InputState(i) for i in mux.inputs}
        self.locks = {lk.name: _LockState(lk) for lk in mux.locks}
        self.mode = mux.default_input
        self.override = False
        self.stats = MuxStats()
        self.measured: np.ndarray | None = None  # newest joint state (clamped into the limits)
        self.measured_s = -math.inf  # when it was taken (receive time or older stamp)
        self.hold_target: np.ndarray | None = None  # what a hold holds: the measured position when it began
        self.source = HOLD
        self.intervention = False
        self.reason = "no joint state received yet"
        self.converging = False
        self.tracking_error = ""  # why the candidate's command is refused (far from the measured position)
        self._last_out_s = -math.inf

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def ready(self) -> bool:
        return self.out.position is not None

    def on_joint_state(self, positions, now: float) -> str | None:
        """A measured position (every ``/joint_states`` message), taken at ``now``; returns an error or None.
        The first one is the initial hold position. Positions slightly outside a limit are clamped into it (a
        command must never leave the limits)."""
        q = np.asarray(positions, dtype=np.float64)
        if q.shape != (len(self.names),) or not np.all(np.isfinite(q)):
            return f"joint state not usable as a measured position: {q.tolist()}"
        clamped = self.limits.clamp(q)
        self.measured, self.measured_s = clamped, now
        if self.ready:
            return None
        self.out.reset(clamped)
        self.hold_target = clamped.copy()
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

    def on_command(self, name: str, positions, now: float, taken: float | None = None) -> str | None:
        """A command from input ``name`` received at ``now`` (taken at ``taken``, default ``now``). Returns the
        rejection reason (the command was dropped) or None."""
        st = self.inputs[name]
        why = self.validate(positions)
        if why is not None:
            return self.reject(name, why)
        was_live = st.live(now)
        st.positions = np.asarray(positions, dtype=np.float64).copy()
        st.received_s = now if taken is None else min(taken, now)
        st.rejected_reason = ""
        st.sent = False
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

    def on_mode(self, text: str) -> str | None:
        """A mode request (input name or "hold"). Returns the rejection reason or None."""
        if text != HOLD and text not in self.inputs:
            self.stats.rejected_modes += 1
            return f"mode '{text}' rejected: not 'hold' or one of {sorted(self.inputs)}"
        if text != self.mode:
            self._event(f"mode {self.mode} -> {text}")
            self.mode = text
        return None

    def on_override(self, value: bool) -> None:
        value = bool(value)
        if value != self.override:
            self._event(f"override {'on' if value else 'off'}: "
                        f"{self.mux.override_input if value else self.mode} selected")
            self.override = value

    def on_lock(self, name: str, value: bool, now: float) -> None:
        lk = self.locks[name]
        value = bool(value)
        was = bool(lk.engaged_reason(now))
        lk.last_msg_s = now
        lk.value = value
        now_engaged = bool(lk.engaged_reason(now))
        if now_engaged != was:
            self._event(f"lock '{name}' {'engaged' if now_engaged else 'released'}")

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
        """(active source, why holding) at time ``now``; the source is "hold" when nothing may drive. Sets
        :attr:`tracking_error` (rule 7)."""
        self.tracking_error = ""
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
            return HOLD, f"{name}{via}: stale (last command {st.age(now):.3f} s old > timeout {st.spec.timeout_s} s)"
        measured_age = now - self.measured_s
        if measured_age > self.mux.joint_state_timeout_s:
            return HOLD, (f"joint states stale (last {measured_age:.3f} s old > {self.mux.joint_state_timeout_s} s): "
                          "robot position unknown")
        far = self._far(st.positions)
        if far:
            self.tracking_error = f"{name}{via}: command farther than the tracking tolerance from the measured " \
                                  f"position: {far}"
            return HOLD, self.tracking_error
        return name, ""

    def _far(self, q: np.ndarray) -> str:
        """The joints of ``q`` farther than the tracking tolerance from the measured position ("" if none)."""
        far = np.flatnonzero(np.abs(q - self.measured) > self.tolerance)
        more = f" (+{far.size - 4} joints)" if far.size > 4 else ""
        return ", ".join(f"{self.names[i]} {q[i]:.4f} vs measured {self.measured[i]:.4f} (tolerance "
                         f"{self.tolerance[i]:.3f})" for i in far[:4]) + more

    def tick(self, now: float, grid: bool = False) -> Tick:
        """The command to publish at ``now`` (None in :attr:`Tick.positions`: publish nothing): on an event
        (``grid=False``) an unsent command of the active input, or the hold position when a hold begins; on the
        grid (``grid=True``) also the hold position while holding."""
        if not self.ready:
            return Tick(None, HOLD, False, self.reason, False, False)
        was_error = self.tracking_error
        source, reason = self.arbitrate(now)
        if self.tracking_error and not was_error:
            self.stats.tracking_errors += 1
            self._event(f"holding: {self.tracking_error}")
        began = source != self.source
        st = None if source == HOLD else self.inputs[source]
        known = now - self.measured_s <= self.mux.joint_state_timeout_s
        # even a stale joint state is the newest word on where the robot is: a hold far from it re-anchors
        far = self._far(self.out.position) if known or st is None else ""
        # publish: an unsent command of the active input; a hold on the grid, when it begins, and at once when
        # the robot turns out to be elsewhere (a joint state far from the held position)
        if not (began or (grid or far if st is None else not st.sent)):
            return Tick(None, self.source, self.intervention, self.reason, self.converging, False)
        if far:
            self.stats.reanchors += 1
            self._event(f"output re-anchored at the measured position: {far}")
            began = True
        if (known or far) and began:  # a resume, a hand-over or a hold starts where the robot is, at rest
            self.out.reset(self.measured)
        if st is None:
            if began:
                self.hold_target = self.out.position.copy()
            target = self.hold_target
        else:
            target, st.sent = st.positions, True
            self.stats.forwarded += 1
        out = self.out.step(target, now - self._last_out_s)
        self.converging = bool(np.any(out != self.limits.clamp(target)))
        self._last_out_s = now
        intervention = st is not None and st.spec.human
        changed = source != self.source or intervention != self.intervention
        if changed:
            self.stats.switches += 1
            self._event(f"active source {self.source} -> {source}" + (f" ({reason})" if reason else ""))
        self.source, self.intervention, self.reason = source, intervention, reason
        self.stats.ticks += 1
        self.stats.hold_ticks += st is None
        return Tick(out, source, intervention, reason, self.converging, changed)

    # ------------------------------------------------------------------------------------------ reporting
    def status(self, now: float) -> dict[str, str]:
        """Key/values for diagnostics: active source, why holding, per-input counts, locks."""
        kv = {"active_source": self.source, "intervention": str(self.intervention), "mode": self.mode,
              "override": str(self.override), "hold_reason": self.reason, "converging": str(self.converging),
              "ticks": str(self.stats.ticks), "hold_ticks": str(self.stats.hold_ticks),
              "switches": str(self.stats.switches), "preemptions": str(self.stats.preemptions),
              "reanchors": str(self.stats.reanchors), "forwarded": str(self.stats.forwarded),
              "tracking_errors": str(self.stats.tracking_errors), "tracking_error": self.tracking_error or "none",
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
