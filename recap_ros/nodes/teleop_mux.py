"""teleop_mux: picks which joint command stream drives the robot (policy, teleoperator, hold).

Wiring only; the arbitration (modes, priorities, locks, timeouts, validation, step-limited handover) lives in
:mod:`recap_ros.control.mux`, whose docstring is the behaviour contract. Everything comes from the station's
``mux:`` and ``robot:`` sections:

- subscribes each ``mux.inputs[*].topic`` (JointState matched by joint name, or Float64MultiArray in station
  joint order), ``mux.mode_topic`` (String), ``mux.override_topic`` (Bool), each lock topic (Bool) and
  ``robot.joint_states_topic`` (the measured position, for as long as the node runs: the first valid message
  is the initial hold position, nothing is published on the command topic before it; holds, resumes and
  re-anchoring follow it);
- publishes ``robot.command_topic`` (``robot.command_type``) every control tick, hold included; a JointState
  command names its source (the mux input, or "hold") in ``header.frame_id``;
  ``mux.active_topic`` (String) and ``mux.intervention_topic`` (Bool) latched, on every change;
  ``/diagnostics`` once per ``diagnostics_period_s`` and on every change of the active source.

Timing: the command ticks run on a :class:`~recap_ros.control.ticker.DeadlineLoop` thread on absolute
monotonic deadlines at the control rate, so neither a late source nor a busy executor lowers the output rate
(a missed deadline is skipped and counted in the diagnostics, never shifts the grid). A mode / override /
lock change or a preemption publishes its first tick at once from the callback (an extra tick, step-limited
by the time since the previous one); the grid then continues. The arbitration state and the command
publication are serialised by one lock, so the loop thread and the callbacks never interleave. A command is
forwarded by the next grid tick (at most one control period later): aligning the grid to the source's phase
would mean moving it, i.e. intervals longer or shorter than one period.

Parameters: ``station`` (name or path), ``realtime_priority`` (default 60, above the policy server's
tick thread: the mux is the last hop to the robot; SCHED_FIFO for the tick thread when permitted, e.g. root or
an rtprio limit; 0: normal scheduling), ``diagnostics_period_s`` (1.0).
"""
from __future__ import annotations

import sys
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String

from recap_ros.control.mux import HOLD, TeleopMux
from recap_ros.control.ticker import DeadlineLoop, PeriodMonitor
from recap_ros.nodes import run_node
from recap_ros.rosmsg import (
    COMMAND_QOS,
    LATCHED_QOS,
    MessageError,
    command_msg,
    command_msg_class,
    diagnostic_array,
    now_ns,
    positions_from_command,
    positions_from_joint_state,
)
from recap_ros.station import load_station


