"""Unit tests of the ROS-free mux arbitration (recap_ros.control.mux): modes, priorities, preemption,
override, locks (latching e-stop, masking by priority, heartbeat), timeouts, validation, limited handover,
event-driven forwarding, the measured position and the tracking tolerance. Time is driven explicitly (seconds),
one control period = 20 ms. Sim station limits: arms and grippers 2 rad/s and 20 rad/s² (a step of at most
0.04 rad, speeding up by at most 0.008 rad per tick), wrists 3 rad/s and 30 rad/s² (0.06, 0.012); tracking
tolerance 0.15 s x max_velocity = 0.3 rad (wrists 0.45 rad)."""
import dataclasses
import math

import numpy as np
import pytest
import yaml

from recap_ros import paths
from recap_ros.control.freshness import taken_ns, taken_s
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
    """n control periods. In each, at its start ``now`` an ideal robot (robot=True) reports that it is at the
    last output; at now + 1 ms every (name, positions) in feeds publishes; at now + 2 ms the grid ticks. Every
    message is an event (a tick). Returns per period the tick that published last (the grid tick when nothing
    was published), its ``source_changed`` true when any tick of the period changed the source."""
    out = []
    for _ in range(n):
        now = clock(DT)
        ticks = []
        if robot and m.ready:
            m.on_joint_state(m.out.position, now)
            ticks.append(m.tick(now))
        for name, q in feeds:
            m.on_command(name, q, now + 0.001)
            ticks.append(m.tick(now + 0.001))
        ticks.append(m.tick(now + 0.002, grid=True))
        sent = [t for t in ticks if t.positions is not None]
        out.append(dataclasses.replace(sent[-1] if sent else ticks[-1],
                                       source_changed=any(t.source_changed for t in ticks)))
    return out


def held(st):
    """A mux in an explicit hold for two periods: it, the clock and the time of the next period."""
    m, clock = ready_mux(st), Clock()
    m.on_mode("hold")
    run(m, clock, 2)
    return m, clock, clock(DT)


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
    assert m.out.position[6] == 0.0 and m.out.position[0] == 0.2
    assert any("clamped" in e for e in m.drain_events())
    m.on_joint_state(np.zeros(14), 1.05)  # later joint states do not move the hold position
    assert m.out.position[0] == 0.2


def test_default_policy_drives_after_step_limited_handover(st):
    m, clock = ready_mux(st), Clock()
    target = np.full(14, 0.1)
    ticks = run(m, clock, 10, [("policy", target)])
    assert all(t.source == "policy" and not t.intervention and t.reason == "" for t in ticks)
    # from rest at 0: steps grow by the acceleration limit, the last one slows down onto the target
    # arm joint 0: 0.008, 0.016, 0.024, 0.032 -> 0.008, 0.024, 0.048, 0.080, then the remaining 0.02
    # wrist joint 3: 0.012, 0.024, 0.036 -> 0.012, 0.036, 0.072, then the remaining 0.028
    np.testing.assert_allclose([t.positions[0] for t in ticks[:5]], [0.008, 0.024, 0.048, 0.080, 0.1])
    np.testing.assert_allclose([t.positions[3] for t in ticks[:4]], [0.012, 0.036, 0.072, 0.1])
    assert ticks[3].converging and not ticks[4].converging
    np.testing.assert_array_equal(ticks[-1].positions, target)  # then forwarded bit for bit
    assert ticks[0].source_changed and not any(t.source_changed for t in ticks[1:])


def test_timeout_falls_back_to_explicit_hold(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 8, [("policy", np.full(14, 0.05))])
    held = m.out.position.copy()
    ticks = run(m, clock, 15)  # policy silent for 300 ms > timeout 0.2 s
    # the last command came 1 ms into its period; the grid ticks 2 ms into each: ages 0.021, 0.041, ... s;
    # 0.181 is the last within 0.2 s (9 periods, nothing to publish: the command was forwarded on arrival)
    live = [t for t in ticks if t.source == "policy"]
    hold = [t for t in ticks if t.source == HOLD]
    assert len(live) == 9 and len(hold) == 6 and all(t.positions is None for t in live)
    assert hold[0].source_changed and "policy: stale" in hold[0].reason and "timeout 0.2" in hold[0].reason
    for t in hold:  # a steady stream while holding: every grid tick
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
    held = m.out.position.copy()
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
    held = m.out.position.copy()
    err = m.on_command("policy", bad, clock())
    assert why in err
    for t in run(m, clock, 3):
        assert t.source == HOLD and why in t.reason and "rejected" in t.reason
        np.testing.assert_array_equal(t.positions, held)
        assert np.all(np.isfinite(t.positions)) and t.positions.shape == (14,)
    assert m.inputs["policy"].dropped == 1 and m.status(clock())["policy.dropped"] == "1"
    assert run(m, clock, 1, [("policy", good)])[0].source == "policy"


