"""policy_server + cfg_guidance over real rclpy middleware, with a fake policy implementing the runtime contract."""
import time
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import MessageLog, wait_for

pytestmark = pytest.mark.ros
rclpy = pytest.importorskip("rclpy")

from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from recap_ros import rosmsg  # noqa: E402
from recap_ros.policy.errors import PolicyError  # noqa: E402
from recap_ros.station import load_station  # noqa: E402

STATION = load_station("sim")
H, N = 50, 14


class FakePolicy:
    """The policy runtime contract: records every call, returns a slow ramp from the state (or NaN)."""

    def __init__(self, latency_s=0.03):
        self.info = SimpleNamespace(chunk_len=H, action_dim=N, camera_roles=("base", "left_wrist", "right_wrist"),
                                    bundle_id="fake")
        self.latency_s, self.nan, self.raise_error = latency_s, False, False
        self.calls = []

    def check_station(self, station):
        assert len(station.robot.joints) == N

    def infer(self, images, state, prompt, beta=1.0, seed=0, steps=None):
        assert len(images) == 3 and all(im.dtype == np.uint8 and im.shape[2] == 3 for im in images)
        self.calls.append(SimpleNamespace(state=np.array(state), prompt=prompt, beta=beta, seed=seed, t=time.time()))
        time.sleep(self.latency_s)
        if self.raise_error:  # what the real runtime does when its backend returns NaN
            raise PolicyError("backend torch returned an invalid chunk (shape (50, 14), finite: False)")
        if self.nan:
            return np.full((H, N), np.nan)
        return np.asarray(state)[None, :] + np.arange(H)[:, None] * 0.002


class FakeStation(Node):
    """Cameras + joint states at 50 Hz (each camera can be switched off), records /policy/command."""

    def __init__(self):
        super().__init__("fake_station")
        self.q = np.full(N, 0.1)
        self.q[6] = self.q[13] = 0.5
        self.cameras_on = [True] * 3
        self.received = MessageLog()
        img = np.zeros((24, 32, 3), np.uint8)
        self.cam_pubs = [(self.create_publisher(Image, c.image_topic, rosmsg.SENSOR_QOS), c) for c in STATION.cameras]
        self.img = img
        self.js_pub = self.create_publisher(JointState, STATION.robot.joint_states_topic, rosmsg.COMMAND_QOS)
        self.active_pub = self.create_publisher(String, STATION.mux.active_topic, rosmsg.LATCHED_QOS)
        self.create_subscription(JointState, STATION.policy.command_topic, self.received.callback("commands"),
                                 rosmsg.COMMAND_QOS)
        self.create_timer(0.02, self._tick)

    def _tick(self):
        now = rosmsg.now_ns(self)
        for on, (pub, cam) in zip(self.cameras_on, self.cam_pubs):
            if on:
                pub.publish(rosmsg.image_msg(self.img, now, cam.frame_id))
        self.js_pub.publish(rosmsg.joint_state_msg(STATION.robot.joint_names, self.q, now))

    def commands_since(self, t0):
        return [np.array(m.position) for _, m in self.received.since("commands", t0)]


@pytest.fixture
def server_factory(spin):
    from recap_ros.nodes.policy_server import PolicyServer

    def make(policy, **params):
        overrides = [Parameter("station", value="sim"), Parameter("stale_after_s", value=0.25)]
        overrides += [Parameter(k, value=v) for k, v in params.items()]
        server = PolicyServer(policy=policy, parameter_overrides=overrides)
        station = FakeStation()
        spin(server, station)
        return server, station

    return make


def executing(server):
    return server.hold_reason is None and server.stats["accepted"] >= 1


def test_executes_chunks_then_stale_camera_holds(server_factory):
    policy = FakePolicy()
    server, station = server_factory(policy)
    wait_for(lambda: executing(server), what="first chunk")
    wait_for(lambda: len(station.commands_since(0)) > 20, what="commands")
    station.cameras_on[2] = False  # right wrist camera stops
    wait_for(lambda: (server.hold_reason or "").startswith("stale observation"), what="stale hold")
    assert "cam_right_wrist/image_raw image older than 0.25 s" in server.hold_reason
    time.sleep(0.3)
    held = station.commands_since(time.monotonic() - 0.3)
    assert len(held) >= 5, "the 50 Hz stream keeps running while holding"
    assert all(np.array_equal(c, held[0]) for c in held), "holding: the command does not move"
    n_calls = len(policy.calls)
    time.sleep(0.2)
    assert len(policy.calls) <= n_calls + 1, "no new plans from a stale observation"
    station.cameras_on[2] = True
    wait_for(lambda: executing(server), what="resume after the camera is back")


