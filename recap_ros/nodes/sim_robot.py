"""sim_robot: the simulated bimanual station (recap_ros.sim.SimEnv) on the topics a real station uses.

Publishes joint states at the control rate, three rendered cameras (Image rgb8, CompressedImage JPEG while
someone subscribes, CameraInfo) at each camera's fps, the task prompt (latched) and episode events; follows
joint-position commands on robot.command_topic. Episodes run back to back from STARTUP_DELAY_S after start
(so recorders and the corrector are connected for the first start event): start -> success / failure ->
end event -> reset_pause_s -> next; `~/reset` (std_srvs/Trigger) ends the running episode (reason "reset")
and starts a new one. Until a command arrives in an episode, the arms hold their start pose.

A command stamped before the running episode's start (JointState commands carry a stamp) is ignored: it was
sent for the previous episode's pose.

Params: station (name or path, default "sim"); seeds (integer list: run exactly these task seeds, one episode
each, then idle; default: the station's seed stream).

Threads: the control tick and each camera run on their own fixed-rate loop (absolute schedule, late ticks are
caught up, so the published rates hold while the CPU is briefly busy); the executor thread only serves the
command subscription, the reset service and diagnostics. The env is guarded by one lock.
"""
from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from recap_ros import rosmsg
from recap_ros.control.ticker import DeadlineLoop, PeriodMonitor
from recap_ros.imaging import encode_jpeg
from recap_ros.nodes import run_node
from recap_ros.sim.env import SimEnv, check_command
from recap_ros.station import Camera, load_station

STARTUP_DELAY_S = 2.0  # first episode starts after this, so recorders / correctors can connect first
CONTROL_MAX_LAG_S = 1.0  # the control loop catches up late ticks (sim time keeps up with wall time) up to this
CAMERA_MAX_LAG_S = 0.1   # cameras drop frames instead when further behind (as real cameras do)


class SimStationNode(Node):
    """What both sim stations' robot nodes (this one and aloha_sim) share: the command intake (bad and pre-episode
    commands counted and ignored), episode events, the seed list, an episode's end bookkeeping, the reset service
    and stopping the loops. A subclass sets station, names, stats, loops, event_pub, _lock, _running, _next_start,
    _episode_start_ns and _command, and implements _start_episode(), _end_episode(success, reason, detail) and
    _episode_label()."""

    def _on_command(self, msg) -> None:
        try:
            q = check_command(rosmsg.positions_from_command(msg, self.station.robot.command_type, self.names),
                              len(self.names))
        except (rosmsg.MessageError, ValueError) as e:
            self.stats["bad_commands"] += 1
            self.get_logger().warning(f"ignored bad command on {self.station.robot.command_topic} "
                                      f"(#{self.stats['bad_commands']}): {e}", throttle_duration_sec=2.0)
            return
        header = getattr(msg, "header", None)
        if header is not None and rosmsg.stamp_to_ns(header.stamp) < self._episode_start_ns:
            self.stats["old_commands"] += 1  # sent before this episode began (for the previous one's pose)
            return
        self._command = q

    def _seed_list(self) -> list[int] | None:
        from rclpy.exceptions import ParameterUninitializedException
        from rclpy.parameter import Parameter

        self.declare_parameter("seeds", Parameter.Type.INTEGER_ARRAY)
        try:
            return [int(s) for s in self.get_parameter("seeds").value]
        except ParameterUninitializedException:
            return None

    def _event(self, payload: dict, stamp_ns: int | None = None) -> None:
        payload["stamp_ns"] = rosmsg.now_ns(self) if stamp_ns is None else stamp_ns
        self.event_pub.publish(String(data=json.dumps(payload)))

    def _stop_episode(self, success: bool) -> None:  # caller holds the lock
        """The bookkeeping of an episode's end: stopped, counted, the next start after the reset pause."""
        self._running = False
        self._next_start = time.monotonic() + self.station.sim.reset_pause_s
        self.stats["episodes"] += 1
        self.stats["successes" if success else "failures"] += 1

    def _on_reset(self, request, response):
        with self._lock:
            if self._running:
                self._end_episode(False, "reset", "reset requested by service")
            response.success = self._start_episode()
            response.message = self._episode_label() if response.success else "the 'seeds' list is used up"
        return response

    def destroy_node(self):
        for loop in self.loops:
            loop.stop()
        return super().destroy_node()


