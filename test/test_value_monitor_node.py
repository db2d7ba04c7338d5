"""value_monitor as a real ROS node: its own process on a small value bundle (V on /value at the station's 5 Hz,
equal to the offline value of the same observation; a missing camera is reported, not fatal; a bad bundle is
one clear line and the node stays up), and in this process with scripted values (a drop raises /value/alert and
a diagnostics WARN; none between an episode's end and the next start)."""
import json
import threading
import time

import numpy as np
import pytest
from helpers import TIMING, MessageLog, start_node, stop_node, wait_for

from recap_ros.station import load_station

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]

ST = load_station("sim")
MON = ST.value_monitor
STATE = np.linspace(-0.5, 0.5, 14)
PROMPT = ST.policy.prompt


def views():
    """Three distinct 64 x 48 RGB views (the node resizes them to the bundle's input size)."""
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in ST.cameras]


class Probe:
    """Publishes camera frames and joint states at 20 Hz; records /value, /value/alert and /diagnostics."""

    def __init__(self, cameras):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String

        from recap_ros import rosmsg

        self.rosmsg, self.String = rosmsg, String
        self.node = n = Node("value_probe")
        self.log = MessageLog()
        n.create_subscription(JointState, MON.value_topic, self.log.callback("value"), rosmsg.EVENT_QOS)
        n.create_subscription(String, MON.alert_topic, self.log.callback("alert"), rosmsg.EVENT_QOS)
        n.create_subscription(DiagnosticArray, "/diagnostics", self.log.callback("diag"), 10)
        self.img_pub = [n.create_publisher(Image, c.image_topic, rosmsg.SENSOR_QOS) for c in ST.cameras]
        self.js_pub = n.create_publisher(JointState, ST.robot.joint_states_topic, rosmsg.COMMAND_QOS)
        self.event_pub = n.create_publisher(String, ST.episode_topic, rosmsg.EVENT_HISTORY_QOS)
        self.cameras = set(cameras)  # indices of the cameras that publish
        self.views = views()
        self.image_stamps: set[int] = set()
        self._stop = threading.Event()
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(n)
        threading.Thread(target=self.executor.spin, daemon=True).start()
        threading.Thread(target=self._feed, daemon=True).start()

    def _feed(self):
        while not self._stop.is_set():
            now = self.rosmsg.now_ns(self.node)
            for i in sorted(self.cameras):
                self.image_stamps.add(now - 10_000_000)  # the frames are 10 ms older than the joint state
                self.img_pub[i].publish(self.rosmsg.image_msg(self.views[i], now - 10_000_000, "cam"))
            self.js_pub.publish(self.rosmsg.joint_state_msg(ST.robot.joint_names, STATE, now))
            time.sleep(0.05)

    def event(self, **payload):
        self.event_pub.publish(self.String(data=json.dumps(payload)))

    def statuses(self):
        return [s for m in self.log.messages("diag") for s in m.status if s.name == "value_monitor"]

    def close(self):
        self._stop.set()
        self.executor.shutdown(timeout_sec=2)
        self.node.destroy_node()


@pytest.fixture
def value_bundle(tmp_path):
    """A small value bundle with random weights (shape of the default backbone)."""
    import torch

    from recap_ros.recap.value import ValueConfig, ValueModel, default_backbone, save_value

    torch.manual_seed(0)
    return save_value(ValueModel(ValueConfig(default_backbone(image_size=16, patch_size=8))), tmp_path / "v")


@pytest.fixture
def probe(rclpy_context):
    made = []

    def make(cameras=range(len(ST.cameras))):
        made.append(Probe(cameras))
        return made[-1]

    yield make
    for p in made:
        p.close()


