"""teleop_mux: picks which joint command stream drives the robot (policy, teleoperator, hold).

Wiring only; the arbitration (modes, priorities, locks, timeouts, validation, the measured position, the
tracking tolerance, event-driven forwarding) lives in :mod:`recap_ros.control.mux`, whose docstring is the
behaviour contract, and every output passes :mod:`recap_ros.control.limits`. Everything comes from the
station's ``mux:`` and ``robot:`` sections.

Two processes (as policy_server's tick: the last hop to the robot shares nothing it could wait for):

* the **output process** (spawned, node ``<name>_output`` in the same namespace) holds the whole command
  path: it subscribes each ``mux.inputs[*].topic`` (JointState matched by joint name, or Float64MultiArray in
  station joint order), ``mux.mode_topic`` (String), ``mux.override_topic`` (Bool), each lock topic (Bool)
  and ``robot.joint_states_topic`` (the measured position, for as long as it runs); it publishes
  ``robot.command_topic`` (``robot.command_type``): an accepted command of the active input at once, from its
  subscription callback (event-driven, as twist_mux), and the hold position on every control tick while
  holding (a :class:`~recap_ros.control.ticker.DeadlineLoop` thread on absolute deadlines, SCHED_FIFO when
  permitted, which also enforces the timeouts); a JointState command names its source (the mux input, or
  "hold") in ``header.frame_id``; ``mux.active_topic`` (String) and ``mux.intervention_topic`` (Bool) latched,
  on every change (before the first command of the new source). Its only Python code is this path (one
  executor thread, the tick thread, a thread that hands reports to this node through a pipe without ever
  making the path wait);
* this node's process: parameters, the log (the output process reports its events, rejections and a status
  through the pipe) and ``/diagnostics`` once per ``diagnostics_period_s`` and at once on every change of the
  active source; level ERROR while a tracking error holds the robot (naming the joints and values) or when the
  output process died, WARN while holding for another reason than an explicit hold.

The output process exits when this process closes the pipe (or dies). A message's age counts from the older
of its stamp and its receive time (:mod:`recap_ros.control.freshness`).

Parameters: ``station`` (name or path), ``realtime_priority`` (default 60, above the policy server's
tick thread: the mux is the last hop to the robot; SCHED_FIFO for the output process's tick and executor
threads when permitted, e.g. root or an rtprio limit; 0: normal scheduling), ``diagnostics_period_s`` (1.0).
"""
from __future__ import annotations

import gc
import queue
import sys
import threading
import time
from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node

from recap_ros import rosmsg
from recap_ros.nodes import ignore_stop_signals, run_node, start_child
from recap_ros.station import load_station

START_TIMEOUT_S = 60.0  # the output process imports rclpy and numpy; a loaded machine takes seconds
STATUS_EVERY_S = 0.5
REPORT_QUEUE_MAX = 1000  # reports beyond this (the node's process stalled) are dropped, never waited for


@dataclass(frozen=True)
class _OutputSpec:
    """What the output process needs (picklable)."""
    station: str            # the station file
    node_name: str
    namespace: str
    topics: dict            # station topic -> the name resolved with this node's remappings
    priority: int


