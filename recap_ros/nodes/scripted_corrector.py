"""scripted_corrector: the simulated human who corrects the policy in the sim station.

Watches joint states and episode events (the start event carries the task); when recap_ros.sim.Corrector
decides the policy is failing, it publishes the scripted expert's joint-position commands on its own mux input
(``sim.corrector_input``: human, priority above the policy's and below the teleoperator's) at the control rate
until the episode ends. Starting to publish preempts the policy (the mux's preemption rule), so the
corrector's ticks are recorded as interventions; a real teleoperator preempts the corrector and is never
overridden by it. At the episode's end it hands back (mode "policy") only when it was the last active source.

Decisions use the robot's measured joint velocities and the joint states' stamps (when the robot measured
them), never receive times, and ignore joint states stamped before the episode's start.

Params: station (name or path, default "sim").
"""
from __future__ import annotations

import json
import sys

from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from recap_ros import rosmsg
from recap_ros.nodes import run_node
from recap_ros.sim.corrector import Corrector
from recap_ros.sim.kinematics import Bimanual
from recap_ros.sim.task import Task
from recap_ros.station import StationConfigError, load_station


class ScriptedCorrector(Node):
    def __init__(self):
        super().__init__("scripted_corrector")
        self.station = load_station(self.declare_parameter("station", "sim").value)
        if self.station.sim is None:
            raise StationConfigError(self.station.file, "robot.type", self.station.robot.type,
                                     "the scripted corrector needs a sim station")
        robot, mux = self.station.robot, self.station.mux
        self.names = robot.joint_names
        self.human = mux.input(self.station.sim.corrector_input)
        self.corrector = Corrector(Bimanual(robot, self.station.file), robot.period_s,
                                   self.station.sim.corrector_patience_s)
        self._q = None
        self._episode_start_ns = 0
        self._active_source = ""
        self.mode_pub = self.create_publisher(String, mux.mode_topic, rosmsg.COMMAND_QOS)
        self.command_pub = self.create_publisher(rosmsg.command_msg_class(self.human.type), self.human.topic,
                                                 rosmsg.COMMAND_QOS)
        self.create_subscription(JointState, robot.joint_states_topic, self._on_joints, rosmsg.COMMAND_QOS)
        # with history: a corrector started after the episode began still gets its start event
        self.create_subscription(String, self.station.episode_topic, self._on_event, rosmsg.EVENT_HISTORY_QOS)
        self.create_subscription(String, mux.active_topic, self._on_active, rosmsg.LATCHED_QOS)
        self.create_timer(robot.period_s, self._tick)

    def _on_active(self, msg: String) -> None:
        self._active_source = msg.data

    def _on_joints(self, msg: JointState) -> None:
        stamp_ns = rosmsg.stamp_to_ns(msg.header.stamp)
        if stamp_ns < self._episode_start_ns:
            return  # measured before this episode began (the previous episode's pose)
        try:
            self._q = rosmsg.positions_from_joint_state(msg, self.names)
        except rosmsg.MessageError as e:
            self.get_logger().warning(f"ignored joint state: {e}", throttle_duration_sec=2.0)
            return
        reason = self.corrector.observe(self._q, stamp_ns * 1e-9,
                                        rosmsg.velocities_from_joint_state(msg, self.names))
        if reason:
            self.get_logger().info(f"taking over on {self.human.topic}: {reason}")

    def _on_event(self, msg: String) -> None:
        try:
            event = json.loads(msg.data)
            kind = event["event"]
            task = Task.from_dict(event["task"]) if kind == "start" else None
        except (ValueError, KeyError, TypeError) as e:
            self.get_logger().warning(f"ignored episode event {msg.data[:200]!r}: {e}")
            return
        if kind == "start":
            if len(task.q0) != len(self.names):
                self.get_logger().warning(f"start event task has {len(task.q0)} joints, expected {len(self.names)}")
                return
            self._episode_start_ns = int(event.get("stamp_ns", 0))
            self._q = None
            self.corrector.start(task, self._episode_start_ns * 1e-9)
        elif kind == "end" and self.corrector.end():
            if self._active_source == self.human.name:
                self.get_logger().info(f"episode {event.get('episode')} ended ({event.get('reason')}): handing back")
                self.mode_pub.publish(String(data="policy"))
            else:  # someone else (a teleoperator) drives now: leave the mode to them
                self.get_logger().info(f"episode {event.get('episode')} ended; {self._active_source or 'nobody'} "
                                       "drives, not handing back")

    def _tick(self) -> None:
        if self.corrector.active and self._q is not None:
            command = self.corrector.command(self._q)
            self.command_pub.publish(rosmsg.command_msg(self.human.type, self.names, command, rosmsg.now_ns(self)))


def main(args=None) -> int:
    return run_node("scripted_corrector", ScriptedCorrector, args)


if __name__ == "__main__":
    sys.exit(main())
