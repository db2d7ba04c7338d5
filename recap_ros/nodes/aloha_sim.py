"""aloha_sim: the MuJoCo ALOHA station (recap_ros.sim.aloha, gym-aloha's physics) on the topics a real station
uses. The launch graph runs it under the node name ``sim_robot`` for a station with ``sim.simulator: aloha``.

Control (its own fixed-rate thread, SCHED_FIFO when allowed, absolute deadlines, late ticks caught up so sim
time keeps up with wall time): each tick steps the physics one control period (gym-aloha's DT) toward the newest joint-position
command from robot.command_topic and publishes joint states (station order, grippers normalised 0..1 as
gym-aloha does, with velocities). Like a real arm's servo profile, the targets given to the physics follow the
command within the station's joint limits (recap_ros.control.limits: position, velocity, acceleration; a
command within them passes unchanged): MuJoCo's stiff position servos would otherwise snap to a far command
(the previous episode's pose still in flight at a reset) and drive joints through their limits. Until a
command arrives in an episode the arms hold their start pose; a command stamped before the episode's start is
ignored; a bad command is counted and ignored.

Cameras (``top``, ``left_wrist``, ``right_wrist``: MuJoCo cameras of the station cameras' names): one thread per
camera at the camera's fps, each with its own GL context (``mujoco.Renderer``), rendering from a copy of the
scene's joint positions taken under the lock at the frame's stamp: the control thread never waits for a
render. Image rgb8, CompressedImage JPEG while someone subscribes, CameraInfo, as camera_ingest publishes them.

Episodes run back to back from STARTUP_DELAY_S after start: task ``sim.tasks[k % n]``, seed ``sim.seed + k``
(or the ``seeds`` parameter's k-th entry, one episode each, then idle), object poses as gym-aloha samples them.
Start event: task, seed, prompt, object poses; end event: success (gym-aloha reward 4 before
``sim.episode_timeout_s``), reason, final and highest reward, the step each reward stage was first reached.
``~/reset`` (std_srvs/Trigger) ends the running episode (reason "reset") and starts the next.

Scripted expert (``recap_ros.sim.aloha.expert``, reads the physics, so it runs here, after each step): with
``sim.corrector`` it takes over on the corrector's mux input when the reward stage stops rising
(recap_ros.sim.aloha.corrector) and hands back (mode "policy") at the episode's end if it was still the active
source; with the ``expert_input`` parameter (a mux input name) it drives that input in every episode.

Params: station (default "aloha_sim"); seeds (integer list); expert_input (mux input name, default "": off).
Without the ``aloha`` extra, or without a working GL, it refuses to start with one line saying what to install.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections import deque

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from recap_ros import rosmsg
from recap_ros.control.limits import JointLimits, Limiter
from recap_ros.control.ticker import CONTROL_PRIORITY, DeadlineLoop, PeriodMonitor
from recap_ros.imaging import encode_jpeg
from recap_ros.nodes import run_node
from recap_ros.nodes.sim_robot import SimStationNode
from recap_ros.sim.env import check_command
from recap_ros.station import Camera, StationConfigError, load_station

STARTUP_DELAY_S = 2.0    # first episode starts after this, so the recorder and the mux are connected
CONTROL_MAX_LAG_S = 1.0  # the control loop catches up late ticks up to this (sim time follows wall time)
CAMERA_MAX_LAG_S = 0.1   # cameras drop frames instead (as real cameras do)
EXPERT_MODULE = "recap_ros.sim.aloha.expert"


class AlohaSimNode(SimStationNode):
    def __init__(self):
        super().__init__("sim_robot")
        self.station = st = load_station(self.declare_parameter("station", "aloha_sim").value)
        if st.sim is None or st.sim.simulator != "aloha":
            raise StationConfigError(st.file, "sim.simulator", st.sim.simulator if st.sim else st.robot.type,
                                     "aloha_sim needs a sim station with sim.simulator aloha")
        try:
            from recap_ros.sim.aloha import env as aloha
        except ImportError as e:
            raise StationConfigError(st.file, "sim.simulator", "aloha", f"MuJoCo ALOHA is not installed ({e}); "
                                     "install the extra: pip install -e '.[aloha]'") from None
        self._check_station(aloha)
        self.aloha = aloha
        self.names = st.robot.joint_names
        self.seeds = self._seed_list()
        # every scene loads now: loading one (~0.1 s) at an episode start would stall the joint-state stream
        self.sim = aloha.AlohaSim(st.sim.episode_timeout_s, st.robot.period_s, preload=st.sim.tasks)
        self.sim.reset(st.sim.tasks[0], st.sim.seed)  # the pose shown and held until the first episode starts
        self.driver, self.driver_input = self._expert_driver()
        aloha.AlohaRenderer(self.sim.scene_model(self.sim.task), 16, 16).close()  # no GL: one line now

        self._lock = threading.Lock()
        self._command: np.ndarray | None = None
        self._hold = self.sim.qpos()
        self.servo = Limiter(JointLimits.from_robot(st.robot))  # the targets the physics gets
        self.servo.reset(self._hold)
        self._joints = (self._hold, np.zeros(len(self.names)))
        self._scene = (self.sim.task, self.sim.physics.data.qpos.copy())
        self._running = False
        self._next_start = time.monotonic() + STARTUP_DELAY_S
        self._episode = -1
        self._episode_start_ns = 0
        self._active_source = ""
        self.stats = {"episodes": 0, "successes": 0, "failures": 0, "takeovers": 0, "bad_commands": 0,
                      "old_commands": 0, "ticks": 0, "physics_steps": 0}
        self.render_ms: dict[str, deque] = {c.name: deque(maxlen=500) for c in st.cameras}
        self.frames = {c.name: 0 for c in st.cameras}

        robot, mux = st.robot, st.mux
        self.joint_pub = self.create_publisher(JointState, robot.joint_states_topic, rosmsg.COMMAND_QOS)
        self.prompt_pub = self.create_publisher(String, st.policy.prompt_topic, rosmsg.LATCHED_QOS)
        self.event_pub = self.create_publisher(String, st.episode_topic, rosmsg.EVENT_HISTORY_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        if self.driver is not None:
            self.expert_pub = self.create_publisher(JointState, self.driver_input.topic, rosmsg.COMMAND_QOS)
            self.mode_pub = self.create_publisher(String, mux.mode_topic, rosmsg.COMMAND_QOS)
            self.create_subscription(String, mux.active_topic, self._on_active, rosmsg.LATCHED_QOS)
        self.create_subscription(rosmsg.command_msg_class(robot.command_type), robot.command_topic,
                                 self._on_command, rosmsg.COMMAND_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_timer(1.0, self._publish_diagnostics)
        self.control = PeriodMonitor(robot.period_s)
        self.loops = [DeadlineLoop(robot.period_s, lambda periods, now_ns: self._tick(), self.control,
                                   self._on_error("control"), priority=CONTROL_PRIORITY, name="control",
                                   max_lag_s=CONTROL_MAX_LAG_S)]
        self.loops += [self._camera_loop(cam) for cam in st.cameras]
        for loop in self.loops:
            loop.start()
        expert = "off" if self.driver is None else ("drives " if self.driver.always else "corrects on ") + \
            self.driver_input.name
        self.get_logger().info(f"MuJoCo ALOHA station '{st.name}' ({st.file}): tasks {list(st.sim.tasks)} at "
                               f"{robot.control_rate_hz:g} Hz, cameras {[(c.name, c.fps) for c in st.cameras]}, "
                               f"scripted expert: {expert}")

    def _check_station(self, aloha) -> None:
        st = self.station
        if tuple(st.robot.joint_names) != aloha.JOINT_NAMES:
            raise StationConfigError(st.file, "robot.joints", st.robot.joint_names, "aloha_sim publishes gym-aloha's "
                                     f"joints in this order: {list(aloha.JOINT_NAMES)}")
        for i, cam in enumerate(st.cameras):
            if cam.name not in aloha.CAMERAS:
                raise StationConfigError(st.file, f"cameras[{i}].name", cam.name,
                                         f"the ALOHA scene's cameras are {list(aloha.CAMERAS)}")

    def _expert_driver(self):
        """(ExpertDriver, the mux input it drives) or (None, None)."""
        from recap_ros.sim.aloha.corrector import ExpertDriver

        st = self.station
        name = str(self.declare_parameter("expert_input", "").value)
        if not name and not st.sim.corrector:
            return None, None
        try:
            target = st.mux.input(name or st.sim.corrector_input)
        except KeyError:
            raise StationConfigError(st.file, "mux.inputs", name, "expert_input must name a mux input") from None
        if importlib.util.find_spec(EXPERT_MODULE) is None:
            if name:
                raise StationConfigError(st.file, "expert_input", name, f"no scripted expert ({EXPERT_MODULE})")
            self.get_logger().warning(f"no scripted expert ({EXPERT_MODULE}): the corrector is off")
            return None, None
        from recap_ros.sim.aloha.expert import AlohaExpert

        return ExpertDriver(AlohaExpert(), st.sim.corrector_patience_s, always=bool(name)), target

    def _on_error(self, name: str):
        def report(e: Exception) -> None:  # the loop keeps running; the error is logged with its source
            if rclpy.ok():
                self.get_logger().error(f"{name}: {type(e).__name__}: {e}", throttle_duration_sec=1.0)
        return report

    # ------------------------------------------------------------------ cameras
    def _camera_loop(self, cam: Camera) -> DeadlineLoop:
        image_pub = self.create_publisher(Image, cam.image_topic, rosmsg.SENSOR_QOS)
        jpeg_pub = self.create_publisher(CompressedImage, cam.compressed_topic, rosmsg.SENSOR_QOS)
        info_pub = self.create_publisher(CameraInfo, cam.camera_info_topic, rosmsg.SENSOR_QOS)
        w, h = cam.output_width, cam.output_height
        k = self.aloha.camera_matrix(self.sim.scene_model(self.sim.task), cam.name, w, h)
        info = CameraInfo(width=w, height=h, distortion_model="plumb_bob", d=[0.0] * 5, k=k.flatten().tolist(),
                          r=np.eye(3).flatten().tolist(), p=np.hstack([k, np.zeros((3, 1))]).flatten().tolist())
        info.header.frame_id = cam.frame_id
        renderers = {}  # task -> AlohaRenderer, made on this camera's thread (a GL context is per thread)

        def frame(periods: int, now_ns: int) -> None:
            if not renderers:  # all at once, each drawn once (the GL driver compiles on a scene's first draw):
                for t in self.station.sim.tasks:  # doing that at an episode start would delay its first frames
                    renderers[t] = self.aloha.AlohaRenderer(self.sim.scene_model(t), w, h)
                    renderers[t].render(cam.name, renderers[t].model.qpos0)
            with self._lock:  # stamped under the lock: a frame stamped after an episode start shows that episode
                task, qpos = self._scene
                stamp_ns = rosmsg.now_ns(self)
            t0 = time.perf_counter()
            rgb = renderers[task].render(cam.name, qpos)
            self.render_ms[cam.name].append((time.perf_counter() - t0) * 1e3)
            image_pub.publish(rosmsg.image_msg(rgb, stamp_ns, cam.frame_id))
            if jpeg_pub.get_subscription_count() > 0:
                jpeg_pub.publish(rosmsg.compressed_msg(encode_jpeg(rgb, cam.jpeg_quality), stamp_ns, cam.frame_id))
            info.header.stamp = rosmsg.ns_to_stamp(stamp_ns)
            info_pub.publish(info)
            self.frames[cam.name] += 1

        return DeadlineLoop(1.0 / cam.fps, frame, PeriodMonitor(1.0 / cam.fps), self._on_error(f"camera {cam.name}"),
                            name=f"camera-{cam.name}", max_lag_s=CAMERA_MAX_LAG_S)

    # ------------------------------------------------------------------ commands and control
    def _on_active(self, msg: String) -> None:
        self._active_source = msg.data

    def _tick(self) -> None:
        expert_command = None
        with self._lock:
            self.stats["ticks"] += 1
            if not self._running and time.monotonic() >= self._next_start and not self._start_episode():
                self._next_start = float("inf")
                self.get_logger().info(f"all {len(self.seeds)} seeds of the 'seeds' parameter done: idle")
            if self._running:
                self.sim.step(self.servo.step(self._hold if self._command is None else self._command))
                self.stats["physics_steps"] += 1
                self._joints = (self.sim.qpos(), self.sim.qvel())
                self._scene = (self.sim.task, self.sim.physics.data.qpos.copy())
                expert_command = self._drive_expert()
                if self.sim.status.done:
                    status = self.sim.status
                    self._end_episode(status.reason == "success", status.reason, status.detail)
                    expert_command = None
            msg = rosmsg.joint_state_msg(self.names, self._joints[0], rosmsg.now_ns(self), self._joints[1])
        self.joint_pub.publish(msg)
        if expert_command is not None:
            self.expert_pub.publish(rosmsg.joint_state_msg(self.names, expert_command, rosmsg.now_ns(self)))

    def _drive_expert(self) -> np.ndarray | None:  # caller holds the lock
        """The expert's command after this step, if it drives (a failing expert publishes nothing: the mux holds,
        and the joint states keep flowing)."""
        if self.driver is None:
            return None
        reason = self.driver.observe(self.sim.reward, self.sim.time_s)
        if reason:
            self.stats["takeovers"] += 1
            self.get_logger().info(f"taking over on {self.driver_input.topic}: {reason}")
        if not self.driver.active:
            return None
        try:
            return check_command(self.driver.command(self.sim.physics), len(self.names))
        except Exception as e:  # noqa: BLE001 - the robot's stream must not stop for the expert
            self.get_logger().error(f"scripted expert: {type(e).__name__}: {e}", throttle_duration_sec=1.0)
            return None

    def _start_episode(self) -> bool:  # caller holds the lock
        """Start the next episode; False when the seed list is used up (the station idles)."""
        k = self._episode + 1
        if self.seeds is not None and k >= len(self.seeds):
            return False
        tasks = self.station.sim.tasks
        self._episode = k
        q = self.sim.reset(tasks[k % len(tasks)], self.station.sim.seed + k if self.seeds is None else self.seeds[k])
        self._episode_start_ns = rosmsg.now_ns(self)
        self._command, self._hold = None, q
        self.servo.reset(q)
        self._joints = (q, self.sim.qvel())
        self._scene = (self.sim.task, self.sim.physics.data.qpos.copy())
        self._running = True
        if self.driver is not None:
            self.driver.start(self.sim.physics, self.sim.task, self.sim.seed, 0.0)
        self.prompt_pub.publish(String(data=self.sim.prompt))
        self._event({"event": "start", "episode": k, "prompt": self.sim.prompt, "task": self.sim.task,
                     "seed": self.sim.seed, "objects": self.sim.object_poses()}, self._episode_start_ns)
        self.get_logger().info(f"episode {k}: {self.sim.task} seed {self.sim.seed}: {self.sim.prompt!r}")
        return True

    def _end_episode(self, success: bool, reason: str, detail: str) -> None:  # caller holds the lock
        self._stop_episode(success)
        self._event({"event": "end", "episode": self._episode, "task": self.sim.task, "seed": self.sim.seed,
                     "success": success, "reason": reason, "detail": detail, "steps": self.sim.steps,
                     "reward": self.sim.reward, "max_reward": self.sim.max_reward,
                     "stage_steps": {str(s): n for s, n in sorted(self.sim.stage_steps.items())}})
        self.get_logger().info(f"episode {self._episode} ended: {reason} ({detail}) after {self.sim.steps} steps")
        if self.driver is not None and self.driver.end() and not self.driver.always:
            if self._active_source == self.driver_input.name:
                self.mode_pub.publish(String(data="policy"))
            else:  # someone else (a teleoperator) drives now: leave the mode to them
                self.get_logger().info(f"{self._active_source or 'nobody'} drives: not handing back")

    def _episode_label(self) -> str:
        return f"episode {self._episode}: {self.sim.task} seed {self.sim.seed}"

    def _publish_diagnostics(self) -> None:
        values = {**self.stats, "episode": self._episode, "sim_time_s": round(self.stats["ticks"] * self.sim.dt, 3),
                  **self.control.summary()}
        for name, ms in self.render_ms.items():
            values[f"{name}_frames"] = self.frames[name]
            values[f"{name}_render_ms_p50"] = round(float(np.median(ms)), 2) if ms else 0.0
        self.diag_pub.publish(rosmsg.diagnostic_array(rosmsg.now_ns(self), [(
            "sim_robot: episodes", DiagnosticStatus.OK, "running" if self._running else "between episodes",
            values)], hardware_id="aloha_sim"))


def main(args=None) -> int:
    from recap_ros.sim.aloha import RenderUnavailable

    return run_node("aloha_sim", AlohaSimNode, args, config_errors=(ValueError, RenderUnavailable))


if __name__ == "__main__":
    sys.exit(main())
