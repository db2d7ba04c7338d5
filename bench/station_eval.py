"""Live evaluation on the sim station: the real node processes, middleware, mux and recorder, on given seeds.

    ./dev run python bench/station_eval.py [--episodes 100] [--first-seed 5000000] [--bundle sim_policy]
    ./dev run python bench/station_eval.py --expert --corrector --episodes 100    # corrector false alarms

Starts the station exactly as ``recap-station`` does (one process per node, the station's Fast DDS profile),
with ``sim_robot`` running one episode per task seed (its ``seeds`` parameter) and the corrector off unless
``--corrector``. A probe node in this process counts the episode events and reads the policy server's chunk
stats and diagnostics. Prints the live success rate (Wilson 95 % CI), failure reasons, throughput (successes
per hour of station time, reset pauses included), the live per-chunk figures (inference latency, delay d in
ticks) and the policy server's stale holds and missed ticks; then, in the same run, the offline roll-out
(``recap_ros.recap.rollout``, ROS-free) on the same seeds, with d drawn from the delays the live run measured,
and the live/offline ratio.

``--expert``: the scripted expert drives through the policy's mux input instead of the policy (no policy
server); with ``--corrector`` this measures false takeovers (the expert never breaks keep-out). Takeovers are
counted by reason from the corrector's log, and the bags land in ``--out``/bags.

``--station aloha_sim`` (MuJoCo ALOHA): episodes alternate over the station's tasks; success per task (Wilson
95 % CI) is printed next to ACT's published figures. The scripted expert and the corrector run inside the
station's sim node (they read the physics): ``--expert`` sets its ``expert_input`` parameter. There is no
offline roll-out for this station.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
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
from sim_policy_eval import HELD_OUT_SEED, wilson  # noqa: E402
from procs import private_domain, stop_group  # noqa: E402

from recap_ros.station import load_station  # noqa: E402

TAKEOVER_RE = re.compile(r"taking over on \S+: ([^:(\n]+)")
# ACT (Zhao et al. 2023), Table 1: success with 50 scripted / 50 human demonstrations
ACT_SUCCESS = {"transfer_cube": (0.90, 0.50), "insertion": (0.50, 0.20)}


def station_file(base: str, out: Path, bundle: str | None, corrector: bool) -> Path:
    """A copy of the station with bags under ``out``, the bundle and the corrector as asked."""
    data = copy.deepcopy(load_station(base).raw)
    data["recorder"]["output_dir"] = str(out / "bags")
    data["sim"]["corrector"] = bool(corrector)
    if bundle:
        data["policy"]["bundle"] = bundle
    f = out / "station.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return f


class Probe:
    """Episode events, chunk stats and the policy server's diagnostics; optionally drives the expert."""

    def __init__(self, station, expert: bool):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String

        from recap_ros import rosmsg

        rclpy.init()
        self.rclpy, self.st = rclpy, station
        self.node = Node("station_eval_probe")
        self.ends: list[dict] = []
        self.starts: list[dict] = []
        self.latency_ms: list[float] = []
        self.delays: list[int] = []
        self.server: dict[str, str] = {}
        self.mux: dict[str, str] = {}
        self.lock = threading.Lock()
        n = self.node
        n.create_subscription(String, station.episode_topic, self._on_event, rosmsg.EVENT_HISTORY_QOS)
        n.create_subscription(DiagnosticArray, station.policy.stats_topic, self._on_stats, rosmsg.EVENT_QOS)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        self.expert = None
        if expert:
            from recap_ros.sim.expert import Expert
            from recap_ros.sim.kinematics import Bimanual

            robot = station.robot
            self.expert = Expert(Bimanual(robot, station.file), robot.period_s)
            self.task, self.q, self.start_ns = None, None, 0
            self.cmd_pub = n.create_publisher(JointState, station.policy.command_topic, rosmsg.COMMAND_QOS)
            n.create_subscription(JointState, robot.joint_states_topic, self._on_joints, rosmsg.COMMAND_QOS)
            n.create_timer(robot.period_s, self._drive)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_event(self, msg) -> None:
        from recap_ros.sim.task import Task

        ev = json.loads(msg.data)
        with self.lock:
            if ev["event"] == "start":
                self.starts.append(ev)
                if self.expert is not None:
                    self.task, self.q, self.start_ns = Task.from_dict(ev["task"]), None, int(ev["stamp_ns"])
                    self.expert.reset(self.task)
            elif ev["event"] == "end":
                self.ends.append(ev)
                if self.expert is not None:
                    self.task = None

    def _on_joints(self, msg) -> None:
        from recap_ros import rosmsg

        if rosmsg.stamp_to_ns(msg.header.stamp) >= self.start_ns:
            self.q = rosmsg.positions_from_joint_state(msg, self.st.robot.joint_names)

    def _drive(self) -> None:
        from recap_ros import rosmsg

        with self.lock:
            task, q = self.task, self.q
            if task is None or q is None:
                return
            cmd = self.expert.act(q)
        self.cmd_pub.publish(rosmsg.joint_state_msg(self.st.robot.joint_names, cmd, rosmsg.now_ns(self.node)))

    def _on_stats(self, msg) -> None:
        from recap_ros.rosmsg import diagnostic_values

        for s in msg.status:
            v = diagnostic_values(s)
            if "latency_ms" in v:
                self.latency_ms.append(float(v["latency_ms"]))
                self.delays.append(int(v["delay_ticks"]))

    def _on_diag(self, msg) -> None:
        from recap_ros.rosmsg import diagnostic_values

        for s in msg.status:
            if s.name == "policy_server":
                self.server = diagnostic_values(s)
            elif s.name.startswith("teleop_mux"):
                self.mux = diagnostic_values(s)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2)
        self.thread.join(timeout=2)
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def run_live(station_yaml: Path, seeds: list[int], expert: bool, log_path: Path, timeout_s: float) -> dict:
    st = load_station(str(station_yaml))
    aloha = st.sim.simulator == "aloha"  # its expert runs in the sim node, and so does its corrector
    cmd = [sys.executable, "-m", "recap_ros.runner", str(station_yaml), "--set", f"sim_robot.seeds={seeds}"]
    if expert:  # the expert drives the policy's input: no policy server
        for name in ("sim_robot", "teleop_mux", "episode_recorder") + (("scripted_corrector",) if st.sim.corrector
                                                                        and not aloha else ()):
            cmd += ["--only", name]
        if aloha:
            cmd += ["--set", "sim_robot.expert_input=policy"]
    probe = Probe(st, expert and not aloha)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    shown = 0
    try:
        while len(probe.ends) < len(seeds) and time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the station exited (code {proc.returncode}); see {log_path}")
            time.sleep(0.5)
            if len(probe.ends) >= shown + 10:
                shown = len(probe.ends) // 10 * 10
                print(f"[live] {len(probe.ends)}/{len(seeds)} episodes, "
                      f"{sum(e['success'] for e in probe.ends)} successes", flush=True)
    finally:
        stop_group(proc)
        log.close()
        probe.close()
    wall = time.monotonic() - t0
    takeovers = Counter(m.group(1).strip() for m in TAKEOVER_RE.finditer(log_path.read_text()))
    ends = probe.ends[:len(seeds)]
    k = sum(e["success"] for e in ends)
    station_s = sum(e["steps"] for e in ends) * st.robot.period_s + len(ends) * st.sim.reset_pause_s
    return {"ends": ends, "n": len(ends), "k": k, "station_s": station_s,
            "per_hour": k / station_s * 3600 if station_s else 0.0,
            "reasons": Counter(e["reason"] for e in ends if not e["success"]), "latency_ms": probe.latency_ms,
            "delays": probe.delays, "server": probe.server, "mux": probe.mux, "takeovers": takeovers, "wall_s": wall,
            "station": st}


