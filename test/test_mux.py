"""Unit tests of the ROS-free mux arbitration (recap_ros.control.mux): modes, priorities, preemption,
override, locks (latching e-stop, masking by priority, heartbeat), timeouts, validation and step-limited
handover. Time is driven explicitly (seconds), one control period = 20 ms."""
import math

import numpy as np
import pytest
import yaml

from recap_ros import paths
from recap_ros.control.mux import HOLD, TeleopMux
from recap_ros.station import parse_station

DT = 0.02


def make_station(locks=None, inputs=None):
    data = yaml.safe_load(paths.station_file("sim").read_text())
    if locks is not None:
        data["mux"]["locks"] = locks
    if inputs is not None:
        data["mux"]["inputs"] += inputs
    return parse_station(data, "test")


@pytest.fixture
def st():
    return make_station()


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self, dt=0.0):
        self.t += dt
        return self.t


def ready_mux(st, q0=None):
    m = TeleopMux(st.mux, st.robot)
    m.on_joint_state(np.zeros(14) if q0 is None else q0, 100.0)
    return m


def run(m, clock, n, feeds=(), robot=True):
    """n ticks; before each, every (name, positions) in feeds publishes and (robot=True) an ideal robot
    reports that it is at the last output. Returns the Tick list."""
    out = []
    for _ in range(n):
        now = clock(DT)
        if robot and m.ready:
            m.on_joint_state(m.output, now)
        for name, q in feeds:
            m.on_command(name, q, now)
        out.append(m.tick(now))
    return out


def both_live(m, clock, feeds):
    """Start both inputs publishing under an explicit hold (which is never preempted), then select policy:
    a teleop that is already publishing does not preempt."""
    m.on_mode("hold")
    run(m, clock, 1, feeds)
    m.on_mode("policy")


def test_nothing_before_joint_state_then_holds_it(st):
    m = TeleopMux(st.mux, st.robot)
    assert not m.ready and m.tick(1.0).positions is None
    m.on_command("policy", np.full(14, 0.1), 1.0)
    assert m.tick(1.02).positions is None
    assert m.on_joint_state(np.full(13, 0.1), 1.03) is not None  # wrong size: ignored
    assert m.on_joint_state(np.full(14, math.nan), 1.03) is not None
    q0 = np.full(14, 0.2)
    q0[6] = -0.001  # gripper a hair below its lower limit 0.0: clamped into the limits
    assert m.on_joint_state(q0, 1.04) is None
    assert m.output[6] == 0.0 and m.output[0] == 0.2
    assert any("clamped" in e for e in m.drain_events())
    m.on_joint_state(np.zeros(14), 1.05)  # later joint states do not move the hold position
    assert m.output[0] == 0.2


def test_default_policy_drives_after_step_limited_handover(st):
    m, clock = ready_mux(st), Clock()
    target = np.full(14, 0.1)
    ticks = run(m, clock, 10, [("policy", target)])
    vmax = np.asarray(st.robot.max_velocity)
    prev = np.zeros(14)
    for t in ticks:
        assert t.source == "policy" and not t.intervention and t.reason == ""
        assert np.all(np.abs(t.positions - prev) <= vmax * DT + 1e-12)
        prev = t.positions
    # 0.1 rad at 2 rad/s * 20 ms = 0.04 per tick -> reached on the third tick, then forwarded unchanged
    np.testing.assert_allclose(ticks[0].positions[0], 0.04)
    assert ticks[1].converging and not ticks[2].converging
    np.testing.assert_array_equal(ticks[-1].positions, target)
    assert ticks[0].source_changed and not any(t.source_changed for t in ticks[1:])


def test_timeout_falls_back_to_explicit_hold(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 5, [("policy", np.full(14, 0.05))])
    held = m.output.copy()
    ticks = run(m, clock, 15)  # policy silent for 300 ms > timeout 0.2 s
    live = [t for t in ticks if t.source == "policy"]
    hold = [t for t in ticks if t.source == HOLD]
    assert len(live) == 10 and len(hold) == 5  # 10 ticks = 200 ms within the timeout, then hold every tick
    assert hold[0].source_changed and "policy: stale" in hold[0].reason and "timeout 0.2" in hold[0].reason
    for t in hold:
        np.testing.assert_array_equal(t.positions, held)
    assert m.status(clock())["active_source"] == HOLD


