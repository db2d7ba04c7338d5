"""policy_server: observations in, chunked 50 Hz joint-position commands out, inference off the control path.

Wiring only: the tick's state machine lives in :mod:`recap_ros.control.policy_tick`, chunk execution, seam
blending and the safety stage in :mod:`recap_ros.control.stitching`, the fixed-rate loop and its period
statistics in :mod:`recap_ros.control.ticker`, β validation in :mod:`recap_ros.control.guidance`; the model
behind the policy runtime contract (``recap_ros.policy``).

Two processes (the ros2_control pattern: the real-time loop shares nothing it could wait for):

* this node's process: ROS callbacks (cameras, joint states, prompt, β, mux, services, publishing of
  chunks/stats and diagnostics) on one SingleThreadedExecutor, inference on a worker thread;
* the **tick process** (spawned, node ``<name>_tick`` in the same namespace): one deadline thread at
  SCHED_FIFO (when allowed) that runs :class:`~recap_ros.control.policy_tick.PolicyTick` and publishes the
  command. It holds its own GIL, so the 50 Hz stream never waits for a Python thread of this process that
  the scheduler preempted while holding the GIL (measured before the split: node p99 5.1 ms with both cores
  busy, a bare loop 0.07 ms).

The two talk through pipes: callbacks forward events (joint states, image stamps, start/stop, prompt resets,
the mux's source) and the worker forwards results to the tick; the tick sends back plan requests, what
became of each result, hold changes and a 1 Hz status. The tick process exits when this process closes the
pipe (or dies); if the tick process dies, this node reports ERROR on /diagnostics.

Topics (from the station): subscribes every camera's ``image_raw`` (SENSOR_QOS), ``robot.joint_states_topic``,
``policy.prompt_topic`` and ``policy.beta_topic`` (latched), ``mux.active_topic`` (latched), the station's
``episode_topic`` (start: its prompt and a re-plan from observations newer than the start; end: no commands
until the next start); publishes
``policy.command_topic`` (``robot.command_type``, from the tick process) every tick while started,
``policy.chunk_topic`` (JointTrajectory, stamp = observation time) and ``policy.stats_topic`` per accepted
chunk, ``/diagnostics``. Services ``~/start`` and ``~/stop`` (std_srvs/Trigger). Nothing is published before a
joint state is known, nor while stopped.

Parameters: ``station``; ``bundle``, ``backend``, ``prompt``, ``replan_every``, ``crossfade_ticks``,
``stale_after_s``, ``denoise_steps``, ``autostart`` (defaults from the station's ``policy:`` section); ``seed``,
``tick_priority`` / ``ros_priority`` / ``inference_priority`` (SCHED_FIFO priorities of the tick thread, the
ROS callback thread and the inference thread; 0 = normal scheduling; they fall back to normal scheduling when
refused), ``gil_switch_interval_ms``, ``retry_after_s``, ``inference_threads``, ``warmup``.
"""
from __future__ import annotations

import gc
import json
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
from recap_ros.control.freshness import taken_ns
from recap_ros.control.guidance import BETA_OFF, beta_problem
from recap_ros.control.policy_tick import POLICY_INPUT, PolicyTick, TickConfig
from recap_ros.control.stitching import HOLD_NO_CHUNK, JointLimits, Request
from recap_ros.control.ticker import CONTROL_PRIORITY, DeadlineLoop, PeriodMonitor, try_realtime
from recap_ros.nodes import ignore_stop_signals, run_node, start_child
from recap_ros.station import BETA_MIN, load_station

OK, WARN, ERROR = 0, 1, 2
TICK_START_TIMEOUT_S = 60.0  # the tick process imports rclpy and numpy; a loaded machine takes seconds


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


@dataclass(frozen=True)
class _TickSpec:
    """What the tick process needs (picklable)."""
    config: TickConfig
    period_s: float
    priority: int
    node_name: str
    namespace: str
    command_topic: str      # fully resolved (this node's remappings applied)
    command_type: str
    joint_names: tuple[str, ...]


