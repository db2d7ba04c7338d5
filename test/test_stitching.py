"""Chunk stitching: seam continuity, delay handling, overrun hold, safety stage (ROS-free)."""
import dataclasses

import numpy as np
import pytest

from recap_ros.control.stitching import (
    HOLD_NO_CHUNK,
    HOLD_OVERRUN,
    ChunkExecutor,
    ChunkRejected,
    JointLimits,
    chunk_stats,
    naive_seam_jump,
)
from recap_ros.station import load_station

H, N = 50, 14


@pytest.fixture
def limits():
    return JointLimits.from_robot(load_station("sim").robot)


def ramp(start, velocity, dt, n=H):
    """A chunk moving every joint at constant velocity from start."""
    return start[None, :] + np.arange(n)[:, None] * velocity * dt


def run(ex, ticks):
    return [ex.step() for _ in range(ticks)]


def test_limits_from_station(limits):
    assert limits.n == N and limits.dt == pytest.approx(0.02)
    assert np.all(limits.max_step == pytest.approx(limits.max_velocity * 0.02))


def test_holds_at_reset_position_until_first_chunk(limits):
    ex = ChunkExecutor(limits)
    assert ex.step() is None  # nothing known, nothing to publish
    q0 = np.full(N, 0.3)
    ex.reset(q0)
    ticks = run(ex, 5)
    assert all(np.array_equal(t.command, q0) and t.hold_reason == HOLD_NO_CHUNK for t in ticks)
    assert ex.wants_plan()


def test_new_chunk_starts_at_measured_delay(limits):
    ex = ChunkExecutor(limits, replan_every=25, crossfade_ticks=0)
    q0 = np.full(N, 0.1)
    ex.reset(q0)
    req = ex.request()
    assert not ex.wants_plan()  # one request in flight at a time
    run(ex, 7)                  # inference took 7 ticks
    chunk = ramp(q0, 0.5 * limits.max_velocity, limits.dt)
    acc = ex.accept(req, chunk)
    assert acc.delay_ticks == 7
    t = ex.step()
    assert t.index == 7
    # the jump to chunk[7] from the hold position is limited to one tick of velocity
    assert np.all(np.abs(t.command - q0) <= limits.max_step + 1e-12)


def test_replan_every_s_while_chunk_keeps_running(limits):
    ex = ChunkExecutor(limits, replan_every=25, crossfade_ticks=0)
    q0 = np.zeros(N)
    ex.reset(q0)
    req = ex.request()
    ex.accept(req, np.repeat(q0[None], H, axis=0))
    for i in range(25):
        assert not ex.wants_plan()
        ex.step()
    assert ex.wants_plan()
    t = ex.step()
    assert t.hold_reason is None and t.index == 25  # keeps executing while the next chunk is computed


def test_seam_is_continuous_and_within_velocity_limit(limits):
    """Two disagreeing chunks: stitched seam steps stay within max_velocity*dt; naive switching jumps."""
    rng = np.random.default_rng(0)
    for k in (0, 5):
        ex = ChunkExecutor(limits, replan_every=20, crossfade_ticks=k)
        q0 = np.zeros(N)
        ex.reset(q0)
        v = 0.6 * limits.max_velocity * rng.choice([-1, 1], N)
        old = ramp(q0, v, limits.dt)
        ex.accept(ex.request(), old)
        cmds = []
        for _ in range(20):
            cmds.append(ex.step().command)
        req = ex.request()
        for _ in range(6):           # d = 6
            cmds.append(ex.step().command)
        new = ramp(old[20] + 0.3, -v, limits.dt)  # offset and reversed: a nasty seam
        acc = ex.accept(req, new)
        assert acc.delay_ticks == 6 and acc.replaced_ticks == 26
        for _ in range(20):
            cmds.append(ex.step().command)
        steps = np.abs(np.diff(np.array(cmds), axis=0))
        assert np.all(steps <= limits.max_step + 1e-12), f"k={k}"
        naive = naive_seam_jump(old, 26, new)
        assert naive.max() > limits.max_step.max()


def test_crossfade_blends_over_k_ticks(limits):
    """With room in the velocity and acceleration limits, the seam moves linearly from old to new targets over k
    ticks."""
    ex = ChunkExecutor(dataclasses.replace(limits, max_acceleration=limits.max_acceleration * 100),
                       replan_every=10, crossfade_ticks=4)
    q0 = np.zeros(N)
    ex.reset(q0)
    ex.accept(ex.request(), np.repeat(q0[None], H, axis=0))
    run(ex, 10)
    req = ex.request()
    new = np.full((H, N), 0.5 * limits.max_step.min() * 5)   # a small offset the fade can absorb
    ex.accept(req, new)
    cmds = [ex.step().command[0] for _ in range(6)]
    expected = [new[0, 0] * w for w in (0.2, 0.4, 0.6, 0.8, 1.0, 1.0)]
    assert cmds == pytest.approx(expected)


def test_overrun_keeps_executing_then_holds(limits):
    ex = ChunkExecutor(limits, replan_every=25, crossfade_ticks=0)
    q0 = np.zeros(N)
    ex.reset(q0)
    chunk = ramp(q0, 0.2 * limits.max_velocity, limits.dt)
    ex.accept(ex.request(), chunk)
    run(ex, 25)
    ex.request()  # never answered
    ticks = run(ex, 30)
    executing, holding = ticks[:25], ticks[25:]
    assert all(t.hold_reason is None for t in executing)
    assert np.allclose(executing[-1].command, chunk[-1])
    assert all(t.hold_reason == HOLD_OVERRUN and t.index == -1 for t in holding)
    assert all(np.array_equal(t.command, chunk[-1]) for t in holding)  # holds the last command, no jump
    assert ex.holds == 1


