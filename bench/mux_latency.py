"""teleop_mux latency, measured through real middleware with the mux in its own process.

- switch latency: a mode message (policy <-> teleop, both inputs publishing at 50 Hz) is published -> the
  first command on robot.command_topic that comes from the new source (goal: <= one 20 ms control tick);
- forwarding latency: an input command is published -> the first output carrying it;
- baseline: the same two DDS hops through a trivial echo process (no mux logic), so the mux's own cost is
  forwarding minus baseline;
- output rate: from the header stamps of the commands received (grid ticks on absolute deadlines plus one
  extra tick per switch), with the interval p50 / p99 / max, goal: the control rate.

Each figure is measured idle and with ``--hogs`` busy-loop processes competing for the cores, alternating
(the machine's own load changes affect both alike); the loaded / idle ratios are printed.

The two sources differ by 1e-4 rad, which the step limit (2 rad/s) lets through on any tick >= 50 us after the
previous one, so a switch shows in its first tick; joint 0 carries a sequence number (1e-5 rad steps),
joint 1 tells the source apart.

    ROS_DOMAIN_ID=.. ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST .venv/bin/python bench/mux_latency.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

SOURCE_MARK = {"policy": 0.2, "teleop": 0.2001}
SEQ_STEP = 1e-5
SEQ_WRAP = 1000
ECHO_IN, ECHO_OUT = "/mux_bench/echo_in", "/mux_bench/echo_out"


def echo_main() -> None:
    """The baseline: republish every JointState unchanged (two hops, no logic)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from sensor_msgs.msg import JointState

    from recap_ros.rosmsg import COMMAND_QOS

    rclpy.init()
    node = Node("mux_bench_echo")
    pub = node.create_publisher(JointState, ECHO_OUT, COMMAND_QOS)
    node.create_subscription(JointState, ECHO_IN, pub.publish, COMMAND_QOS)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def pct(xs) -> str:
    if len(xs) == 0:
        return "n=0"
    a = np.asarray(xs) * 1e3
    return (f"p50 {np.percentile(a, 50):6.2f}  p99 {np.percentile(a, 99):6.2f}  max {a.max():6.2f} ms  "
            f"(n={a.size})")