class TeleopMuxNode(Node):
    def __init__(self):
        super().__init__("teleop_mux")
        self.station = load_station(self.declare_parameter("station", "sim").value)
        priority = int(self.declare_parameter("realtime_priority", 60).value)
        diag_period = float(self.declare_parameter("diagnostics_period_s", 1.0).value)
        robot, mux = self.station.robot, self.station.mux
        self.names = robot.joint_names
        self.core = TeleopMux(mux, robot)
        self._lock = threading.Lock()  # serialises self.core and the command publication
        self.switch_ticks = 0

        self.pub_cmd = self.create_publisher(command_msg_class(robot.command_type), robot.command_topic,
                                             COMMAND_QOS)
        self.pub_active = self.create_publisher(String, mux.active_topic, LATCHED_QOS)
        self.pub_intervention = self.create_publisher(Bool, mux.intervention_topic, LATCHED_QOS)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._publish_source(HOLD, False)

        for inp in mux.inputs:
            self.create_subscription(command_msg_class(inp.type), inp.topic,
                                     lambda msg, i=inp: self._on_input(i, msg), COMMAND_QOS)
        for lk in mux.locks:
            self.create_subscription(Bool, lk.topic, lambda msg, n=lk.name: self._on_lock(n, msg), COMMAND_QOS)
        self.create_subscription(String, mux.mode_topic, self._on_mode, COMMAND_QOS)
        self.create_subscription(Bool, mux.override_topic, self._on_override, COMMAND_QOS)
        self.create_subscription(JointState, robot.joint_states_topic, self._on_joint_state, COMMAND_QOS)
        self.create_timer(diag_period, self._publish_diagnostics)
        self.monitor = PeriodMonitor(robot.period_s)
        self.loop = DeadlineLoop(robot.period_s, lambda periods, now_ns: self._tick(), self.monitor,
                                 self._on_loop_error, priority=priority, name="teleop_mux ticks")
        self.loop.start()
        self.get_logger().info(
            f"station '{self.station.name}': inputs {[(i.name, i.topic, i.priority) for i in mux.inputs]}, "
            f"locks {[(lk.name, lk.topic, lk.priority) for lk in mux.locks]}, mode '{self.core.mode}', "
            f"output {robot.command_topic} ({robot.command_type}) at {robot.control_rate_hz} Hz, "
            f"ticks on absolute deadlines ({'SCHED_FIFO requested' if priority > 0 else 'normal scheduling'}); "
            f"waiting for {robot.joint_states_topic}")

    # ------------------------------------------------------------------------------------------ callbacks
    def _on_joint_state(self, msg: JointState) -> None:
        try:
            q = positions_from_joint_state(msg, self.names)
            with self._lock:
                err = self.core.on_joint_state(q, time.monotonic())
        except MessageError as e:
            err = f"joint state not usable as a measured position: {e}"
        if err:
            self.get_logger().warning(err, throttle_duration_sec=1.0)
        self._after_event()

    def _on_input(self, inp, msg) -> None:
        try:
            q, why = positions_from_command(msg, inp.type, self.names), None
        except MessageError as e:
            q, why = None, str(e)
        with self._lock:
            now = time.monotonic()
            err = self.core.reject(inp.name, why) if why else self.core.on_command(inp.name, q, now)
            dropped = self.core.inputs[inp.name].dropped
        if err:
            self.get_logger().warning(f"{err} (from {inp.topic}; {dropped} dropped)", throttle_duration_sec=1.0)
        self._after_event()

    def _on_mode(self, msg: String) -> None:
        with self._lock:
            err = self.core.on_mode(msg.data)
        if err:
            self.get_logger().warning(f"{err} (from {self.station.mux.mode_topic})")
        self._after_event()

    def _on_override(self, msg: Bool) -> None:
        with self._lock:
            self.core.on_override(msg.data)
        self._after_event()

    def _on_lock(self, name: str, msg: Bool) -> None:
        with self._lock:
            self.core.on_lock(name, msg.data, time.monotonic())
        self._after_event()

    def _after_event(self) -> None:
        """A switch (mode / override / lock change, preemption) gets its first tick now; then the grid."""
        self._tick(switch=True)

    def _on_loop_error(self, e: Exception) -> None:
        if rclpy.ok():  # after shutdown a publish fails; nothing to report then
            self.get_logger().error(f"tick: {type(e).__name__}: {e}", throttle_duration_sec=1.0)

    # ------------------------------------------------------------------------------------------ output
    def _tick(self, switch: bool = False) -> None:
        """A grid tick, or (switch=True) the immediate tick of a switch when one is pending."""
        with self._lock:
            if switch and not self.core.switch_pending:
                t = None
            else:
                t = self.core.tick(time.monotonic())
                self.switch_ticks += switch
                if t.positions is not None:
                    if t.source_changed:  # the state first: a command never precedes the source it came from
                        self._publish_source(t.source, t.intervention)
                    self.pub_cmd.publish(command_msg(self.station.robot.command_type, self.names, t.positions,
                                                     now_ns(self), t.source))
            events = self.core.drain_events()
        for line in events:  # mode changes, source switches (with the reason when holding)
            self.get_logger().info(line)
        if t is not None and t.positions is not None and t.source_changed:
            self._publish_diagnostics()

    def _publish_source(self, source: str, intervention: bool) -> None:
        self.pub_active.publish(String(data=source))
        self.pub_intervention.publish(Bool(data=intervention))

    def _publish_diagnostics(self) -> None:
        with self._lock:
            c = self.core
            holding_by_choice = c.source != HOLD or c.reason == "mode hold"
            level = DiagnosticStatus.OK if holding_by_choice else DiagnosticStatus.WARN
            message = f"driven by {c.source}" if c.source != HOLD else f"holding: {c.reason}"
            values = {**c.status(time.monotonic()), "switch_ticks": str(self.switch_ticks),
                      **{k: f"{v:.3f}" if isinstance(v, float) else str(v)
                         for k, v in self.monitor.summary().items()}}
            stamp = now_ns(self)
        self.pub_diag.publish(diagnostic_array(stamp, [("teleop_mux: arbitration", level, message, values)],
                                               hardware_id=self.station.name))

    def destroy_node(self):
        self.loop.stop()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node("teleop_mux", TeleopMuxNode, args)


if __name__ == "__main__":
    sys.exit(main())
