"""The one limiter (position, velocity, acceleration) with hand-computed numbers. Two joints, control period
0.1 s, velocity limit 1 rad/s (a step of at most 0.1 rad), acceleration limit 5 rad/s² (consecutive steps of a
joint that speeds up differ by at most 5 x 0.1² = 0.05 rad), position limits [-1, 1]."""
import numpy as np
import pytest

from recap_ros.control.limits import JointLimits, Limiter
from recap_ros.station import load_station

LIM = JointLimits(lower=np.array([-1.0, -1.0]), upper=np.array([1.0, 1.0]), max_velocity=np.array([1.0, 1.0]),
                  max_acceleration=np.array([5.0, 5.0]), dt=0.1)


def limiter(q=(0.0, 0.0)) -> Limiter:
    lm = Limiter(LIM)
    lm.reset(np.array(q))
    return lm


def test_from_rest_speeds_up_at_the_acceleration_limit_then_cruises_at_the_velocity_limit():
    lm = limiter()
    out = [lm.step([1.0, 0.0])[0] for _ in range(4)]
    # steps 0.05, 0.10 (0.05 + 0.05), 0.10 (velocity limit), 0.10
    assert out == pytest.approx([0.05, 0.15, 0.25, 0.35])


def test_slowing_down_is_free_and_never_overshoots():
    lm = limiter()
    for _ in range(3):
        lm.step([1.0, 0.0])                   # at 0.25, moving 0.1 per tick
    assert lm.step([0.25, 0.0])[0] == 0.25   # a hold at the current position stops at once
    lm = limiter()
    for _ in range(3):
        lm.step([1.0, 0.0])
    assert lm.step([0.27, 0.0])[0] == 0.27   # 0.02 ahead: arrives exactly, no overshoot


def test_reversal_is_limited_like_speeding_up():
    lm = limiter()
    for _ in range(3):
        lm.step([1.0, 0.0])                   # at 0.25, step +0.1
    out = [lm.step([-1.0, 0.0])[0] for _ in range(3)]
    # allowed steps: [min(0.1 - 0.05, 0), 0.15] -> 0; then [-0.05, 0.05] -> -0.05; then [-0.1, 0] -> -0.1
    assert out == pytest.approx([0.25, 0.20, 0.10])


def test_a_target_within_the_limits_is_returned_bit_for_bit():
    lm = limiter((0.3, 0.3))
    target = np.array([0.3 + 0.04, 0.3 - 0.03])  # steps 0.04 and -0.03 from rest: within 0.05
    out = lm.step(target)
    assert out.tobytes() == target.tobytes()


def test_each_joint_is_limited_on_its_own():
    lm = limiter()
    out = lm.step([1.0, 0.01])
    assert out[0] == pytest.approx(0.05) and out[1] == 0.01  # joint 1 is not slowed down by joint 0


def test_position_limits_clamp_the_target():
    lm = limiter((0.95, -0.97))
    out = [lm.step([5.0, -5.0]) for _ in range(3)]
    assert [o[0] for o in out] == pytest.approx([1.0, 1.0, 1.0])      # 0.05 would reach 1.0: stops there
    assert [o[1] for o in out] == pytest.approx([-1.0, -1.0, -1.0])   # 0.03 to the lower limit
    lm = limiter((5.0, -5.0))  # a start outside the limits is clamped into them
    assert lm.position.tolist() == [1.0, -1.0]


def test_missed_ticks_never_add_up_to_a_multi_tick_step():
    lm = limiter()
    for _ in range(3):
        lm.step([1.0, 0.0])                      # cruising at 0.1 per tick, at 0.25
    assert lm.step([1.0, 0.0], dt=0.35)[0] == pytest.approx(0.35)   # 3.5 periods late: still one step
    assert lm.step([1.0, 0.0], dt=0.03)[0] == pytest.approx(0.38)   # 30 ms after the previous output: 0.03


def test_bad_target_raises_and_changes_nothing():
    lm = limiter((0.1, 0.2))
    for bad in ([np.nan, 0.0], [0.0], [np.inf, 0.0]):
        with pytest.raises(ValueError, match="finite"):
            lm.step(bad)
    assert lm.position.tolist() == [0.1, 0.2]
    with pytest.raises(ValueError, match="reset"):
        Limiter(LIM).step([0.0, 0.0])


def test_station_limits():
    lim = JointLimits.from_robot(load_station("sim").robot)
    # sim.yaml: left_waist 2 rad/s, 20 rad/s²; left_wrist_angle 3 rad/s, 30 rad/s²; 50 Hz
    assert lim.dt == pytest.approx(0.02)
    assert lim.max_step[0] == pytest.approx(0.04) and lim.max_step[4] == pytest.approx(0.06)
    assert lim.max_step_change[0] == pytest.approx(0.008) and lim.max_step_change[4] == pytest.approx(0.012)
