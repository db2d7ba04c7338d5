"""Fault injection on the live sim station: what reaches the robot when a node dies, stalls or sends garbage.

    ./dev run python bench/faults.py [--out DIR] [--window 2.0]

Starts the sim station with the runner's node set (``recap_ros.runner.Station``: one process per node, the
station's Fast DDS profile, the corrector on) and plays a supervisor that respawns a killed node at once (as
``ros2 launch`` with ``respawn=True`` would; the runner itself stops the whole station when a node dies). A
probe node in this process records every robot command (its source from ``header.frame_id``), the joint
states and the episode events, and injects, one row at a time, each in a fresh episode (sim_robot's
``~/reset``) once the policy drives:

- SIGKILL of each node in turn: policy_server, its tick process, sim_robot (the sim's robot and cameras:
  camera_ingest is not part of a sim station), episode_recorder, scripted_corrector, cfg_guidance; the node
  is respawned at once (the tick process: its policy_server is restarted once the row is measured);
- SIGSTOP of policy_server for 1 s (its tick process keeps running);
- bad inputs published on each mux input (policy, teleop, corrector): NaN, wrong length, wrong joint names,
  an out-of-limit value, a 1 rad step from the measured position (a human input that preempts with it is
  handed back to the policy 0.3 s later);
- a joint jump of the measured state while the robot is held: mode hold, then an episode reset moves the sim
  robot to the next episode's start pose, then mode policy.

Columns: **max step** = the largest per-joint change of the robot's setpoint over the row, as a fraction of
the velocity limit x one control period (<= 1 required): each command is compared with where the robot may be
when it arrives, the previous setpoint or a joint state within 60 ms of it (a hold at the measured position is
no step; with none that close, the next one within 2 s: this process and the mux discover a respawned
sim_robot at different times), and the smaller counts; after a sim_robot respawn, commands until the first
one near the new robot's pose after its first episode start do not count (it ignores commands stamped before
that start, and until DDS discovery has matched it with the mux it receives none: its joint states show it
still at its start pose meanwhile);
the previous setpoint does not count when the robot was moved away from it (a joint state farther than the
tracking tolerance that arrived at least one control period before the command), so commanding a moved robot
back would show; **hold** =
seconds from the fault to the first hold command ("-": no hold); **recover** = seconds from the fault to the
first command from an input after that hold; **missed** = robot command slots (control periods) without any
command during the row (while an input is silent but not yet timed out, 0.2 s, the mux sends nothing new);
**bag** = how many bags of the row's episodes read: rosbags reads every message without repair / the export's
reader accepts them, checked after the station has stopped.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import private_domain  # noqa: E402

from recap_ros import launch_graph  # noqa: E402
from recap_ros.runner import Station as Runner  # noqa: E402
from recap_ros.station import load_station  # noqa: E402

BAD_KINDS = ("NaN", "wrong length", "wrong joint names", "out of limits", "1 rad step")
JS_WINDOW_S = 0.06  # joint states this close to a command count as where the robot may be when it arrives
LATE_JS_S = 2.0  # with no joint state that close, the next one within this long
ORDER_S = 0.02  # a joint state that reached this process a control period before a command had reached the mux
#                before it computed that command (delivery to two subscribers differs by ms on a loaded machine)


@dataclass
class Row:
    fault: str
    t0: float = 0.0
    t1: float = 0.0
    start_wall: float = 0.0
    bags: list[Path] = field(default_factory=list)
    note: str = ""
    robot_respawned: float = 0.0  # when sim_robot was started again (0: not in this row)


class Probe:
    def __init__(self, st):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        from recap_ros import rosmsg

        rclpy.init()
        self.rclpy, self.st, self.rosmsg, self.String, self.Trigger = rclpy, st, rosmsg, String, Trigger
        self.JointState = JointState
        self.names = st.robot.joint_names
        self.node = n = Node("faults_probe")
        self.lock = threading.Lock()
        self.cmds: list[tuple[float, np.ndarray, str]] = []
        self.js: list[tuple[float, np.ndarray]] = []
        self.starts: list[float] = []
        n.create_subscription(JointState, st.robot.command_topic, self._on_cmd, rosmsg.COMMAND_QOS)
        n.create_subscription(JointState, st.robot.joint_states_topic, self._on_js, rosmsg.COMMAND_QOS)
        n.create_subscription(String, st.episode_topic, self._on_event, rosmsg.EVENT_HISTORY_QOS)
        self.inputs = {i.name: n.create_publisher(JointState, i.topic, rosmsg.COMMAND_QOS) for i in st.mux.inputs}
        self.mode_pub = n.create_publisher(String, st.mux.mode_topic, rosmsg.COMMAND_QOS)
        ns = ("/" + st.namespace.strip("/")) if st.namespace else ""
        self.reset_client = n.create_client(Trigger, f"{ns}/sim_robot/reset")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(n)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _on_cmd(self, msg) -> None:
        q = np.asarray(msg.position, dtype=np.float64)
        with self.lock:
            self.cmds.append((time.monotonic(), q, msg.header.frame_id))

    def _on_js(self, msg) -> None:
        q = self.rosmsg.positions_from_joint_state(msg, self.names)
        with self.lock:
            self.js.append((time.monotonic(), q))

    def _on_event(self, msg) -> None:
        if json.loads(msg.data)["event"] == "start":
            with self.lock:
                self.starts.append(time.monotonic())

    def measured(self) -> np.ndarray:
        with self.lock:
            return self.js[-1][1].copy()

    def mode(self, m: str) -> None:
        self.mode_pub.publish(self.String(data=m))

    def publish(self, inp: str, names, positions) -> None:
        msg = self.JointState()
        msg.header.stamp = self.rosmsg.ns_to_stamp(self.rosmsg.now_ns(self.node))
        msg.name, msg.position = list(names), [float(x) for x in positions]
        self.inputs[inp].publish(msg)

    def reset_episode(self, timeout: float = 30.0) -> float:
        """End the running episode and wait for the next start; returns its time."""
        with self.lock:
            n0 = len(self.starts)
        if self.reset_client.wait_for_service(timeout_sec=timeout):
            self.reset_client.call_async(self.Trigger.Request())
        wait(lambda: len(self.starts) > n0, timeout, "the next episode start")
        return self.starts[-1]

    def policy_driving(self, since: float, timeout: float = 30.0) -> None:
        def ok():
            with self.lock:
                return any(t >= since and src == "policy" for t, _, src in self.cmds[-5:])
        wait(ok, timeout, "the policy driving")

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2)
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


class Bench:
    def __init__(self, st, workdir: Path):
        self.st, self.workdir = st, workdir
        self.specs = {s.name: s for s in launch_graph.node_specs(st)}
        self.runner = Runner(list(self.specs.values()), workdir)
        self.runner.start()
        self.probe = Probe(st)

    def pid(self, name: str) -> int:
        return self.runner.procs[name].pid

    def respawn(self, name: str) -> None:
        old = self.runner.procs[name]
        old.wait(timeout=10)
        one = Runner([self.specs[name]], self.workdir)
        one.start()
        self.runner.procs[name] = one.procs[name]

    def tick_pid(self) -> int:
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(self.pid("policy_server"))],
                             capture_output=True, text=True).stdout
        pids = [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]
        if not pids:
            raise RuntimeError("policy_server's tick process not found")
        return pids[0]

    def restart(self, name: str) -> None:
        """Stop a node cleanly (SIGINT to its group) and start it again."""
        os.killpg(self.pid(name), signal.SIGINT)
        self.respawn(name)

    def stop(self) -> None:
        self.probe.close()
        self.runner.stop()


def bad_message(kind: str, names: list[str], q: np.ndarray, st) -> tuple[list[str], np.ndarray]:
    q = q.copy()
    if kind == "NaN":
        q[0] = np.nan
    elif kind == "wrong length":
        q = q[:-1]
    elif kind == "wrong joint names":
        names = ["left_wiast"] + names[1:]
    elif kind == "out of limits":
        q[6] = st.robot.upper[6] + 0.5
    elif kind == "1 rad step":
        up = q[1] + 1.0 <= st.robot.upper[1]
        q[1] += 1.0 if up else -1.0
    return names, q


def analyse(row: Row, probe: Probe, st) -> dict:
    if not row.t0:  # the fault was never injected
        return {"max_step": 0.0, "hold": "n/a", "recover": "n/a", "missed": 0}
    limit = np.asarray(st.robot.max_velocity) * st.robot.period_s
    tol = np.asarray(st.robot.max_velocity) * st.mux.tracking_tolerance_s
    with probe.lock:
        cmds = [c for c in probe.cmds if row.t0 - 1.0 <= c[0] <= row.t1]
        ignored = (row.robot_respawned, row.robot_respawned)  # commands the robot does not act on
        if row.robot_respawned:
            # until the mux has matched the respawned sim_robot (DDS discovery) the robot receives none of its
            # commands, and it acts on none stamped before its first episode start: from the respawn to the
            # first command near one of the new robot's joint states, after that start
            first = min((t for t in probe.starts if t > row.robot_respawned), default=row.t1)
            new_js = [(tj, q) for tj, q in probe.js if tj >= first]  # surely the new robot's
            tol = np.asarray(st.robot.max_velocity) * st.mux.tracking_tolerance_s
            matched = next((t for t, q, _ in cmds if t >= first and q.shape == tol.shape and any(
                abs(tj - t) <= JS_WINDOW_S and np.all(np.abs(q - j) <= tol) for tj, j in new_js)), row.t1)
            ignored = (row.robot_respawned, matched)
        js = [j for j in probe.js if row.t0 - 1.5 <= j[0] <= row.t1 + LATE_JS_S]
    js_t = np.asarray([t for t, _ in js])
    worst, prev, prev_t = 0.0, None, -np.inf
    for t, q, _ in cmds:
        if ignored[0] <= t < ignored[1]:
            continue
        if prev is not None and t >= row.t0:
            # where the robot may be: the previous setpoint, or a joint state around this command (the mux may
            # have seen it a little before or after this process did); the previous setpoint does not count
            # when the robot was moved away from it (a joint state farther than the tracking tolerance)
            near = [js[i][1] for i in np.flatnonzero((js_t >= t - JS_WINDOW_S) & (js_t <= t + JS_WINDOW_S))]
            if not near:  # this process discovers a respawned robot's publisher later than the mux: its first
                later = np.flatnonzero((js_t > t) & (js_t <= t + LATE_JS_S))  # joint state, until the robot moves
                near = [js[later[0]][1]] if later.size else []
            around = [js[i][1] for i in np.flatnonzero((js_t >= prev_t - JS_WINDOW_S) & (js_t <= t - ORDER_S))]
            moved = any(np.any(np.abs(j - prev) > tol) for j in around)
            refs = near + ([] if moved else [prev])
            if refs:
                worst = max(worst, min(float(np.max(np.abs(q - r) / limit)) for r in refs))
        prev, prev_t = q, t
    after = [(t, src) for t, _, src in cmds if t >= row.t0]
    hold = next((t for t, src in after if src == "hold"), None)
    recover = None
    if hold is not None:
        recover = next((t for t, src in after if t > hold and src != "hold"), None)
    times = np.asarray([t for t, _ in after])
    missed = 0
    if times.size > 1:
        gaps = np.diff(times) / st.robot.period_s
        missed = int(np.sum(np.maximum(np.round(gaps) - 1, 0)))
    return {"max_step": worst, "hold": "-" if hold is None else f"{hold - row.t0:.3f}",
            "recover": "-" if recover is None else f"{recover - row.t0:.3f}", "missed": missed}


def bag_readable(paths: list[Path], st) -> str:
    """How many of the bags open and read to the end without repair (rosbags), and how many the export reads."""
    from rosbags.rosbag2 import Reader

    from recap_ros.export.bagread import ExportError, read_episode_bag

    opened = exported = 0
    for p in paths:
        try:
            with Reader(p) as r:
                for _ in r.messages():
                    pass
            opened += 1
        except Exception:  # noqa: BLE001 - any failure means "not readable"
            continue
        try:
            read_episode_bag(p, st)
            exported += 1
        except ExportError:
            pass
    return f"{opened}/{len(paths)}, export {exported}"


def created(bag: Path) -> float:
    """A bag's creation time (wall clock, 1 s resolution) from its directory name."""
    from recap_ros.recording.bag import parse_episode_dir

    parsed = parse_episode_dir(bag.name)
    return time.mktime(time.strptime(parsed[1], "%Y%m%d-%H%M%S")) if parsed else 0.0


