"""sim_robot node in its own process: joint-state and camera rates, episode events, reset service,
velocity-limited command following, bad commands ignored, SIGINT shutdown."""
import json
import os
import signal
import time

import numpy as np
import pytest
from helpers import TIMING, MessageLog, start_node, stop_node

pytestmark = pytest.mark.ros

MEASURE_S = 6.0


def _rate(samples):
    return (len(samples) - 1) / (samples[-1][0] - samples[0][0])


class Processes:
    """Nodes started as separate processes (python -m recap_ros.nodes.<node>), killed at teardown if alive."""

    def __init__(self, tmp_path):
        self.tmp_path, self.procs = tmp_path, []

    def start(self, node, station="sim"):
        log = open(self.tmp_path / f"{node}.log", "w+")
        proc = start_node(node, station=station, log=log)
        self.procs.append((proc, log))
        return proc, log

    def close(self):
        for proc, log in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


@pytest.fixture
def processes(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.close()


@TIMING
def test_sim_robot_node(rclpy_context, spin, processes):
    from rclpy.node import Node
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from recap_ros import rosmsg
    from recap_ros.imaging import decode_jpeg
    from recap_ros.station import load_station

    proc, log = processes.start("sim_robot")
    station = load_station("sim")
    names = station.robot.joint_names
    rec = MessageLog()
    node = Node("test_sim_robot_probe")
    node.create_subscription(JointState, "/joint_states", rec.callback("joints"), rosmsg.COMMAND_QOS)
    for cam in station.cameras:
        node.create_subscription(Image, cam.image_topic, rec.callback(cam.name), rosmsg.SENSOR_QOS)
    base = station.cameras[0]
    node.create_subscription(CompressedImage, base.compressed_topic, rec.callback("jpeg"), rosmsg.SENSOR_QOS)
    node.create_subscription(CameraInfo, base.camera_info_topic, rec.callback("info"), rosmsg.SENSOR_QOS)
    node.create_subscription(String, "/episode/events", rec.callback("events"), rosmsg.EVENT_QOS)
    node.create_subscription(String, "/task/prompt", rec.callback("prompt"), rosmsg.LATCHED_QOS)
    command_pub = node.create_publisher(JointState, "/robot/command", rosmsg.COMMAND_QOS)
    reset = node.create_client(Trigger, "/sim_robot/reset")
    spin(node)

    assert rec.wait(lambda: all(len(rec.data[c.name]) > 3 for c in station.cameras) and len(rec.data["joints"]) > 3,
                    30.0), f"no data from sim_robot; log:\n{_log(log)}"
    t0 = time.monotonic()
    time.sleep(MEASURE_S)
    joints = rec.since("joints", t0)
    joint_rate = _rate(joints)
    gaps = np.diff([rosmsg.stamp_to_ns(m.header.stamp) for _, m in joints]) * 1e-6
    camera_rates = {c.name: _rate(rec.since(c.name, t0)) for c in station.cameras}
    print(f"\n/joint_states {joint_rate:.2f} Hz over {MEASURE_S:g} s; cameras "
          + ", ".join(f"{k} {v:.2f} Hz" for k, v in camera_rates.items())
          + f"; joint-state stamp gaps p50 {np.median(gaps):.1f} ms, max {gaps.max():.1f} ms")
    assert abs(joint_rate - 50.0) <= 2.0, joint_rate
    for name, rate in camera_rates.items():
        assert abs(rate - 30.0) <= 3.0, (name, rate)

    # message contents: station joint order, rgb8 224x224 stamped at render time, JPEG, camera info
    _, js = rec.since("joints", t0)[-1]
    assert list(js.name) == names and len(js.position) == 14 and len(js.velocity) == 14
    t_img, img = rec.since(base.name, t0)[-1]
    assert (img.encoding, img.width, img.height) == ("rgb8", 224, 224)
    assert abs(rosmsg.stamp_to_ns(img.header.stamp) - time.time_ns()) < 2e9
    assert decode_jpeg(bytes(rec.data["jpeg"][-1][1].data)).shape == (224, 224, 3)
    info = rec.data["info"][-1][1]
    assert info.width == 224 and info.k[0] > 0

    # reset service: ends the running episode (end event, reason "reset") and starts the next one, whose start
    # event carries the task for the corrector; the prompt is latched
    assert reset.wait_for_service(timeout_sec=10.0)
    future = reset.call_async(Trigger.Request())
    assert rec.wait(lambda: future.done(), 10.0) and future.result().success

    def events():
        return [json.loads(m.data) for _, m in rec.data["events"]]
    assert rec.wait(lambda: len(events()) >= 2 and events()[-1]["event"] == "start", 5.0), events()
    end, start = events()[-2:]
    assert end["event"] == "end" and end["reason"] == "reset" and end["success"] is False
    assert start["episode"] == end["episode"] + 1
    assert {"episode", "prompt", "seed", "arm", "target", "task", "stamp_ns"} <= set(start)
    assert rec.wait(lambda: rec.data["prompt"] and rec.data["prompt"][-1][1].data == start["prompt"], 5.0)
    episode = start["episode"]

    # holds its start pose without commands; then follows a command, velocity-limited
    time.sleep(0.5)
    q0 = np.array(rec.data["joints"][-1][1].position)
    assert np.allclose(q0, start["task"]["q0"], atol=1e-9)
    command_pub.publish(rosmsg.joint_state_msg(names[:5], np.zeros(5), 0))   # bad: missing joints -> ignored
    target = q0.copy()
    target[0] += 0.8      # left_waist: 0.4 s at 2 rad/s
    command_pub.publish(rosmsg.joint_state_msg(names, target, start["stamp_ns"] - 1))  # before the episode began
    time.sleep(0.3)
    assert np.allclose(rec.data["joints"][-1][1].position, q0, atol=1e-9), "followed a previous episode's command"
    t_cmd = time.monotonic()
    command_pub.publish(rosmsg.joint_state_msg(names, target, rosmsg.now_ns(node)))
    assert rec.wait(lambda: abs(rec.data["joints"][-1][1].position[0] - target[0]) < 1e-3, 5.0), "arm did not move"
    traj = [(t, m) for t, m in rec.since("joints", t_cmd)]
    pos = np.array([m.position for _, m in traj])
    step = np.abs(np.diff(pos[:, 0]))
    vmax, period = station.robot.joints[0].max_velocity, station.robot.period_s
    moving = np.flatnonzero(step > 1e-6)
    took = traj[moving[-1] + 1][0] - traj[moving[0]][0]
    print(f"left_waist: peak {step.max() / period:.3f} rad/s per tick (limit {vmax}), 0.8 rad in {took:.2f} s")
    assert step.max() <= vmax * period * (1 + 1e-9)        # never faster than max_velocity per control tick
    assert step.max() == pytest.approx(vmax * period)       # the step is big enough to hit the cap
    assert max(abs(m.velocity[0]) for _, m in traj) <= vmax * (1 + 1e-9)
    assert took >= 0.8 / vmax * 0.9                         # wall time agrees: velocity-limited motion
    assert np.allclose(pos[-1, 1:], q0[1:], atol=1e-9)   # nothing else moved
    assert json.loads(rec.data["events"][-1][1].data)["episode"] == episode   # no failure from this motion

    # SIGINT stops it within 5 s
    took = stop_node(proc)
    print(f"sim_robot stopped {took:.2f} s after SIGINT, rc={proc.returncode}")
    assert took < 5.0 and proc.returncode == 0, _log(log)
    assert "bad command" in _log(log)


def _log(log):
    log.flush()
    log.seek(0)
    return log.read()


def test_scripted_corrector_takes_over_a_stalled_policy(rclpy_context, spin, processes, tmp_path):
    """No policy drives: the corrector takes over after its patience by publishing on its own mux input, its
    expert commands (forwarded here as the mux would, which also announces the corrector as the active source)
    finish the episode; then it hands back (mode "policy") because it was the active source."""
    import yaml
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from recap_ros import rosmsg
    from recap_ros.station import load_station

    station = load_station("sim")
    raw = dict(station.raw, sim=dict(station.raw["sim"], corrector_patience_s=1.0))
    path = tmp_path / "sim_fast.yaml"
    path.write_text(yaml.safe_dump(raw))
    rec = MessageLog()
    node = Node("test_corrector_probe")
    node.create_subscription(String, "/episode/events", rec.callback("events"), rosmsg.EVENT_QOS)
    node.create_subscription(String, "/mux/mode", rec.callback("mode"), rosmsg.COMMAND_QOS)
    robot_pub = node.create_publisher(JointState, "/robot/command", rosmsg.COMMAND_QOS)
    active_pub = node.create_publisher(String, "/mux/active_source", rosmsg.LATCHED_QOS)

    def forward(m):  # the mux: the corrector preempts the policy and drives
        if not rec.data["corrector"]:
            active_pub.publish(String(data="corrector"))
        robot_pub.publish(m)
    node.create_subscription(JointState, "/corrector/command", forward, rosmsg.COMMAND_QOS)
    node.create_subscription(JointState, "/corrector/command", rec.callback("corrector"), rosmsg.COMMAND_QOS)
    spin(node)
    sim, sim_log = processes.start("sim_robot", str(path))
    time.sleep(3.0)  # the corrector joins after the first episode started: it gets the start event from history
    corrector, corrector_log = processes.start("scripted_corrector", str(path))

    def ended():
        return any(json.loads(m.data)["event"] == "end" for _, m in rec.data["events"])
    assert rec.wait(ended, 30.0), f"no episode end\n{_log(sim_log)}\n{_log(corrector_log)}"
    events = [json.loads(m.data) for _, m in rec.data["events"]]
    end = next(e for e in events if e["event"] == "end")
    assert end["success"] and end["reason"] == "success", (end, _log(corrector_log))
    modes = lambda: [m.data for _, m in rec.data["mode"]]  # noqa: E731
    assert rec.wait(lambda: modes() == ["policy"], 5.0), modes()  # the hand-back; the takeover needs no mode
    assert len(rec.data["corrector"]) > 20
    assert "taking over on /corrector/command: no progress" in _log(corrector_log)
    for proc, log in ((sim, sim_log), (corrector, corrector_log)):
        assert stop_node(proc) < 5.0 and proc.returncode == 0, _log(log)