def test_handover_is_step_limited_every_output_including_early_ones(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.zeros(14))])
    near = np.full(14, 0.25)  # within the 0.3 rad tracking tolerance of the robot at 0
    m.on_mode("teleop")
    vmax = np.asarray(st.robot.max_velocity)
    prev, last_t = m.out.position.copy(), clock()
    for i in range(200):
        now = clock(DT if i % 3 else DT / 4)  # some early commands, 5 ms after the previous one
        m.on_joint_state(prev, now)  # an ideal robot, at the last command
        m.on_command("teleop", near, now)
        t = m.tick(now)
        assert np.all(np.abs(t.positions - prev) <= vmax * min(now - last_t, DT) + 1e-12)
        prev, last_t = t.positions, now
        if not t.converging:
            break
    np.testing.assert_array_equal(prev, near)
    assert i >= 8  # 0.25 rad at <= 0.04 per 20 ms (and less after 5 ms) takes more than 6 outputs


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


def test_each_command_is_output_once_on_arrival_and_the_grid_sends_only_holds(st):
    m, clock = ready_mux(st), Clock()
    q = np.full(14, 0.01)
    run(m, clock, 3, [("policy", q)])
    now = clock(DT)
    assert m.tick(now, grid=True).positions is None  # an input drives: the grid publishes nothing
    q2 = q + 0.001
    m.on_command("policy", q2, now + 0.005)
    t = m.tick(now + 0.005)
    np.testing.assert_array_equal(t.positions, q2)  # at once, bit for bit
    assert m.tick(now + 0.006).positions is None and m.tick(now + 0.007, grid=True).positions is None  # once
    m.on_command("teleop", np.full(14, 0.02), now + 0.008)  # preemption: the new source's command at once
    t = m.tick(now + 0.008)
    assert t.source == "teleop" and t.positions is not None and t.source_changed
    m.on_mode("hold")  # a hold is published by the event that starts it
    t = m.tick(now + 0.009)
    assert t.source == HOLD and t.positions is not None
    assert m.tick(now + 0.010).positions is None  # later events: nothing; the grid: the hold, every tick
    assert all(m.tick(now + 0.02 * k, grid=True).positions is not None for k in range(1, 4))
    m.on_mode("policy")  # a switch to an input outputs its newest (unsent) command at once
    m.on_joint_state(m.out.position, now + 0.07)
    m.on_command("policy", q, now + 0.07)
    assert m.tick(now + 0.07).source == "policy"
    assert m.stats.forwarded == 6  # 3 in run, q2, teleop's at the preemption, policy's at the switch


# ------------------------------------------------------------------ the measured position (joint states)
def test_hold_holds_the_measured_position_taken_when_the_hold_began(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.full(14, 0.1))], robot=False)  # robot still measured at 0.0
    assert m.out.position[0] == pytest.approx(0.048)  # 0.008 + 0.016 + 0.024
    now = clock(0.25)  # policy silent for > 0.2 s: hold
    m.on_joint_state(np.full(14, 0.03), now)  # the robot lags its command
    t = m.tick(now, grid=True)
    assert t.source == HOLD
    np.testing.assert_allclose(t.positions, 0.03)  # where the robot is, not the last command (0.048)


def test_robot_moved_while_held_reanchors_at_its_measured_position(st):
    m, clock, now = held(st)
    moved = np.zeros(14)
    moved[1] = 1.0  # shoulder moved by hand / an episode reset: 1.0 rad > 2 rad/s * 0.15 s = 0.3 rad
    m.on_joint_state(moved, now)
    t = m.tick(now)  # at once, on the joint state's event: not the next grid tick
    np.testing.assert_array_equal(t.positions, moved)  # never a command back toward the old position
    assert m.stats.reanchors == 1
    assert any("re-anchored" in e and "left_shoulder 0.0000 vs measured 1.0000 (tolerance 0.300)" in e
               for e in m.drain_events())
    small = moved.copy()
    small[1] = 1.2  # within tolerance of the hold: the hold stays at 1.0
    now = clock(DT)
    m.on_joint_state(small, now)
    assert m.tick(now).positions is None  # within the tolerance: no event output; the grid holds 1.0
    assert m.tick(now, grid=True).positions[1] == pytest.approx(1.0) and m.stats.reanchors == 1


