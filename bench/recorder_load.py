"""Recorder under station load: the episode_recorder node (its own process) records 3 cameras x 30 Hz JPEG
(CompressedImage, SENSOR_QOS) + 50 Hz joint states + 50 Hz commands (COMMAND_QOS) published by this process
for --duration seconds (the issue's figure is 10 min: --duration 600). Prints sent vs recorded per topic
(read back from the bag with rosbags), the drops the recorder reported, its CPU % (process CPU time / wall
time, from /proc), the bag's MB/s and the recorded/sent ratio. Goal: 0 dropped.

    ROS_DOMAIN_ID=.. ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST .venv/bin/python bench/recorder_load.py --duration 20
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from recap_ros.imaging import encode_jpeg  # noqa: E402
from recap_ros.station import load_station  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import stop_group  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _frame(cam, index: int, k: int) -> bytes:
    """A camera-like JPEG: a moving gradient scene with sensor noise, at the camera's size and quality."""
    rng = np.random.default_rng([index, k])
    y, x = np.mgrid[0:cam.height, 0:cam.width]
    scene = np.stack([(x + 4 * k) % 256, (y + 2 * k) % 256, (x + y) // 2 % 256], axis=-1).astype(float)
    return encode_jpeg(np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8), cam.jpeg_quality)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of recording (issue: 600)")
    ap.add_argument("--station", default="sim")
    ap.add_argument("--queue-size", type=int, default=None, help="override recorder.queue_size")
    ap.add_argument("--out", default=None, help="bag output directory (default: a temporary one, deleted)")
    args = ap.parse_args()

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import CompressedImage, JointState
    from std_srvs.srv import Trigger

    from recap_ros.rosmsg import COMMAND_QOS, SENSOR_QOS, joint_state_msg, ns_to_stamp

    st = load_station(args.station)
    tmp = None if args.out else tempfile.TemporaryDirectory()
    out = Path(args.out or tmp.name)
    cams = [c.compressed_topic for c in st.cameras]
    rates = {**{t: 30.0 for t in cams}, st.robot.joint_states_topic: 50.0, st.robot.command_topic: 50.0}
    jpegs = [[_frame(c, i, k) for k in range(30)] for i, c in enumerate(st.cameras)]  # all distinct (zstd)
    jpeg_kb = np.mean([len(j) for js in jpegs for j in js]) / 1e3

    cmd = [sys.executable, "-m", "recap_ros.nodes.episode_recorder", "--ros-args", "-p", f"station:={args.station}",
           "-p", f"output_dir:={out}", "-p", "auto_episodes:=false", "-p", "model:=bench", "-p", "min_free_disk_mb:=64"]
    if args.queue_size:
        cmd += ["-p", f"queue_size:={args.queue_size}"]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "recorder.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rclpy.init()
    node = Node("recorder_load")
    pubs = {t: node.create_publisher(CompressedImage if t in cams else JointState, t,
                                     SENSOR_QOS if t in cams else COMMAND_QOS) for t in rates}
    srv = {n: node.create_client(Trigger, f"/episode_recorder/{n}") for n in ("start", "stop")}
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    threading.Thread(target=ex.spin, daemon=True).start()

    def call(name: str):
        fut = srv[name].call_async(Trigger.Request())
        t0 = time.monotonic()
        while not fut.done():
            if time.monotonic() - t0 > 60:
                raise SystemExit(f"~/{name} did not answer")
            time.sleep(0.01)
        r = fut.result()
        if not r.success:
            raise SystemExit(f"~/{name} failed: {r.message}")
        return r.message

    try:
        t0 = time.monotonic()
        while not (all(p.get_subscription_count() for p in pubs.values())
                   and all(c.service_is_ready() for c in srv.values())):
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                raise SystemExit("recorder did not come up:\n" + (out / "recorder.log").read_text()[-2000:])
            time.sleep(0.05)
        bag = Path(call("start"))
        sent = {t: 0 for t in rates}
        names = st.robot.joint_names
        q = np.zeros(len(names))
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        next_t = {t: wall0 for t in rates}
        late = 0.0
        while (now := time.monotonic()) < wall0 + args.duration:
            for t, hz in rates.items():
                if now >= next_t[t]:
                    late = max(late, now - next_t[t])
                    next_t[t] += 1.0 / hz
                    stamp = time.time_ns()
                    if t in cams:
                        msg = CompressedImage(format="jpeg", data=jpegs[cams.index(t)][sent[t] % 30])
                        msg.header.stamp = ns_to_stamp(stamp)
                    else:
                        msg = joint_state_msg(names, q, stamp)
                    pubs[t].publish(msg)
                    sent[t] += 1
            time.sleep(max(0.0, min(next_t.values()) - time.monotonic()))
        time.sleep(0.5)  # delivery of the last messages
        cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
        stop_msg = call("stop")
    finally:
        stop_group(proc, 15)
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()

    from rosbags.rosbag2 import Reader

    recorded: dict[str, int] = {}
    payload = 0
    with Reader(bag) as rd:  # read every message back: counts and payload bytes
        custom = dict(rd.storage.metadata.custom or {})
        for conn, _, raw in rd.messages():
            recorded[conn.topic] = recorded.get(conn.topic, 0) + 1
            payload += len(raw)
    size = sum(p.stat().st_size for p in bag.iterdir())
    wall = wall1 - wall0
    total_sent = sum(sent.values())
    total_rec = sum(recorded.get(t, 0) for t in sent)
    print(f"recorder load: {args.duration:.0f} s, station {st.name}, queue_size "
          f"{args.queue_size or st.recorder.queue_size}, JPEG {jpeg_kb:.1f} kB, publisher max lateness "
          f"{late * 1e3:.1f} ms")
    print(f"{'topic':44s} {'Hz':>5s} {'sent':>7s} {'recorded':>9s} {'lost':>6s}")
    for t, hz in rates.items():
        print(f"{t:44s} {hz:5.0f} {sent[t]:7d} {recorded.get(t, 0):9d} {sent[t] - recorded.get(t, 0):6d}")
    print(f"dropped by the recorder queue (recap.dropped): {custom.get('recap.dropped')}; "
          f"lost in total: {total_sent - total_rec} of {total_sent} (recorded/sent = {total_rec / total_sent:.6f})")
    print(f"recorder CPU: {100 * (cpu1 - cpu0) / wall:.1f} % of one core; {total_rec / wall:.0f} msg/s; "
          f"payload {payload / 1e6 / wall:.2f} MB/s, bag on disk {size / 1e6:.1f} MB = {size / 1e6 / wall:.2f} MB/s "
          f"(zstd ratio {payload / size:.2f})")
    print(f"stop: {stop_msg}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