class SimRobot(SimStationNode):
    def __init__(self):
        super().__init__("sim_robot")
        station_name = self.declare_parameter("station", "sim").value
        self.station = load_station(station_name)
        self.seeds = self._seed_list()
        self.env = SimEnv(self.station)
        self.names = self.station.robot.joint_names
        self._lock = threading.Lock()
        self._command: np.ndarray | None = None
        self._q = self.env.state
        self._v = np.zeros_like(self._q)
        self._running = False
        self._next_start = time.monotonic() + STARTUP_DELAY_S
        self._episode_start_ns = 0
        self.stats = {"episodes": 0, "successes": 0, "failures": 0, "bad_commands": 0, "old_commands": 0}
        self._last_reason = ""

        robot = self.station.robot
        self.joint_pub = self.create_publisher(JointState, robot.joint_states_topic, rosmsg.COMMAND_QOS)
        self.prompt_pub = self.create_publisher(String, self.station.policy.prompt_topic, rosmsg.LATCHED_QOS)
        self.event_pub = self.create_publisher(String, self.station.episode_topic, rosmsg.EVENT_HISTORY_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(rosmsg.command_msg_class(robot.command_type), robot.command_topic,
                                 self._on_command, rosmsg.COMMAND_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_timer(1.0, self._publish_diagnostics)
        self.loops = [self._loop(robot.period_s, lambda periods, now_ns: self._tick(), "control",
                                 CONTROL_MAX_LAG_S)]
        self.loops += [self._camera_loop(cam) for cam in self.station.cameras]
        for loop in self.loops:
            loop.start()
        self.get_logger().info(f"sim station '{self.station.name}' ({self.station.file}): {len(self.names)} "
                               f"joints at {robot.control_rate_hz:g} Hz, cameras "
                               f"{[c.name for c in self.station.cameras]}")

    # ------------------------------------------------------------------ cameras
    def _loop(self, period_s: float, fn, name: str, max_lag_s: float) -> DeadlineLoop:
        def on_error(e: Exception) -> None:  # keep the robot alive; the error is logged with its source
            if rclpy.ok():
                self.get_logger().error(f"{name}: {type(e).__name__}: {e}", throttle_duration_sec=1.0)

        return DeadlineLoop(period_s, fn, PeriodMonitor(period_s), on_error, name=name, max_lag_s=max_lag_s)

    def _camera_loop(self, cam: Camera) -> DeadlineLoop:
        image_pub = self.create_publisher(Image, cam.image_topic, rosmsg.SENSOR_QOS)
        jpeg_pub = self.create_publisher(CompressedImage, cam.compressed_topic, rosmsg.SENSOR_QOS)
        info_pub = self.create_publisher(CameraInfo, cam.camera_info_topic, rosmsg.SENSOR_QOS)
        info = self._camera_info(cam)

        def publish(periods: int, now_ns: int) -> None:
            with self._lock:  # stamped under the lock: a frame stamped after an episode start shows that episode
                q, task = self._q, self.env.task
                stamp_ns = rosmsg.now_ns(self)
            rgb = self.env.renderer.render(cam.role, q, task)
            image_pub.publish(rosmsg.image_msg(rgb, stamp_ns, cam.frame_id))
            if jpeg_pub.get_subscription_count() > 0:
                jpeg_pub.publish(rosmsg.compressed_msg(encode_jpeg(rgb, cam.jpeg_quality), stamp_ns, cam.frame_id))
            info.header.stamp = rosmsg.ns_to_stamp(stamp_ns)
            info_pub.publish(info)

        return self._loop(1.0 / cam.fps, publish, f"camera {cam.name}", CAMERA_MAX_LAG_S)

    def _camera_info(self, cam: Camera) -> CameraInfo:
        k = self.env.renderer.output_intrinsics(cam.role)
        info = CameraInfo()
        info.header.frame_id = cam.frame_id
        info.width, info.height = k.width, k.height
        info.distortion_model = "plumb_bob"
        info.d = [0.0] * 5
        info.k = k.K.flatten().tolist()
        info.r = np.eye(3).flatten().tolist()
        info.p = np.hstack([k.K, np.zeros((3, 1))]).flatten().tolist()
        return info

    def _tick(self) -> None:
        with self._lock:
            if not self._running and time.monotonic() >= self._next_start and not self._start_episode():
                self._next_start = float("inf")
                self.get_logger().info(f"all {len(self.seeds)} seeds of the 'seeds' parameter done: idle")
            if self._running:
                command = self._command if self._command is not None else np.asarray(self.env.task.q0)
                self.env.step(command)
                self._q, self._v = self.env.state, self.env.velocity
                if self.env.status.done:
                    self._end_episode(self.env.status.state == "success", self.env.status.reason,
                                      self.env.status.detail)
            else:
                self._v = np.zeros_like(self._v)
            msg = rosmsg.joint_state_msg(self.names, self._q, rosmsg.now_ns(self), self._v)
        self.joint_pub.publish(msg)

    def _start_episode(self) -> bool:  # caller holds the lock
        """Start the next episode; False when the seed list is used up (the station idles)."""
        if self.seeds is not None and self.env.episode + 1 >= len(self.seeds):
            return False
        task = self.env.reset(None if self.seeds is None else self.seeds[self.env.episode + 1])
        self._episode_start_ns = rosmsg.now_ns(self)
        self._command = None
        self._q, self._v = self.env.state, self.env.velocity
        self._running = True
        self.prompt_pub.publish(String(data=task.prompt))
        self._event({"event": "start", "episode": self.env.episode, "prompt": task.prompt, "seed": task.seed,
                     "arm": task.arm, "target": task.to_dict()["target"], "task": task.to_dict()},
                    self._episode_start_ns)
        self.get_logger().info(f"episode {self.env.episode} (seed {task.seed}): {task.prompt!r}")
        return True

    def _end_episode(self, success: bool, reason: str, detail: str) -> None:  # caller holds the lock
        self._stop_episode(success)
        self._last_reason = reason
        self._event({"event": "end", "episode": self.env.episode, "success": success, "reason": reason,
                     "detail": detail, "steps": self.env.steps})
        self.get_logger().info(f"episode {self.env.episode} ended: {reason} ({detail}) after {self.env.steps} steps")

    def _episode_label(self) -> str:
        return f"episode {self.env.episode}: {self.env.task.prompt}"

    def _publish_diagnostics(self) -> None:
        values = {**self.stats, "episode": self.env.episode, "last_reason": self._last_reason}
        self.diag_pub.publish(rosmsg.diagnostic_array(rosmsg.now_ns(self), [(
            "sim_robot: episodes", DiagnosticStatus.OK, "running" if self._running else "between episodes",
            values)], hardware_id="sim"))


def main(args=None) -> int:
    return run_node("sim_robot", SimRobot, args, config_errors=(ValueError,))  # ValueError: not a sim station


if __name__ == "__main__":
    sys.exit(main())