def test_resume_starts_from_the_measured_position_at_rest(st):
    m, clock, now = held(st)
    q = np.zeros(14)
    q[0] = 0.2  # pushed 0.2 rad while held (inside the 0.3 rad tolerance)
    m.on_joint_state(q, now)
    m.on_command("policy", np.full(14, 0.25), now)  # within the 0.3 rad tolerance of the measured position
    m.on_mode("policy")
    t = m.tick(now)
    # from the measured 0.2 (not the held 0.0) at rest: one step of the acceleration limit, 0.008 toward 0.25
    assert t.source == "policy" and t.positions[0] == pytest.approx(0.208)
    assert t.positions[3] == pytest.approx(0.012)  # forearm roll 30 rad/s²: 0.012 from its measured 0.0


def test_stale_joint_states_hold(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.full(14, 0.01))])
    ticks = run(m, clock, 15, [("policy", np.full(14, 0.2))], robot=False)  # no joint state for 300 ms
    assert ticks[-1].source == HOLD and "joint states stale" in ticks[-1].reason
    # the last joint state came at the start of period 3; commands 1 ms into each later period: ages 0.021,
    # ..., 0.201 s: 9 driven by the policy, then the grid (2 ms in) holds
    assert [t.source for t in ticks].count("policy") == 9
    # position unknown: the hold keeps the last output, 0.2 (0.01 + 0.008 + 0.016 + 0.024 + 0.032 + 0.04 + 0.04
    # = 0.17, then the remaining 0.03)
    np.testing.assert_allclose(ticks[-1].positions, 0.2)
    np.testing.assert_allclose(ticks[8].positions, 0.2)


def test_command_beyond_the_tracking_tolerance_holds_with_an_error_until_one_is_within(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.zeros(14))])
    far = np.zeros(14)
    far[1] = 0.35  # shoulder: 0.35 rad from the measured 0.0 > 0.3 rad
    t = run(m, clock, 1, [("policy", far)])[0]
    assert t.source == HOLD and t.source_changed
    np.testing.assert_array_equal(t.positions, np.zeros(14))  # holds where the robot is
    assert m.tracking_error == t.reason and "left_shoulder 0.3500 vs measured 0.0000 (tolerance 0.300)" in t.reason
    assert m.stats.tracking_errors == 1 and m.status(clock())["tracking_error"] == m.tracking_error
    assert any("holding: policy: command farther than the tracking tolerance" in e for e in m.drain_events())
    run(m, clock, 3, [("policy", far)])
    assert m.stats.tracking_errors == 1  # one error per episode of far commands
    near = np.zeros(14)
    near[1] = 0.25
    t = run(m, clock, 1, [("policy", near)])[0]
    assert t.source == "policy" and m.tracking_error == "" and t.positions[1] == pytest.approx(0.008)


def test_a_command_stamped_long_before_it_arrived_is_stale_and_a_clock_ahead_does_not_make_it_fresh(st):
    m, clock = ready_mux(st), Clock()
    run(m, clock, 3, [("policy", np.zeros(14))])
    now = clock(DT)
    m.on_command("policy", np.full(14, 0.01), now, taken=now - 0.25)  # stamped 250 ms before it arrived
    t = m.tick(now)
    assert t.source == HOLD and "stale (last command 0.250 s old" in t.reason
    m.on_command("policy", np.full(14, 0.01), now + 0.01, taken=now + 5.0)  # stamped 5 s in the future
    assert m.tick(now + 0.01).source == "policy"
    assert m.tick(now + 0.22, grid=True).source == HOLD  # 0.21 s after it arrived: stale by receive time


def test_a_message_is_taken_at_the_older_of_its_stamp_and_its_receive_time():
    assert taken_ns(1_000, 1_500) == 1_000  # delayed 500 ns: ages from its stamp
    assert taken_ns(2_000, 1_500) == 1_500  # stamped in the future (clock ahead): ages from its receipt
    assert taken_ns(0, 1_500) == 1_500      # unstamped
    # on the monotonic clock: received at 10.0 s, stamped 0.25 s before its ROS receive time -> 9.75 s
    assert taken_s(1_000_000_000, 1_250_000_000, 10.0) == pytest.approx(9.75)
    assert taken_s(2_000_000_000, 1_250_000_000, 10.0) == 10.0


def test_a_hold_re_anchors_on_a_stale_joint_state_that_shows_the_robot_elsewhere(st):
    m, clock, now = held(st)
    moved = np.zeros(14)
    moved[8] = -0.55  # a restarted driver reports the arm elsewhere, stamped 1 s ago: stale, but the newest word
    m.on_joint_state(moved, now - 1.0)
    t = m.tick(now)
    assert t.source == HOLD and m.stats.reanchors == 1
    np.testing.assert_array_equal(t.positions, moved)
    t = m.tick(now + 0.02, grid=True)
    np.testing.assert_array_equal(t.positions, moved)  # the grid holds there
