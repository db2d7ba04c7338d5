"""scripted_corrector: the simulated human who corrects the policy in the sim station.

Watches joint states and episode events (the start event carries the task); when recap_ros.sim.Corrector
decides the policy is failing, it switches the mux to the human input (mode = that input's name on
mux.mode_topic) and publishes the scripted expert's joint-position commands on that input's topic at the
control rate until the episode ends, then hands back (mode "policy").

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
        self.human = next(i for i in mux.inputs if i.human)
        self.corrector = Corrector(Bimanual(robot, self.station.file), robot.period_s,
                                   self.station.sim.corrector_patience_s)
        self._q = None
        self.mode_pub = self.create_publisher(String, mux.mode_topic, rosmsg.COMMAND_QOS)
        self.command_pub = self.create_publisher(rosmsg.command_msg_class(self.human.type), self.human.topic,
                                                 rosmsg.COMMAND_QOS)
        self.create_subscription(JointState, robot.joint_states_topic, self._on_joints, rosmsg.COMMAND_QOS)
        # with history: a corrector started after the episode began still gets its start event
        self.create_subscription(String, self.station.episode_topic, self._on_event, rosmsg.EVENT_HISTORY_QOS)
        self.create_timer(robot.period_s, self._tick)

    def _now_s(self) -> float:
        return rosmsg.now_ns(self) * 1e-9

    def _on_joints(self, msg: JointState) -> None:
        try:
            self._q = rosmsg.positions_from_joint_state(msg, self.names)
        except rosmsg.MessageError as e:
            self.get_logger().warning(f"ignored joint state: {e}", throttle_duration_sec=2.0)
            return
        reason = self.corrector.observe(self._q, self._now_s())
        if reason:
            self.get_logger().info(f"taking over: {reason}")
            self.mode_pub.publish(String(data=self.human.name))

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
            self.corrector.start(task, self._now_s())
        elif kind == "end" and self.corrector.end():
            self.get_logger().info(f"episode {event.get('episode')} ended ({event.get('reason')}): handing back")
            self.mode_pub.publish(String(data="policy"))

    def _tick(self) -> None:
        if self.corrector.active and self._q is not None:
            command = self.corrector.command(self._q)
            self.command_pub.publish(rosmsg.command_msg(self.human.type, self.names, command, rosmsg.now_ns(self)))


def main(args=None) -> int:
    return run_node("scripted_corrector", ScriptedCorrector, args)


if __name__ == "__main__":
    sys.exit(main())
