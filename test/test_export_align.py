"""Unit tests of the control-clock alignment (recap_ros.export.align), ROS-free, no bags."""
import numpy as np
import pytest

from recap_ros.export.align import (
    NS,
    Stream,
    Tolerances,
    align_episode,
    camera_tolerance_s,
    interpolate,
    latest,
    segments,
    tick_grid,
)

MS = 1_000_000


def test_tick_grid_counts_duration_times_rate_plus_one():
    assert len(tick_grid(0, 2 * NS, 50)) == 101
    assert len(tick_grid(0, 2 * NS - 1, 50)) == 100
    g = tick_grid(5, 5 + NS, 50)
    assert g[0] == 5 and g[-1] == 5 + NS and np.all(np.diff(g) == 20 * MS)
    with pytest.raises(ValueError, match="ends before"):
        tick_grid(10, 5, 50)


def test_latest_is_at_or_before_never_future():
    s = Stream.of([10, 20, 30], np.array([1, 2, 3]))
    idx, age = latest(s, np.array([5, 10, 19, 20, 35]))
    assert idx.tolist() == [-1, 0, 0, 1, 2]
    assert np.isinf(age[0]) and age[1] == 0 and age[4] == pytest.approx(5 / NS)


def test_interpolate_between_close_samples_else_latest():
    s = Stream.of([0, 10 * MS, 100 * MS], np.array([[0.0], [1.0], [5.0]]))
    v, _ = interpolate(s, np.array([5 * MS, 50 * MS]), max_gap_s=0.02)
    assert v[0, 0] == pytest.approx(0.5)   # bracketing samples 10 ms apart: interpolated
    assert v[1, 0] == pytest.approx(1.0)   # 90 ms apart > 20 ms: latest, not interpolated across the gap


def test_stream_of_sorts_by_stamp():
    s = Stream.of([30, 10, 20], ["c", "a", "b"])
    assert s.stamps.tolist() == [10, 20, 30] and s.values == ["a", "b", "c"]


def _streams(dur_s=1.0, cam_drop=(), rate=50.0, cam_fps=25.0):
    t = np.arange(0, dur_s + 1e-9, 1 / rate)
    cam_t = np.array([x for x in np.arange(0, dur_s + 1e-9, 1 / cam_fps) if not any(a < x < b for a, b in cam_drop)])
    joints = Stream.of((t * NS).astype(np.int64), np.stack([t, -t], axis=1))
    command = Stream.of((t * NS).astype(np.int64) + MS, np.stack([t + 1, -t], axis=1))
    policy = Stream.of((t * NS).astype(np.int64) + MS, np.stack([t + 2, -t], axis=1))
    cams = {"cam": Stream.of((cam_t * NS).astype(np.int64), list(range(len(cam_t))))}
    return cams, joints, command, policy


def test_align_clean_episode_uses_every_tick():
    cams, joints, command, policy = _streams()
    inter = Stream.of([0, 400 * MS, 600 * MS], np.array([False, True, False]))
    active = Stream.of([0, 400 * MS, 600 * MS], np.array(["policy", "teleop", "policy"], dtype=object))
    al = align_episode(0, NS, 50.0, cameras=cams, joints=joints, command=command, policy=policy,
                       intervention=inter, active_source=active)
    assert al.num_ticks == 51 and al.valid.all() and not al.gaps
    t = np.arange(51) / 50
    np.testing.assert_allclose(al.state[:, 0], t, atol=1e-9)
    np.testing.assert_allclose(al.action[:, 0], t + 1, atol=1e-9)  # command sent 1 ms after the tick
    # camera at 25 fps: tick k uses frame k // 2 (latest at or before)
    assert al.camera_index["cam"].tolist() == [k // 2 for k in range(51)]
    human = (t >= 0.4 - 1e-9) & (t < 0.6 - 1e-9)
    assert al.intervention.tolist() == human.tolist()
    assert np.all(np.isnan(al.policy_action[~human]))
    np.testing.assert_allclose(al.policy_action[human, 0], t[human] + 2, atol=1e-9)


def test_align_reports_interior_gap_and_trims_short_edges():
    cams, joints, command, policy = _streams(cam_drop=[(0.3, 0.62)])
    al = align_episode(0, NS, 50.0, cameras=cams, joints=joints, command=command,
                       tol=Tolerances(camera_s=0.1))
    assert len(al.gaps) == 1 and al.gaps[0].stream == "cam"
    g = al.gaps[0]
    assert g.start_s > 0.3 and g.end_s < 0.66 and g.max_age_s > 0.1
    segs = segments(al.valid)
    assert len(segs) == 2 and segs[0][0] == 0 and segs[1][1] == 51
    assert "cam: gap at" in str(g)
    # joints starting 40 ms late: two edge ticks trimmed (within edge_s), not a gap
    cams, joints, command, _ = _streams()
    late = Stream.of(joints.stamps[2:], joints.values[2:])
    al2 = align_episode(0, NS, 50.0, cameras=cams, joints=late, command=command)
    assert al2.trimmed_start == 2 and not al2.gaps and al2.valid[2:].all() and not al2.valid[:2].any()


def test_align_rejects_bad_tolerances_and_modes():
    with pytest.raises(ValueError, match="camera_s"):
        Tolerances(camera_s=-1)
    cams, joints, command, _ = _streams()
    with pytest.raises(ValueError, match="joint_mode"):
        align_episode(0, NS, 50.0, cameras=cams, joints=joints, command=command, joint_mode="cubic")


def test_default_camera_tolerance_is_three_periods_of_the_slowest_camera_at_least_0_1_s():
    assert camera_tolerance_s([15.0, 15.0, 15.0]) == pytest.approx(0.2)  # 3 / 15
    assert camera_tolerance_s([30.0, 10.0]) == pytest.approx(0.3)        # the slowest: 3 / 10
    assert camera_tolerance_s([30.0]) == pytest.approx(0.1)              # 3 / 30
    assert camera_tolerance_s([60.0]) == pytest.approx(0.1)              # 3 / 60 = 0.05, below the 0.1 s floor
    assert camera_tolerance_s([]) == pytest.approx(0.1)


def test_one_dropped_frame_of_a_15_fps_camera_is_a_gap_at_0_1_s_not_at_its_default():
    # frames every 1/15 s; the one at 0.400 s dropped: frame 0.333 s serves ticks 0.34 .. 0.46 (the next is at
    # 0.467). Ticks 0.44 and 0.46 see it 0.107 and 0.127 s old: over 0.1 s, under 3 / 15 = 0.2 s.
    cams, joints, command, _ = _streams(cam_drop=[(0.39, 0.41)], cam_fps=15.0)
    al = align_episode(0, NS, 50.0, cameras=cams, joints=joints, command=command, tol=Tolerances(camera_s=0.1))
    assert len(al.gaps) == 1
    g = al.gaps[0]
    assert (g.start_s, g.end_s) == (pytest.approx(0.44), pytest.approx(0.46))
    assert g.max_age_s == pytest.approx(0.46 - 5 / 15)
    assert np.flatnonzero(~al.valid).tolist() == [22, 23]
    al = align_episode(0, NS, 50.0, cameras=cams, joints=joints, command=command,
                       tol=Tolerances(camera_s=camera_tolerance_s([15.0])))
    assert not al.gaps and al.valid.all()