@TIMING  # the rate check on a loaded 2-core machine
def test_node_publishes_v_at_its_rate_equal_to_the_offline_value(value_bundle, probe, tmp_path):
    from recap_ros.recap.data import resize_views
    from recap_ros.recap.value import load_value, predict_values

    p = probe(cameras=[0, 1])  # the right wrist camera is missing at first
    proc = start_node("value_monitor", f"bundle:={value_bundle}", log=tmp_path / "node.log")
    try:
        wait_for(lambda: any("no data yet from cam_right_wrist" in s.message for s in p.statuses()), 60,
                 "a diagnostics WARN naming the missing camera")
        assert p.log.count("value") == 0 and proc.poll() is None
        p.cameras.add(2)
        assert p.log.wait(lambda: len(p.log.data["value"]) >= 12, 30), "fewer than 12 values"
        t0 = time.monotonic()
        assert p.log.wait(lambda: p.log.data["value"][-1][0] > t0 + 2.0, 10)
        got = p.log.since("value", t0)
        rate = (len(got) - 1) / (got[-1][0] - got[0][0])
        assert rate >= 0.9 * MON.rate_hz, f"{rate:.2f} values/s"
        model = load_value(value_bundle)
        expected = predict_values(model, resize_views(p.views, 16)[None], STATE[None].astype(np.float32),
                                  [PROMPT], np.zeros(1, np.int64))[0]
        for _, m in got:
            assert list(m.name) == ["value", "steps_to_go"]
            v, steps = m.position
            assert v == pytest.approx(expected, abs=1e-5) and -1.0 <= v <= 0.0
            assert steps == pytest.approx(-v * MON.max_len)
            assert m.header.stamp.sec * 10**9 + m.header.stamp.nanosec in p.image_stamps  # observation time
        assert any(s.level == b"\x00" for s in p.statuses())
    finally:
        assert stop_node(proc) < 10.0
    assert proc.returncode == 0, (tmp_path / "node.log").read_text()


def test_a_bad_bundle_is_one_clear_line_and_the_node_stays_up(probe, tmp_path):
    p = probe()
    log = tmp_path / "node.log"
    proc = start_node("value_monitor", f"bundle:={tmp_path / 'nowhere'}", log=log)
    try:
        wait_for(lambda: any(s.level == b"\x02" for s in p.statuses()), 60, "a diagnostics ERROR")
        assert proc.poll() is None and p.log.count("value") == 0
        lines = [ln for ln in log.read_text().splitlines() if "not loaded" in ln]
        assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0], log.read_text()
    finally:
        stop_node(proc)
    assert proc.returncode == 0


def test_a_drop_raises_an_alert_and_a_warn_but_not_between_episodes(probe, spin):
    from rclpy.parameter import Parameter

    from recap_ros.nodes.value_monitor import ValueMonitorNode

    script = iter([-0.25] * 5 + [-0.75] + [-0.25] * 1000)  # one fall of 0.5 (> drop 0.15) within 0.2 s
    node = ValueMonitorNode(value=lambda views, state, prompt: next(script), parameter_overrides=[
        Parameter("rate_hz", value=10.0)])
    p = probe()
    spin(node)
    assert p.log.wait(lambda: len(p.log.data["alert"]) == 1, 20), "no alert"
    text = p.log.messages("alert")[0].data
    assert text.startswith("value dropped 0.500 in ") and text.endswith("(V -0.250 -> -0.750)")
    wait_for(lambda: any(s.level == b"\x01" and s.message == text for s in p.statuses()), 5, "a WARN")
    p.event(event="end", episode=0, success=False)
    wait_for(lambda: not node._in_episode, 5, "the end event")
    script_after = iter([-0.25, -0.75] * 1000)  # falls of 0.5 after the episode ended: no alert
    node.value = lambda views, state, prompt: next(script_after)
    n = node.evaluations
    wait_for(lambda: node.evaluations >= n + 6, 10, "more evaluations")
    assert p.log.count("alert") == 1 and node.alerts == 1


def test_an_observation_the_model_fails_on_is_skipped_not_fatal(probe, spin):
    from rclpy.parameter import Parameter

    from recap_ros.nodes.value_monitor import ValueMonitorNode

    def broken(views, state, prompt):
        raise ValueError("images (1, 2, 16, 16, 3) do not fit the value model")

    node = ValueMonitorNode(value=broken, parameter_overrides=[Parameter("rate_hz", value=10.0)])
    p = probe()
    spin(node)
    wait_for(lambda: node.failures >= 3, 20, "failed evaluations")
    assert node.evaluations == 0 and p.log.count("value") == 0
    node.value = lambda views, state, prompt: -0.5  # the next good observation is published
    assert p.log.wait(lambda: len(p.log.data["value"]) >= 1, 10)
    assert list(p.log.messages("value")[-1].position) == [-0.5, 300.0]
