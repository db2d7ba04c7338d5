"""Chunk execution for a 50 Hz joint-position stream fed by a slow, asynchronous chunk policy (ROS-free).

The policy returns a chunk of H absolute joint targets; ``chunk[0]`` belongs to the tick at which the
observation was taken. Inference takes d ticks, so when a chunk arrives its first d actions are already in the
past: :class:`ChunkExecutor` starts it at index d, and cross-fades from the chunk that was running to the new
one over k ticks. Re-planning is requested once the running chunk has reached index s (``replan_every``), while
it keeps executing. Every command then passes the safety stage, the station's one limiter
(:class:`~recap_ros.control.limits.Limiter`: position, velocity and acceleration limits per joint; after
missed ticks the chunk index skips ahead but the command still moves one tick's step), and never emits a
non-finite value.

Holds: the executor repeats its last command (never jumps) when

* the running chunk is exhausted before the next one arrived (inference overrun),
* a chunk is invalid (wrong shape, NaN/inf): it is rejected and the running chunk is dropped,
* the owner calls :meth:`ChunkExecutor.hold` (stale observation, episode stopped, ...).

All state lives in one object used from one thread (the tick thread); the inference worker hands results to
that thread, so no locking is needed here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recap_ros.control.limits import JointLimits, Limiter

HOLD_OVERRUN = "overrun: chunk exhausted before the next chunk arrived"
HOLD_NO_CHUNK = "waiting for the first chunk"


class ChunkRejected(ValueError):
    """A chunk cannot be executed; the message says why (shape, non-finite values, too late, stale)."""


@dataclass(frozen=True)
class ChunkStats:
    peak_velocity_ratio: float  # max |Δq|/dt / max_velocity between consecutive chunk points (1 = at the limit)
    min_limit_margin: float     # min distance to a joint limit / joint range (< 0: outside the limits)


def chunk_stats(chunk: np.ndarray, limits: JointLimits) -> ChunkStats:
    """How aggressive a chunk is, measured on the raw model output (before clamping and limiting)."""
    vel = np.abs(np.diff(chunk, axis=0)) / limits.max_step
    margin = np.minimum(chunk - limits.lower, limits.upper - chunk) / (limits.upper - limits.lower)
    return ChunkStats(float(vel.max()) if vel.size else 0.0, float(margin.min()))


def validate_chunk(chunk, chunk_len: int, n_joints: int) -> np.ndarray:
    """The chunk as a float64 (H, n) array; raises ChunkRejected naming the bad shape or value."""
    arr = np.asarray(chunk, dtype=np.float64)
    if arr.shape != (chunk_len, n_joints):
        raise ChunkRejected(f"chunk has shape {arr.shape}, expected ({chunk_len}, {n_joints})")
    bad = ~np.isfinite(arr)
    if bad.any():
        step, joint = np.argwhere(bad)[0]
        raise ChunkRejected(f"chunk has {int(bad.sum())} non-finite values (first: step {step}, joint {joint} "
                            f"= {arr[step, joint]})")
    return arr


def naive_seam_jump(old_chunk: np.ndarray, old_index: int, new_chunk: np.ndarray) -> np.ndarray:
    """Per-joint jump of naive switching (openpi style): the new chunk starts at index 0 right away."""
    return np.abs(new_chunk[0] - old_chunk[min(old_index, len(old_chunk) - 1)])


@dataclass(frozen=True)
class Request:
    """A plan request: the observation was taken at ``tick``; ``generation`` invalidates it on reset."""
    tick: int
    generation: int


@dataclass(frozen=True)
class Accepted:
    delay_ticks: int       # d: ticks between the observation and the chunk's first executed step
    stats: ChunkStats
    replaced_ticks: int    # ticks the previous chunk was executed for (0 if there was none)


@dataclass(frozen=True)
class Tick:
    command: np.ndarray    # joint-position command for this tick (finite, within limits)
    index: int             # index into the running chunk, -1 while holding
    hold_reason: str | None


class ChunkExecutor:
    """Executes chunks tick by tick. ``tick`` is the number of the next control tick to be executed."""

    def __init__(self, limits: JointLimits, chunk_len: int = 50, replan_every: int = 25,
                 crossfade_ticks: int = 5):
        if not 1 <= replan_every < chunk_len:
            raise ValueError(f"replan_every must be in [1, {chunk_len - 1}] (got {replan_every})")
        if not 0 <= crossfade_ticks < chunk_len:
            raise ValueError(f"crossfade_ticks must be in [0, {chunk_len - 1}] (got {crossfade_ticks})")
        self.limits, self.chunk_len = limits, chunk_len
        self.replan_every, self.crossfade_ticks = replan_every, crossfade_ticks
        self.tick = 0
        self.generation = 0
        self.holds = 0                      # transitions into hold
        self._out = Limiter(limits)         # the command: its position (None until reset) and last step
        self._hold_target: np.ndarray | None = None  # where a hold goes (velocity-limited): reset position or stop
        self._chunk: np.ndarray | None = None
        self._chunk_tick = 0                # tick of the running chunk's index 0
        self._chunk_accepted = 0            # tick at which the running chunk took over
        self._fade_from: np.ndarray | None = None  # chunk being faded out (None: fade from the hold position)
        self._fade_from_tick = 0
        self._fade_hold = np.zeros(limits.n)
        self._fade_start: int | None = None
        self._in_flight: Request | None = None
        self._hold_reason: str | None = HOLD_NO_CHUNK

    # ------------------------------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        """True once a start position is known (after :meth:`reset`)."""
        return self._out.position is not None

    @property
    def command(self) -> np.ndarray | None:
        return None if self._out.position is None else self._out.position.copy()

    @property
    def hold_reason(self) -> str | None:
        return self._hold_reason

    @property
    def ticks_on_chunk(self) -> int:
        return self.tick - self._chunk_accepted if self._chunk is not None else 0

    def _set_hold(self, reason: str) -> None:
        if self._hold_reason is None:
            self.holds += 1
        self._hold_reason = reason

    # ------------------------------------------------------------------------------------------ control
    def reset(self, q: np.ndarray) -> None:
        """Start (again) from the measured position q: drop the chunk and any request in flight; the command
        is q (where the robot is: after a reset, a hand-back or a move by someone else, commanding the old
        command would drive the robot back to it)."""
        self._out.reset(q)  # raises ValueError for a position that is not n finite values
        self._hold_target = self._out.position.copy()
        self._chunk = self._fade_from = self._fade_start = self._in_flight = None
        self.generation += 1
        self._set_hold(HOLD_NO_CHUNK)

    def hold(self, reason: str) -> None:
        """Stop at the last command and drop the running chunk; a new chunk resumes motion (cross-faded)."""
        self._chunk = self._fade_from = self._fade_start = None
        if self._out.position is not None:
            self._hold_target = self._out.position.copy()
        self._set_hold(reason)

    def wants_plan(self) -> bool:
        """A new chunk should be requested now (none in flight, and none running or the running one is at s)."""
        if not self.ready or self._in_flight is not None:
            return False
        return self._chunk is None or self.tick - self._chunk_tick >= self.replan_every

    def request(self) -> Request:
        """Record that an observation taken at this tick was sent for inference."""
        self._in_flight = Request(self.tick, self.generation)
        return self._in_flight

    def cancel(self, request: Request) -> None:
        """The request failed without a chunk (inference error); allow the next request."""
        if self._in_flight == request:
            self._in_flight = None

    def accept(self, request: Request, chunk) -> Accepted:
        """Hand a finished chunk to the executor; it starts at index d = now - request tick.

        Raises ChunkRejected if the request is stale (reset since), the chunk arrived after its horizon,
        or the chunk is invalid; an invalid chunk also drops the running chunk and holds.
        """
        if self._in_flight == request:
            self._in_flight = None
        if request.generation != self.generation:
            raise ChunkRejected("chunk planned before a reset (stale): dropped")
        try:
            arr = validate_chunk(chunk, self.chunk_len, self.limits.n)
        except ChunkRejected as e:
            self.hold(f"invalid chunk: {e}")
            raise
        delay = self.tick - request.tick
        if delay >= self.chunk_len:
            raise ChunkRejected(f"chunk arrived {delay} ticks after its observation, beyond its "
                                f"{self.chunk_len}-tick horizon")
        replaced = self.ticks_on_chunk
        if self.crossfade_ticks > 0:
            self._fade_from, self._fade_from_tick = self._chunk, self._chunk_tick
            self._fade_hold = self._out.position.copy()
            self._fade_start = self.tick
        self._chunk, self._chunk_tick, self._chunk_accepted = arr, request.tick, self.tick
        self._hold_reason = None
        return Accepted(delay, chunk_stats(arr, self.limits), replaced)

    def step(self, ticks: int = 1) -> Tick | None:
        """Advance by ``ticks`` control periods (more than 1 after a missed deadline) and return the command:
        the chunk index skips the missed ticks, the command moves at most one tick's limited step.

        None until :meth:`reset` gave a start position.
        """
        if self._out.position is None:
            return None
        self.tick += ticks - 1  # deadlines missed since the last step
        index = self.tick - self._chunk_tick
        if self._chunk is not None and index >= self.chunk_len:
            self.hold(HOLD_OVERRUN)
        if self._chunk is None:
            index, target = -1, self._hold_target
        else:
            target = self._chunk[index]
            if self._fade_start is not None:
                j = self.tick - self._fade_start
                if j >= self.crossfade_ticks:
                    self._fade_from = self._fade_start = None
                else:
                    w = (j + 1) / (self.crossfade_ticks + 1)
                    target = (1.0 - w) * self._fade_source() + w * target
        try:
            cmd = self._out.step(target)
        except ValueError:  # unreachable with validated chunks; the last line of defence against NaN on the wire
            self.hold("non-finite command computed")
            index, cmd = -1, self._out.position.copy()
        self.tick += 1
        return Tick(cmd, index, self._hold_reason)

    def _fade_source(self) -> np.ndarray:
        if self._fade_from is None:
            return self._fade_hold
        i = min(self.tick - self._fade_from_tick, self.chunk_len - 1)
        return self._fade_from[i]
