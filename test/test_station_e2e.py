"""The whole sim station through `recap-station`: rates measured by a subscriber for >= 5 s, the policy
drives the robot through the mux, episodes are recorded, and SIGINT stops every process within 5 s."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from recap_ros import paths
from recap_ros.station import load_station

pytestmark = [pytest.mark.ros, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def station_file(tmp_path):
    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["recorder"]["output_dir"] = str(tmp_path / "bags")
    f = tmp_path / "sim.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_sim_station_runs_and_stops(rclpy_context, spin, station_file, tmp_path):
    from rclpy.node import Node
    from sensor_msgs.msg import Image, JointState

    from recap_ros.rosmsg import COMMAND_QOS, SENSOR_QOS

    st = load_station(str(station_file))
    log = open(tmp_path / "station.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "recap_ros.runner", str(station_file)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        node = Node("e2e_probe")
        stamps = {"joints": [], "command": []}
        for cam in st.cameras:
            stamps[cam.name] = []
            node.create_subscription(Image, cam.image_topic,
                                     lambda m, k=cam.name: stamps[k].append(time.monotonic()), SENSOR_QOS,
                                     raw=True)  # counting only: no deserialisation cost in this process
        node.create_subscription(JointState, st.robot.joint_states_topic,
                                 lambda m: stamps["joints"].append(time.monotonic()), COMMAND_QOS, raw=True)
        node.create_subscription(JointState, st.robot.command_topic,
                                 lambda m: stamps["command"].append(time.monotonic()), COMMAND_QOS, raw=True)
        spin(node)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(stamps[k] for k in stamps):
            assert proc.poll() is None, (tmp_path / "station.log").read_text()[-3000:]
            time.sleep(0.2)
        assert all(stamps[k] for k in stamps), {k: len(v) for k, v in stamps.items()}
        t0 = time.monotonic()
        time.sleep(6.0)
        t1 = time.monotonic()
        rates = {k: sum(t0 <= t < t1 for t in v) / (t1 - t0) for k, v in stamps.items()}
        print("measured rates (Hz):", {k: round(r, 1) for k, r in rates.items()})
        assert 48.0 <= rates["joints"] <= 52.0, rates
        for cam in st.cameras:
            assert 27.0 <= rates[cam.name] <= 33.0, rates
        assert rates["command"] >= 45.0, rates  # the mux publishes every tick (policy or hold)
    finally:
        nodes = _children(proc.pid)
        t_int = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - t_int
        log.close()
    text = (tmp_path / "station.log").read_text()
    assert rc == 0, text[-3000:]
    assert elapsed <= 5.5, f"station took {elapsed:.1f} s to stop\n{text[-3000:]}"
    assert "ignored SIGINT" not in text
    assert nodes and not any(_alive(p) for p in nodes)
    assert list((tmp_path / "bags").glob("sim_*")), "the recorder wrote no episode bag"