def _output_process(spec: _OutputSpec, inbox, outbox) -> None:
    """Entry of the output process: run the mux on the command path until the inbox closes."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Bool, String

    from recap_ros.control.freshness import taken_s
    from recap_ros.control.mux import HOLD, TeleopMux
    from recap_ros.control.ticker import DeadlineLoop, PeriodMonitor, try_realtime

    ignore_stop_signals()  # Ctrl-C, launch's SIGTERM or a hang-up reach the whole process group: the parent decides
    rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(spec.node_name, namespace=spec.namespace, start_parameter_services=False,
                             enable_rosout=False)  # it logs through the node's process
    station = load_station(spec.station)
    robot, mux = station.robot, station.mux
    names, ctype = robot.joint_names, robot.command_type
    topic = spec.topics.__getitem__
    core = TeleopMux(mux, robot)
    lock = threading.Lock()  # serialises the core and the publications (callbacks and ticks)
    reports: queue.SimpleQueue = queue.SimpleQueue()
    done = threading.Event()

    def report(*msg) -> None:  # never blocks the command path
        if reports.qsize() < REPORT_QUEUE_MAX:
            reports.put(msg)

    def send_reports() -> None:
        while not done.is_set():
            try:
                msg = reports.get(timeout=0.1)
                outbox.send(msg)
            except queue.Empty:
                continue
            except OSError:  # the node's process is gone
                done.set()

    pub_cmd = node.create_publisher(rosmsg.command_msg_class(ctype), topic(robot.command_topic),
                                    rosmsg.COMMAND_QOS)
    pub_active = node.create_publisher(String, topic(mux.active_topic), rosmsg.LATCHED_QOS)
    pub_intervention = node.create_publisher(Bool, topic(mux.intervention_topic), rosmsg.LATCHED_QOS)
    pub_active.publish(String(data=HOLD))
    pub_intervention.publish(Bool(data=False))
    monitor = PeriodMonitor(robot.period_s)

    def status(now: float) -> dict:
        return {**core.status(now), "status_stamp_ns": str(rosmsg.now_ns(node)),
                **{k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in monitor.summary().items()}}

    def tick(now: float, grid: bool) -> None:
        """Under the lock: publish what the core says now (an event's command, a hold)."""
        t = core.tick(now, grid)
        if t.positions is not None:
            if t.source_changed:  # the state first: a command never precedes the source it came from
                pub_active.publish(String(data=t.source))
                pub_intervention.publish(Bool(data=t.intervention))
            pub_cmd.publish(rosmsg.command_msg(ctype, names, t.positions, rosmsg.now_ns(node), t.source))
        for line in core.drain_events():
            report("log", line)
        if t.source_changed:
            report("status", status(now), True)

    def taken(msg, now: float) -> float:
        header = getattr(msg, "header", None)
        if header is None:  # Float64MultiArray: its receive time
            return now
        return taken_s(rosmsg.stamp_to_ns(header.stamp), rosmsg.now_ns(node), now)

    def on_input(inp, msg) -> None:
        try:
            q, why = rosmsg.positions_from_command(msg, inp.type, names), None
        except rosmsg.MessageError as e:
            q, why = None, str(e)
        with lock:
            now = time.monotonic()
            err = core.reject(inp.name, why) if why else core.on_command(inp.name, q, now, taken(msg, now))
            tick(now, grid=False)
            dropped = core.inputs[inp.name].dropped
        if err:
            report("warn", f"{err} (from {inp.topic}; {dropped} dropped)")

    def on_joint_state(msg) -> None:
        try:
            q = rosmsg.positions_from_joint_state(msg, names)
        except rosmsg.MessageError as e:
            report("warn", f"joint state not usable as a measured position: {e}")
            return
        with lock:
            now = time.monotonic()
            err = core.on_joint_state(q, taken(msg, now))
            tick(now, grid=False)
        if err:
            report("warn", err)

    def on_mode(msg) -> None:
        with lock:
            err = core.on_mode(msg.data)
            tick(time.monotonic(), grid=False)
        if err:
            report("warn", f"{err} (from {mux.mode_topic})")

    def on_override(msg) -> None:
        with lock:
            core.on_override(msg.data)
            tick(time.monotonic(), grid=False)

    def on_lock(name: str, msg) -> None:
        with lock:
            now = time.monotonic()
            core.on_lock(name, msg.data, now)
            tick(now, grid=False)

    for inp in mux.inputs:
        node.create_subscription(rosmsg.command_msg_class(inp.type), topic(inp.topic),
                                 lambda msg, i=inp: on_input(i, msg), rosmsg.COMMAND_QOS)
    for lk in mux.locks:
        node.create_subscription(Bool, topic(lk.topic), lambda msg, n=lk.name: on_lock(n, msg), rosmsg.COMMAND_QOS)
    node.create_subscription(String, topic(mux.mode_topic), on_mode, rosmsg.COMMAND_QOS)
    node.create_subscription(Bool, topic(mux.override_topic), on_override, rosmsg.COMMAND_QOS)
    node.create_subscription(JointState, topic(robot.joint_states_topic), on_joint_state, rosmsg.COMMAND_QOS)
    status_every = max(1, int(round(STATUS_EVERY_S / robot.period_s)))

    def on_tick(periods: int, mono_ns: int) -> None:
        try:
            while inbox.poll():
                if inbox.recv() == ("close",):
                    done.set()
        except (EOFError, OSError):  # the node's process closed the pipe or died
            done.set()
        if done.is_set():
            return
        with lock:
            tick(mono_ns * 1e-9, grid=True)
            if monitor.ticks % status_every == 0:
                report("status", status(mono_ns * 1e-9), False)

    loop = DeadlineLoop(robot.period_s, on_tick, monitor,
                        lambda e: report("error", f"tick failed: {type(e).__name__}: {e}"),
                        spec.priority, name="teleop_mux ticks")
    threading.Thread(target=send_reports, name="teleop_mux reports", daemon=True).start()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    gc.collect()
    gc.freeze()  # nothing allocated so far is garbage; a full collection over it would stall the path
    callbacks = try_realtime(spec.priority)
    loop.start()
    while not loop.scheduling:  # set by the tick thread as it starts
        time.sleep(0.001)
    report("ready", loop.scheduling, callbacks)
    try:
        while not done.is_set():
            executor.spin_once(timeout_sec=0.1)
    finally:
        loop.stop()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()


class TeleopMuxNode(Node):
    def __init__(self):
        super().__init__("teleop_mux")
        self.station = load_station(self.declare_parameter("station", "sim").value)
        priority = int(self.declare_parameter("realtime_priority", 60).value)
        diag_period = float(self.declare_parameter("diagnostics_period_s", 1.0).value)
        robot, mux = self.station.robot, self.station.mux
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._status: dict[str, str] = {}
        self._exit_code: int | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        station_topics = [robot.command_topic, robot.joint_states_topic, mux.mode_topic, mux.override_topic,
                          mux.active_topic, mux.intervention_topic, *(i.topic for i in mux.inputs),
                          *(lk.topic for lk in mux.locks)]
        spec = _OutputSpec(str(self.station.file), f"{self.get_name()}_output", self.get_namespace(),
                           {t: self.resolve_topic_name(t) for t in station_topics}, priority)
        scheduling = self._start_output_process(spec)
        self.create_timer(0.05, self._drain)
        self.create_timer(diag_period, self._publish_diagnostics)
        self.get_logger().info(
            f"station '{self.station.name}': inputs {[(i.name, i.topic, i.priority) for i in mux.inputs]}, "
            f"locks {[(lk.name, lk.topic, lk.priority) for lk in mux.locks]}, mode '{mux.default_input}', "
            f"output {robot.command_topic} ({robot.command_type}): commands forwarded on arrival, holds at "
            f"{robot.control_rate_hz} Hz, in process {self._proc.pid} (ticks: {scheduling[0]}; callbacks: "
            f"{scheduling[1]}); waiting for {robot.joint_states_topic}")

    # ------------------------------------------------------------------------------------ output process
    def _start_output_process(self, spec: _OutputSpec) -> tuple[str, str]:
        self._proc, self._to_child, self._from_child, (_ready, *scheduling) = start_child(
            _output_process, spec, spec.node_name, START_TIMEOUT_S)
        threading.Thread(target=self._read_child, name="teleop_mux reports", daemon=True).start()
        return tuple(scheduling)

    def _read_child(self) -> None:
        while True:
            try:
                self._inbox.put(self._from_child.recv())
            except (EOFError, OSError):
                break
        if not self._closing.is_set():
            self._proc.join(1.0)
            self._inbox.put(("exit", self._proc.exitcode))

    def _drain(self) -> None:
        log = self.get_logger()
        while True:
            try:
                kind, *args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "log":
                log.info(args[0])
            elif kind == "warn":
                log.warning(args[0], throttle_duration_sec=1.0)
            elif kind == "error":
                log.error(args[0], throttle_duration_sec=1.0)
            elif kind == "status":
                self._status = args[0]
                if args[1]:  # the active source changed
                    self._publish_diagnostics()
            elif kind == "exit":
                self._exit_code = args[0]
                log.error(f"output process died (exit code {args[0]}): nothing is published to the robot")
                self._publish_diagnostics()

    def _publish_diagnostics(self) -> None:
        s = self._status
        source, reason = s.get("active_source", "hold"), s.get("hold_reason", "starting")
        if self._exit_code is not None:
            level, message = DiagnosticStatus.ERROR, f"output process died (exit code {self._exit_code})"
        elif s.get("tracking_error", "none") != "none":
            level, message = DiagnosticStatus.ERROR, f"holding: tracking error: {s['tracking_error']}"
        elif source != "hold" or reason == "mode hold":
            level, message = DiagnosticStatus.OK, f"driven by {source}" if source != "hold" else "holding: mode hold"
        else:
            level, message = DiagnosticStatus.WARN, f"holding: {reason}"
        self.pub_diag.publish(rosmsg.diagnostic_array(rosmsg.now_ns(self),
                                                      [("teleop_mux: arbitration", level, message, s)],
                                                      hardware_id=self.station.name))

    def destroy_node(self):
        # rclpy destroys the nodes of its context at shutdown, also one whose __init__ raised (a bad station
        # file): then there is no output process to stop.
        if getattr(self, "_proc", None) is not None:
            self._closing.set()
            try:
                self._to_child.send(("close",))
            except OSError:
                pass
            self._to_child.close()
            self._proc.join(timeout=3.0)
            if self._proc.is_alive():
                self._proc.kill()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node("teleop_mux", TeleopMuxNode, args)


if __name__ == "__main__":
    sys.exit(main())