class Bench:
    def __init__(self, node, st):
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String

        from recap_ros.rosmsg import (
            COMMAND_QOS,
            joint_state_msg,
            positions_from_joint_state,
        )

        self.st, self.names, self.String = st, st.robot.joint_names, String
        self.joint_state_msg, self.positions = joint_state_msg, positions_from_joint_state
        self.lock = threading.Lock()
        self.sent: dict[tuple[str, int], float] = {}
        self.seq = 0
        self.forward: list[float] = []
        self.seen: set[tuple[str, int]] = set()
        self.switch_t: tuple[str, float] | None = None
        self.switches: list[float] = []
        self.outputs = 0
        self.stamps: list[int] = []
        self.pub = {i.name: node.create_publisher(JointState, i.topic, COMMAND_QOS) for i in st.mux.inputs}
        self.js = node.create_publisher(JointState, st.robot.joint_states_topic, COMMAND_QOS)
        self.mode_pub = node.create_publisher(String, st.mux.mode_topic, COMMAND_QOS)
        node.create_subscription(JointState, st.robot.command_topic, self.on_output, COMMAND_QOS)
        self.echo_pub = node.create_publisher(JointState, ECHO_IN, COMMAND_QOS)
        node.create_subscription(JointState, ECHO_OUT, self.on_echo, COMMAND_QOS)
        self.echo_sent: dict[int, float] = {}
        self.echo: list[float] = []

    def q(self, source: str, seq: int) -> np.ndarray:
        q = np.full(len(self.names), 0.1)
        q[0] = (seq % SEQ_WRAP) * SEQ_STEP
        q[1] = SOURCE_MARK[source]
        return q

    def publish_inputs(self) -> None:
        with self.lock:
            self.seq += 1
            seq = self.seq
            for name in SOURCE_MARK:
                self.sent[(name, seq % SEQ_WRAP)] = time.monotonic()
        for name in SOURCE_MARK:
            self.pub[name].publish(self.joint_state_msg(self.names, self.q(name, seq), 0))
        self.echo_sent[seq % SEQ_WRAP] = time.monotonic()
        self.echo_pub.publish(self.joint_state_msg(self.names, self.q("policy", seq), 0))

    def mode(self, source: str) -> None:
        with self.lock:
            self.switch_t = (source, time.monotonic())
        self.mode_pub.publish(self.String(data=source))

    def on_output(self, msg) -> None:
        t = time.monotonic()
        q = self.positions(msg, self.names)
        source = min(SOURCE_MARK, key=lambda s: abs(SOURCE_MARK[s] - q[1]))
        seq = int(round(q[0] / SEQ_STEP))
        with self.lock:
            self.outputs += 1
            self.stamps.append(msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)
            if abs(SOURCE_MARK[source] - q[1]) > 1e-9:
                return  # a step-limited handover tick (not expected with these inputs)
            if (source, seq) not in self.seen and (source, seq) in self.sent:
                self.seen.add((source, seq))
                self.forward.append(t - self.sent[(source, seq)])
            if self.switch_t and self.switch_t[0] == source:
                self.switches.append(t - self.switch_t[1])
                self.switch_t = None

    def on_echo(self, msg) -> None:
        seq = int(round(msg.position[0] / SEQ_STEP))
        if seq in self.echo_sent:
            self.echo.append(time.monotonic() - self.echo_sent.pop(seq))

    def reset_stats(self) -> None:
        with self.lock:
            self.forward.clear()
            self.switches.clear()
            self.echo.clear()
            self.seen.clear()
            self.stamps.clear()


def run_mode(st, hogs: int, duration: float, switch_every: float) -> dict:
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    env = dict(os.environ)
    mux = subprocess.Popen([sys.executable, "-m", "recap_ros.nodes.teleop_mux", "--ros-args", "-p",
                            f"station:={st.file}", "--log-level", "warn"], env=env, start_new_session=True)
    echo = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--echo"], env=env,
                            start_new_session=True)
    node = Node(f"mux_bench_{hogs}_hogs")
    b = Bench(node, st)
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    threading.Thread(target=ex.spin, daemon=True).start()
    stop = threading.Event()
    hog_procs: list[subprocess.Popen] = []

    def feeder():  # 1 % slower than the control rate: the phase to the mux's timer sweeps every 2 s
        next_t = time.monotonic()
        while not stop.is_set():
            b.publish_inputs()
            next_t += st.robot.period_s * 1.01
            time.sleep(max(0.0, next_t - time.monotonic()))

    try:
        deadline = time.monotonic() + 60
        b.mode("hold")  # both inputs start publishing under an explicit hold (no preemption)
        while b.outputs == 0 or b.echo_pub.get_subscription_count() == 0:
            if time.monotonic() > deadline or mux.poll() is not None:
                raise SystemExit("teleop_mux did not start publishing")
            b.js.publish(b.joint_state_msg(b.names, np.full(len(b.names), 0.1), 0))
            b.mode("hold")
            time.sleep(0.1)
        threading.Thread(target=feeder, daemon=True).start()
        b.mode("policy")
        hog_procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
        time.sleep(1.0)
        b.reset_stats()
        t_end, source = time.monotonic() + duration, "policy"
        while time.monotonic() < t_end:
            # switch at a random phase relative to the control tick
            time.sleep(switch_every + np.random.uniform(0, st.robot.period_s))
            source = "teleop" if source == "policy" else "policy"
            b.mode(source)
        time.sleep(0.2)
        with b.lock:
            stamps = np.sort(np.asarray(b.stamps, dtype=np.int64))
            gaps = list(np.diff(stamps) * 1e-9)
            span = (stamps[-1] - stamps[0]) * 1e-9 if len(stamps) > 1 else 0.0
            return {"forward": list(b.forward), "switch": list(b.switches), "echo": list(b.echo),
                    "intervals": gaps, "span": [span], "extra": [len(b.switches)]}
    finally:
        stop.set()
        for h in hog_procs:
            h.kill()
            h.wait()
        for p in (mux, echo):
            os.killpg(p.pid, signal.SIGINT)
        for p in (mux, echo):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        ex.shutdown(timeout_sec=2)
        node.destroy_node()


