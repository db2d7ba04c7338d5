"""policy_server's tick state machine (ROS-free): plans, holds on stale input and bad chunks, mux hand-back."""
import numpy as np
import pytest

from recap_ros.control.policy_tick import PolicyTick, TickConfig
from recap_ros.control.stitching import JointLimits
from recap_ros.station import load_station

H, N = 50, 14
MS = 1_000_000
PERIOD = 20 * MS
STALE = 250 * MS
RETRY = 500 * MS
CAMS = ("/cam_base/image_raw", "/cam_left_wrist/image_raw", "/cam_right_wrist/image_raw")


class Station:
    """Drives a PolicyTick tick by tick with fresh observations (or not), collecting its reports."""

    def __init__(self):
        limits = JointLimits.from_robot(load_station("sim").robot)
        self.reports = []
        self.tick = PolicyTick(TickConfig(limits, H, 25, 5, STALE, RETRY, CAMS, "/joint_states"),
                               lambda *r: self.reports.append(r))
        self.q = np.full(N, 0.1)
        self.now = 1_000 * MS
        self.cameras_on = [True] * 3
        self.commands = []

    def step(self, n=1):
        for _ in range(n):
            for i, on in enumerate(self.cameras_on):
                if on:
                    self.tick.event("image", i, self.now)
            self.tick.event("joint", self.q.copy(), self.now)
            self.commands.append(self.tick.step(1, self.now))
            self.now += PERIOD

    @classmethod
    def executing(cls, ticks):
        """Started, the first plan answered, then ``ticks`` ticks run."""
        s = cls()
        s.tick.event("start")
        s.step()
        s.answer()
        s.step(ticks)
        return s

    def kinds(self, kind):
        return [r for r in self.reports if r[0] == kind]

    def answer(self, chunk_fn=None, error=None):
        """Answer the newest plan request with a ramp from its state (or chunk_fn(state), or an error)."""
        _, request, q, _ = self.kinds("plan")[-1]
        chunk = None if error else (chunk_fn or (lambda s: s[None, :] + np.arange(H)[:, None] * 0.002))(q)
        self.tick.event("result", request, chunk, error)


def test_stopped_publishes_nothing_and_unknown_event_is_named():
    s = Station()
    s.step(3)
    assert s.commands == [None, None, None] and not s.kinds("plan")
    with pytest.raises(ValueError, match="'teleport'"):
        s.tick.event("teleport")


def test_plans_from_the_joint_state_and_executes_the_chunk():
    s = Station()
    s.tick.event("start")
    s.step()
    (_, request, q, stamp), = s.kinds("plan")
    assert np.array_equal(q, s.q) and stamp == 1_000 * MS
    s.step(2)
    s.answer()
    s.step(10)
    assert s.kinds("accepted")[0][2].delay_ticks == 3
    assert s.kinds("hold")[-1] == ("hold", None)
    assert s.commands[-1][0] > s.q[0], "moving along the chunk"


def test_stale_camera_holds_and_does_not_plan():
    s = Station.executing(5)
    s.cameras_on[2] = False
    s.step(20)
    assert s.kinds("hold")[-1][1] == f"stale observation: {CAMS[2]} image older than 0.25 s"
    assert np.array_equal(s.commands[-1], s.commands[-2]), "holding still"
    plans = len(s.kinds("plan"))
    s.step(30)
    assert len(s.kinds("plan")) == plans


def test_invalid_chunk_is_rejected_held_and_retried_after_the_wait():
    s = Station()
    s.tick.event("start")
    s.step()
    s.answer(chunk_fn=lambda q: np.full((H, N), np.nan))
    s.step()
    (_, _, reason, current), = s.kinds("rejected")
    assert "non-finite" in reason and current
    assert "non-finite" in s.kinds("hold")[-1][1]
    s.step(RETRY // PERIOD - 2)
    assert len(s.kinds("plan")) == 1, "waits retry_ns before asking again"
    s.step(3)
    assert len(s.kinds("plan")) == 2
    assert all(np.array_equal(c, s.q) for c in s.commands), "never moved"


def test_inference_error_holds_at_once():
    s = Station.executing(26)  # the running chunk asks for the next one at replan_every
    s.answer(error="PolicyError: boom")
    s.step()
    assert s.kinds("failed")[0][2:] == ("PolicyError: boom", True)
    assert s.kinds("hold")[-1] == ("hold", "inference failed: PolicyError: boom")


def test_mux_hand_back_replans_from_the_current_state():
    s = Station.executing(5)
    s.tick.event("active", "teleop")
    s.q = s.q + 0.3  # the teleoperator moves the robot
    s.step(60)
    assert np.allclose(s.commands[-1], s.q), "follows the robot while someone else drives"
    plans = len(s.kinds("plan"))
    s.tick.event("active", "policy")
    s.step()
    assert len(s.kinds("plan")) == plans + 1
    assert np.array_equal(s.kinds("plan")[-1][2], s.q), "planned from the current joint state"
    assert ("log", "mux handed control back: re-planning from the current state") in s.reports


def test_episode_end_publishes_nothing_and_start_waits_for_observations_of_the_new_episode():
    s = Station.executing(10)
    assert s.commands[-1] is not None
    s.tick.event("episode", False, s.now)
    s.step(3)
    assert s.commands[-3:] == [None, None, None]  # between episodes: the mux holds the robot, not us
    start = s.now + 5 * MS  # the next episode starts between two ticks
    s.q = np.full(N, -0.4)  # ... at a new pose (grippers 0.4: inside their 0..1 range)
    s.q[[6, 13]] = 0.4
    s.tick.event("episode", True, start)
    plans = len(s.kinds("plan"))
    s.step()  # observations stamped before the start: nothing published, nothing planned
    assert s.commands[-1] is None and len(s.kinds("plan")) == plans
    assert "joint_states message of the new episode" in s.kinds("hold")[-1][1]
    s.step()  # stamped after the start: plan from the new pose, hold it meanwhile
    assert len(s.kinds("plan")) == plans + 1
    np.testing.assert_array_equal(s.kinds("plan")[-1][2], s.q)
    np.testing.assert_array_equal(s.commands[-1], s.q)


def test_episode_start_holds_are_routine_and_faults_are_not():
    s = Station.executing(10)
    s.tick.event("episode", False, s.now)
    s.step(2)
    s.tick.event("episode", True, s.now + 5 * MS)
    first = len(s.kinds("hold"))
    s.step(3)  # waits for the new episode's joint state, then for the first chunk
    starts = [r[1] for r in s.kinds("hold")[first:]]
    assert starts == ["waiting for a /joint_states message of the new episode", "waiting for the first chunk"]
    assert all(PolicyTick.routine_hold(r) for r in starts) and PolicyTick.routine_hold("stopped")
    for fault in ("stale observation: /cam_base/image_raw image older than 0.25 s",
                  "inference failed: PolicyError: boom", "overrun: chunk exhausted before the next chunk arrived",
                  None):
        assert not PolicyTick.routine_hold(fault), fault
