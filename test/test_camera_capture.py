"""ROS-free camera ingest core: settings validation, newest-frame slot, backoff, opening sources, paced file
capture with real video files written by OpenCV, loop / stop at end, reconnect, calibration fit, health."""
import math
import shutil
import time

import cv2
import numpy as np
import pytest

from recap_ros import imaging
from recap_ros.camera import (
    CameraConfigError,
    CaptureThread,
    Delivery,
    Frame,
    FrameSlot,
    LatencyWindow,
    OpenError,
    backend_available,
    camera_health,
    camera_settings,
    fit_calibration,
    load_calibration,
    open_capture,
    to_output_rgb,
)
from recap_ros.camera.capture import (
    ENDED,
    FAILED,
    RECONNECTING,
    STREAMING,
    Backoff,
    CaptureStats,
)
from recap_ros.camera.health import ERROR, OK, WARN
from recap_ros.station import load_station


def write_video(path, n_frames=30, width=320, height=240, fps=30.0):
    """An MJPG AVI whose frame i has a bright square at a position that encodes i (decodable by FFmpeg)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened()
    for i in range(n_frames):
        img = np.zeros((height, width, 3), np.uint8)
        img[:, :, 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]   # blue ramp left -> right
        img[:, :, 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]  # red ramp top -> bottom
        x = 8 + (i * 7) % (width - 32)
        img[height // 2 - 8:height // 2 + 8, x:x + 16] = 255
        writer.write(img)
    writer.release()
    return path


def settings(**overrides):
    cam = load_station("bimanual_aloha").camera("cam_high")
    return camera_settings(cam, overrides, "bimanual_aloha.yaml")


def collect(thread, slot, seconds):
    frames, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        f = slot.take(0.05)
        if f is not None:
            frames.append(f)
    return frames


# ---------------------------------------------------------------------------------------------- settings
def test_settings_merge_station_and_overrides():
    s = settings(fps=15, qos="reliable")
    assert s.source.kind == "device" and s.width == 640 and s.height == 480
    assert (s.output_width, s.output_height, s.resize) == (448, 448, "letterbox")
    assert s.fps == 15.0 and s.qos == "reliable" and s.period_s == pytest.approx(1 / 15)


@pytest.mark.parametrize("key,value,words", [
    ("fps", 0, "must be > 0.0"), ("fps", -5.0, "must be > 0.0"), ("fps", 1000, "<= 240"),
    ("fps", "fast", "expected a number"), ("width", 641, "must be even"), ("height", 100001, "<= 8192"),
    ("width", 8, ">= 16"), ("output_width", 10.5, "expected an integer"),
    ("source", "ftp://cam.local/x", "unknown source scheme 'ftp://'"), ("source", "sim", "rendered by sim_robot"),
    ("source", "webcam", "unknown camera source"), ("source", "gst:videotestsrc", "must end in an appsink"),
    ("resize", "crop", "letterbox, resize"), ("jpeg_quality", 0, ">= 1"), ("loop", "yes", "true or false"),
    ("fourcc", "MJPEG", "4 ASCII"), ("qos", "fast", "sensor, reliable"), ("frame_id", " ", "empty"),
    ("reconnect_min_s", 0.0, "> 0.0"), ("opencv_threads", 100, "<= 64"),
])
def test_settings_bad_input_names_key_value_and_origin(key, value, words):
    with pytest.raises(CameraConfigError) as e:
        settings(**{key: value})
    msg = str(e.value)
    assert f"ROS parameter '{key}'" in msg and words in msg and repr(value) in msg


def test_station_values_are_blamed_on_the_station_file():
    with pytest.raises(CameraConfigError, match=r"sim.yaml: camera 'cam_high' key 'source'.*sim_robot"):
        camera_settings(load_station("sim").camera("cam_high"), {}, "sim.yaml")
    with pytest.raises(CameraConfigError, match="unknown camera setting"):
        settings(exposure=3)


# ------------------------------------------------------------------------------------------ slot, backoff
def test_slot_keeps_only_the_newest_frame_and_counts_drops():
    slot = FrameSlot()
    for i in range(5):
        slot.put(Frame(np.zeros((2, 2, 3), np.uint8), i, i))
    assert slot.take(0.0).seq == 4 and slot.dropped == 4
    assert slot.take(0.01) is None
    slot.close()
    t = time.monotonic()
    assert slot.take(5.0) is None and time.monotonic() - t < 1.0


def test_backoff_doubles_caps_and_resets():
    b = Backoff(0.25, 1.0)
    assert [b.next_delay() for _ in range(5)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    b.reset()
    assert b.next_delay() == 0.25


# --------------------------------------------------------------------------------------------- open errors
def test_open_errors_are_clear(tmp_path):
    with pytest.raises(OpenError, match="V4L2 device /dev/video_recap_missing does not exist") as e:
        open_capture(settings(source="/dev/video_recap_missing"))
    assert not e.value.permanent
    with pytest.raises(OpenError, match="V4L2 device /dev/video97 does not exist"):
        open_capture(settings(source=97))
    with pytest.raises(OpenError, match="not found"):
        open_capture(settings(source=f"file:{tmp_path}/none.avi"))
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(OpenError, match="could not open video file"):
        open_capture(settings(source=f"file:{junk}"))
    with pytest.raises(OpenError, match="could not open network stream rtsp://127.0.0.1:9/cam"):
        open_capture(settings(source="rtsp://127.0.0.1:9/cam", open_timeout_s=1.0))  # nothing listens on port 9


@pytest.mark.skipif(backend_available("GStreamer"), reason="this OpenCV has GStreamer")
def test_gstreamer_without_backend_is_a_permanent_error_naming_gstreamer():
    s = settings(source="gst:videotestsrc ! videoconvert ! appsink")
    with pytest.raises(OpenError, match="built without GStreamer") as e:
        open_capture(s)
    assert e.value.permanent
    events = []
    t = CaptureThread(s, FrameSlot(), time.monotonic_ns, lambda lvl, txt: events.append((lvl, txt)))
    t.start()
    assert t.stop(timeout=2.0)
    assert t.stats().state == FAILED and events[-1][0] == "error" and "GStreamer" in events[-1][1]


# --------------------------------------------------------------------------------------------- file capture
def test_file_capture_is_paced_stamped_and_decoded(tmp_path):
    video = write_video(tmp_path / "clip.avi", n_frames=60)
    s = settings(source=f"file:{video}", fps=20.0, output_width=160, output_height=160)
    slot = FrameSlot()
    t = CaptureThread(s, slot, time.monotonic_ns)
    t.start()
    frames = collect(t, slot, 1.6)
    assert t.stop()
    stamps = np.array([f.stamp_ns for f in frames], dtype=np.int64)
    assert len(frames) >= 25 and np.all(np.diff(stamps) > 0)
    rate = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1e9)
    assert rate == pytest.approx(20.0, rel=0.10)
    first = frames[0].image
    assert first.shape == (240, 320, 3)
    expected = cv2.VideoCapture(str(video))
    ok, ref = expected.read()
    assert ok and np.abs(first.astype(int) - ref.astype(int)).max() == 0  # same decoder, same pixels
    stats = t.stats()
    assert stats.state == STREAMING and stats.connected and (stats.frame_width, stats.frame_height) == (320, 240)


def test_file_stops_at_end_without_loop_and_loops_with_it(tmp_path):
    video = write_video(tmp_path / "short.avi", n_frames=8)
    events = []
    slot = FrameSlot()
    t = CaptureThread(settings(source=f"file:{video}", fps=100.0, loop=False), slot, time.monotonic_ns,
                      lambda lvl, txt: events.append(txt))
    t.start()
    t._thread.join(5.0)
    assert t.stats().state == ENDED and t.stats().frames == 8 and "end of" in events[-1]
    t = CaptureThread(settings(source=f"file:{video}", fps=100.0, loop=True), slot, time.monotonic_ns)
    t.start()
    time.sleep(0.5)
    assert t.stop()
    assert t.stats().loops >= 2 and t.stats().reconnects == 0 and t.stats().frames > 16


def test_reconnects_with_backoff_when_the_file_disappears_and_comes_back(tmp_path):
    video = write_video(tmp_path / "cam.avi", n_frames=6)
    hidden = tmp_path / "away.avi"
    events = []
    s = settings(source=f"file:{video}", fps=60.0, reconnect_min_s=0.05, reconnect_max_s=0.2)
    slot = FrameSlot()
    t = CaptureThread(s, slot, time.monotonic_ns, lambda lvl, txt: events.append((lvl, txt)))
    t.start()
    assert len(collect(t, slot, 0.3)) > 0
    shutil.move(video, hidden)
    time.sleep(0.6)
    down = t.stats()
    assert down.state == RECONNECTING and not down.connected and down.outage_s > 0.2
    assert "not found" in down.last_error and down.open_failures >= 3
    assert len([e for e in events if e[0] == "warn"]) == 1  # logged once per outage, not once per retry
    shutil.move(hidden, video)
    back = collect(t, slot, 0.6)
    assert t.stop()
    up = t.stats()
    assert back and up.state == STREAMING and up.reconnects == 1 and up.total_outage_s > 0.2
    assert "reconnected" in events[-1][1]


class MjpegServer:
    """An MJPEG-over-HTTP camera (multipart/x-mixed-replace, as IP cameras serve it) on 127.0.0.1; while
    ``online`` is False, open streams end and new requests get 503."""

    def __init__(self, fps=30.0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self
        self.online = True

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if not server.online:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while server.online:
                        img = np.full((96, 128, 3), (i * 5) % 255, np.uint8)
                        jpg = cv2.imencode(".jpg", img)[1].tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                         % (len(jpg), jpg))
                        i += 1
                        time.sleep(1.0 / fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.online = False
        self.httpd.shutdown()
        self.httpd.server_close()


def test_network_stream_drop_and_recovery():
    server = MjpegServer()
    events = []
    try:
        s = settings(source=server.url, fps=30.0, read_timeout_s=1.0, open_timeout_s=1.0, reconnect_min_s=0.05,
                     reconnect_max_s=0.2)
        slot = FrameSlot()
        t = CaptureThread(s, slot, time.monotonic_ns, lambda lvl, txt: events.append((lvl, txt)))
        t.start()
        assert len(collect(t, slot, 1.0)) >= 10
        assert t.stats().frame_width == 128 and t.stats().state == STREAMING
        server.online = False  # the camera drops off the network
        time.sleep(1.0)
        down = t.stats()
        assert down.state == RECONNECTING and down.outage_s > 0.3
        assert "could not open network stream" in down.last_error and down.open_failures >= 2
        server.online = True
        assert len(collect(t, slot, 1.5)) >= 10
        assert t.stop()
        assert t.stats().reconnects == 1 and "reconnected" in events[-1][1]
    finally:
        server.close()


# ---------------------------------------------------------------------------------------- conversion
def test_to_output_rgb_handles_bgr_bgra_mono_and_letterboxes():
    s = settings(output_width=64, output_height=64)
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[..., 0] = 200  # blue
    out = to_output_rgb(bgr, s)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[32, 32]) == (0, 0, 200) and tuple(out[0, 0]) == (0, 0, 0)  # RGB, padded rows black
    bgra = np.dstack([bgr, np.full((48, 64), 255, np.uint8)])
    assert np.array_equal(to_output_rgb(bgra, s), out)
    mono = to_output_rgb(np.full((48, 64), 90, np.uint8), s)
    assert tuple(mono[32, 32]) == (90, 90, 90)


def test_delivery_records_latency_and_survives_a_bad_frame():
    slot, latency, errors, seen = FrameSlot(), LatencyWindow(), [], []

    def handler(frame):
        if frame.seq == 0:
            raise ValueError("boom")
        seen.append(frame.seq)
        return frame.stamp_ns + 2_000_000  # "published" 2 ms after capture

    d = Delivery(slot, handler, latency, errors.append)
    d.start()
    for i in range(3):
        slot.put(Frame(np.zeros((2, 2, 3), np.uint8), 1_000_000_000 + i, i))
        time.sleep(0.1)
    assert d.stop()
    assert seen == [1, 2] and d.delivered == 2 and "boom" in errors[0]
    assert latency.percentiles_ms(50) == [pytest.approx(2.0)]


# -------------------------------------------------------------------------------------------- calibration
def test_calibration_follows_the_letterboxed_pixels(tmp_path):
    f = tmp_path / "cam.yaml"
    f.write_text("""image_width: 640