def core_cost_us(st, n: int = 20000) -> float:
    """CPU cost of the ROS-free arbitration per forwarded command (on_joint_state + on_command + tick), µs."""
    from recap_ros.control.mux import TeleopMux

    m = TeleopMux(st.mux, st.robot)
    m.on_joint_state(np.full(len(st.robot.joints), 0.1), 0.0)
    qs = [np.full(len(st.robot.joints), 0.1) + 1e-6 * (i % 100) for i in range(n)]
    t0 = time.perf_counter()
    for i, q in enumerate(qs):
        now = i * st.robot.period_s
        m.on_joint_state(q, now)
        m.on_command("policy", q, now)
        m.tick(now)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--station", default="sim")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per output mode")
    ap.add_argument("--quick", action="store_true", help="3 s per mode")
    ap.add_argument("--rounds", type=int, default=3, help="alternating idle / loaded rounds")
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes in the loaded runs")
    ap.add_argument("--switch-every", type=float, default=0.2, help="seconds between mode switches")
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.echo:
        echo_main()
        return 0
    import rclpy

    from recap_ros.station import load_station

    st = load_station(args.station)
    if st.robot.command_type != "joint_state":
        raise SystemExit(f"{st.file}: the bench decodes JointState commands (command_type joint_state)")
    duration = 3.0 if args.quick else args.duration
    rounds = 1 if args.quick else args.rounds
    keys = ("forward", "switch", "echo", "intervals", "span", "extra")
    loads = (0, args.hogs)
    res = {h: {k: [] for k in keys} for h in loads}
    rclpy.init()
    try:  # idle and loaded alternate, so a machine whose load changes during the run affects both alike
        for _ in range(rounds):
            for hogs in loads:
                for k, v in run_mode(st, hogs, duration / rounds, args.switch_every).items():
                    res[hogs][k] += v
    finally:
        rclpy.try_shutdown()
    tick_ms = st.robot.period_s * 1e3
    print(f"teleop_mux latency, station '{st.name}', control tick {tick_ms:.0f} ms, {duration:.0f} s per load "
          f"in {rounds} alternating rounds")
    print(f"  arbitration core, command + tick (no ROS)  {core_cost_us(st):.1f} us")
    rates = {}
    for hogs in loads:
        r = res[hogs]
        name = f"{hogs} hogs"
        within = np.mean(np.asarray(r["switch"]) <= st.robot.period_s) * 100 if r["switch"] else float("nan")
        # grid rate: received commands minus the extra switch ticks, over the stamp span
        rates[hogs] = (len(r["intervals"]) - sum(r["extra"])) / max(sum(r["span"]), 1e-9)
        print(f"  {name} baseline 2 DDS hops (echo)  {pct(r['echo'])}")
        print(f"  {name} switch                      {pct(r['switch'])}  <= 1 tick: {within:.0f} %")
        print(f"  {name} forwarding                  {pct(r['forward'])}")
        print(f"  {name} output interval (stamps)    {pct(r['intervals'])}")
        print(f"  {name} output rate {rates[hogs]:.2f} Hz = {rates[hogs] / st.robot.control_rate_hz:.3f} x the "
              f"control rate")
    for key in ("switch", "forward"):
        a, t = res[args.hogs][key], res[0][key]
        if a and t:
            print(f"  ratio loaded / idle, {key:8s} p50 {np.median(a) / np.median(t):.2f}  "
                  f"p99 {np.percentile(a, 99) / np.percentile(t, 99):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
