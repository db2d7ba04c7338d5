"""teleop_mux latency, measured through real middleware with the mux in its own processes.

- forwarding latency: an input command of the active source is published -> the output carrying it (the mux
  forwards on arrival; the command a switch outputs counts as a switch sample);
- baseline: the same two DDS hops through a plain relay process (no mux logic); the mux's added latency is
  forwarding minus relay (p50 and p99 differences and ratios, measured in the same run);
- switch latency: a mode message (policy <-> teleop, both inputs publishing at 50 Hz) is published -> the
  first command on robot.command_topic that comes from the new source (goal: <= one 20 ms control tick);
- ``--minutes M``: an endurance run: the policy input drives at 50 Hz for M minutes, and every input command
  must reach the robot exactly once (duplicated and skipped commands are counted, for the relay as well),
  then the hold stream's rate over 5 s (goal: the control rate).

The bench plays an ideal robot: every command it receives is published back as the joint state. Each latency
figure is measured idle and with ``--hogs`` busy-loop processes competing for the cores, alternating (the
machine's own load changes affect both alike); the loaded / idle ratios are printed.

The two sources differ by 1e-4 rad on joint 1 (which tells them apart); joint 0 (1e-6 rad steps, wrapping every
1000) and joint 2 (1e-6 rad per wrap) carry a sequence number, so every command is within the velocity and
acceleration limits and is forwarded bit for bit.

    ROS_DOMAIN_ID=.. ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST .venv/bin/python bench/mux_latency.py [--quick]
        [--minutes 10]
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
SEQ_STEP = 1e-6
SEQ_WRAP = 1000
SEQ_BASE = 0.1  # joint 2: SEQ_BASE + (seq // SEQ_WRAP) * SEQ_STEP
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


def encode(source: str, seq: int, n: int) -> np.ndarray:
    q = np.full(n, 0.1)
    q[0] = (seq % SEQ_WRAP) * SEQ_STEP
    q[1] = SOURCE_MARK[source]
    q[2] = SEQ_BASE + (seq // SEQ_WRAP) * SEQ_STEP
    return q


def decode(q) -> tuple[str, int] | None:
    """(source, seq) of a forwarded command; None for anything else (a limited step, the start position)."""
    source = min(SOURCE_MARK, key=lambda s: abs(SOURCE_MARK[s] - q[1]))
    if abs(SOURCE_MARK[source] - q[1]) > 1e-9:
        return None
    return source, int(round(q[0] / SEQ_STEP)) + SEQ_WRAP * int(round((q[2] - SEQ_BASE) / SEQ_STEP))


class Bench:
    def __init__(self, node, st):
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String

        from recap_ros.rosmsg import COMMAND_QOS, joint_state_msg, positions_from_joint_state

        self.st, self.names, self.String = st, st.robot.joint_names, String
        self.joint_state_msg, self.positions = joint_state_msg, positions_from_joint_state
        self.lock = threading.Lock()
        self.sent: dict[tuple[str, int], float] = {}
        self.seq = 0
        self.forward: list[float] = []
        self.out_count: dict[tuple[str, int], int] = {}
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
        self.echo_count: dict[int, int] = {}
        self.echo: list[float] = []

    def publish_inputs(self, sources=tuple(SOURCE_MARK)) -> None:
        n = len(self.names)
        with self.lock:
            self.seq += 1
            seq = self.seq
            for name in sources:
                self.sent[(name, seq)] = time.monotonic()
        for name in sources:
            self.pub[name].publish(self.joint_state_msg(self.names, encode(name, seq, n), 0))
        with self.lock:
            self.echo_sent[seq] = time.monotonic()
        self.echo_pub.publish(self.joint_state_msg(self.names, encode("policy", seq, n), 0))

    def mode(self, source: str) -> None:
        with self.lock:
            self.switch_t = (source, time.monotonic())
        self.mode_pub.publish(self.String(data=source))

    def on_output(self, msg) -> None:
        t = time.monotonic()
        self.js.publish(msg)  # the ideal robot: it is where it was told to be
        q = self.positions(msg, self.names)
        key = decode(q)
        with self.lock:
            self.outputs += 1
            self.stamps.append(msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)
            if key is None or msg.header.frame_id == "hold":
                return
            self.out_count[key] = self.out_count.get(key, 0) + 1
            if self.switch_t and self.switch_t[0] == key[0]:
                # the switch outputs the new source's newest command, published while it was not active: a
                # switch sample, not a forwarding one
                self.switches.append(t - self.switch_t[1])
                self.switch_t = None
            elif self.out_count[key] == 1 and key in self.sent:
                self.forward.append(t - self.sent[key])

    def on_echo(self, msg) -> None:
        t = time.monotonic()
        key = decode(np.asarray(msg.position))
        if key is None:
            return
        with self.lock:
            self.echo_count[key[1]] = self.echo_count.get(key[1], 0) + 1
            if self.echo_count[key[1]] == 1 and key[1] in self.echo_sent:
                self.echo.append(t - self.echo_sent[key[1]])

    def reset_stats(self) -> None:
        with self.lock:
            self.forward.clear()
            self.switches.clear()
            self.echo.clear()
            self.stamps.clear()


class Station:
    """The mux and the relay as processes, a bench node spinning in a thread."""

    def __init__(self, st, name: str):
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        env = dict(os.environ)
        self.procs = [subprocess.Popen([sys.executable, "-m", "recap_ros.nodes.teleop_mux", "--ros-args", "-p",
                                        f"station:={st.file}", "--log-level", "warn"], env=env,
                                       start_new_session=True),
                      subprocess.Popen([sys.executable, os.path.abspath(__file__), "--echo"], env=env,
                                       start_new_session=True)]
        self.node = Node(name)
        self.b = Bench(self.node, st)
        self.ex = SingleThreadedExecutor()
        self.ex.add_node(self.node)
        threading.Thread(target=self.ex.spin, daemon=True).start()
        self.stop = threading.Event()
        b, deadline = self.b, time.monotonic() + 60
        b.mode("hold")  # inputs start publishing under an explicit hold (no preemption)
        while b.outputs == 0 or b.echo_pub.get_subscription_count() == 0:
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.close()
                raise SystemExit("teleop_mux did not start publishing")
            b.js.publish(b.joint_state_msg(b.names, encode("policy", 0, len(b.names)), 0))
            b.mode("hold")
            time.sleep(0.1)

    def feed(self, period_s: float, sources=tuple(SOURCE_MARK)) -> None:
        def run():
            next_t = time.monotonic()
            while not self.stop.is_set():
                self.b.publish_inputs(sources)
                next_t += period_s
                time.sleep(max(0.0, next_t - time.monotonic()))
        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            os.killpg(p.pid, signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.ex.shutdown(timeout_sec=2)
        self.node.destroy_node()


def run_mode(st, hogs: int, duration: float, switch_every: float) -> dict:
    s = Station(st, f"mux_bench_{hogs}_hogs")
    b = s.b
    hog_procs: list[subprocess.Popen] = []
    try:
        # 1 % slower than the control rate: the phase to the mux's hold grid sweeps every 2 s
        s.feed(st.robot.period_s * 1.01)
        b.mode("policy")
        hog_procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
        time.sleep(1.0)
        b.reset_stats()
        t_end, source = time.monotonic() + duration, "policy"
        while time.monotonic() < t_end:
            # switch at a random phase relative to the inputs
            time.sleep(switch_every + np.random.uniform(0, st.robot.period_s))
            source = "teleop" if source == "policy" else "policy"
            b.mode(source)
        time.sleep(0.2)
        with b.lock:
            return {"forward": list(b.forward), "switch": list(b.switches), "echo": list(b.echo)}
    finally:
        for h in hog_procs:
            h.kill()
            h.wait()
        s.close()


def endurance(st, minutes: float) -> dict:
    """The policy drives at the control rate for ``minutes``: every command exactly once? Then 5 s of hold."""
    s = Station(st, "mux_bench_endurance")
    b = s.b
    try:
        b.mode("policy")
        time.sleep(0.5)
        with b.lock:
            b.sent.clear()
            b.echo_sent.clear()
            b.out_count.clear()
            b.echo_count.clear()
            first = b.seq + 1
        s.feed(st.robot.period_s, sources=("policy",))
        time.sleep(minutes * 60)
        s.stop.set()
        time.sleep(1.0)  # the last commands arrive
        with b.lock:
            seqs = [seq for (name, seq) in b.sent if name == "policy" and seq >= first]
            out = {seq: n for (name, seq), n in b.out_count.items() if name == "policy" and seq >= first}
            echo = {seq: n for seq, n in b.echo_count.items() if seq >= first}
            res = {"sent": len(seqs),
                   "mux_dup": sum(n - 1 for n in out.values()), "mux_skip": sum(seq not in out for seq in seqs),
                   "echo_dup": sum(n - 1 for n in echo.values()), "echo_skip": sum(seq not in echo for seq in seqs),
                   "forward": list(b.forward), "echo": list(b.echo)}
        b.mode("hold")
        time.sleep(1.0)
        with b.lock:
            b.stamps.clear()
        time.sleep(5.0)
        with b.lock:
            stamps = np.sort(np.asarray(b.stamps, dtype=np.int64))
        res["hold_hz"] = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) * 1e-9) if len(stamps) > 1 else 0.0
        res["hold_gaps"] = list(np.diff(stamps) * 1e-9)
        return res
    finally:
        s.close()


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


def added(fwd, echo, q: float) -> str:
    a, e = np.percentile(np.asarray(fwd) * 1e3, q), np.percentile(np.asarray(echo) * 1e3, q)
    return f"p{q:g} {a - e:+6.2f} ms (mux {a:.2f} / relay {e:.2f} = x{a / e:.2f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--station", default="sim")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per load")
    ap.add_argument("--quick", action="store_true", help="3 s per load, 1 round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating idle / loaded rounds")
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes in the loaded runs")
    ap.add_argument("--switch-every", type=float, default=0.2, help="seconds between mode switches")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="then an endurance run: the policy drives at 50 Hz for this long (duplicates, skips)")
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
    keys = ("forward", "switch", "echo")
    loads = (0, args.hogs)
    res = {h: {k: [] for k in keys} for h in loads}
    rclpy.init()
    try:  # idle and loaded alternate, so a machine whose load changes during the run affects both alike
        for _ in range(rounds):
            for hogs in loads:
                for k, v in run_mode(st, hogs, duration / rounds, args.switch_every).items():
                    res[hogs][k] += v
        long = endurance(st, args.minutes) if args.minutes > 0 else None
    finally:
        rclpy.try_shutdown()
    tick_ms = st.robot.period_s * 1e3
    print(f"teleop_mux latency, station '{st.name}', control tick {tick_ms:.0f} ms, {duration:.0f} s per load "
          f"in {rounds} alternating rounds")
    print(f"  arbitration core, joint state + command + tick (no ROS)  {core_cost_us(st):.1f} us")
    for hogs in loads:
        r = res[hogs]
        name = f"{hogs} hogs"
        within = np.mean(np.asarray(r["switch"]) <= st.robot.period_s) * 100 if r["switch"] else float("nan")
        print(f"  {name} plain relay (2 DDS hops)   {pct(r['echo'])}")
        print(f"  {name} mux forwarding            {pct(r['forward'])}")
        if r["forward"] and r["echo"]:
            print(f"  {name} added by the mux          {added(r['forward'], r['echo'], 50)}, "
                  f"{added(r['forward'], r['echo'], 99)}")
        print(f"  {name} switch                    {pct(r['switch'])}  <= 1 tick: {within:.0f} %")
    for key in ("switch", "forward"):
        a, t = res[args.hogs][key], res[0][key]
        if a and t:
            print(f"  ratio loaded / idle, {key:8s} p50 {np.median(a) / np.median(t):.2f}  "
                  f"p99 {np.percentile(a, 99) / np.percentile(t, 99):.2f}")
    if long is not None:
        print(f"  endurance {args.minutes:g} min at {st.robot.control_rate_hz:g} Hz, policy driving, "
              f"{long['sent']} commands sent:")
        print(f"    mux:   {long['mux_dup']} duplicated, {long['mux_skip']} skipped; forwarding {pct(long['forward'])}")
        print(f"    relay: {long['echo_dup']} duplicated, {long['echo_skip']} skipped; {pct(long['echo'])}")
        if long["forward"] and long["echo"]:
            print(f"    added by the mux {added(long['forward'], long['echo'], 50)}, "
                  f"{added(long['forward'], long['echo'], 99)}")
        print(f"    then holding: {long['hold_hz']:.2f} Hz = {long['hold_hz'] / st.robot.control_rate_hz:.3f} x the "
              f"control rate, interval {pct(long['hold_gaps'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