def test_nan_from_model_holds_and_reports_error(server_factory):
    policy = FakePolicy()
    policy.nan = True
    server, station = server_factory(policy, retry_after_s=0.1)
    wait_for(lambda: server.stats["rejected"] >= 2, what="rejected NaN chunks")
    assert "non-finite" in server.hold_reason
    wait_for(lambda: "non-finite" in server.stats["last_error"], what="error report")
    cmds = station.commands_since(0)
    assert cmds and all(np.all(np.isfinite(c)) for c in cmds)
    assert all(np.allclose(c, station.q) for c in cmds), "holds the start position, never moves"
    policy.nan = False
    wait_for(lambda: executing(server), what="recovery with a good model output")
    # the runtime's own NaN check raises PolicyError: hold at once (not after the running chunk) and report
    policy.raise_error = True
    wait_for(lambda: (server.hold_reason or "").startswith("inference failed: PolicyError"),
             what="hold on a runtime error")
    wait_for(lambda: "finite: False" in server.stats["last_error"], what="error report")
    t0 = time.monotonic()
    time.sleep(0.2)
    held = station.commands_since(t0)
    assert held and all(np.array_equal(c, held[0]) for c in held)


def test_beta_rejected_and_accepted_reaches_engine_input(server_factory, spin):
    from recap_ros.nodes.cfg_guidance import CfgGuidance

    policy = FakePolicy()
    server, station = server_factory(policy, warmup=False)  # the warm-up also runs a guided batch
    guidance = CfgGuidance(parameter_overrides=[Parameter("station", value="sim")])
    spin(guidance)
    wait_for(lambda: executing(server), what="first chunk")
    assert all(c.beta == 1.0 for c in policy.calls)
    for bad in (3.0, 1.2):
        result = guidance.set_parameters([Parameter("beta", value=bad)])[0]
        assert not result.successful and result.reason, bad
        assert guidance.get_parameter("beta").value == 1.0
    assert "[1.5, 2.5]" in guidance.set_parameters([Parameter("beta", value=1.2)])[0].reason
    assert guidance.set_parameters([Parameter("beta", value=2.0)])[0].successful
    wait_for(lambda: server.beta == 2.0, what="β on the server")
    n = len(policy.calls)
    wait_for(lambda: len(policy.calls) > n + 1, what="next chunks")
    assert policy.calls[-1].beta == 2.0


def test_mux_hand_back_replans_from_current_state(server_factory):
    policy = FakePolicy()
    server, station = server_factory(policy)
    wait_for(lambda: executing(server), what="first chunk")
    station.active_pub.publish(String(data="teleop"))
    wait_for(lambda: not server._in_control, what="teleop in control")
    q_new = station.q.copy()
    q_new[0] += 0.4  # the teleoperator moved the robot
    station.q = q_new
    wait_for(lambda: any(np.allclose(c, q_new) for c in station.commands_since(time.monotonic() - 0.1)),
             what="command following the robot")
    n = len(policy.calls)
    t_back = time.monotonic()
    station.active_pub.publish(String(data="policy"))
    wait_for(lambda: len(policy.calls) > n, what="new plan after hand-back")
    assert np.allclose(policy.calls[n].state, q_new), "planned from the current joint state"
    wait_for(lambda: executing(server), what="executing after hand-back")
    cmds = np.array(station.commands_since(t_back))
    steps = np.abs(np.diff(np.vstack([q_new, cmds]), axis=0))
    assert np.all(steps <= server.limits.max_step + 1e-9), "no jump at the hand-back"


def test_tick_process_exit_is_reported(server_factory):
    policy = FakePolicy()
    server, station = server_factory(policy)
    wait_for(lambda: executing(server), what="first chunk")
    server._tick_proc.kill()
    wait_for(lambda: "tick process exited" in server.stats["last_error"], what="tick exit report")
    t0 = time.monotonic()
    time.sleep(0.2)
    assert not station.commands_since(t0), "no commands without the tick process"
