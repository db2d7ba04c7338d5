"""camera_ingest node against real media: a video written with OpenCV is streamed through rclpy; frames, JPEG
side-stream, CameraInfo and /diagnostics are checked from a subscriber; outage/reconnect; bad input."""
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from helpers import TIMING, MessageLog, node_command, start_node, stop_node
from test_camera_capture import (
    write_video,  # test helper: real media written with OpenCV
)

pytestmark = pytest.mark.ros
pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402

from recap_ros.camera import CameraConfigError  # noqa: E402
from recap_ros.imaging import decode_jpeg  # noqa: E402
from recap_ros.nodes import camera_ingest  # noqa: E402
from recap_ros.rosmsg import COMMAND_QOS, SENSOR_QOS, image_from_msg, stamp_to_ns  # noqa: E402

CAM = "cam_high"  # in the sim station; its source 'sim' is overridden by the test's ROS parameters


def make_node(**params):
    params = {"station": "sim", "camera": CAM, **params}
    return camera_ingest.CameraIngest(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])


class Listener(MessageLog):
    """Records the camera's images, JPEGs, camera infos and /diagnostics."""

    def __init__(self, rclpy, name, jpeg=True, cam=CAM, qos=SENSOR_QOS):
        super().__init__()
        self.node, self.cam = rclpy.create_node(name), cam
        topic = f"/cameras/{cam}"
        self.node.create_subscription(Image, f"{topic}/image_raw", self.callback("images"), qos)
        if jpeg:
            self.subscribe_jpeg()
        self.node.create_subscription(CameraInfo, f"{topic}/camera_info", self.callback("infos"), SENSOR_QOS)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.callback("diags"), 10)

    def subscribe_jpeg(self):
        self.node.create_subscription(CompressedImage, f"/cameras/{self.cam}/image_raw/compressed",
                                      self.callback("jpegs"), SENSOR_QOS)

    def last_status(self):
        with self.lock:
            for arr in reversed(self.messages("diags")):
                for st in arr.status:
                    if self.cam in st.name:
                        return st, {kv.key: kv.value for kv in st.values}
        return None, {}


@TIMING
def test_streams_a_video_file_at_the_requested_rate_with_capture_stamps(spin, tmp_path, rclpy_context, request):
    video = write_video(tmp_path / "clip.avi", n_frames=90, width=320, height=240)
    calib = tmp_path / "cam_high.yaml"
    calib.write_text("image_width: 320\nimage_height: 240\ndistortion_model: plumb_bob\n"
                     "camera_matrix: {rows: 3, cols: 3, data: [300, 0, 159.5, 0, 300, 119.5, 0, 0, 1]}\n"
                     "distortion_coefficients: {rows: 1, cols: 5, data: [0.1, 0, 0, 0, 0]}\n")
    # the node in its own process, as on a station; reliable images here: this test judges the node's pacing
    # and stamps, not best-effort delivery (the sensor-data default drops frames to a listener that lags)
    proc = start_node("camera_ingest", f"camera:={CAM}", f"source:=file:{video}", "fps:=20.0",
                      "output_width:=160", "output_height:=160", "jpeg_quality:=90", "frame_id:=cam_test_frame",
                      "diagnostics_period_s:=0.5", f"camera_info_file:={calib}", "qos:=reliable",
                      log=tmp_path / "node.log")
    request.addfinalizer(lambda: stop_node(proc))
    ears = Listener(rclpy_context, "camera_test_listener", qos=COMMAND_QOS)
    spin(ears.node)
    assert ears.wait(lambda: ears.count("images") >= 45, 20.0), \
        f"only {ears.count('images')} images; log:\n{(tmp_path / 'node.log').read_text()[-2000:]}"
    with ears.lock:
        images, jpegs, infos = (ears.messages(k) for k in ("images", "jpegs", "infos"))
    stamps = np.array([stamp_to_ns(m.header.stamp) for m in images], dtype=np.int64)
    assert np.all(np.diff(stamps) > 0)
    rate = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1e9)
    assert rate == pytest.approx(20.0, rel=0.10)
    m = images[-1]
    assert (m.width, m.height, m.encoding, m.step, len(m.data)) == (160, 160, "rgb8", 480, 160 * 160 * 3)
    assert m.header.frame_id == "cam_test_frame"
    rgb = image_from_msg(m)
    assert rgb[:20].max() == 0 and rgb[40:120].mean() > 40  # letterbox: 320x240 -> 160x120 with black bars
    by_stamp = {stamp_to_ns(j.header.stamp): j for j in jpegs}
    pairs = [(image_from_msg(i), decode_jpeg(bytes(by_stamp[stamp_to_ns(i.header.stamp)].data)))
             for i in images if stamp_to_ns(i.header.stamp) in by_stamp]
    assert len(pairs) >= 10
    for raw, jpg in pairs:
        assert jpg.shape == raw.shape
        assert np.abs(jpg.astype(int) - raw.astype(int)).mean() < 3.0  # JPEG q90 tolerance
    info = infos[-1]
    assert (info.width, info.height, info.header.frame_id) == (160, 160, "cam_test_frame")
    # 320x240 letterboxed into 160x160: half scale, 20 rows of padding on top
    assert np.allclose(info.k, [150, 0, 79.5, 0, 150, 59.5 + 20, 0, 0, 1]) and list(info.d) == [0.1, 0, 0, 0, 0]
    assert set(stamp_to_ns(i.header.stamp) for i in infos) & set(stamps.tolist())
    assert ears.wait(lambda: ears.last_status()[1].get("frames_published", "0") != "0", 3.0)
    status, values = ears.last_status()
    assert status.level == b"\x00" and values["connected"] == "true"
    assert float(values["latency_p50_ms"]) > 0 and float(values["fps"]) == pytest.approx(20.0, rel=0.25)


