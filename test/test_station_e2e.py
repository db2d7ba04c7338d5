"""The whole sim station through `recap-station`: rates measured by a subscriber for >= 5 s, the policy
drives the robot through the mux (the scripted corrector takes over when it stalls), episodes are recorded
with their outcome, SIGINT stops every process within 5 s, and the recorded bags export to a RECAP dataset
whose labels equal the hand-computed ones."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from helpers import TIMING, alive, descendants

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


@TIMING
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
        # let two episodes finish (success, or failure on timeout / keep-out) so they are labelled
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_labelled_bags(tmp_path / "bags")) < 2:
            assert proc.poll() is None, (tmp_path / "station.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        nodes = descendants(proc.pid)
        t_int = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - t_int
        log.close()
    text = (tmp_path / "station.log").read_text()
    assert rc == 0, text[-3000:]
    assert elapsed <= 5.5, f"station took {elapsed:.1f} s to stop\n{text[-3000:]}"
    assert "ignored SIGINT" not in text
    assert nodes and not any(alive(p) for p in nodes)
    labelled = _labelled_bags(tmp_path / "bags")
    assert len(labelled) >= 2, "fewer than two episode bags with an outcome label"

    # the recorded episodes -> LeRobot dataset with RECAP labels
    from recap_ros.export.cli import main as export_main
    from recap_ros.dataset.reader import RecapDataset
    from recap_ros.recap.returns import episode_labels

    out = tmp_path / "dataset"
    assert export_main([str(tmp_path / "bags"), "--out", str(out), "--quiet"]) == 0
    ds = RecapDataset(out)
    metas = [ds.episode_meta(ep) for ep in range(ds.num_episodes)]
    # every labelled bag is exported (a gap beyond tolerance may split one into segments), except possibly the
    # station's first episode, which starts while the recorder is still discovering the camera publishers (the
    # export then reports "no segment without gaps"); the unlabelled last episode (stopped by SIGINT) is skipped
    exported = {m["recap/source_bag"] for m in metas}
    assert exported <= {b.name for b in labelled}
    assert {b.name for b in labelled[1:]} <= exported, (exported, [b.name for b in labelled])
    max_len = int(st.sim.episode_timeout_s * st.robot.control_rate_hz)
    for ep, meta in enumerate(metas):
        e = ds.episode(ep)
        n = len(e["frame_index"])
        success = bool(e["episode_success"][0])
        # labels of the whole episode, by hand from its outcome and length, cut to this segment
        full = episode_labels(meta["recap/episode_ticks"], success, max_len=max_len, c_fail=max_len)
        lo = meta["recap/first_tick"]
        want = {k: v[lo:lo + n] for k, v in full.items()}
        np.testing.assert_array_equal(e["next.reward"], want["reward"])
        np.testing.assert_array_equal(e["return"], want["return"])
        np.testing.assert_allclose(e["return_normalized"], want["return_normalized"])
        np.testing.assert_array_equal(e["return_bin"], want["return_bin"])
        assert e["observation.state"].shape == (n, 14) and e["action"].shape == (n, 14)
        print(f"episode {ep}: {n} frames, success={success}, interventions={int(e['intervention'].sum())}, "
              f"task={e['task']!r}, segment {meta['recap/segment'] + 1}/{meta['recap/segments']}")
    images = ds.images(0)
    assert all(v.shape[0] == len(ds.episode(0)["frame_index"]) for v in images.values())


def _labelled_bags(root):
    from recap_ros.recording.bag import K_OUTCOME, read_metadata

    out = []
    for bag in sorted(root.glob("sim_*")):
        try:
            custom = read_metadata(bag)["rosbag2_bagfile_information"].get("custom_data") or {}
        except Exception:  # still being written
            continue
        if custom.get(K_OUTCOME) in ("success", "failure"):
            out.append(bag)
    return out