def _tick_process(spec: _TickSpec, inbox, outbox) -> None:
    """Entry of the tick process: publish PolicyTick's command every period until the inbox closes."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    ignore_stop_signals()  # Ctrl-C, launch's SIGTERM or a hang-up reach the whole process group: the parent decides
    rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(spec.node_name, namespace=spec.namespace, start_parameter_services=False,
                             enable_rosout=False)  # it logs through the node's process
    pub = node.create_publisher(rosmsg.command_msg_class(spec.command_type), spec.command_topic,
                                rosmsg.COMMAND_QOS)
    done = threading.Event()
    send_lock = threading.Lock()

    def send(*msg) -> None:
        try:
            with send_lock:
                outbox.send(msg)
        except OSError:  # the node's process is gone
            done.set()

    tick = PolicyTick(spec.config, send)
    monitor = PeriodMonitor(spec.period_s)
    offset_ns = [0]  # ROS time - monotonic time, from the node's clock
    status_every = max(1, int(round(1.0 / spec.period_s)))

    def on_tick(periods: int, mono_ns: int) -> None:
        # ROS time of the instant the loop measured for this tick: stamps and the period monitor agree exactly
        now = mono_ns + offset_ns[0]
        try:
            while inbox.poll():
                kind, *args = inbox.recv()
                if kind == "clock":
                    offset_ns[0] = args[0]
                    now = mono_ns + offset_ns[0]
                elif kind == "close":
                    done.set()
                    return
                else:
                    tick.event(kind, *args)
        except (EOFError, OSError):
            done.set()
            return
        command = tick.step(periods, now)
        if command is not None:
            pub.publish(rosmsg.command_msg(spec.command_type, spec.joint_names, command, now))
        if monitor.ticks % status_every == 0:
            send("status", {**tick.status(), **monitor.summary(), "tick_scheduling": loop.scheduling})

    loop = DeadlineLoop(spec.period_s, on_tick, monitor,
                        lambda e: send("log_error", f"control tick failed: {type(e).__name__}: {e}"),
                        spec.priority, name="policy-tick")
    gc.collect()
    gc.freeze()  # nothing allocated so far is garbage; a full collection over it would stall a tick
    loop.start()
    send("ready", loop.scheduling)
    done.wait()
    loop.stop()
    node.destroy_node()
    rclpy.try_shutdown()


class PolicyServer(Node):
    def __init__(self, policy=None, **node_kwargs):
        """``policy``: an object implementing the policy runtime contract; None loads ``bundle``/``backend``."""
        super().__init__("policy_server", **node_kwargs)
        station = load_station(self.declare_parameter("station", "sim").value)
        self.station, robot, pol = station, station.robot, station.policy
        p = self._param
        bundle = p("bundle", pol.bundle, "model bundle name or path")
        backend = p("backend", pol.backend, "auto | torch | onnxruntime | onnxruntime-cuda | onnxruntime-trt | "
                                             "tensorrt | remote (policy.server)")
        self.prompt = p("prompt", pol.prompt, "task prompt until one arrives on the prompt topic").strip()
        replan_every = p("replan_every", pol.replan_every, "ticks executed before the next chunk is requested")
        crossfade = p("crossfade_ticks", pol.crossfade_ticks, "seam blend length in ticks")
        stale_after_s = p("stale_after_s", pol.stale_after_s, "observation age that holds")
        self.denoise_steps = p("denoise_steps", pol.denoise_steps, "flow-matching steps per chunk")
        autostart = p("autostart", pol.autostart, "start executing without a ~/start call")
        self.seed = p("seed", 0, "noise seed of the first chunk (+1 per chunk)")
        tick_priority = p("tick_priority", CONTROL_PRIORITY, "SCHED_FIFO priority of the tick thread (0: none)")
        ros_priority = p("ros_priority", 0, "SCHED_FIFO priority of the thread that builds and spins this node "
                         "(0: none, the default: a busy FIFO executor starves the other nodes of a small machine)")
        self.inference_priority = p("inference_priority", 0, "SCHED_FIFO priority of the inference thread "
                                    "(0: normal; its backend threads inherit it)")
        switch_ms = p("gil_switch_interval_ms", 0.5, "Python thread switch interval (GIL hand-over latency)")
        retry_after_s = p("retry_after_s", 0.5, "wait after a failed inference before asking again")
        threads = p("inference_threads", pol.threads, "CPU threads of the torch / onnxruntime backend (0: its "
                    "default; station policy.threads)")
        self.warmup = p("warmup", True, "run one inference at start-up so the first chunk is not slow")
        if switch_ms > 0:
            sys.setswitchinterval(switch_ms / 1000.0)
        if ros_priority > 0:
            self.get_logger().info(f"ROS callback thread: {try_realtime(ros_priority)}")

        if policy is None and backend == "remote":
            from recap_ros.serve.client import connect_remote

            policy = connect_remote(pol, bundle, log=self.get_logger().warning)
        elif policy is None:
            from recap_ros.policy import load_policy

            # tensorrt engines for the station's step count are loaded (built when missing) now, never mid-run
            policy = load_policy(bundle, backend=backend, threads=threads or None,
                                 steps=(self.denoise_steps,) if backend in ("auto", "tensorrt") else None)
        policy.check_station(station)
        self.policy = policy
        self.names = robot.joint_names
        self.cameras = station.cameras
        self.limits = JointLimits.from_robot(robot)
        tick_config = TickConfig(self.limits, policy.info.chunk_len, replan_every, crossfade,
                                 int(stale_after_s * 1e9), int(retry_after_s * 1e9),
                                 tuple(c.image_topic for c in self.cameras), robot.joint_states_topic)
        PolicyTick(tick_config, lambda *_: None)  # checks replan_every / crossfade_ticks here, with a clear error

        # state of this process
        self._images: list[bytes | None] = [None] * len(self.cameras)  # newest serialized frame per camera
        self.beta = BETA_OFF
        self._active_source: str | None = None
        self._in_control = True
        self._running = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()   # tick reports / worker logs -> publishing timer
        self._job: _Job | None = None
        self._job_cv = threading.Condition()
        self._results: dict[Request, _Result] = {}             # sent to the tick, waiting for its verdict
        self._results_lock = threading.Lock()
        self._chunks = 0
        self._closing = threading.Event()
        self.hold_reason: str | None = HOLD_NO_CHUNK
        self._routine_hold_logged = False
        self.tick_status: dict = {}
        self.latencies_ms: deque[float] = deque(maxlen=200)
        self.stats = {"accepted": 0, "rejected": 0, "errors": 0, "last_delay_ticks": -1,
                      "last_ticks_per_chunk": -1, "last_error": ""}

        self.pub_chunk = self.create_publisher(JointTrajectory, pol.chunk_topic, rosmsg.EVENT_QOS)
        self.pub_stats = self.create_publisher(DiagnosticArray, pol.stats_topic, rosmsg.EVENT_QOS)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        spec = _TickSpec(tick_config, robot.period_s, tick_priority, f"{self.get_name()}_tick",
                         self.get_namespace(), self.resolve_topic_name(pol.command_topic), robot.command_type,
                         tuple(self.names))
        self._start_tick_process(spec)

        for i, cam in enumerate(self.cameras):
            # raw: the callback keeps the serialized frame and reads only its stamp; the worker deserialises the
            # newest frames when it plans (2 chunks/s), not every frame (3 x 30/s) in the ROS callback thread
            self.create_subscription(Image, cam.image_topic, lambda m, i=i: self._on_image(i, m),
                                     rosmsg.SENSOR_QOS, raw=True)
        self.create_subscription(JointState, robot.joint_states_topic, self._on_joint_state, rosmsg.COMMAND_QOS)
        self.create_subscription(String, pol.prompt_topic, self._on_prompt, rosmsg.LATCHED_QOS)
        self.create_subscription(Float64, pol.beta_topic, self._on_beta, rosmsg.LATCHED_QOS)
        self.create_subscription(String, station.mux.active_topic, self._on_active, rosmsg.LATCHED_QOS)
        # with history: the current episode's start (and prompt) reaches a server started after it
        self.create_subscription(String, station.episode_topic, self._on_episode, rosmsg.EVENT_HISTORY_QOS)
        self.create_service(Trigger, "~/start", self._on_start)
        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_timer(0.05, self._publish_outbox)
        self.create_timer(1.0, self._publish_diagnostics)

        self._worker = threading.Thread(target=self._work, name="policy-inference", daemon=True)
        self._worker.start()
        if autostart:
            self._running = True
            self._to_tick("start")
        info = policy.info
        self.get_logger().info(
            f"station '{station.name}', bundle {getattr(info, 'bundle_id', bundle)}: chunk {info.chunk_len} x "
            f"{info.action_dim} at {robot.control_rate_hz:g} Hz, re-plan every {replan_every} ticks, cross-fade "
            f"{crossfade} ticks, stale after {stale_after_s:g} s, commands on {spec.command_topic} "
            f"({robot.command_type}) from {spec.node_name} ({self._tick_scheduling}); "
            + ("autostart" if autostart else "waiting for ~/start"))

    def _param(self, name: str, default, description: str):
        return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

    # ------------------------------------------------------------------------------------ tick process
    def _start_tick_process(self, spec: _TickSpec) -> None:
        self._send_lock = threading.Lock()
        self._tick_proc, self._tick_inbox, self._tick_outbox, (_ready, self._tick_scheduling) = start_child(
            _tick_process, spec, spec.node_name, TICK_START_TIMEOUT_S)
        self._to_tick("clock", rosmsg.now_ns(self) - time.monotonic_ns())
        self._reader = threading.Thread(target=self._read_tick, name="policy-tick-reports", daemon=True)
        self._reader.start()

    def _to_tick(self, *msg) -> None:
        try:
            with self._send_lock:
                self._tick_inbox.send(msg)
        except OSError:  # the tick process is gone: _read_tick reports it
            pass

    def _read_tick(self) -> None:
        while True:
            try:
                kind, *args = self._tick_outbox.recv()
            except (EOFError, OSError):
                break
            if kind == "plan":
                self._plan(*args)
            else:
                self._outbox.put((kind, args))
        if not self._closing.is_set():
            self._tick_proc.join(1.0)
            self._outbox.put(("tick_exit", [self._tick_proc.exitcode]))

    # ------------------------------------------------------------------------------------ ROS callbacks
    def _on_image(self, i: int, raw: bytes) -> None:
        try:
            stamp = taken_ns(rosmsg.header_stamp_ns(raw), rosmsg.now_ns(self))  # the older of stamp, receipt
        except rosmsg.MessageError as e:
            self.get_logger().error(f"{self.cameras[i].image_topic}: {e}", throttle_duration_sec=5.0)
            return
        self._images[i] = raw
        self._to_tick("image", i, stamp)

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
        self._to_tick("joint", q, taken_ns(rosmsg.stamp_to_ns(msg.header.stamp), rosmsg.now_ns(self)))

    def _on_prompt(self, msg: String) -> None:
        prompt = msg.data.strip()
        if not prompt:
            self.get_logger().warning(f"ignoring empty prompt on {self.station.policy.prompt_topic}")
        elif prompt != self.prompt:
            self.prompt = prompt
            self.get_logger().info(f"prompt: '{prompt}': re-planning from the current state")
            self._to_tick("reset")

    def _on_episode(self, msg: String) -> None:
        """Episode start: its prompt, and a re-plan from observations stamped after it; end: publish nothing
        until the next start (the mux then holds the robot where it is)."""
        try:
            event = json.loads(msg.data)
            kind, stamp_ns = event["event"], int(event["stamp_ns"])
            prompt = str(event.get("prompt") or "").strip() if kind == "start" else ""
        except (ValueError, KeyError, TypeError) as e:
            self.get_logger().warning(f"ignored episode event {msg.data[:200]!r}: {e}")
            return
        if kind not in ("start", "end"):
            return
        if prompt:
            self.prompt = prompt
        self._to_tick("episode", kind == "start", stamp_ns)

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
        self._in_control = msg.data == POLICY_INPUT
        self._to_tick("active", msg.data)

    def _on_start(self, _req, resp):
        self._running = True
        self._to_tick("start")
        resp.success, resp.message = True, "started: planning from the current joint state"
        return resp

    def _on_stop(self, _req, resp):
        self._running = False
        self._to_tick("stop")
        resp.success, resp.message = True, "stopped: no more commands until ~/start"
        return resp

    # ------------------------------------------------------------------------------------ inference worker
    def _plan(self, request: Request, q: np.ndarray, stamp_ns: int) -> None:
        """A plan request from the tick: the newest frames, prompt and β go with it to the worker."""
        job = _Job(request, tuple(self._images), q, self.prompt, self.beta, self.seed + self._chunks, stamp_ns)
        self._chunks += 1
        with self._job_cv:
            self._job = job  # replaces a job not yet started (it would be stale anyway)
            self._job_cv.notify()

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
                self._outbox.put(("log_error", [f"warm-up inference (β = {beta}) failed: {type(e).__name__}: {e}"]))
                return
            self._outbox.put(("log", [f"warm-up inference (β = {beta}) took "
                                      f"{(time.perf_counter() - t0) * 1e3:.0f} ms"]))

    def _work(self) -> None:
        self._outbox.put(("log", [f"inference thread: {try_realtime(self.inference_priority)}"]))
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
            result = _Result(job, chunk, error, (time.perf_counter() - t0) * 1e3)
            with self._results_lock:
                self._results[job.request] = result
            self._to_tick("result", job.request, None if chunk is None else np.asarray(chunk), error)

    def _take_result(self, request: Request) -> _Result | None:
        with self._results_lock:
            return self._results.pop(request, None)

    # ------------------------------------------------------------------------------------ publishing
    def _publish_outbox(self) -> None:
        log = self.get_logger()
        for kind, args in _drain(self._outbox):
            if kind in ("accepted", "rejected", "failed"):  # the tick's verdict on a result: args[0] = request
                res = self._take_result(args[0])
                if res is not None:
                    self.latencies_ms.append(res.latency_ms)
            if kind == "accepted":
                _, acc, accept_tick, accept_ns = args
                self.stats["accepted"] += 1
                self.stats["last_delay_ticks"] = acc.delay_ticks
                self.stats["last_ticks_per_chunk"] = acc.replaced_ticks
                if res is not None:
                    self._publish_chunk(res, acc, accept_tick, accept_ns)
            elif kind in ("rejected", "failed"):
                _, reason, current = args
                self.stats["rejected" if kind == "rejected" else "errors"] += 1
                if current:
                    text = f"chunk rejected: {reason}" if kind == "rejected" else f"inference failed: {reason}"
                    self.stats["last_error"] = text
                    log.error(f"{text}; holding", throttle_duration_sec=2.0)
            elif kind == "hold":
                self.hold_reason = args[0]
                if args[0] is None:
                    log.info("executing chunks")
                    self._routine_hold_logged = False
                elif not PolicyTick.routine_hold(args[0]):
                    log.warning(f"holding: {args[0]}", throttle_duration_sec=2.0)
                elif not self._routine_hold_logged:  # once per episode start, not once per observation awaited
                    log.info(f"holding: {args[0]}")
                    self._routine_hold_logged = True
            elif kind == "status":
                self.tick_status = args[0]
            elif kind == "tick_exit":
                self.stats["last_error"] = f"tick process exited (exit code {args[0]}): no commands are published"
                log.error(self.stats["last_error"])
            elif kind == "log_error":
                self.stats["last_error"] = args[0]
                log.error(args[0], throttle_duration_sec=1.0)
            else:
                log.info(args[0])

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
        self._to_tick("clock", rosmsg.now_ns(self) - time.monotonic_ns())
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        status = self.tick_status
        hold = self.hold_reason
        if not self._tick_proc.is_alive():
            level, message = ERROR, f"tick process exited (exit code {self._tick_proc.exitcode})"
        elif not self._running:
            level, message = OK, "stopped"
        elif not self._in_control:
            level, message = OK, f"following the robot: mux source is '{self._active_source}'"
        elif hold:
            level, message = OK if PolicyTick.routine_hold(hold) else WARN, f"holding: {hold}"
        else:
            level, message = OK, "executing"
        values = {"inference_latency_ms_last": f"{lat[-1]:.1f}", "inference_latency_ms_p50": f"{np.median(lat):.1f}",
                  "inference_latency_ms_max": f"{lat.max():.1f}", "delay_ticks": self.stats["last_delay_ticks"],
                  "ticks_per_chunk": self.stats["last_ticks_per_chunk"], "hold_reason": hold or "",
                  "beta": f"{self.beta:g}", "prompt": self.prompt,
                  "chunks_accepted": self.stats["accepted"], "chunks_rejected": self.stats["rejected"],
                  "inference_errors": self.stats["errors"], "last_error": self.stats["last_error"],
                  "tick_scheduling": self._tick_scheduling,
                  **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in status.items()
                     if k not in ("hold_reason", "tick_scheduling")}}
        self.pub_diag.publish(rosmsg.diagnostic_array(rosmsg.now_ns(self), [("policy_server", level, message,
                                                                            values)]))

    def destroy_node(self):
        self._closing.set()
        self._to_tick("close")
        self._tick_inbox.close()
        self._tick_proc.join(timeout=3.0)
        if self._tick_proc.is_alive():
            self._tick_proc.kill()
        with self._job_cv:
            self._job_cv.notify_all()
        self._worker.join(timeout=2.0)
        return super().destroy_node()


def main(args=None) -> int:
    from recap_ros.policy import PolicyError

    return run_node("policy_server", PolicyServer, args, config_errors=(PolicyError,))


if __name__ == "__main__":
    sys.exit(main())
