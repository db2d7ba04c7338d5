"""policy_server: observations in, chunked 50 Hz joint-position commands out, inference off the control path.

Wiring only: chunk execution, seam blending and the safety stage live in :mod:`recap_ros.control.stitching`,
the fixed-rate loop and its period statistics in :mod:`recap_ros.control.ticker`, β validation in
:mod:`recap_ros.control.guidance`; the model behind the policy runtime contract (``recap_ros.policy``).

Threads: ROS callbacks (cameras, joint states, prompt, β, mux, services, publishing of chunks/stats and
diagnostics) run on one SingleThreadedExecutor (rclpy's MultiThreadedExecutor costs milliseconds of GIL time
per callback, which the tick then waits for); inference runs on its own worker thread; the control tick runs on
a dedicated deadline thread (SCHED_FIFO when allowed). Only the tick touches the executor state; callbacks hand
it control events, the worker hands it results, and it hands chunks/stats to the publishing timer, all through
queues.

Topics (from the station): subscribes every camera's ``image_raw`` (SENSOR_QOS), ``robot.joint_states_topic``,
``policy.prompt_topic`` and ``policy.beta_topic`` (latched), ``mux.active_topic`` (latched); publishes
``policy.command_topic`` (``robot.command_type``) every tick while started, ``policy.chunk_topic``
(JointTrajectory, stamp = observation time) and ``policy.stats_topic`` per accepted chunk, ``/diagnostics``.
Services ``~/start`` and ``~/stop`` (std_srvs/Trigger).

Behaviour: while started and driving (the mux's active source is ``policy``, or no mux has spoken), a plan is
requested every ``replan_every`` ticks with the newest observation, the current prompt and β; the result starts
at its measured delay and is cross-faded in. While another source drives, the command follows the measured
position (so the mux input stays live and a hand-back cannot jump); on hand-back, on start and on a new
prompt the running chunk is dropped and a new one is planned from the current joint state. A camera image or
joint state older than ``stale_after_s`` (header stamp) holds the last command and is reported; so do invalid
chunks (NaN), inference errors and inference overruns. Nothing is published before a joint state is known,
nor while stopped.

Parameters: ``station``; ``bundle``, ``backend``, ``prompt``, ``replan_every``, ``crossfade_ticks``,
``stale_after_s``, ``denoise_steps``, ``autostart`` (defaults from the station's ``policy:`` section); ``seed``,
``tick_priority`` / ``ros_priority`` / ``inference_priority`` (SCHED_FIFO
priorities of the tick thread, the ROS callback thread and the inference thread; 0 = normal scheduling; they
fall back to normal scheduling when refused), ``gil_switch_interval_ms``, ``retry_after_s``,
``inference_threads``, ``warmup``.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from recap_ros import rosmsg
from recap_ros.control.guidance import BETA_OFF, beta_problem
from recap_ros.control.stitching import (
    ChunkExecutor,
    ChunkRejected,
    JointLimits,
    Request,
)
from recap_ros.control.ticker import CONTROL_PRIORITY, DeadlineLoop, PeriodMonitor, try_realtime
from recap_ros.nodes import run_node
from recap_ros.station import BETA_MIN, load_station

OK, WARN, ERROR = 0, 1, 2
POLICY_INPUT = "policy"


def _drain(q: queue.SimpleQueue):
    """The items already in ``q``, oldest first, without blocking."""
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


@dataclass(frozen=True)
class _Job:
    request: Request
    images: tuple           # serialized sensor_msgs/Image, station camera order (base, left wrist, right wrist)
    state: np.ndarray
    prompt: str
    beta: float
    seed: int
    stamp_ns: int           # observation time: the chunk's index 0


@dataclass(frozen=True)
class _Result:
    job: _Job
    chunk: np.ndarray | None
    error: str | None
    latency_ms: float


class PolicyServer(Node):
    def __init__(self, policy=None, **node_kwargs):
        """``policy``: an object implementing the policy runtime contract; None loads ``bundle``/``backend``."""
        super().__init__("policy_server", **node_kwargs)
        station = load_station(self.declare_parameter("station", "sim").value)
        self.station, robot, pol = station, station.robot, station.policy
        p = self._param
        bundle = p("bundle", pol.bundle, "model bundle name or path")
        backend = p("backend", pol.backend, "auto | torch | onnxruntime | tensorrt")
        self.prompt = p("prompt", pol.prompt, "task prompt until one arrives on the prompt topic").strip()
        replan_every = p("replan_every", pol.replan_every, "ticks executed before the next chunk is requested")
        crossfade = p("crossfade_ticks", pol.crossfade_ticks, "seam blend length in ticks")
        self.stale_after_ns = int(p("stale_after_s", pol.stale_after_s, "observation age that holds") * 1e9)
        self.denoise_steps = p("denoise_steps", pol.denoise_steps, "flow-matching steps per chunk")
        autostart = p("autostart", pol.autostart, "start executing without a ~/start call")
        self.seed = p("seed", 0, "noise seed of the first chunk (+1 per chunk)")
        tick_priority = p("tick_priority", CONTROL_PRIORITY, "SCHED_FIFO priority of the tick thread (0: none)")
        ros_priority = p("ros_priority", 0, "SCHED_FIFO priority of the thread that builds and spins this node "
                         "(0: none, the default: a busy FIFO executor starves the other nodes of a small machine)")
        self.inference_priority = p("inference_priority", 0, "SCHED_FIFO priority of the inference thread "
                                    "(0: normal; its backend threads inherit it)")
        switch_ms = p("gil_switch_interval_ms", 0.5, "Python thread switch interval (GIL hand-over latency)")
        self.retry_ns = int(p("retry_after_s", 0.5, "wait after a failed inference before asking again") * 1e9)
        threads = p("inference_threads", 0, "CPU threads of the torch / onnxruntime backend (0: its default)")
        self.warmup = p("warmup", True, "run one inference at start-up so the first chunk is not slow")
        if switch_ms > 0:
            sys.setswitchinterval(switch_ms / 1000.0)
        if ros_priority > 0:
            self.get_logger().info(f"ROS callback thread: {try_realtime(ros_priority)}")

        if policy is None:
            from recap_ros.policy import load_policy

            policy = load_policy(bundle, backend=backend, threads=threads or None)
        policy.check_station(station)
        self.policy = policy
        self.names = robot.joint_names
        self.cameras = station.cameras
        self.limits = JointLimits.from_robot(robot)
        self.core = ChunkExecutor(self.limits, policy.info.chunk_len, replan_every, crossfade)
        self.monitor = PeriodMonitor(robot.period_s)

        # state shared with the tick thread (single assignments of immutable values; queues for events)
        self._images: list[tuple[bytes, int] | None] = [None] * len(self.cameras)  # serialized frame, stamp
        self._joint: tuple[np.ndarray, int] | None = None
        self.beta = BETA_OFF
        self._active_source: str | None = None
        self._control: queue.SimpleQueue = queue.SimpleQueue()   # callbacks -> tick
        self._results: queue.SimpleQueue = queue.SimpleQueue()   # worker -> tick
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()    # tick -> publishing timer
        self._mono_to_ros_ns = rosmsg.now_ns(self) - time.monotonic_ns()  # refreshed with the diagnostics
        self._job: _Job | None = None
        self._job_cv = threading.Condition()
        self._closing = threading.Event()
        # tick-thread state
        self._running = False
        self._in_control = True
        self._need_reset = True
        self._retry_at_ns = 0
        self._chunks = 0
        self._reported_hold: str | None = None
        # statistics for diagnostics
        self.latencies_ms: deque[float] = deque(maxlen=200)
        self.stats = {"accepted": 0, "rejected": 0, "errors": 0, "last_delay_ticks": -1,
                      "last_ticks_per_chunk": -1, "last_error": ""}

        self.pub_cmd = self.create_publisher(rosmsg.command_msg_class(robot.command_type), pol.command_topic,
                                             rosmsg.COMMAND_QOS)
        self.pub_chunk = self.create_publisher(JointTrajectory, pol.chunk_topic, rosmsg.EVENT_QOS)
        self.pub_stats = self.create_publisher(DiagnosticArray, pol.stats_topic, rosmsg.EVENT_QOS)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        for i, cam in enumerate(self.cameras):
            # raw: the callback keeps the serialized frame and reads only its stamp; the worker deserialises the
            # newest frames when it plans (2 chunks/s), not every frame (3 x 30/s) in the ROS callback threads
            self.create_subscription(Image, cam.image_topic, lambda m, i=i: self._on_image(i, m),
                                     rosmsg.SENSOR_QOS, raw=True)
        self.create_subscription(JointState, robot.joint_states_topic, self._on_joint_state, rosmsg.COMMAND_QOS)
        self.create_subscription(String, pol.prompt_topic, self._on_prompt, rosmsg.LATCHED_QOS)
        self.create_subscription(Float64, pol.beta_topic, self._on_beta, rosmsg.LATCHED_QOS)
        self.create_subscription(String, station.mux.active_topic, self._on_active, rosmsg.LATCHED_QOS)
        self.create_service(Trigger, "~/start", self._on_start)
        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_timer(0.05, self._publish_outbox)
        self.create_timer(1.0, self._publish_diagnostics)

        self._worker = threading.Thread(target=self._work, name="policy-inference", daemon=True)
        self._worker.start()
        self._loop = DeadlineLoop(robot.period_s, self._tick, self.monitor, self._on_tick_error, tick_priority,
                                  name="policy-tick")
        self._loop.start()
        if autostart:
            self._control.put(("start", "autostart"))
        info = policy.info
        self.get_logger().info(
            f"station '{station.name}', bundle {getattr(info, 'bundle_id', bundle)}: chunk {info.chunk_len} x "
            f"{info.action_dim} at {robot.control_rate_hz:g} Hz, re-plan every {replan_every} ticks, cross-fade "
            f"{crossfade} ticks, stale after {self.stale_after_ns / 1e9:g} s, "
            f"commands on {pol.command_topic} ({robot.command_type}); "
            + ("autostart" if autostart else "waiting for ~/start"))

    def _param(self, name: str, default, description: str):
        return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

    # ------------------------------------------------------------------------------------ ROS callbacks
    def _on_image(self, i: int, raw: bytes) -> None:
        try:
            stamp = rosmsg.header_stamp_ns(raw) or rosmsg.now_ns(self)
        except rosmsg.MessageError as e:
            self.get_logger().error(f"{self.cameras[i].image_topic}: {e}", throttle_duration_sec=5.0)
            return
        self._images[i] = (raw, stamp)

    def _on_joint_state(self, msg: JointState) -> None:
        try:
            q = rosmsg.positions_from_joint_state(msg, self.names)
        except rosmsg.MessageError as e:
            self.get_logger().warning(f"ignoring {self.station.robot.joint_states_topic}: {e}",
                                   throttle_duration_sec=2.0)
            return
        if not np.all(np.isfinite(q)):
            self.get_logger().warning(f"ignoring non-finite joint state {q.tolist()}", throttle_duration_sec=2.0)
            return
        self._joint = (q, rosmsg.stamp_to_ns(msg.header.stamp) or rosmsg.now_ns(self))

    def _on_prompt(self, msg: String) -> None:
        prompt = msg.data.strip()
        if not prompt:
            self.get_logger().warning(f"ignoring empty prompt on {self.station.policy.prompt_topic}")
        elif prompt != self.prompt:
            self.prompt = prompt
            self.get_logger().info(f"prompt: '{prompt}': re-planning from the current state")
            self._control.put(("reset", "new prompt"))

    def _on_beta(self, msg: Float64) -> None:
        problem = beta_problem(msg.data)
        if problem:
            self.get_logger().error(f"ignoring β from {self.station.policy.beta_topic}: {problem}; "
                                    f"keeping β = {self.beta}")
        elif msg.data != self.beta:
            self.get_logger().info(f"β {self.beta} -> {msg.data} (applied from the next chunk)")
            self.beta = float(msg.data)

    def _on_active(self, msg: String) -> None:
        self._active_source = msg.data
        self._control.put(("active", msg.data))

    def _on_start(self, _req, resp):
        self._control.put(("start", "~/start"))
        resp.success, resp.message = True, "started: planning from the current joint state"
        return resp

    def _on_stop(self, _req, resp):
        self._control.put(("stop", "~/stop"))
        resp.success, resp.message = True, "stopped: no more commands until ~/start"
        return resp

    # ------------------------------------------------------------------------------------ inference worker
    def _warm_up(self) -> None:
        """One unguided and one guided (batch of 2) inference, so the first real chunks are not slow."""
        images = [np.zeros((c.height, c.width, 3), np.uint8) for c in self.cameras]
        state = self.limits.clamp(np.zeros(self.limits.n))
        for beta in (BETA_OFF, BETA_MIN):
            t0 = time.perf_counter()
            try:
                self.policy.infer(images=images, state=state, prompt=self.prompt, beta=beta, seed=self.seed,
                                  steps=self.denoise_steps)
            except Exception as e:  # noqa: BLE001 - the same error is reported for every real request
                self._outbox.put(("error", f"warm-up inference (β = {beta}) failed: {type(e).__name__}: {e}"))
                return
            self._outbox.put(("log", f"warm-up inference (β = {beta}) took {(time.perf_counter() - t0) * 1e3:.0f} ms"))

    def _work(self) -> None:
        self._outbox.put(("log", f"inference thread: {try_realtime(self.inference_priority)}"))
        if self.warmup:
            self._warm_up()
        while not self._closing.is_set():
            with self._job_cv:
                self._job_cv.wait_for(lambda: self._job is not None or self._closing.is_set(), timeout=0.5)
                job, self._job = self._job, None
            if job is None:
                continue
            t0 = time.perf_counter()
            chunk, error = None, None
            try:
                images = [rosmsg.image_from_msg(deserialize_message(raw, Image)) for raw in job.images]
                chunk = self.policy.infer(images=images, state=job.state, prompt=job.prompt, beta=job.beta,
                                          seed=job.seed, steps=self.denoise_steps)
            except Exception as e:  # noqa: BLE001 - any model failure is reported and held, never fatal
                error = f"{type(e).__name__}: {e}"
            self._results.put(_Result(job, chunk, error, (time.perf_counter() - t0) * 1e3))

    def _submit(self, now_ns: int, q: np.ndarray) -> None:
        request = self.core.request()
        job = _Job(request, tuple(entry[0] for entry in self._images), q, self.prompt, self.beta,
                   self.seed + self._chunks, now_ns)
        self._chunks += 1
        with self._job_cv:
            self._job = job  # replaces a job not yet started (it would be stale anyway)
            self._job_cv.notify()

    # ------------------------------------------------------------------------------------ control tick
    def _on_tick_error(self, e: Exception) -> None:
        if not self.context.ok():  # shutting down: publishers are gone, nothing to report
            return
        self.get_logger().error(f"control tick failed: {type(e).__name__}: {e}", throttle_duration_sec=1.0)

    def _tick(self, periods: int, mono_ns: int) -> None:
        # ROS time of the instant the loop measured for this tick: stamps and the period monitor agree exactly
        now = mono_ns + self._mono_to_ros_ns
        self._apply_control_events()
        self._apply_results(now)
        if not self._running:
            return
        joint = self._joint
        joint_fresh = joint is not None and now - joint[1] <= self.stale_after_ns
        if not self._in_control:
            if joint_fresh:
                self.core.reset(joint[0])  # follow the robot: the hand-back starts where it is
            self._publish_command(self.core.step(periods), now)
            return
        if self._need_reset:
            if not joint_fresh:
                self._report_hold(self._stale_reason(now) or "waiting for a joint state")
                self._publish_command(self.core.step(periods), now)
                return
            self.core.reset(joint[0])
            self._need_reset = False
        stale = self._stale_reason(now)
        if stale:
            self.core.hold(f"stale observation: {stale}")
        elif self.core.wants_plan() and now >= self._retry_at_ns:
            self._submit(now, joint[0])
        tick = self.core.step(periods)
        self._report_hold(tick.hold_reason if tick else None)
        self._publish_command(tick, now)

    def _publish_command(self, tick, now_ns: int) -> None:
        if tick is not None:
            self.pub_cmd.publish(rosmsg.command_msg(self.station.robot.command_type, self.names, tick.command,
                                                    now_ns))

    def _stale_reason(self, now_ns: int) -> str | None:
        """Why the observation cannot be used (a stable text, so a hold is reported once), or None."""
        limit = f"{self.stale_after_ns / 1e9:g} s"
        for cam, entry in zip(self.cameras, self._images):
            if entry is None:
                return f"no image yet on {cam.image_topic}"
            if now_ns - entry[1] > self.stale_after_ns:
                return f"{cam.image_topic} image older than {limit}"
        joint = self._joint
        if joint is None:
            return f"no joint state yet on {self.station.robot.joint_states_topic}"
        if now_ns - joint[1] > self.stale_after_ns:
            return f"{self.station.robot.joint_states_topic} older than {limit}"
        return None

    def _report_hold(self, reason: str | None) -> None:
        if reason != self._reported_hold:
            self._reported_hold = reason
            self._outbox.put(("hold", reason))

    def _apply_control_events(self) -> None:
        for kind, arg in _drain(self._control):
            if kind == "start":
                self._running, self._need_reset = True, True
            elif kind == "stop":
                self._running = False
                self.core.hold("stopped")
            elif kind == "reset":
                self._need_reset = True
            elif kind == "active":
                in_control = arg == POLICY_INPUT
                if in_control and not self._in_control:
                    self._need_reset = True
                    self._outbox.put(("log", "mux handed control back: re-planning from the current state"))
                self._in_control = in_control

    def _apply_results(self, now_ns: int) -> None:
        for res in _drain(self._results):
            self.latencies_ms.append(res.latency_ms)
            if res.error is not None:
                self.core.cancel(res.job.request)
                self.stats["errors"] += 1
                if res.job.request.generation == self.core.generation:
                    self.core.hold(f"inference failed: {res.error}")
                    self._retry_at_ns = now_ns + self.retry_ns
                    self._outbox.put(("error", f"inference failed: {res.error}"))
                continue
            try:
                acc = self.core.accept(res.job.request, res.chunk)
            except ChunkRejected as e:
                self.stats["rejected"] += 1
                if res.job.request.generation == self.core.generation:
                    self._retry_at_ns = now_ns + self.retry_ns
                    self._outbox.put(("error", f"chunk rejected: {e}"))
                continue
            self.stats["accepted"] += 1
            self.stats["last_delay_ticks"] = acc.delay_ticks
            self.stats["last_ticks_per_chunk"] = acc.replaced_ticks
            self._outbox.put(("chunk", (res, acc, self.core.tick, now_ns)))

    # ------------------------------------------------------------------------------------ publishing
    def _publish_outbox(self) -> None:
        log = self.get_logger()
        for kind, arg in _drain(self._outbox):
            if kind == "chunk":
                self._publish_chunk(*arg)
            elif kind == "error":
                self.stats["last_error"] = arg
                log.error(f"{arg}; holding", throttle_duration_sec=2.0)
            elif kind == "hold":
                if arg is None:
                    log.info("executing chunks")
                else:
                    log.warning(f"holding: {arg}", throttle_duration_sec=2.0)
            else:
                log.info(arg)

    def _publish_chunk(self, res: _Result, acc, accept_tick: int, accept_ns: int) -> None:
        job = res.job
        chunk = np.asarray(res.chunk, dtype=np.float64)
        self.pub_chunk.publish(rosmsg.joint_trajectory_msg(self.names, chunk, job.stamp_ns, self.limits.dt))
        values = {"peak_velocity_ratio": f"{acc.stats.peak_velocity_ratio:.4f}",
                  "min_limit_margin": f"{acc.stats.min_limit_margin:.4f}", "beta": f"{job.beta:g}",
                  "latency_ms": f"{res.latency_ms:.2f}", "delay_ticks": acc.delay_ticks,
                  "request_tick": job.request.tick, "accept_tick": accept_tick,
                  "chunk_stamp_ns": job.stamp_ns, "accept_stamp_ns": accept_ns,
                  "ticks_on_previous": acc.replaced_ticks, "seed": job.seed}
        self.pub_stats.publish(rosmsg.diagnostic_array(
            rosmsg.now_ns(self), [("policy_server: chunk", OK, job.prompt, values)]))

    def _publish_diagnostics(self) -> None:
        self._mono_to_ros_ns = rosmsg.now_ns(self) - time.monotonic_ns()
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        hold = self.core.hold_reason
        if not self._running:
            level, message = OK, "stopped"
        elif not self._in_control:
            level, message = OK, f"following the robot: mux source is '{self._active_source}'"
        elif hold:
            level, message = WARN, f"holding: {hold}"
        else:
            level, message = OK, "executing"
        values = {"inference_latency_ms_last": f"{lat[-1]:.1f}", "inference_latency_ms_p50": f"{np.median(lat):.1f}",
                  "inference_latency_ms_max": f"{lat.max():.1f}", "delay_ticks": self.stats["last_delay_ticks"],
                  "ticks_per_chunk": self.stats["last_ticks_per_chunk"], "holds": self.core.holds,
                  "hold_reason": hold or "", "beta": f"{self.beta:g}", "prompt": self.prompt,
                  "chunks_accepted": self.stats["accepted"], "chunks_rejected": self.stats["rejected"],
                  "inference_errors": self.stats["errors"], "last_error": self.stats["last_error"],
                  **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in self.monitor.summary().items()}}
        values["tick_scheduling"] = self._loop.scheduling
        self.pub_diag.publish(rosmsg.diagnostic_array(rosmsg.now_ns(self), [("policy_server", level, message,
                                                                            values)]))

    def destroy_node(self):
        self._closing.set()
        self._loop.stop()
        with self._job_cv:
            self._job_cv.notify_all()
        self._worker.join(timeout=2.0)
        return super().destroy_node()


def main(args=None) -> int:
    from recap_ros.policy import PolicyError

    return run_node("policy_server", PolicyServer, args, config_errors=(PolicyError,))


if __name__ == "__main__":
    sys.exit(main())
