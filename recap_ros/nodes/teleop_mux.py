"""teleop_mux: picks which joint command stream drives the robot (policy, teleoperator, hold).

Wiring only; the arbitration (modes, priorities, locks, timeouts, validation, step-limited handover) lives in
:mod:`recap_ros.control.mux`, whose docstring is the behaviour contract. Everything comes from the station's
``mux:`` and ``robot:`` sections:

- subscribes each ``mux.inputs[*].topic`` (JointState matched by joint name, or Float64MultiArray in station
  joint order), ``mux.mode_topic`` (String), ``mux.override_topic`` (Bool), each lock topic (Bool) and
  ``robot.joint_states_topic`` (the first valid message is the initial hold position; nothing is published
  on the command topic before it);
- publishes ``robot.command_topic`` (``robot.command_type``) every control tick, hold included;
  ``mux.active_topic`` (String) and ``mux.intervention_topic`` (Bool) latched, on every change;
  ``/diagnostics`` once per ``diagnostics_period_s`` and on every change of the active source.

Parameters: ``station`` (name or path), ``tick_aligned`` (default true: a fresh command from the active
source, or a mode / override / lock change, is forwarded at once instead of waiting up to one control period
for the timer: the next tick is moved just after the command's arrival (2 ms at 50 Hz), so a source at the
control rate is forwarded in its own phase, one command per tick, never waiting for a timer in another
phase; ticks only ever move earlier, so the output never falls below the control rate (see
TeleopMux.aligned_delay); false: every command waits for the fixed timer),
``diagnostics_period_s`` (1.0).
"""
from __future__ import annotations

import sys
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String

from recap_ros.control.mux import HOLD, TeleopMux
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
        self.tick_aligned = bool(self.declare_parameter("tick_aligned", True).value)
        diag_period = float(self.declare_parameter("diagnostics_period_s", 1.0).value)
        robot, mux = self.station.robot, self.station.mux
        self.names = robot.joint_names
        self.core = TeleopMux(mux, robot)

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
        self._joint_sub = self.create_subscription(JointState, robot.joint_states_topic, self._on_joint_state,
                                                   COMMAND_QOS)
        self._period_ns = int(robot.period_s * 1e9)
        self._timer_ns = self._period_ns
        self.timer = self.create_timer(robot.period_s, self._on_timer)
        self.create_timer(diag_period, self._publish_diagnostics)
        self.get_logger().info(
            f"station '{self.station.name}': inputs {[(i.name, i.topic, i.priority) for i in mux.inputs]}, "
            f"locks {[(lk.name, lk.topic, lk.priority) for lk in mux.locks]}, mode '{self.core.mode}', "
            f"output {robot.command_topic} ({robot.command_type}) at {robot.control_rate_hz} Hz, "
            f"tick_aligned={self.tick_aligned}; waiting for {robot.joint_states_topic}")

    # ------------------------------------------------------------------------------------------ callbacks
    def _on_joint_state(self, msg: JointState) -> None:
        try:
            err = self.core.on_joint_state(positions_from_joint_state(msg, self.names), time.monotonic())
        except MessageError as e:
            err = f"joint state not usable as the initial hold position: {e}"
        if err:
            self.get_logger().warning(err, throttle_duration_sec=1.0)
        elif self.core.ready:
            self.destroy_subscription(self._joint_sub)  # only the first position matters
        self._after_event()

    def _on_input(self, inp, msg) -> None:
        now = time.monotonic()
        try:
            err = self.core.on_command(inp.name, positions_from_command(msg, inp.type, self.names), now)
        except MessageError as e:
            err = self.core.reject(inp.name, str(e))
        if err:
            self.get_logger().warning(f"{err} (from {inp.topic}; {self.core.inputs[inp.name].dropped} dropped)",
                                      throttle_duration_sec=1.0)
        self._after_event()

    def _on_mode(self, msg: String) -> None:
        err = self.core.on_mode(msg.data)
        if err:
            self.get_logger().warning(f"{err} (from {self.station.mux.mode_topic})")
        self._after_event()

    def _on_override(self, msg: Bool) -> None:
        self.core.on_override(msg.data)
        self._after_event()

    def _on_lock(self, name: str, msg: Bool) -> None:
        self.core.on_lock(name, msg.data, time.monotonic())
        self._after_event()

    def _after_event(self) -> None:
        for line in self.core.drain_events():
            self.get_logger().info(line)
        delay = self.core.aligned_delay(time.monotonic()) if self.tick_aligned else None
        if delay == 0.0:  # a switch: its first tick now, the control period from here
            self._tick()
            self._arm_timer(self._period_ns)
        elif delay is not None:  # move the next tick earlier, just after this command's arrival
            self._arm_timer(max(1, int(delay * 1e9)))

    def _on_timer(self) -> None:
        self._tick()
        if self._timer_ns != self._period_ns:  # a moved tick: the control period again, from this tick
            self._arm_timer(self._period_ns)

    def _arm_timer(self, period_ns: int) -> None:
        """The timer's next tick is period_ns from now, then every period_ns."""
        if period_ns != self._timer_ns:
            self.timer.timer_period_ns = period_ns
            self._timer_ns = period_ns
        self.timer.reset()

    # ------------------------------------------------------------------------------------------ output
    def _tick(self) -> None:
        t = self.core.tick(time.monotonic())
        if t.positions is None:
            return
        self.pub_cmd.publish(command_msg(self.station.robot.command_type, self.names, t.positions, now_ns(self)))
        if t.source_changed:
            self._publish_source(t.source, t.intervention)
            self._publish_diagnostics()
        for line in self.core.drain_events():  # source switches, with the reason when holding
            self.get_logger().info(line)

    def _publish_source(self, source: str, intervention: bool) -> None:
        self.pub_active.publish(String(data=source))
        self.pub_intervention.publish(Bool(data=intervention))

    def _publish_diagnostics(self) -> None:
        c = self.core
        holding_by_choice = c.source != HOLD or c.reason == "mode hold"
        self.pub_diag.publish(diagnostic_array(now_ns(self), [(
            "teleop_mux: arbitration", DiagnosticStatus.OK if holding_by_choice else DiagnosticStatus.WARN,
            f"driven by {c.source}" if c.source != HOLD else f"holding: {c.reason}",
            c.status(time.monotonic()))], hardware_id=self.station.name))


def main(args=None) -> int:
    return run_node("teleop_mux", TeleopMuxNode, args)


if __name__ == "__main__":
    sys.exit(main())
