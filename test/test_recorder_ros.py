"""episode_recorder as a real ROS node in its own process (``python -m recap_ros.nodes.episode_recorder``),
fed by real rclpy publishers in the test process that count their sends: the round trip (every message sent
during the episode is in the bag, read back with rosbags), the services (start / stop / label and their
refusals, SIGINT mid-episode), the crash test (SIGKILL mid-episode, ``recap-bag-repair``, everything sent up to
1 s before the kill is there) and the real sim_robot driving auto episodes through its episode events."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, start_node, stop_node, wait_for

from recap_ros.station import load_station

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

ST = load_station("sim")
CAMS = [c.compressed_topic for c in ST.cameras]
STREAMS = {**{t: 30.0 for t in CAMS}, ST.robot.joint_states_topic: 50.0, ST.robot.command_topic: 50.0,
           ST.policy.command_topic: 50.0}


def start_recorder(out_dir: Path, log_path: Path, *extra: str):
    return start_node("episode_recorder", f"output_dir:={out_dir}", "auto_episodes:=false", "model:=test_bundle",
                      "operator:=pytest", "min_free_disk_mb:=1", "diagnostics_period_s:=0.2", *extra, log=log_path)


class Feeder:
    """Publishes the station's streams at their rates (header stamp = send time, frame_id = sequence number)
    plus the latched prompt / β / intervention flag, counting every send; calls the recorder's services."""

    def __init__(self, rclpy):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from sensor_msgs.msg import CompressedImage, JointState
        from std_msgs.msg import Bool, Float64, String
        from std_srvs.srv import SetBool, Trigger

        from recap_ros.rosmsg import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS, ns_to_stamp

        self.ns_to_stamp, self.CompressedImage, self.JointState = ns_to_stamp, CompressedImage, JointState
        self.Bool = Bool
        self.node = n = Node("recorder_feeder")
        self.pubs = {t: n.create_publisher(CompressedImage if t in CAMS else JointState, t,
                                           SENSOR_QOS if t in CAMS else COMMAND_QOS) for t in STREAMS}
        self.prompt = n.create_publisher(String, ST.policy.prompt_topic, LATCHED_QOS)
        self.beta = n.create_publisher(Float64, ST.policy.beta_topic, LATCHED_QOS)
        self.intervention = n.create_publisher(Bool, ST.mux.intervention_topic, LATCHED_QOS)
        self.sent: dict[str, list[tuple[int, int]]] = {t: [] for t in STREAMS}  # (seq, send ns)
        self.latched_sent: dict[str, int] = {}
        self.diag: list = []
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.srv = {name: n.create_client(Trigger if name != "label" else SetBool, f"/episode_recorder/{name}")
                    for name in ("start", "stop", "label")}
        self.Trigger, self.SetBool = Trigger, SetBool
        self._stop = threading.Event()
        self._thread = None
        self.jpeg = bytes(range(256)) * 60  # 15 kB, the size of a 224x224 JPEG

    def _on_diag(self, msg) -> None:
        for s in msg.status:
            if s.name.startswith("episode_recorder"):
                self.diag.append({kv.key: kv.value for kv in s.values})

    def publish_state(self, prompt: str, beta: float, intervention: bool) -> None:
        from std_msgs.msg import Float64, String

        self.prompt.publish(String(data=prompt))
        self.beta.publish(Float64(data=beta))
        self.set_intervention(intervention)

    def set_intervention(self, on: bool) -> None:
        self.intervention.publish(self.Bool(data=on))
        self.latched_sent[ST.mux.intervention_topic] = self.latched_sent.get(ST.mux.intervention_topic, 0) + 1

    def wait_matched(self) -> None:
        """Until the recorder subscribed every stream with a matching QoS (and the publishers know it)."""
        wait_for(lambda: all(p.get_subscription_count() >= 1 for p in self.pubs.values())
                 and self.prompt.get_subscription_count() >= 1 and self.intervention.get_subscription_count() >= 1,
                 20.0, "recorder subscriptions")
        for c in self.srv.values():
            assert c.wait_for_service(timeout_sec=20.0)

    def call(self, name: str, data: bool | None = None):
        req = self.SetBool.Request(data=data) if name == "label" else self.Trigger.Request()
        fut = self.srv[name].call_async(req)
        wait_for(fut.done, 30.0, f"~/{name} response")
        return fut.result()

    def start_episode(self) -> Path:
        """~/start; the new episode's bag."""
        r = self.call("start")
        assert r.success, r.message
        return Path(r.message)

    def start_streams(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop_streams(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        t0 = time.monotonic()
        next_t = {t: t0 for t in STREAMS}
        while not self._stop.is_set():
            now = time.monotonic()
            for t, hz in STREAMS.items():
                if now >= next_t[t]:
                    next_t[t] += 1.0 / hz
                    seq, stamp = len(self.sent[t]), time.time_ns()
                    if t in CAMS:
                        msg = self.CompressedImage(format="jpeg", data=self.jpeg)
                    else:
                        msg = self.JointState(name=[j.name for j in ST.robot.joints], position=[0.1] * 14)
                    msg.header.stamp = self.ns_to_stamp(stamp)
                    msg.header.frame_id = str(seq)
                    self.pubs[t].publish(msg)
                    self.sent[t].append((seq, stamp))
            time.sleep(max(0.0, min(next_t.values()) - time.monotonic()))


def read_bag(bag: Path):
    from rosbags.rosbag2 import Reader

    from recap_ros.recording.bag import typestore

    ts, got = typestore(), {}
    with Reader(bag) as r:
        custom = dict(r.storage.metadata.custom or {})
        msgdefs = {c.topic: c.msgdef.data for c in r.connections}
        for conn, t, raw in r.messages():
            got.setdefault(conn.topic, []).append((t, ts.deserialize_cdr(raw, conn.msgtype)))
    return got, custom, msgdefs


@pytest.fixture
def feeder(rclpy_context, spin):
    f = Feeder(rclpy_context)
    spin(f.node)
    return f


@pytest.fixture
def recorder(tmp_path):
    """(the recorder process writing episodes to tmp_path/bags, that folder); killed at teardown if still alive."""
    out = tmp_path / "bags"
    proc = start_recorder(out, tmp_path / "recorder.log")
    yield proc, out
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_round_trip_services_and_labels(feeder, recorder, tmp_path):
    proc, out = recorder
    try:
        feeder.publish_state("touch the red marker with the left gripper", 2.0, False)
        feeder.wait_matched()
        assert not feeder.call("label", True).success  # nothing recorded yet: clear refusal
        bag = feeder.start_episode()
        assert bag.parent == out and bag.name.startswith("sim_") and bag.name.endswith("_ep0000")
        again = feeder.call("start")
        assert not again.success and "already recording" in again.message
        feeder.start_streams()
        time.sleep(1.0)
        feeder.set_intervention(True)   # recorded changes
        feeder.set_intervention(False)
        time.sleep(0.5)
        feeder.set_intervention(True)
        time.sleep(1.0)
        feeder.stop_streams()
        time.sleep(0.5)  # delivery of the last messages
        r = feeder.call("stop")
        assert r.success, r.message
        assert not feeder.call("stop").success
        assert feeder.call("label", False).success  # after stop: labels the finished bag
        wait_for(lambda: feeder.diag and feeder.diag[-1]["recording"] == "False", 20.0, "idle diagnostics")
        assert feeder.diag[-1]["dropped_total"] == "0"
        second = feeder.start_episode()  # a second episode, interrupted by SIGINT: closed cleanly
        assert second.name.endswith("_ep0001"), second
        first_sent = {t: list(v) for t, v in feeder.sent.items()}
        feeder.start_streams()
        time.sleep(0.5)
    finally:
        if feeder._thread is not None and feeder._thread.is_alive():
            feeder.stop_streams()
        took = stop_node(proc)
        assert proc.returncode == 0, (tmp_path / "recorder.log").read_text()[-3000:]
        assert took < 5.0
    got2, custom2, _ = read_bag(second)  # readable without repair: the node finished the bag on SIGINT
    assert custom2["recap.end_reason"] == "shutdown" and len(got2[ST.robot.joint_states_topic]) > 5
    feeder.sent = first_sent

    got, custom, msgdefs = read_bag(bag)
    for topic, sent in feeder.sent.items():
        seqs = [int(m.header.frame_id) for _, m in got.get(topic, [])]
        assert seqs == [s for s, _ in sent], f"{topic}: {len(seqs)} recorded, {len(sent)} sent"
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, m in got[topic]]
        assert stamps == [ns for _, ns in sent]  # header stamps kept
        assert all(t >= ns for (t, _), (_, ns) in zip(got[topic], sent))  # bag time = receive time
    assert len(got[ST.mux.intervention_topic]) == 1 + 3  # state at start + three changes
    assert [m.data for _, m in got[ST.policy.prompt_topic]] == ["touch the red marker with the left gripper"]
    assert "sensor_msgs/CompressedImage" in msgdefs[CAMS[0]] or "uint8[] data" in msgdefs[CAMS[0]]
    assert custom["recap.station"] == "sim" and custom["recap.episode"] == "0"
    assert custom["recap.prompt"] == "touch the red marker with the left gripper"
    # the intervention flag counts nothing: the feeder's commands carry sequence numbers, no human source
    assert custom["recap.beta"] == "2.0" and custom["recap.interventions"] == "0"
    assert custom["recap.outcome"] == "failure" and custom["recap.model"] == "test_bundle"
    assert custom["recap.operator"] == "pytest" and custom["recap.dropped"] == "0"
    assert int(custom["recap.start_ns"]) < int(custom["recap.end_ns"])


def test_unwritable_output_dir_is_refused_clearly(feeder, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    proc = start_recorder(blocker / "bags", tmp_path / "recorder.log")
    try:
        feeder.wait_matched()
        r = feeder.call("start")
        assert not r.success and str(blocker / "bags") in r.message
        assert not feeder.call("stop").success
    finally:
        stop_node(proc)
        assert proc.returncode == 0


# Issue #7 asks for <= 1 s: chunks are flushed every 0.25 s.
CRASH_LOSS_BOUND_NS = 1_000_000_000


def test_sigkill_mid_episode_then_repair_keeps_all_but_the_last_second(feeder, recorder):
    proc, out = recorder
    feeder.publish_state("crash test", 1.0, False)
    feeder.wait_matched()
    bag = feeder.start_episode()
    feeder.start_streams()
    time.sleep(4.0)
    kill_ns = time.time_ns()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    feeder.stop_streams()
    from rosbags.rosbag2 import Reader

    with pytest.raises(Exception):  # unfinished: no summary/footer, no counts
        with Reader(bag) as rd:
            list(rd.messages())
    rep = subprocess.run([sys.executable, "-m", "recap_ros.recording.repair", str(out)], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert rep.returncode == 0, rep.stderr
    assert "ok " in rep.stdout and "MCAP finished" in rep.stdout
    got, custom, _ = read_bag(bag)
    assert custom["recap.repaired"] == "true" and custom["recap.prompt"] == "crash test"
    for topic, sent in feeder.sent.items():
        recorded = {int(m.header.frame_id) for _, m in got.get(topic, [])}
        due = [s for s, ns in sent if ns <= kill_ns - CRASH_LOSS_BOUND_NS]
        assert len(due) > 50
        missing = [s for s in due if s not in recorded]
        # camera JPEGs are best effort (SENSOR_QOS, as camera drivers publish): the middleware may drop one
        # on the way; that is delivery, not the crash. Reliable topics must be complete.
        allowed = len(due) // 50 if "/cameras/" in topic else 0
        assert len(missing) <= allowed, (f"{topic}: {len(missing)} messages sent > {CRASH_LOSS_BOUND_NS / 1e9:g} s "
                                         f"before the kill are missing: {missing} of {due[0]}..{due[-1]}")


def test_sim_station_auto_episodes(feeder, tmp_path):
    """The real sim_robot drives the recorder through its episode events: one bag per episode, labelled from
    the end event, with the rendered JPEG cameras, joint states, prompt and both events."""
    from std_srvs.srv import Trigger

    sim = start_node("sim_robot", log=tmp_path / "sim.log")
    rec = start_recorder(tmp_path / "bags", tmp_path / "recorder.log", "auto_episodes:=true")
    reset = feeder.node.create_client(Trigger, "/sim_robot/reset")
    try:
        wait_for(lambda: feeder.diag and feeder.diag[-1]["recording"] == "True", 60, "first sim episode")
        time.sleep(1.5)
        assert reset.wait_for_service(timeout_sec=10)
        fut = reset.call_async(Trigger.Request())
        wait_for(fut.done, 10, "sim reset")
        wait_for(lambda: feeder.diag[-1]["last_episode"] not in ("None", ""), 20, "episode end")
    finally:
        stop_node(rec)
        sim_took = stop_node(sim)
        assert rec.returncode == 0, (tmp_path / "recorder.log").read_text()[-3000:]
        assert sim_took < 10.0
    from recap_ros.recording import episode_bags

    bags = episode_bags(tmp_path / "bags", "sim")
    first = bags[min(bags)]
    got, custom, _ = read_bag(first)
    assert custom["recap.outcome"] == "failure" and custom["recap.end_reason"] == "reset"
    events = [json.loads(m.data) for _, m in got[ST.episode_topic]]
    assert [e["event"] for e in events] == ["start", "end"]
    assert custom["recap.prompt"] == events[0]["prompt"] and custom["recap.episode"] == str(events[0]["episode"])
    for cam in CAMS:
        assert len(got[cam]) > 10 and "jpeg" in got[cam][0][1].format.lower()
    assert len(got[ST.robot.joint_states_topic]) > 20
