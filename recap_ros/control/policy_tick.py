"""policy_server's 50 Hz control tick as a ROS-free state machine.

Inputs are events: ``start`` / ``stop``, ``reset`` (new prompt), ``episode`` (an episode started / ended at
a stamp), ``active`` (the mux's active source), ``joint`` (measured position + stamp), ``image`` (camera i's
newest stamp) and ``result`` (an inference result for a plan request). :meth:`PolicyTick.step` runs one tick
at a given time and returns the joint command to publish (or None); everything else it has to say goes to the
``report`` callback as ``(kind, *args)``:

* ``("plan", request, q, now_ns)``: plan a chunk from the observation at now_ns, starting at position q;
* ``("accepted", request, accepted, tick, now_ns)``, ``("rejected", request, reason, current)``,
  ``("failed", request, error, current)``: what became of each result (``current``: not made stale by a reset);
* ``("hold", reason or None)`` on every change of the hold state, ``("log", text)``.

Behaviour: while started and driving (the active source is ``policy``, or none was announced), a plan is
requested whenever the chunk executor wants one; chunks start at their measured delay and are cross-faded in.
While another source drives, the command follows the measured position (the mux input stays live and a
hand-back cannot jump); on hand-back, on start and on reset the running chunk is dropped and the next one is
planned from the current joint state. An image or joint state older than ``stale_after_ns`` holds the last
command, and so do invalid chunks, inference errors and overruns (:mod:`recap_ros.control.stitching`). After a
failed or rejected plan the next request waits ``retry_ns``.

Episodes (stations that publish episode events, e.g. the sim): between an episode's end and the next start
nothing is published (the mux's policy input goes stale and the mux holds the robot where it is). After a
start stamped t, nothing is published and nothing planned until a joint state and a frame of every camera
stamped at or after t have arrived: the first chunk of an episode is never planned from the previous
episode's views or pose. Without episode events the tick is always in an episode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from recap_ros.control.stitching import ChunkExecutor, ChunkRejected, JointLimits, Request

POLICY_INPUT = "policy"  # the mux's name for the policy's command input
WAITING = "waiting for "  # how every routine hold of an episode start begins (see PolicyTick.routine_hold)


@dataclass(frozen=True)
class TickConfig:
    limits: JointLimits
    chunk_len: int
    replan_every: int
    crossfade_ticks: int
    stale_after_ns: int
    retry_ns: int
    image_topics: tuple[str, ...]   # for hold reasons, station camera order
    joint_states_topic: str


class PolicyTick:
    EVENTS = ("start", "stop", "reset", "episode", "active", "joint", "image", "result")

    def __init__(self, cfg: TickConfig, report: Callable[..., None]):
        self.cfg, self.report = cfg, report
        self.core = ChunkExecutor(cfg.limits, cfg.chunk_len, cfg.replan_every, cfg.crossfade_ticks)
        self.running = False
        self.in_control = True
        self._need_reset = True
        self.in_episode = True
        self._episode_start_ns = 0  # observations must be stamped at or after this to plan the episode's start
        self._retry_at_ns = 0
        self._images: list[int | None] = [None] * len(cfg.image_topics)
        self._joint: tuple[np.ndarray, int] | None = None
        self._results: list[tuple[Request, np.ndarray | None, str | None]] = []
        self._reported_hold: str | None = None

    # ------------------------------------------------------------------------------------------ events
    def event(self, kind: str, *args) -> None:
        """Apply an event (one of :attr:`EVENTS`); results wait for the next :meth:`step`."""
        if kind not in self.EVENTS:
            raise ValueError(f"unknown tick event {kind!r} (known: {', '.join(self.EVENTS)})")
        getattr(self, f"_on_{kind}")(*args)

    def _on_start(self) -> None:
        self.running, self._need_reset = True, True

    def _on_stop(self) -> None:
        self.running = False
        self.core.hold("stopped")

    def _on_reset(self) -> None:
        self._need_reset = True

    def _on_episode(self, started: bool, stamp_ns: int) -> None:
        self.in_episode = bool(started)
        if started:
            self._need_reset, self._episode_start_ns = True, int(stamp_ns)
        else:
            self.core.hold("between episodes")

    def _on_active(self, source: str) -> None:
        in_control = source == POLICY_INPUT
        if in_control and not self.in_control:
            self._need_reset = True
            self.report("log", "mux handed control back: re-planning from the current state")
        self.in_control = in_control

    def _on_joint(self, q: np.ndarray, stamp_ns: int) -> None:
        self._joint = (q, stamp_ns)

    def _on_image(self, i: int, stamp_ns: int) -> None:
        self._images[i] = stamp_ns

    def _on_result(self, request: Request, chunk: np.ndarray | None, error: str | None) -> None:
        self._results.append((request, chunk, error))

    # ------------------------------------------------------------------------------------------ tick
    def step(self, periods: int, now_ns: int) -> np.ndarray | None:
        """One control tick covering ``periods`` periods (more than 1 after a miss) at now_ns: the command."""
        self._apply_results(now_ns)
        if not self.running or not self.in_episode:
            return None
        core, joint = self.core, self._joint
        joint_fresh = joint is not None and now_ns - joint[1] <= self.cfg.stale_after_ns
        if not self.in_control:
            if joint_fresh:
                core.reset(joint[0])  # follow the robot: the hand-back starts where it is
            return self._command(core.step(periods))
        if self._need_reset:
            old = self.older_than_episode()
            if old:  # publish nothing: the held command would be the previous episode's
                self._report_hold(old)
                return None
            if not joint_fresh:
                self._report_hold(self.stale_reason(now_ns) or "waiting for a joint state")
                return self._command(core.step(periods))
            core.reset(joint[0])
            self._need_reset = False
        stale = self.stale_reason(now_ns)
        if stale:
            core.hold(f"stale observation: {stale}")
        elif core.wants_plan() and now_ns >= self._retry_at_ns:
            self.report("plan", core.request(), joint[0], now_ns)
        tick = core.step(periods)
        self._report_hold(tick.hold_reason if tick else None)
        return self._command(tick)

    @staticmethod
    def _command(tick) -> np.ndarray | None:
        return None if tick is None else tick.command

    def stale_reason(self, now_ns: int) -> str | None:
        """Why the observation cannot be used (a stable text, so a hold is reported once), or None."""
        limit_ns = self.cfg.stale_after_ns
        limit = f"{limit_ns / 1e9:g} s"
        for topic, stamp in zip(self.cfg.image_topics, self._images):
            if stamp is None:
                return f"no image yet on {topic}"
            if now_ns - stamp > limit_ns:
                return f"{topic} image older than {limit}"
        if self._joint is None:
            return f"no joint state yet on {self.cfg.joint_states_topic}"
        if now_ns - self._joint[1] > limit_ns:
            return f"{self.cfg.joint_states_topic} older than {limit}"
        return None

    def older_than_episode(self) -> str | None:
        """Which observation still predates the running episode's start (None: all are newer)."""
        start = self._episode_start_ns
        if self._joint is None or self._joint[1] < start:
            return f"waiting for a {self.cfg.joint_states_topic} message of the new episode"
        for topic, stamp in zip(self.cfg.image_topics, self._images):
            if stamp is None or stamp < start:
                return f"waiting for a {topic} frame of the new episode"
        return None

    @staticmethod
    def routine_hold(reason: str | None) -> bool:
        """A hold every start and every episode goes through, not a fault: stopped, or waiting for the
        observations of the new episode, a first joint state or the first chunk. The others (stale observations,
        rejected or failed chunks, overruns) are worth a warning."""
        return reason is not None and (reason == "stopped" or reason.startswith(WAITING))

    def _report_hold(self, reason: str | None) -> None:
        if reason != self._reported_hold:
            self._reported_hold = reason
            self.report("hold", reason)

    def _apply_results(self, now_ns: int) -> None:
        results, self._results = self._results, []
        core = self.core
        for request, chunk, error in results:
            current = request.generation == core.generation
            if error is not None:
                core.cancel(request)
                if current:
                    core.hold(f"inference failed: {error}")
                    self._retry_at_ns = now_ns + self.cfg.retry_ns
                self.report("failed", request, error, current)
                continue
            try:
                accepted = core.accept(request, chunk)
            except ChunkRejected as e:
                if current:
                    self._retry_at_ns = now_ns + self.cfg.retry_ns
                self.report("rejected", request, str(e), current)
                continue
            self.report("accepted", request, accepted, core.tick, now_ns)

    def status(self) -> dict:
        """For diagnostics: hold count and reason, ticks executed."""
        return {"holds": self.core.holds, "hold_reason": self.core.hold_reason or "", "tick": self.core.tick}