image_height: 480
camera_name: cam_high
camera_matrix: {rows: 3, cols: 3, data: [600.0, 0.0, 319.5, 0.0, 600.0, 239.5, 0.0, 0.0, 1.0]}
distortion_model: plumb_bob
distortion_coefficients: {rows: 1, cols: 5, data: [0.1, -0.05, 0.0, 0.0, 0.0]}
""")
    cal = load_calibration(str(f))
    out = fit_calibration(cal, 448, 448, "letterbox")
    point = np.array([0.12, -0.07, 1.0])  # a 3D point in the camera frame
    u0, v0 = (cal.k @ point)[:2]
    img = np.zeros((480, 640, 3), np.uint8)
    cv2.circle(img, (int(round(u0)), int(round(v0))), 12, (255, 255, 255), -1)
    fitted = imaging.fit(img, 448, 448, "letterbox")[..., 0].astype(float)
    ys, xs = np.nonzero(fitted)
    cx, cy = (xs * fitted[ys, xs]).sum() / fitted.sum(), (ys * fitted[ys, xs]).sum() / fitted.sum()
    u1, v1 = (out.k @ point)[:2]
    assert (out.width, out.height) == (448, 448) and abs(u1 - cx) < 0.6 and abs(v1 - cy) < 0.6
    assert np.allclose(out.p[:, :3], out.k) and np.array_equal(out.d, cal.d)
    f.write_text("image_width: 640\nimage_height: 480\ncamera_matrix: {data: [1, 2, 3]}\n")
    with pytest.raises(CameraConfigError, match="'camera_matrix' needs 9 values, got 3"):
        load_calibration(str(f))
    with pytest.raises(CameraConfigError, match="cannot read"):
        load_calibration(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------------------------------------- health
def _stats(**kw):
    base = dict(state=STREAMING, frames=100, dropped=0, reconnects=0, loops=0, read_failures=0, open_failures=0,
                outage_s=0.0, total_outage_s=0.0, last_error="", frame_width=640, frame_height=480,
                last_frame_age_s=0.01)
    return CaptureStats(**{**base, **kw})


@pytest.mark.parametrize("kw,capture_fps,level,words", [
    ({}, 30.0, OK, "streaming"),
    ({}, 12.0, WARN, "capturing 12.0 fps, 30 requested"),
    ({"last_frame_age_s": 3.0}, 30.0, WARN, "stalled"),
    ({"state": RECONNECTING, "outage_s": 2.5, "last_error": "V4L2 device /dev/video0 does not exist"}, math.nan,
     ERROR, "no frames for 2.5 s: V4L2 device /dev/video0"),
    ({"state": ENDED}, math.nan, WARN, "end of file"),
    ({"state": FAILED, "last_error": "built without GStreamer"}, math.nan, ERROR, "GStreamer"),
])
def test_health_levels(kw, capture_fps, level, words):
    h = camera_health(_stats(**kw), requested_fps=30.0, capture_fps=capture_fps, publish_fps=capture_fps,
                      published=90, latency_p50_ms=3.0, latency_p99_ms=9.0, source="/dev/video0")
    values = dict(h.values)
    assert h.level == level and words in h.message
    assert values["connected"] == str(kw.get("state", STREAMING) == STREAMING).lower()
    assert values["latency_p99_ms"] == "9.00" and values["frames_published"] == "90"