def test_late_chunk_beyond_horizon_rejected(limits):
    ex = ChunkExecutor(limits)
    ex.reset(np.zeros(N))
    req = ex.request()
    run(ex, H)
    with pytest.raises(ChunkRejected, match="beyond its 50-tick horizon"):
        ex.accept(req, np.zeros((H, N)))
    assert ex.wants_plan()  # may ask again


def test_nan_chunk_rejected_and_holds(limits):
    ex = ChunkExecutor(limits, replan_every=10, crossfade_ticks=0)
    q0 = np.zeros(N)
    ex.reset(q0)
    ex.accept(ex.request(), ramp(q0, 0.2 * limits.max_velocity, limits.dt))
    run(ex, 10)
    before = ex.command
    bad = np.zeros((H, N))
    bad[3, 5] = np.nan
    with pytest.raises(ChunkRejected, match="non-finite.*step 3, joint 5"):
        ex.accept(ex.request(), bad)
    t = ex.step()
    assert t.hold_reason.startswith("invalid chunk") and np.array_equal(t.command, before)
    assert np.all(np.isfinite(t.command))


def test_bad_shape_rejected(limits):
    ex = ChunkExecutor(limits)
    ex.reset(np.zeros(N))
    with pytest.raises(ChunkRejected, match=r"shape \(50, 16\)"):
        ex.accept(ex.request(), np.zeros((H, 16)))


def test_reset_drops_chunk_and_stale_results(limits):
    ex = ChunkExecutor(limits, crossfade_ticks=0)
    ex.reset(np.zeros(N))
    ex.accept(ex.request(), np.ones((H, N)) * 0.01)
    stale = ex.request()
    run(ex, 3)
    q_now = np.full(N, 0.2)
    ex.reset(q_now)                     # e.g. the mux handed control back, the robot is elsewhere now
    assert ex.wants_plan()
    with pytest.raises(ChunkRejected, match="stale"):
        ex.accept(stale, np.ones((H, N)))
    cmds = np.array([ex.command] + [t.command for t in run(ex, 40)])
    assert np.all(np.abs(np.diff(cmds, axis=0)) <= limits.max_step + 1e-12), "moves there, never jumps"
    assert np.allclose(cmds[-1], q_now) and ex.hold_reason == HOLD_NO_CHUNK


def test_clamps_to_joint_limits(limits):
    ex = ChunkExecutor(limits, crossfade_ticks=0)
    q0 = limits.upper - 0.01
    ex.reset(q0)
    ex.accept(ex.request(), np.repeat((limits.upper + 1.0)[None], H, axis=0))
    cmds = np.array([t.command for t in run(ex, 20)])
    assert np.all(cmds <= limits.upper) and np.allclose(cmds[-1], limits.upper)


def test_missed_ticks_advance_the_chunk(limits):
    ex = ChunkExecutor(limits, crossfade_ticks=0)
    q0 = np.zeros(N)
    ex.reset(q0)
    chunk = ramp(q0, 0.3 * limits.max_velocity, limits.dt)
    ex.accept(ex.request(), chunk)
    ex.step()
    t = ex.step(ticks=3)  # two deadlines were missed
    # the chunk skips to index 3 (0.036 rad away on joint 0: 3 x 0.3 x 2 rad/s x 0.02 s), but the command moves
    # one tick's step from rest: the acceleration limit 20 rad/s² x (0.02 s)² = 0.008 rad, never a 3-tick jump
    assert t.index == 3 and t.command[0] == pytest.approx(0.008)


def test_chunk_stats(limits):
    q0 = np.zeros(N)
    s = chunk_stats(ramp(q0, 0.5 * limits.max_velocity, limits.dt), limits)
    assert s.peak_velocity_ratio == pytest.approx(0.5)
    edge = np.repeat(limits.upper[None], H, axis=0)
    assert chunk_stats(edge, limits).min_limit_margin == pytest.approx(0.0)


def test_reset_rejects_nan_state(limits):
    ex = ChunkExecutor(limits)
    with pytest.raises(ValueError, match="finite"):
        ex.reset(np.full(N, np.nan))


def test_period_monitor_counts_missed_ticks():
    from recap_ros.control.ticker import PeriodMonitor

    m = PeriodMonitor(0.02)
    t = 0
    assert m.tick(t) == 1
    for dt_ms in (20, 21, 19, 60, 20):  # one period of 60 ms swallowed two ticks
        t += dt_ms * 1_000_000
        periods = m.tick(t)
    s = m.summary()
    assert periods == 1 and s["missed_ticks"] == 2 and s["period_err_max_ms"] == pytest.approx(40.0)
    assert s["period_err_p50_ms"] == pytest.approx(1.0)


def test_deadline_loop_keeps_running_after_an_error():
    import threading

    from recap_ros.control.ticker import DeadlineLoop, PeriodMonitor

    calls, errors, done = [], [], threading.Event()

    def fn(periods, now):
        calls.append(periods)
        if len(calls) == 2:
            raise RuntimeError("boom")
        if len(calls) >= 5:
            done.set()

    loop = DeadlineLoop(0.005, fn, PeriodMonitor(0.005), errors.append)
    loop.start()
    assert done.wait(5.0)
    loop.stop()
    assert [str(e) for e in errors] == ["boom"] and len(calls) >= 5