def summarise(name: str, successes: int, n: int, reasons: dict, per_hour: float) -> str:
    lo, hi = wilson(successes, n)
    return (f"{name}: success {successes}/{n} = {successes / max(n, 1):.2f} (95% CI {lo:.2f}-{hi:.2f}); "
            f"failures {dict(reasons)}; throughput {per_hour:.0f} successes/h")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--station", default="sim")
    ap.add_argument("--bundle", default=None, help="model bundle (default: the station's)")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--corrector", action="store_true", help="run the scripted corrector (off by default)")
    ap.add_argument("--expert", action="store_true", help="the scripted expert drives instead of the policy")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline roll-out on the same seeds")
    ap.add_argument("--out", default=None, help="where bags and the station log go (default: a temp dir)")
    a = ap.parse_args(argv)
    print(f"[bench] ROS_DOMAIN_ID={private_domain()}", flush=True)
    out = Path(a.out or tempfile.mkdtemp(prefix="station-eval-"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(a.first_seed, a.first_seed + a.episodes))
    yml = station_file(a.station, out, a.bundle, a.corrector)
    st = load_station(str(yml))
    print(f"[live] station {st.name}, bundle {st.policy.bundle if not a.expert else '(scripted expert)'}, "
          f"{a.episodes} seeds from {a.first_seed}, corrector {'on' if a.corrector else 'off'}; output {out}")
    live = run_live(yml, seeds, a.expert, out / "station.log", timeout_s=a.episodes * 20 + 120)
    ends, n, k, reasons = live["ends"], live["n"], live["k"], live["reasons"]
    station_time, live_per_hour = live["station_s"], live["per_hour"]
    print(summarise("live   ", k, n, reasons, live_per_hour) + f" ({station_time:.0f} s of station time, "
          f"{live['wall_s']:.0f} s wall)")
    if live["takeovers"] or a.corrector:
        print(f"live   : corrector takeovers {sum(live['takeovers'].values())} in {n} episodes, by reason "
              f"{dict(live['takeovers'])}")
    if st.sim.simulator == "aloha":
        for task, (scripted, human) in ACT_SUCCESS.items():
            done = [e for e in ends if e["task"] == task]
            if done:
                k_task = sum(e["success"] for e in done)
                lo, hi = wilson(k_task, len(done))
                print(f"live {task}: success {k_task}/{len(done)} = {k_task / len(done):.2f} (95% CI {lo:.2f}-"
                      f"{hi:.2f}); failures {dict(Counter(e['reason'] for e in done if not e['success']))}; ACT "
                      f"(Table 1): {scripted:.0%} with 50 scripted, {human:.0%} with 50 human demonstrations")
    mux = live["mux"]
    if mux:
        print(f"live   : mux re-anchors {mux.get('reanchors', '?')}, preemptions {mux.get('preemptions', '?')}, "
              f"switches {mux.get('switches', '?')}")
    if not a.expert:
        lat, d = np.asarray(live["latency_ms"]), np.asarray(live["delays"])
        srv = live["server"]
        if lat.size:
            print(f"live   : {lat.size} chunks; inference latency p50 {np.median(lat):.1f} ms, p99 "
                  f"{np.percentile(lat, 99):.1f} ms; delay d p50 {np.median(d):.0f}, max {d.max()} ticks "
                  f"(histogram {dict(sorted(Counter(d.tolist()).items()))}); stale/other holds "
                  f"{srv.get('holds', '?')}, missed ticks {srv.get('missed_ticks', '?')}, period error p99 "
                  f"{srv.get('period_err_p99_ms', '?')} ms")
        if not a.no_offline and st.sim.simulator != "aloha":
            import torch

            from sim_policy_eval import evaluate
            torch.set_num_threads(1)
            delays = d.tolist() if d.size else [0]
            summary, wall = evaluate(st.policy.bundle, a.episodes, a.first_seed, station_name=str(yml),
                                     progress=False, desc="offline", delays=delays)
            reasons = {k: v for k, v in summary.reasons().items() if k != "success"}
            print(summarise("offline", summary.successes, summary.n, reasons,
                            summary.throughput_per_hour) + f" (delays drawn from the live run's; {wall:.0f} s)")
            ratio = (k / max(n, 1)) / max(summary.success_rate, 1e-9)
            print(f"live/offline success ratio {ratio:.2f} ({(k / max(n, 1) - summary.success_rate) * 100:+.0f} "
                  f"points); throughput ratio {live_per_hour / max(summary.throughput_per_hour, 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