def test_mode_selects_input_and_unknown_modes_are_rejected(st):
    m, clock = ready_mux(st), Clock()
    feeds = [("policy", np.full(14, 0.01)), ("teleop", np.full(14, 0.02))]
    both_live(m, clock, feeds)
    assert run(m, clock, 1, feeds)[0].source == "policy"
    assert m.on_mode("teleop") is None
    t = run(m, clock, 1, feeds)[0]
    assert t.source == "teleop" and t.intervention and t.source_changed
    err = m.on_mode("joystick")
    assert "joystick" in err and "teleop" in err and m.mode == "teleop" and m.stats.rejected_modes == 1
    m.on_mode("hold")
    t = run(m, clock, 1, feeds)[0]
    assert t.source == HOLD and t.reason == "mode hold" and not t.intervention
    m.on_mode("policy")
    assert run(m, clock, 1, feeds)[0].source == "policy"


def test_override_wins_while_true_and_releases(st):
    m, clock = ready_mux(st), Clock()
    feeds = [("policy", np.full(14, 0.01)), ("teleop", np.full(14, 0.02))]
    both_live(m, clock, feeds)
    assert run(m, clock, 2, feeds)[-1].source == "policy"
    m.on_override(True)
    assert m.switch_pending  # a switch: the node ticks at once
    t = run(m, clock, 1, feeds)[0]
    assert (t.source, t.intervention) == ("teleop", True)
    m.on_mode("policy")  # the mode cannot take control from a held deadman
    assert run(m, clock, 1, feeds)[0].source == "teleop"
    m.on_override(False)
    t = run(m, clock, 1, feeds)[0]
    assert (t.source, t.intervention) == ("policy", False)
    m.on_override(True)  # override with a silent teleop: hold, never the policy
    t = run(m, clock, 15, [feeds[0]])[-1]
    assert t.source == HOLD and "teleop (override): stale" in t.reason


def test_estop_latches_through_mode_and_override_until_released(st):
    m, clock = ready_mux(st), Clock()
    feeds = [("policy", np.full(14, 0.01)), ("teleop", np.full(14, 0.02))]
    both_live(m, clock, feeds)
    assert run(m, clock, 3, feeds)[-1].source == "policy"
    m.on_lock("estop", True, clock())
    held = m.output.copy()
    for action in (lambda: m.on_mode("teleop"), lambda: m.on_override(True),
                   lambda: m.on_override(False), lambda: m.on_mode("policy"),
                   lambda: m.on_lock("estop", True, clock())):
        action()
        for t in run(m, clock, 3, feeds):
            assert t.source == HOLD and "estop" in t.reason and "latched" in t.reason
            np.testing.assert_array_equal(t.positions, held)
    m.on_lock("estop", False, clock())
    t = run(m, clock, 1, feeds)[0]
    assert t.source == "policy"


def test_lock_masks_only_inputs_with_lower_or_equal_priority():
    st = make_station(locks=[{"name": "pause", "topic": "/pause", "priority": 100},
                             {"name": "hb", "topic": "/hb", "priority": 50, "heartbeat_timeout_s": 0.1}])
    m, clock = ready_mux(st), Clock()
    feeds = [("policy", np.full(14, 0.01)), ("teleop", np.full(14, 0.02))]
    both_live(m, clock, feeds)
    t = run(m, clock, 1, feeds)[0]  # heartbeat lock never heard: engaged, masks policy (10 <= 50)
    assert t.source == HOLD and "heartbeat lost (never received" in t.reason
    m.on_mode("teleop")
    assert run(m, clock, 1, feeds)[0].source == "teleop"  # teleop (100) is above the heartbeat lock
    m.on_lock("pause", True, clock())
    assert run(m, clock, 1, feeds)[0].source == HOLD  # priority 100 >= 100 masks teleop
    m.on_lock("pause", False, clock())
    m.on_mode("policy")
    for _ in range(4):  # heartbeat at 40 ms < 100 ms: released
        m.on_lock("hb", False, clock())
        assert run(m, clock, 2, feeds)[-1].source == "policy"
    t = run(m, clock, 6, feeds)[-1]  # heartbeat silent for 120 ms
    assert t.source == HOLD and "heartbeat lost (silent" in t.reason


