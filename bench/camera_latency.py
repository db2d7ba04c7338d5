"""camera_ingest cost with 3 simultaneous cameras at 30 Hz, each node in its own process (as on a station).

Sources are MJPG video files written here with OpenCV (what a USB camera in MJPG mode hands over; the node
decodes them with FFmpeg and paces them at the requested fps). A subscriber in this process takes every
Image and the JPEG side-stream (so JPEG encoding runs, as while recording). Per camera it prints:

- node capture-to-publish latency p50 / p99 (from the node's /diagnostics: frame stamp -> Image published),
- capture-to-receive latency p50 / p99 (header.stamp -> callback here: adds DDS transport and our executor),
- delivered rate and CPU % of the node process (utime + stime from /proc over the measured window),
- the share of that CPU spent decoding the source itself (decode timed here, scaled to 30 Hz),

for 448x448 and 640x480 captures (and the bimanual_aloha setting 640x480 -> 448x448 letterbox), plus the
ratios of each scenario to the 448x448 one. On a loaded machine the absolute figures are noisy; the ratios
within one run are the comparable numbers.

"Hz" is what arrives here. With ``--qos sensor`` (best effort, the default) Fast DDS drops raw frames larger
than its 512 KiB shared-memory segment (448x448x3 = 588 KiB) while the node publishes every one (compare
"pub Hz" from the node's diagnostics); ``--qos reliable``, or a Fast DDS profile with a larger SHM
``segment_size`` (FASTDDS_DEFAULT_PROFILES_FILE), delivers them.

    ROS_DOMAIN_ID=.. ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST .venv/bin/python bench/camera_latency.py \
        [--duration 8] [--quick]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
SCENARIOS = {  # name: (capture w, h, output w, h, resize)
    "448x448": (448, 448, 448, 448, "resize"),
    "640x480": (640, 480, 640, 480, "resize"),
    "640x480->448 letterbox": (640, 480, 448, 448, "letterbox"),
}


def write_clip(path: Path, width: int, height: int, n: int, seed: int) -> Path:
    """A textured clip (noise + moving shapes) so MJPG/JPEG do real work, not flat colour."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (7, 7), 0)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30.0, (width, height))
    for i in range(n):
        img = np.roll(base, 4 * i, axis=1)
        cv2.circle(img, (int(width * (0.2 + 0.6 * i / n)), height // 2), height // 6, (40, 200, 90), -1)
        w.write(img)
    w.release()
    return path


def decode_ms(path: Path, frames: int = 60) -> float:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    t = time.perf_counter()
    n = 0
    while n < frames and cap.grab() and cap.retrieve()[0]:
        n += 1
    cap.release()
    return (time.perf_counter() - t) / max(n, 1) * 1e3


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_scenario(name, spec, clips_dir: Path, duration: float, warmup: float, fps: float, qos: str, threads: int,
                 listener):
    cw, ch, ow, oh, mode = spec
    clips = [write_clip(clips_dir / f"{name.split()[0]}_{i}.avi", cw, ch, 90, i) for i in range(len(CAMERAS))]
    procs = []
    for cam, clip in zip(CAMERAS, clips):
        args = [sys.executable, "-m", "recap_ros.nodes.camera_ingest", "--ros-args", "-r", f"__node:=bench_{cam}",
                "-p", "station:=sim", "-p", f"camera:={cam}", "-p", f"source:=file:{clip}",
                "-p", f"width:={cw}", "-p", f"height:={ch}", "-p", f"output_width:={ow}",
                "-p", f"output_height:={oh}", "-p", f"resize:={mode}", "-p", f"fps:={fps}",
                "-p", "diagnostics_period_s:=0.5", "-p", f"qos:={qos}",
                "-p", f"opencv_threads:={threads}", "--log-level", "warn"]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        time.sleep(warmup)
        listener.reset()
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        t0 = time.monotonic()
        time.sleep(duration)
        wall = time.monotonic() - t0
        cpu1 = [cpu_seconds(p.pid) for p in procs]
        result = listener.snapshot()
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    dec = decode_ms(clips[0])
    rows = []
    for i, cam in enumerate(CAMERAS):
        lat, diag = result["latency"][cam], result["diag"].get(cam, {})
        cpu = (cpu1[i] - cpu0[i]) / wall * 100.0
        rows.append(dict(cam=cam, rate=len(lat) / wall, node_p50=float(diag.get("latency_p50_ms", "nan")),
                         node_p99=float(diag.get("latency_p99_ms", "nan")), rx_p50=pct(lat, 50), rx_p99=pct(lat, 99),
                         cpu=cpu, jpeg=result["jpegs"][cam] / wall, dropped=diag.get("dropped_frames", "?"),
                         pub=float(diag.get("fps", "nan")),
                         decode_cpu=dec * fps / 10.0))
    return rows


class Listener:
    def __init__(self, qos_name: str):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import CompressedImage, Image

        from recap_ros.nodes.camera_ingest import RELIABLE_IMAGE_QOS
        from recap_ros.rosmsg import SENSOR_QOS, stamp_to_ns

        qos = SENSOR_QOS if qos_name == "sensor" else RELIABLE_IMAGE_QOS

        rclpy.init()
        self.rclpy = rclpy
        self.node = rclpy.create_node("camera_latency_bench")
        self.lock = threading.Lock()
        self.reset()
        clock = self.node.get_clock()
        for cam in CAMERAS:
            def on_image(msg, cam=cam):
                dt = (clock.now().nanoseconds - stamp_to_ns(msg.header.stamp)) / 1e6
                with self.lock:
                    self.latency[cam].append(dt)

            def on_jpeg(msg, cam=cam):
                with self.lock:
                    self.jpegs[cam] += 1
            self.node.create_subscription(Image, f"/cameras/{cam}/image_raw", on_image, qos)
            self.node.create_subscription(CompressedImage, f"/cameras/{cam}/image_raw/compressed", on_jpeg, qos)

        def on_diag(msg):
            with self.lock:
                for st in msg.status:
                    for cam in CAMERAS:
                        if st.name.endswith(f"camera {cam}"):
                            self.diag[cam] = {kv.key: kv.value for kv in st.values}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
        self.executor = rclpy.executors.SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def reset(self):
        with self.lock:
            self.latency = {c: [] for c in CAMERAS}
            self.jpegs = {c: 0 for c in CAMERAS}
            self.diag = {}

    def snapshot(self):
        with self.lock:
            return {"latency": {c: list(v) for c, v in self.latency.items()}, "jpegs": dict(self.jpegs),
                    "diag": dict(self.diag)}

    def close(self):
        self.executor.shutdown(timeout_sec=2)
        self.thread.join(timeout=2)
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per scenario")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring (discovery, first open)")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--qos", choices=("sensor", "reliable"), default="sensor", help="node qos parameter "
                    "(the subscriber here matches it)")
    ap.add_argument("--opencv-threads", type=int, default=1, help="node opencv_threads parameter")
    ap.add_argument("--quick", action="store_true", help="3 s per scenario, 448x448 and 640x480 only")
    a = ap.parse_args()
    scenarios = dict(SCENARIOS)
    if a.quick:
        a.duration = min(a.duration, 3.0)
        scenarios.pop("640x480->448 letterbox")
    listener = Listener(a.qos)
    summary = {}
    print(f"camera_ingest: {len(CAMERAS)} cameras x {a.fps:g} Hz, one process each, JPEG side-stream subscribed, "
          f"QoS {a.qos}, opencv_threads {a.opencv_threads}, {a.duration:g} s per scenario, {os.cpu_count()} CPUs, "
          f"Fast DDS profile {os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE') or 'none (stock: 512 KiB SHM segment)'}")
    try:
        with tempfile.TemporaryDirectory(prefix="camera_bench_") as tmp:
            for name, spec in scenarios.items():
                rows = run_scenario(name, spec, Path(tmp), a.duration, a.warmup, a.fps, a.qos, a.opencv_threads,
                                    listener)
                print(f"\n{name}: capture {spec[0]}x{spec[1]} -> Image {spec[2]}x{spec[3]} ({spec[4]})")
                print(f"  {'camera':16s} {'pub Hz':>6s} {'Hz':>6s} {'JPEG Hz':>8s} {'node p50/p99 ms':>16s} "
                      f"{'rx p50/p99 ms':>15s} {'CPU %':>6s} {'decode %':>8s} {'dropped':>7s}")
                for r in rows:
                    print(f"  {r['cam']:16s} {r['pub']:6.1f} {r['rate']:6.1f} {r['jpeg']:8.1f} {r['node_p50']:7.2f}/{r['node_p99']:<8.2f}"
                          f" {r['rx_p50']:6.2f}/{r['rx_p99']:<8.2f} {r['cpu']:6.1f} {r['decode_cpu']:8.1f} "
                          f"{r['dropped']:>7s}")
                summary[name] = {k: float(np.nanmean([r[k] for r in rows]))
                                 for k in ("node_p50", "node_p99", "rx_p50", "cpu", "rate")}
    finally:
        listener.close()
    ref = summary.get("448x448")
    print("\nper camera, mean of the 3 (ratio to 448x448 in the same run):")
    for name, s in summary.items():
        print(f"  {name:24s} node p50 {s['node_p50']:6.2f} ms ({s['node_p50'] / ref['node_p50']:.2f}x)  "
              f"p99 {s['node_p99']:6.2f} ms  rx p50 {s['rx_p50']:6.2f} ms  CPU {s['cpu']:5.1f} % "
              f"({s['cpu'] / ref['cpu']:.2f}x)  rate {s['rate']:5.1f} Hz ({s['rate'] / a.fps:.2f} of requested)")


if __name__ == "__main__":
    main()