def test_jpeg_is_encoded_only_while_subscribed(spin, tmp_path, rclpy_context, monkeypatch):
    calls = []
    real = camera_ingest.encode_jpeg
    monkeypatch.setattr(camera_ingest, "encode_jpeg", lambda rgb, q: calls.append(q) or real(rgb, q))
    video = write_video(tmp_path / "clip.avi", n_frames=30, width=64, height=48)
    cam = "cam_left_wrist"  # a topic no earlier test in this process subscribed to
    node = make_node(camera=cam, source=f"file:{video}", width=64, height=48, output_width=64, output_height=48,
                     fps=30.0)
    ears = Listener(rclpy_context, "camera_test_no_jpeg", jpeg=False, cam=cam)
    spin(node, ears.node)
    assert ears.wait(lambda: ears.count("images") >= 15, 10.0)
    assert calls == []
    ears.subscribe_jpeg()
    assert ears.wait(lambda: ears.count("jpegs") >= 3, 10.0)
    assert calls and calls[0] == 85


def test_survives_the_source_disappearing_and_reports_the_outage(spin, tmp_path, rclpy_context):
    video = write_video(tmp_path / "cam.avi", n_frames=10, width=64, height=48)
    hidden = tmp_path / "unplugged.avi"
    node = make_node(source=f"file:{video}", fps=30.0, width=64, height=48, output_width=64, output_height=48,
                     reconnect_min_s=0.05, reconnect_max_s=0.2, diagnostics_period_s=0.2)
    ears = Listener(rclpy_context, "camera_test_reconnect", jpeg=False)
    spin(node, ears.node)
    assert ears.wait(lambda: ears.count("images") >= 5, 10.0)
    shutil.move(video, hidden)  # the loop restart finds no file: outage
    assert ears.wait(lambda: ears.last_status()[1].get("connected") == "false", 5.0)
    status, values = ears.last_status()
    assert status.level == b"\x02" and "not found" in status.message and "not found" in values["last_error"]
    with ears.lock:
        n_down = ears.count("images")
    time.sleep(0.5)
    with ears.lock:
        assert ears.count("images") == n_down  # nothing published during the outage
    shutil.move(hidden, video)
    assert ears.wait(lambda: ears.count("images") >= n_down + 10, 10.0)
    assert ears.wait(lambda: ears.last_status()[1].get("reconnects") == "1", 3.0)
    status, values = ears.last_status()
    assert values["connected"] == "true" and float(values["total_outage_s"]) >= 0.5
    with ears.lock:
        stamps = [stamp_to_ns(m.header.stamp) for m in ears.messages("images")]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))


def test_unopenable_device_keeps_the_node_alive_with_error_diagnostics(spin, rclpy_context):
    node = make_node(source="/dev/video_recap_unplugged", reconnect_min_s=0.05, reconnect_max_s=0.1,
                     diagnostics_period_s=0.2)
    ears = Listener(rclpy_context, "camera_test_nodev", jpeg=False)
    spin(node, ears.node)
    assert ears.wait(lambda: ears.last_status()[0] is not None
                     and int(ears.last_status()[1]["open_failures"]) >= 3, 10.0)
    status, values = ears.last_status()
    assert status.level == b"\x02" and "/dev/video_recap_unplugged does not exist" in status.message
    assert values["connected"] == "false" and node.capture._thread.is_alive()


@pytest.mark.parametrize("params,words", [
    ({"fps": 0.0}, "ROS parameter 'fps': must be > 0.0"),
    ({"fps": -30}, "ROS parameter 'fps'"),
    ({"width": 641}, "must be even"),
    ({"source": "smb://nas/cam"}, "unknown source scheme 'smb://'"),
    ({"camera": "cam_nope"}, "no camera 'cam_nope'"),
    ({"source": "sim"}, "rendered by sim_robot"),
])
def test_invalid_config_is_refused_with_a_clear_error(rclpy_context, params, words):
    params = {"source": "file:/tmp/x.avi", **params}
    with pytest.raises(CameraConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make_node(**params)


def test_process_refuses_bad_config_without_a_traceback():
    p = subprocess.run(node_command("camera_ingest", f"camera:={CAM}", "source:=/dev/video0", "fps:=-5.0"),
                       capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "refusing to start" in out and "ROS parameter 'fps'" in out and "Traceback" not in out


def test_process_stops_on_sigint_within_5_s_while_reconnecting():
    p = start_node("camera_ingest", f"camera:={CAM}", "source:=/dev/video_recap_none", stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        lines = []
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            lines.append(line)
            if "does not exist" in line:
                break
        assert any("does not exist" in ln for ln in lines), "".join(lines)
        assert stop_node(p) < 5.0 and p.returncode == 0
        assert "Traceback" not in p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