@pytest.mark.parametrize("bad, why", [
    (np.r_[np.full(13, 0.01), math.nan], "non-finite position for right_gripper"),
    (np.full(13, 0.01), "expected 14 joint positions, got 13"),
    (np.r_[np.full(6, 0.01), 1.5, np.full(7, 0.01)], "left_gripper=1.5000 not in [0.0, 1.0]"),
    (np.r_[np.inf, np.full(13, 0.01)], "non-finite position for left_waist"),
])
def test_invalid_commands_are_dropped_counted_and_hold(st, bad, why):
    m, clock = ready_mux(st), Clock()
    good = np.full(14, 0.01)
    run(m, clock, 3, [("policy", good)])
    held = m.output.copy()
    err = m.on_command("policy", bad, clock())
    assert why in err
    for t in run(m, clock, 3):
        assert t.source == HOLD and why in t.reason and "rejected" in t.reason
        np.testing.assert_array_equal(t.positions, held)
        assert np.all(np.isfinite(t.positions)) and t.positions.shape == (14,)
    assert m.inputs["policy"].dropped == 1 and m.status(clock())["policy.dropped"] == "1"
    assert run(m, clock, 1, [("policy", good)])[0].source == "policy"


def test_handover_is_step_limited_every_tick_including_early_ticks(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.zeros(14))])
    far = np.asarray(st.robot.upper) * 0.9
    m.on_mode("teleop")
    vmax = np.asarray(st.robot.max_velocity)
    prev, last_t = m.output.copy(), clock()
    for i in range(200):
        now = clock(DT if i % 3 else DT / 4)  # some early (tick-aligned) ticks, 5 ms after the previous one
        m.on_joint_state(prev, now)  # an ideal robot, at the last command
        m.on_command("teleop", far, now)
        t = m.tick(now)
        assert np.all(np.abs(t.positions - prev) <= vmax * min(now - last_t, DT) + 1e-12)
        prev, last_t = t.positions, now
        if not t.converging:
            break
    np.testing.assert_array_equal(prev, far)
    assert i > 50  # waist 2.83 rad at 2 rad/s takes > 1.4 s


def test_human_input_that_starts_publishing_preempts_until_handed_back(st):
    m, clock = ready_mux(st), Clock()
    pol, tel = ("policy", np.full(14, 0.01)), ("teleop", np.full(14, 0.02))
    run(m, clock, 3, [pol])
    t = run(m, clock, 1, [pol, tel])[0]  # the teleoperator grabs the controls
    assert (m.mode, t.source, t.intervention) == ("teleop", "teleop", True) and m.stats.preemptions == 1
    m.on_mode("policy")  # hand back while the teleop device keeps publishing: no new preemption
    ticks = run(m, clock, 5, [pol, tel]) + run(m, clock, 15, [pol])
    assert all(t.source == "policy" for t in ticks) and m.stats.preemptions == 1
    assert run(m, clock, 1, [pol, tel])[0].source == "teleop"  # silent > timeout, then publishing again
    assert m.stats.preemptions == 2
    t = run(m, clock, 15, [pol])[-1]  # teleop goes quiet: hold, not a silent fall-back to the policy
    assert t.source == HOLD and "teleop: stale" in t.reason
    m.on_mode("hold")
    run(m, clock, 15, [pol])
    assert run(m, clock, 1, [pol, tel])[0].source == HOLD  # an explicit hold is never preempted
    m.on_lock("estop", True, clock())
    m.on_mode("policy")
    run(m, clock, 15, [pol])
    run(m, clock, 1, [pol, tel])  # masked by the e-stop: no preemption
    assert m.mode == "policy" and m.stats.preemptions == 2


def test_non_human_or_lower_priority_inputs_never_preempt():
    st = make_station(inputs=[{"name": "script", "topic": "/script/command", "priority": 200, "timeout_s": 0.2},
                              {"name": "spotter", "topic": "/spotter/command", "priority": 5, "timeout_s": 0.2,
                               "human": True}])
    m, clock = ready_mux(st), Clock()
    feeds = [("policy", np.full(14, 0.01)), ("script", np.full(14, 0.02)), ("spotter", np.full(14, 0.03))]
    ticks = run(m, clock, 5, feeds)
    assert all(t.source == "policy" for t in ticks) and m.stats.preemptions == 0