def run_row(b: Bench, row: Row, inject, window: float, settle=None) -> None:
    """In a fresh episode, once the policy drives: inject, observe ``window`` s (then ``settle``). A row that
    times out waiting for the station is kept with a note (its figures cover what was observed)."""
    p = b.probe
    try:
        start = p.reset_episode()
        row.start_wall = time.time() - (time.monotonic() - start)
        p.mode("policy")  # hand back, if the corrector or a test input still holds the mode
        p.policy_driving(start)
        time.sleep(0.5)
        row.t0 = time.monotonic()
        inject()
        time.sleep(window)
        if settle is not None:
            settle()
    except TimeoutError as e:
        row.note = str(e)
    row.t1 = time.monotonic()
    row.bags = [path for path in Path(b.st.recorder.output_dir).iterdir()
                if path.is_dir() and created(path) >= row.start_wall - 1.5]
    print(f"[faults] {row.fault}: done{' (' + row.note + ')' if row.note else ''}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--station", default="sim")
    ap.add_argument("--out", default=None, help="bags and logs (default: a temp dir)")
    ap.add_argument("--window", type=float, default=2.0, help="seconds observed after a fault")
    a = ap.parse_args(argv)
    print(f"[bench] ROS_DOMAIN_ID={private_domain()}", flush=True)
    out = Path(a.out or tempfile.mkdtemp(prefix="faults-"))
    out.mkdir(parents=True, exist_ok=True)
    data = copy.deepcopy(load_station(a.station).raw)
    data["recorder"]["output_dir"] = str(out / "bags")
    data["sim"]["corrector"] = True
    data["sim"]["episode_timeout_s"] = 30.0  # a row's episode does not end on its own
    yml = out / "station.yaml"
    yml.write_text(yaml.safe_dump(data, sort_keys=False))
    st = load_station(str(yml))
    work = out / "params"
    work.mkdir(exist_ok=True)
    print(f"[faults] station {st.name}, output {out}", flush=True)
    b = Bench(st, work)
    rows: list[Row] = []
    try:
        wait(lambda: b.probe.cmds and b.probe.js, 120, "the station up")
        b.probe.policy_driving(0.0, timeout=120)

        def kill(name: str, row: Row):
            def inject():
                os.kill(b.pid(name), signal.SIGKILL)
                b.respawn(name)
                if name == "sim_robot":
                    row.robot_respawned = time.monotonic()
            return inject

        def until_recovered(timeout: float):
            def settle():
                t0 = time.monotonic()
                with b.probe.lock:
                    n = len(b.probe.cmds)
                while time.monotonic() - t0 < timeout:
                    with b.probe.lock:
                        tail = b.probe.cmds[n:]
                    if any(src == "policy" for _, _, src in tail[-3:]):
                        return
                    time.sleep(0.1)
            return settle

        for name in ("policy_server", "sim_robot", "episode_recorder", "scripted_corrector", "cfg_guidance"):
            row = Row(f"SIGKILL {name}" + (" (robot + sim cameras)" if name == "sim_robot" else ""))
            run_row(b, row, kill(name, row), a.window, until_recovered(90.0))
            rows.append(row)

        row = Row("SIGKILL policy_server tick process")
        run_row(b, row, lambda: os.kill(b.tick_pid(), signal.SIGKILL), a.window + 6.0)
        row.note = row.note or "nothing restarts the tick process (policy_server reports ERROR): restarted after"
        rows.append(row)
        b.restart("policy_server")
        b.probe.mode("policy")
        b.probe.policy_driving(time.monotonic(), timeout=120)

        def sigstop():
            pid = b.pid("policy_server")
            os.kill(pid, signal.SIGSTOP)
            time.sleep(1.0)
            os.kill(pid, signal.SIGCONT)
        row = Row("SIGSTOP policy_server 1 s")
        run_row(b, row, sigstop, a.window)
        rows.append(row)

        for inp in (i.name for i in st.mux.inputs):
            for kind in BAD_KINDS:
                def bad(inp=inp, kind=kind):
                    names, q = bad_message(kind, st.robot.joint_names, b.probe.measured(), st)
                    b.probe.publish(inp, names, q)
                    if inp != "policy":
                        time.sleep(0.3)
                        b.probe.mode("policy")  # hand back, if it preempted
                row = Row(f"{inp} input: {kind}")
                run_row(b, row, bad, a.window)
                rows.append(row)

        def jump():
            b.probe.mode("hold")
            time.sleep(0.5)
            b.probe.reset_episode()  # the sim robot moves to the next episode's start pose while held
            time.sleep(1.0)
            b.probe.mode("policy")
        row = Row("joint jump of the measured state while held")
        run_row(b, row, jump, a.window)
        rows.append(row)
        b.probe.reset_episode()  # the last row's episode ends: its bag is finalised
        time.sleep(1.0)
        results = [analyse(r, b.probe, st) for r in rows]
        with b.probe.lock:  # the raw record, for a closer look
            np.savez_compressed(out / "record.npz", cmd_t=[c[0] for c in b.probe.cmds],
                                cmd_q=np.stack([c[1] for c in b.probe.cmds if c[1].shape == (len(st.robot.joints),)]),
                                cmd_src=[c[2] for c in b.probe.cmds], js_t=[j[0] for j in b.probe.js],
                                js_q=np.stack([j[1] for j in b.probe.js]), starts=b.probe.starts,
                                respawned=[r.robot_respawned for r in rows], rows=[r.fault for r in rows],
                                t0=[r.t0 for r in rows], t1=[r.t1 for r in rows])
    finally:
        b.stop()
    print()
    print(f"faults on the live '{st.name}' station; max step = largest setpoint change (from the "
          f"previous setpoint or the measured position) / (max_velocity x {st.robot.period_s * 1e3:.0f} ms); times "
          f"from the fault (s); bag: readable / total, read by the export")
    head = f"| {'fault':48s} | max step | hold   | recover | missed | bag {'':12s} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r, res in zip(rows, results):
        print(f"| {r.fault:48s} | {res['max_step']:8.2f} | {res['hold']:6s} | {res['recover']:7s} | "
              f"{res['missed']:6d} | {bag_readable(r.bags, st):16s} |")
    for r in rows:
        if r.note:
            print(f"  {r.fault}: {r.note}")
    worst = max(res["max_step"] for res in results)
    print(f"largest robot step over all rows: {worst:.2f} x the velocity limit x dt "
          f"({'within' if worst <= 1.0 + 1e-9 else 'ABOVE'} the limit)")
    return 0 if worst <= 1.0 + 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
