"""aloha_sim node (MuJoCo ALOHA) in its own process: joint states, the three camera topics, episode events with
task, seed and reward stages, command following, bad commands ignored, one-line refusals, SIGINT; and a live
episode of each task driven by the scripted expert through the mux, recorded, exported and loaded."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from helpers import TIMING, MessageLog, start_node, stop_node

import recap_ros.sim.aloha  # noqa: F401  (before mujoco: headless EGL)
from recap_ros import paths

pytest.importorskip("mujoco")
pytest.importorskip("gym_aloha")
pytestmark = pytest.mark.ros


def _station(tmp_path, **sim) -> str:
    data = yaml.safe_load(paths.station_file("aloha_sim").read_text())
    data["recorder"]["output_dir"] = str(tmp_path / "bags")
    data["sim"].update(sim)
    f = tmp_path / "aloha_sim.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(f)


def _text(log) -> str:
    log.flush()
    return open(log.name).read()[-3000:]


@TIMING
def test_aloha_sim_node(rclpy_context, spin, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from gym_aloha.utils import sample_box_pose
    from rclpy.node import Node
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from recap_ros import rosmsg
    from recap_ros.imaging import decode_jpeg
    from recap_ros.station import load_station

    file = _station(tmp_path, episode_timeout_s=2.0, reset_pause_s=0.3, corrector=False)
    st = load_station(file)
    log = open(tmp_path / "aloha_sim.log", "w+")
    proc = start_node("aloha_sim", station=file, log=log)
    try:
        rec = MessageLog()
        node = Node("test_aloha_sim_probe")
        node.create_subscription(JointState, "/joint_states", rec.callback("joints"), rosmsg.COMMAND_QOS)
        for cam in st.cameras:
            node.create_subscription(Image, cam.image_topic, rec.callback(cam.name), rosmsg.SENSOR_QOS)
        node.create_subscription(CompressedImage, "/cameras/top/image_raw/compressed", rec.callback("jpeg"),
                                 rosmsg.SENSOR_QOS)
        node.create_subscription(CameraInfo, "/cameras/top/camera_info", rec.callback("info"), rosmsg.SENSOR_QOS)
        node.create_subscription(String, "/episode/events", rec.callback("events"), rosmsg.EVENT_HISTORY_QOS)
        node.create_subscription(String, "/task/prompt", rec.callback("prompt"), rosmsg.LATCHED_QOS)
        node.create_subscription(DiagnosticArray, "/diagnostics", rec.callback("diag"), 10)
        command_pub = node.create_publisher(JointState, "/robot/command", rosmsg.COMMAND_QOS)
        spin(node)

        def events():
            return [json.loads(m.data) for m in rec.messages("events")]

        assert rec.wait(lambda: len(events()) >= 3, 60.0), f"episode events {events()}; log:\n{_text(log)}"
        # episode 1 just began (2 s long): a command moves the left waist from the start pose held until then
        start0, end0, start1 = events()[:3]
        target = np.array(rosmsg.positions_from_joint_state(rec.messages("joints")[-1], st.robot.joint_names))
        target[0] += 0.3
        for _ in range(25):
            command_pub.publish(rosmsg.joint_state_msg(st.robot.joint_names, target, rosmsg.now_ns(node)))
            time.sleep(0.02)
        time.sleep(0.1)
        q = rosmsg.positions_from_joint_state(rec.messages("joints")[-1], st.robot.joint_names)
        assert len(events()) == 3, "episode 1 ended before the command test"
        assert q[0] == pytest.approx(target[0], abs=0.05) and q[7] == pytest.approx(target[7], abs=0.05), q

        t0 = time.monotonic()
        time.sleep(3.0)
        joints = rec.since("joints", t0)
        rate = (len(joints) - 1) / (joints[-1][0] - joints[0][0])
        assert 45.0 <= rate <= 55.0, rate
        for cam in st.cameras:
            frames = rec.since(cam.name, t0)
            assert len(frames) >= 3 * 10, (cam.name, len(frames))  # >= 10 Hz (the station sets 15)
            img = frames[-1][1]
            assert (img.width, img.height, img.encoding) == (224, 224, "rgb8")
        assert decode_jpeg(bytes(rec.messages("jpeg")[-1].data)).shape == (224, 224, 3)
        f = 112 / math.tan(math.radians(39))  # the scene's cameras: fovy 78 deg
        np.testing.assert_allclose(rec.messages("info")[-1].k, [f, 0, 112, 0, f, 112, 0, 0, 1])
        assert list(joints[-1][1].name) == st.robot.joint_names and len(joints[-1][1].velocity) == 14

        assert (start0["event"], start0["task"], start0["seed"]) == ("start", "transfer_cube", 0)
        np.testing.assert_allclose(start0["objects"], sample_box_pose(0))  # gym-aloha's pose for the seed
        assert start0["prompt"] in [m.data for m in rec.messages("prompt")]
        assert end0["event"] == "end" and end0["success"] is False and end0["reason"] == "timeout"
        assert end0["steps"] == 100 and end0["max_reward"] == 0 and end0["stage_steps"] == {}
        assert (start1["task"], start1["seed"]) == ("insertion", 1)

        bad = rosmsg.joint_state_msg(st.robot.joint_names, np.full(14, np.nan), rosmsg.now_ns(node))
        command_pub.publish(bad)
        assert rec.wait(lambda: any(dict((v.key, v.value) for v in s.values).get("bad_commands", "0") != "0"
                                    for m in rec.messages("diag") for s in m.status), 5.0)

        # ~/reset ends the running episode, if any, and starts the next one (tasks alternate, seed = station seed
        # 0 + episode index); its reply names that episode
        reset = node.create_client(Trigger, "/sim_robot/reset")
        assert reset.wait_for_service(timeout_sec=10.0)
        future = reset.call_async(Trigger.Request())
        assert rec.wait(future.done, 10.0)
        k = max(e["episode"] for e in events() if e["event"] == "start")
        task = ("transfer_cube", "insertion")[k % 2]
        assert future.result().success and future.result().message == f"episode {k}: {task} seed {k}"
        assert rec.wait(lambda: any(e["event"] == "start" and e["episode"] == k for e in events()), 5.0)
        ends = [e for e in events() if e["event"] == "end" and e["episode"] == k - 1]
        assert len(ends) == 1 and ends[0]["reason"] in ("reset", "timeout") and ends[0]["success"] is False, ends
        assert proc.poll() is None
    finally:
        took = stop_node(proc)
    assert proc.returncode == 0 and took < 5.0, _text(log)


def test_aloha_sim_refuses_in_one_line(tmp_path):
    """A station that is not an aloha one, and a GL backend that cannot start: exit code 2, one line each."""
    for station, env, words in (("sim", {}, "sim.simulator"),
                                (_station(tmp_path), {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"},
                                 "cannot render the ALOHA cameras")):
        proc = start_node("aloha_sim", station=station, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        out, _ = proc.communicate(timeout=60)
        refusals = [line for line in out.splitlines() if "refusing to start" in line]
        assert proc.returncode == 2 and len(refusals) == 1 and words in refusals[0], out
        assert "Traceback" not in out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_expert_episodes_live(rclpy_context, spin, tmp_path):
    """The station's node graph (aloha_sim, teleop_mux, episode_recorder through recap-station) with the scripted
    expert driving the policy's mux input: both tasks succeed (gym-aloha reward 4), the bags export with
    recap-export and load as a dataset."""
    pytest.importorskip("recap_ros.sim.aloha.expert")
    from rclpy.node import Node
    from std_msgs.msg import String

    from recap_ros import rosmsg
    from recap_ros.export.cli import main as export_main
    from recap_ros.dataset.reader import RecapDataset

    rec = MessageLog()
    node = Node("test_aloha_expert_probe")
    node.create_subscription(String, "/episode/events", rec.callback("events"), rosmsg.EVENT_HISTORY_QOS)
    spin(node)

    def ends():
        return [e for e in (json.loads(m.data) for m in rec.messages("events")) if e["event"] == "end"]

    file = _station(tmp_path)
    log = open(tmp_path / "station.log", "w")
    cmd = [sys.executable, "-m", "recap_ros.runner", file, "--set", "sim_robot.expert_input=policy",
           "--set", "sim_robot.seeds=[0, 1]", "--only", "sim_robot", "--only", "teleop_mux", "--only",
           "episode_recorder"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert rec.wait(lambda: len(ends()) >= 2 or proc.poll() is not None, 120.0)
        time.sleep(1.0)  # the recorder closes the last bag
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "station.log").read_text()
    assert [(e["task"], e["reason"], e["max_reward"]) for e in ends()] == [
        ("transfer_cube", "success", 4), ("insertion", "success", 4)], text[-3000:]
    out = tmp_path / "dataset"
    assert export_main([str(tmp_path / "bags"), "--out", str(out), "--quiet"]) == 0
    ds = RecapDataset(out)
    tasks = set()
    for i in range(ds.num_episodes):
        e = ds.episode(i)
        n = len(e["frame_index"])
        assert bool(e["episode_success"][0]) and e["observation.state"].shape == (n, 14)
        assert {k: v.shape for k, v in ds.images(i).items()} == {
            f"observation.images.{r}": (n, 224, 224, 3) for r in ("base", "left_wrist", "right_wrist")}
        tasks.add(e["task"])
    # the second episode at least (the first starts while the recorder still discovers the publishers)
    assert "Insert the peg into the socket." in tasks, text[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_corrector_takes_over_live(rclpy_context, spin, tmp_path):
    """No policy drives (the mux holds): after sim.corrector_patience_s without a new reward stage the scripted
    expert takes over on the corrector's mux input (an intervention), finishes the task, and hands back."""
    pytest.importorskip("recap_ros.sim.aloha.expert")
    from rclpy.node import Node
    from std_msgs.msg import Bool, String

    from recap_ros import rosmsg

    rec = MessageLog()
    node = Node("test_aloha_corrector_probe")
    node.create_subscription(String, "/episode/events", rec.callback("events"), rosmsg.EVENT_HISTORY_QOS)
    node.create_subscription(Bool, "/mux/intervention", rec.callback("intervention"), rosmsg.LATCHED_QOS)
    node.create_subscription(String, "/mux/mode", rec.callback("mode"), rosmsg.COMMAND_QOS)
    spin(node)
    file = _station(tmp_path, corrector_patience_s=1.0)
    log = open(tmp_path / "station.log", "w")
    cmd = [sys.executable, "-m", "recap_ros.runner", file, "--set", "sim_robot.seeds=[3]", "--only", "sim_robot",
           "--only", "teleop_mux"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert rec.wait(lambda: rec.messages("mode") or proc.poll() is not None, 90.0)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "station.log").read_text()
    ends = [e for e in (json.loads(m.data) for m in rec.messages("events")) if e["event"] == "end"]
    assert [(e["task"], e["reason"]) for e in ends] == [("transfer_cube", "success")], text[-3000:]
    assert "taking over on /corrector/command: no new reward stage for 1.0 s (highest 0)" in text
    assert any(m.data for m in rec.messages("intervention"))
    assert [m.data for m in rec.messages("mode")] == ["policy"]  # handed back after the episode