def test_switch_pending_for_mode_override_lock_changes_and_preemption_until_the_next_tick(st):
    m, clock = ready_mux(st), Clock()
    pol = ("policy", np.full(14, 0.01))
    run(m, clock, 2, [pol])
    assert not m.switch_pending
    m.on_command("policy", np.full(14, 0.01), clock(0.005))  # a command from the active source: the grid sends it
    m.on_mode("policy")  # no change
    m.on_mode("joystick")  # rejected
    m.on_override(False)
    m.on_lock("estop", False, clock())
    assert not m.switch_pending
    for change in (lambda: m.on_mode("hold"), lambda: m.on_override(True), lambda: m.on_override(False),
                   lambda: m.on_lock("estop", True, clock()), lambda: m.on_lock("estop", False, clock())):
        change()
        assert m.switch_pending
        m.tick(clock(0.003))
        assert not m.switch_pending
    m.on_mode("policy")
    run(m, clock, 15, [pol])
    m.on_command("teleop", np.full(14, 0.02), clock(0.004))  # preemption
    assert m.switch_pending and m.tick(clock()).source == "teleop"


# ------------------------------------------------------------------ the measured position (joint states)
def test_hold_holds_the_measured_position_taken_when_the_hold_began(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.full(14, 0.1))], robot=False)  # robot still measured at 0.0
    assert m.output[0] == pytest.approx(0.1)
    now = clock(0.25)  # policy silent for > 0.2 s: hold
    m.on_joint_state(np.full(14, 0.07), now)  # the robot lags its command by 0.03
    t = m.tick(now)
    assert t.source == HOLD
    np.testing.assert_allclose(t.positions, 0.07)  # where the robot is, not the last command (0.1)


def test_robot_moved_while_held_reanchors_at_its_measured_position(st):
    m, clock = ready_mux(st), Clock()
    m.on_mode("hold")
    run(m, clock, 2)
    moved = np.zeros(14)
    moved[1] = 1.0  # shoulder moved by hand / an episode reset: 1.0 rad > 2 rad/s * 0.15 s = 0.3 rad
    now = clock(DT)
    m.on_joint_state(moved, now)
    t = m.tick(now)
    np.testing.assert_array_equal(t.positions, moved)  # never a command back toward the old position
    assert m.stats.reanchors == 1
    assert any("re-anchored" in e and "left_shoulder commanded 0.000, measured 1.000" in e for e in m.drain_events())
    small = moved.copy()
    small[1] = 1.2  # within tolerance of the hold: the hold stays at 1.0
    now = clock(DT)
    m.on_joint_state(small, now)
    assert m.tick(now).positions[1] == pytest.approx(1.0) and m.stats.reanchors == 1


def test_resume_starts_from_the_measured_position_at_the_velocity_limit(st):
    m, clock = ready_mux(st), Clock()
    m.on_mode("hold")
    run(m, clock, 2)
    now = clock(DT)
    q = np.zeros(14)
    q[0] = 0.2  # pushed 0.2 rad while held (inside the 0.3 rad tolerance)
    m.on_joint_state(q, now)
    m.on_command("policy", np.full(14, 0.5), now)
    m.on_mode("policy")
    t = m.tick(now)
    # from the measured 0.2 (not the held 0.0), one 20 ms step at 2 rad/s = 0.04 toward 0.5
    assert t.source == "policy" and t.positions[0] == pytest.approx(0.24)
    assert t.positions[3] == pytest.approx(0.06)  # forearm roll 3 rad/s: 0.06 from its measured 0.0


def test_stale_joint_states_hold(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.full(14, 0.01))])
    held = m.output.copy()
    ticks = run(m, clock, 15, [("policy", np.full(14, 0.2))], robot=False)  # no joint state for 300 ms
    assert ticks[-1].source == HOLD and "joint states stale" in ticks[-1].reason
    assert [t.source for t in ticks].count("policy") == 10  # 200 ms = joint_state_timeout_s, then hold
    np.testing.assert_allclose(ticks[-1].positions, ticks[9].positions)
    assert np.all(np.abs(ticks[-1].positions - held) <= 10 * 0.04 + 1e-9)
