"""Cost of the aloha_sim station (MuJoCo ALOHA) with its whole node graph running: real-time factor, CPU per
node, the 50 Hz command stream and the cameras.

    ./dev run python bench/aloha_cost.py [--duration 60] [--fps 15] [--expert]

Starts the station as ``recap-station`` does (one process per node, the station's Fast DDS profile), bags into a
temporary directory. Default: the whole graph (aloha_sim with its cameras and the scripted corrector,
policy_server with the station's bundle, cfg_guidance, teleop_mux, episode_recorder); ``--expert``: the scripted
expert drives every episode through the policy's mux input, no policy server. After ``--settle`` seconds it
measures for ``--duration`` seconds and prints:

* real-time factor: simulated time over wall time (aloha_sim's control ticks x DT, from its diagnostics; the
  control loop catches up late ticks for up to 1 s, so RTF < 1 means ticks were given up);
* CPU per node (% of one core, the node's process and its children, from /proc) and the machine's load;
* the command stream (/robot/command, the mux's header stamps) and the joint-state stream (aloha_sim's stamps):
  p50 / p99 absolute period error, missed ticks (a gap of >= 1.5 periods counts the ticks it swallowed), within
  the episodes (between two episodes the command sources stop and the mux only holds after its input timeout)
  and over the whole window; and aloha_sim's own control-loop monitor;
* each camera's delivered rate and render time (p50, from aloha_sim's diagnostics); episodes and successes.

Before the station starts it times one render of each camera in this process (p50 over ``--renders``), with the
station's scene flags (shadows, reflections, skybox off) and with MuJoCo's defaults, and one physics step.

Figures measured on a loaded shared machine are noisy: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_server_timing import period_figures  # noqa: E402
from procs import private_domain, stop_group  # noqa: E402

from recap_ros.station import load_station  # noqa: E402

TICK_S = os.sysconf("SC_CLK_TCK")


class Probe:
    """Stamps of the command, joint-state and camera streams, aloha_sim's diagnostics, episode ends."""

    def __init__(self, station):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String

        from recap_ros import rosmsg

        rclpy.init()
        self.rclpy, self.rosmsg = rclpy, rosmsg
        self.node = n = Node("aloha_cost_probe")
        self.lock = threading.Lock()
        self.recording = False
        self.stamps: dict[str, list[int]] = {"command": [], "joints": []}
        self.frames: Counter = Counter()
        self.diag: list[tuple[float, dict]] = []
        self.ends: list[dict] = []
        self.episode_start_ns = 0
        self.episodes_ns: list[tuple[int, int]] = []  # (start, end) stamps of the episodes ended in the window
        n.create_subscription(JointState, station.robot.command_topic, self._stamp("command"), rosmsg.COMMAND_QOS)
        n.create_subscription(JointState, station.robot.joint_states_topic, self._stamp("joints"),
                              rosmsg.COMMAND_QOS)
        for cam in station.cameras:
            n.create_subscription(Image, cam.image_topic, lambda m, c=cam.name: self._count(c), rosmsg.SENSOR_QOS,
                                  raw=True)  # counting only: no deserialisation in this process
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        n.create_subscription(String, station.episode_topic, self._on_event, rosmsg.EVENT_HISTORY_QOS)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _stamp(self, key):
        def cb(msg):
            if self.recording:
                self.stamps[key].append(self.rosmsg.stamp_to_ns(msg.header.stamp))
        return cb

    def _count(self, cam):
        if self.recording:
            self.frames[cam] += 1

    def _on_diag(self, msg):
        from recap_ros.rosmsg import diagnostic_values

        for s in msg.status:
            if s.name == "sim_robot: episodes":
                with self.lock:
                    self.diag.append((time.monotonic(), diagnostic_values(s)))

    def _on_event(self, msg):
        ev = json.loads(msg.data)
        if ev.get("event") == "start":
            self.episode_start_ns = int(ev["stamp_ns"])
        elif ev.get("event") == "end" and self.recording:
            self.ends.append(ev)
            self.episodes_ns.append((self.episode_start_ns, int(ev["stamp_ns"])))

    def close(self):
        self.executor.shutdown(timeout_sec=2)
        self.thread.join(timeout=2)
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def node_pids(runner_pid: int) -> dict[str, list[int]]:
    """Node name -> pids of its process and that process's descendants (policy_server's tick child)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    nodes = {}
    for pid in children.get(runner_pid, []):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = next((a.decode().split(":=", 1)[1] for a in args if a.startswith(b"__node:=")), str(pid))
        family, todo = [pid], [pid]
        while todo:
            for c in children.get(todo.pop(), []):
                family.append(c)
                todo.append(c)
        nodes[name] = family
    return nodes


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK_S  # utime + stime
    return total


def standalone_costs(station, n: int) -> None:
    """p50 ms of a physics step and of one render per camera (cheap scene flags vs MuJoCo's defaults)."""
    from recap_ros.sim.aloha.env import AlohaRenderer, AlohaSim  # first: it picks headless EGL for mujoco

    import mujoco

    def p50(fn) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1e3

    sim = AlohaSim()
    q = sim.reset(station.sim.tasks[0], 0)
    print(f"physics step (DT {sim.dt:g} s, {sim.n_sub_steps} substeps): p50 {p50(lambda: sim.step(q)):.2f} ms")
    cam = station.cameras[0]
    model, qpos = sim.scene_model(sim.task), sim.physics.data.qpos.copy()
    cheap = AlohaRenderer(model, cam.output_width, cam.output_height)
    default = mujoco.Renderer(model, height=cam.output_height, width=cam.output_width)
    data = cheap.data
    for c in station.cameras:
        def render_default(name=c.name):
            default.update_scene(data, camera=name)
            default.render()

        fast = p50(lambda name=c.name: cheap.render(name, qpos))
        print(f"render {c.name} {cam.output_width}x{cam.output_height}: p50 {fast:.1f} ms (shadows, reflections, "
              f"skybox off) vs {p50(render_default):.1f} ms (MuJoCo's default flags)")
    cheap.close()
    default.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--station", default="aloha_sim")
    ap.add_argument("--duration", type=float, default=60.0, help="measurement window (s)")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds after start before measuring")
    ap.add_argument("--fps", type=float, default=None, help="camera rate (default: the station's)")
    ap.add_argument("--expert", action="store_true", help="the scripted expert drives; no policy server")
    ap.add_argument("--renders", type=int, default=30, help="renders per camera for the standalone cost")
    a = ap.parse_args(argv)
    print(f"[bench] ROS_DOMAIN_ID={private_domain()}", flush=True)
    out = Path(tempfile.mkdtemp(prefix="aloha-cost-"))
    data = load_station(a.station).raw
    data["recorder"]["output_dir"] = str(out / "bags")
    for cam in data["cameras"]:
        cam["fps"] = a.fps or cam["fps"]
    yml = out / "station.yaml"
    yml.write_text(yaml.safe_dump(data, sort_keys=False))
    st = load_station(str(yml))
    cmd = [sys.executable, "-m", "recap_ros.runner", str(yml)]
    if a.expert:
        cmd += ["--set", "sim_robot.expert_input=policy", "--only", "sim_robot", "--only", "teleop_mux",
                "--only", "episode_recorder"]
    driver = "scripted expert drives (no policy server)" if a.expert else f"whole graph, bundle {st.policy.bundle}"
    print(f"station {st.name}: {driver}; cameras {[(c.name, c.fps) for c in st.cameras]} at "
          f"{st.cameras[0].output_width}x{st.cameras[0].output_height}; {os.cpu_count()} CPUs; output {out}",
          flush=True)
    standalone_costs(st, a.renders)
    probe = Probe(st)
    log = open(out / "station.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(a.settle)
        if proc.poll() is not None:
            raise SystemExit(f"the station exited (code {proc.returncode}); see {out / 'station.log'}")
        nodes = node_pids(proc.pid)
        load0 = os.getloadavg()
        cpu0 = {k: cpu_seconds(v) for k, v in nodes.items()}
        with probe.lock:
            d0 = probe.diag[-1] if probe.diag else None
        t0 = time.monotonic()
        probe.recording = True
        time.sleep(a.duration)
        probe.recording = False
        wall = time.monotonic() - t0
        cpu1 = {k: cpu_seconds(v) for k, v in nodes.items()}
        with probe.lock:
            d1 = probe.diag[-1] if probe.diag else None
        load1 = os.getloadavg()
    finally:
        stop_group(proc)
        log.close()
        probe.close()
    if d0 is None or d1 is None:
        raise SystemExit(f"no diagnostics from aloha_sim; see {out / 'station.log'}")
    (t_a, v0), (t_b, v1) = d0, d1
    dt = st.robot.period_s
    ticks = int(v1["ticks"]) - int(v0["ticks"])
    steps = int(v1["physics_steps"]) - int(v0["physics_steps"])
    print(f"\nreal-time factor: {ticks * dt / (t_b - t_a):.3f} (simulated {ticks * dt:.1f} s in {t_b - t_a:.1f} s "
          f"wall; {steps} physics steps, the rest reset pauses); aloha_sim missed ticks "
          f"{int(v1['missed_ticks']) - int(v0['missed_ticks'])}, its control period error p99 "
          f"{float(v1['period_err_p99_ms']):.2f} ms (last {3000 * dt:.0f} s)")
    print(f"machine: load average {load0[0]:.2f} -> {load1[0]:.2f} over the window, {os.cpu_count()} CPUs")
    print("CPU per node (% of one core):")
    for name in sorted(cpu1, key=lambda k: -(cpu1[k] - cpu0.get(k, 0.0))):
        print(f"  {name:<18} {100 * (cpu1[name] - cpu0.get(name, 0.0)) / wall:6.1f} %")
    print(f"  {'all nodes':<18} {100 * (sum(cpu1.values()) - sum(cpu0.values())) / wall:6.1f} %")
    for key, label in (("command", "command stream /robot/command"), ("joints", "joint states")):
        s = np.sort(np.asarray(probe.stamps[key], dtype=np.int64))
        if len(s) < 3:
            print(f"{label}: {len(s)} messages")
            continue
        pf = period_figures(s, dt)
        # within episodes only: between them the sources stop and the mux holds after its input timeout
        inside = [period_figures(s[(s >= a) & (s <= b)], dt) for a, b in probe.episodes_ns
                  if np.count_nonzero((s >= a) & (s <= b)) >= 3]
        err = (f"within the {len(inside)} episodes p99 {max(f['p99'] for f in inside):.2f} ms (worst episode), "
               f"missed ticks {sum(f['missed'] for f in inside)}; " if inside else "")
        print(f"{label}: {len(s) / wall:.1f} Hz; {err}whole window p50 {pf['p50']:.2f} ms, p99 {pf['p99']:.2f} ms, "
              f"max {pf['max']:.1f} ms, missed ticks {pf['missed']}")
    for cam in st.cameras:
        print(f"camera {cam.name}: {probe.frames[cam.name] / wall:.1f} Hz delivered (set {cam.fps:g}), render p50 "
              f"{float(v1[cam.name + '_render_ms_p50']):.1f} ms")
    ends = probe.ends
    print(f"episodes in the window: {len(ends)}, successes {sum(e['success'] for e in ends)}, by task "
          f"{dict(Counter((e['task'], e['reason']) for e in ends))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
