"""Station schema: one YAML file under ``config/stations/`` describes a whole robot station.

It is the single source of truth for the node graph (see :mod:`recap_ros.launch_graph`), topics, joints,
limits, cameras, model, mux and recorder. Both ``station.launch.py`` and the no-ROS ``recap-station`` runner
read it through :func:`load_station`. Every error names the file, the key and the bad value.

ROS-free: only PyYAML and the standard library.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recap_ros import paths

N_JOINTS = 14
COMMAND_TYPES = ("joint_state", "float64_multi_array")
CAMERA_ROLES = ("base", "left_wrist", "right_wrist")
RESIZE_MODES = ("letterbox", "resize")
BACKENDS = ("auto", "torch", "onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "remote")  # remote: a recap-serve (policy.server)
DEFAULT_RAMP_S = 0.1  # default max_acceleration = max_velocity / this (a joint reaches full speed in 0.1 s)
BETA_MIN, BETA_MAX = 1.5, 2.5
SIMULATORS = ("kinematic", "aloha")  # sim.simulator: the built-in kinematic sim (sim_robot), MuJoCo ALOHA (aloha_sim)
ALOHA_TASKS = ("transfer_cube", "insertion")  # gym-aloha's tasks (sim.tasks of an aloha station)
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_TOPIC_RE = re.compile(r"^/?[A-Za-z][A-Za-z0-9_/]*$")
_SERVER_RE = re.compile(r"^wss?://[^\s/?#]+(/\S*)?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class StationConfigError(ValueError):
    """A station file is invalid. The message names the file, the key and the bad value."""

    def __init__(self, file: str | os.PathLike, key: str, value: Any, why: str):
        self.file, self.key, self.value, self.why = str(file), key, value, why
        super().__init__(f"{file}: {key}: {why} (got {value!r})")


# --------------------------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class Joint:
    name: str
    lower: float
    upper: float
    max_velocity: float  # rad/s (or unit/s for grippers)
    max_acceleration: float  # rad/s² (unit/s²); default max_velocity / DEFAULT_RAMP_S: full speed in 0.1 s


@dataclass(frozen=True)
class Robot:
    type: str  # "sim" or "hardware"
    control_rate_hz: float
    joint_states_topic: str
    command_topic: str
    command_type: str
    joints: tuple[Joint, ...]

    @property
    def joint_names(self) -> list[str]:
        return [j.name for j in self.joints]

    @property
    def lower(self) -> list[float]:
        return [j.lower for j in self.joints]

    @property
    def upper(self) -> list[float]:
        return [j.upper for j in self.joints]

    @property
    def max_velocity(self) -> list[float]:
        return [j.max_velocity for j in self.joints]

    @property
    def max_acceleration(self) -> list[float]:
        return [j.max_acceleration for j in self.joints]

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_rate_hz


@dataclass(frozen=True)
class Camera:
    name: str
    role: str
    source: str  # "sim", a V4L2 index or /dev path, file:<path>, gst:<pipeline>, rtsp://..., http(s)://...
    width: int
    height: int
    fps: float
    output_width: int
    output_height: int
    resize: str
    jpeg_quality: int
    frame_id: str
    camera_info_file: str
    loop: bool

    @property
    def image_topic(self) -> str:
        return f"/cameras/{self.name}/image_raw"

    @property
    def compressed_topic(self) -> str:
        return f"/cameras/{self.name}/image_raw/compressed"

    @property
    def camera_info_topic(self) -> str:
        return f"/cameras/{self.name}/camera_info"


@dataclass(frozen=True)
class Policy:
    bundle: str
    backend: str
    prompt: str
    beta: float
    beta_table: dict[str, float]
    denoise_steps: int
    replan_every: int
    crossfade_ticks: int
    stale_after_s: float
    autostart: bool
    command_topic: str
    chunk_topic: str
    beta_topic: str
    prompt_topic: str
    stats_topic: str
    threads: int = 1        # CPU threads of the torch / onnxruntime backend (0: the backend's default)
    server: str = ""        # backend remote: ws:// or wss:// URL of a recap-serve
    api_key_env: str = ""   # backend remote: environment variable holding its API key ("": none)


@dataclass(frozen=True)
class MuxInput:
    name: str
    topic: str
    type: str
    priority: int
    timeout_s: float
    human: bool


@dataclass(frozen=True)
class MuxLock:
    name: str
    topic: str
    priority: int
    latching: bool
    heartbeat_timeout_s: float | None


@dataclass(frozen=True)
class Mux:
    default_input: str
    mode_topic: str
    override_topic: str
    override_input: str
    active_topic: str
    intervention_topic: str
    inputs: tuple[MuxInput, ...]
    locks: tuple[MuxLock, ...]
    joint_state_timeout_s: float = 0.2  # no joint state for this long -> hold (the robot's position is unknown)
    tracking_tolerance_s: float = 0.15  # per joint max_velocity * this: a command farther from the measured
    #                                     position holds (diagnostics ERROR); an output that far is re-anchored

    def input(self, name: str) -> MuxInput:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)


@dataclass(frozen=True)
class Recorder:
    output_dir: str
    queue_size: int
    compression: str
    auto_episodes: bool
    min_free_disk_mb: int
    extra_topics: tuple[tuple[str, str], ...]  # (topic, msgtype)


@dataclass(frozen=True)
class Sim:
    seed: int
    episode_timeout_s: float
    reset_pause_s: float
    corrector: bool
    corrector_patience_s: float
    render_scale: float
    corrector_input: str = "corrector"  # the mux input the scripted corrector drives (human, below teleop)
    simulator: str = "kinematic"  # one of SIMULATORS
    tasks: tuple[str, ...] = ()   # aloha: the tasks episodes cycle through (episode k runs tasks[k % len])


@dataclass(frozen=True)
class ValueMonitor:
    """The value_monitor node (section ``value_monitor:``; absent or ``enabled: false``: not run)."""
    bundle: str          # value bundle name (models/<name>) or directory
    rate_hz: float       # V evaluations per second
    max_len: int         # the task's maximum episode length in control ticks (steps to go = -V * max_len)
    drop: float          # alert when V falls by more than this ...
    window_s: float      # ... within this many seconds
    value_topic: str     # sensor_msgs/JointState: name ["value", "steps_to_go"], position [V, steps]
    alert_topic: str     # std_msgs/String, one per alert
    threads: int         # torch CPU threads of the monitor (0: torch's default)
    device: str = "cpu"  # torch device of the value model: cpu, cuda, cuda:N


@dataclass(frozen=True)
class Station:
    file: str
    name: str
    namespace: str
    episode_topic: str
    robot: Robot
    cameras: tuple[Camera, ...]
    policy: Policy
    mux: Mux
    recorder: Recorder
    sim: Sim | None
    raw: dict = field(repr=False, compare=False, default_factory=dict)
    value_monitor: ValueMonitor | None = None

    @property
    def is_sim(self) -> bool:
        return self.robot.type == "sim"

    def camera(self, name: str) -> Camera:
        for c in self.cameras:
            if c.name == name:
                return c
        raise KeyError(name)

    def recorded_topics(self) -> list[tuple[str, str]]:
        """Every topic the episode recorder stores, with its ROS message type (one source of truth)."""
        topics: list[tuple[str, str]] = []
        for c in self.cameras:
            topics.append((c.compressed_topic, "sensor_msgs/msg/CompressedImage"))
            topics.append((c.camera_info_topic, "sensor_msgs/msg/CameraInfo"))
        topics.append((self.robot.joint_states_topic, "sensor_msgs/msg/JointState"))
        topics.append((self.robot.command_topic, _msgtype(self.robot.command_type)))
        for i in self.mux.inputs:
            topics.append((i.topic, _msgtype(i.type)))
        topics += [
            (self.mux.active_topic, "std_msgs/msg/String"),
            (self.mux.intervention_topic, "std_msgs/msg/Bool"),
            (self.mux.mode_topic, "std_msgs/msg/String"),
            (self.policy.chunk_topic, "trajectory_msgs/msg/JointTrajectory"),
            (self.policy.beta_topic, "std_msgs/msg/Float64"),
            (self.policy.prompt_topic, "std_msgs/msg/String"),
            (self.policy.stats_topic, "diagnostic_msgs/msg/DiagnosticArray"),
            (self.episode_topic, "std_msgs/msg/String"),
            ("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"),
        ]
        if self.value_monitor is not None:
            topics += [(self.value_monitor.value_topic, "sensor_msgs/msg/JointState"),
                       (self.value_monitor.alert_topic, "std_msgs/msg/String")]
        topics += list(self.recorder.extra_topics)
        seen: dict[str, str] = {}
        for t, ty in topics:
            seen.setdefault(t, ty)
        return list(seen.items())


def _msgtype(command_type: str) -> str:
    return {"joint_state": "sensor_msgs/msg/JointState",
            "float64_multi_array": "std_msgs/msg/Float64MultiArray"}[command_type]


# --------------------------------------------------------------------------------------------- validation
_REQUIRED = object()


class _Reader:
    """Typed access to a nested YAML mapping; every failure raises StationConfigError with file and key.

    Each reader records the keys it was asked for; :meth:`refuse_unknown` (once the whole file is parsed) refuses
    any key of any mapping read through it or its children that the parser never asked for, naming the closest
    valid key. So the schema is whatever the parser reads: a key added there is accepted without a key list.
    """

    def __init__(self, file: str, data: Any, prefix: str = "", _readers: list | None = None):
        self.file, self.data, self.prefix = file, data, prefix
        if not isinstance(data, dict):
            raise StationConfigError(file, prefix or "<root>", data, "expected a mapping")
        self.read: set[str] = set()
        self._readers = [] if _readers is None else _readers
        self._readers.append(self)

    def _key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def fail(self, k: str, value: Any, why: str) -> StationConfigError:
        return StationConfigError(self.file, self._key(k), value, why)

    def _get(self, k: str, default: Any):
        self.read.add(k)
        if k in self.data:
            return self.data[k]
        if default is _REQUIRED:
            unread = [str(u) for u in self.data if u not in self.read]
            close = difflib.get_close_matches(k, unread, n=1)
            raise self.fail(k, None, "missing required key" + (f" (is '{close[0]}' a misspelling of it?)"
                                                              if close else ""))
        return default

    def get(self, k: str, default: Any = None) -> Any:
        """The raw value of optional key ``k`` (``default`` when absent), for values with their own checks."""
        return self._get(k, default)

    def child(self, data: Any, prefix: str) -> "_Reader":
        """A reader for a nested mapping (e.g. a list item) whose keys :meth:`refuse_unknown` checks too."""
        return _Reader(self.file, data, prefix, self._readers)

    def refuse_unknown(self) -> None:
        """Raise StationConfigError for the first key, in this reader or any child, that was never read."""
        for r in self._readers:
            for k in r.data:
                if k in r.read:
                    continue
                valid = sorted(r.read)
                close = difflib.get_close_matches(str(k), valid, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
                raise r.fail(str(k), r.data[k], f"unknown key; {hint}")

    def sub(self, k: str, default: Any = None) -> "_Reader":
        return self.child(self._get(k, _REQUIRED if default is None else default), self._key(k))

    def str(self, k: str, default: Any = None, choices: tuple[str, ...] | None = None,
            pattern: re.Pattern | None = None) -> str:
        v = self._get(k, _REQUIRED if default is None else default)
        if not isinstance(v, str):
            raise self.fail(k, v, "expected a string")
        if choices is not None and v not in choices:
            raise self.fail(k, v, f"must be one of {', '.join(choices)}")
        if pattern is not None and not pattern.match(v):
            raise self.fail(k, v, f"must match {pattern.pattern}")
        return v

    def num(self, k: str, default: Any = None, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, integer: bool = False, allow_none: bool = False):
        v = self._get(k, _REQUIRED if default is None and not allow_none else default)
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise self.fail(k, v, "expected an integer" if integer else "expected a number")
        if not math.isfinite(float(v)):
            raise self.fail(k, v, "must be finite")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise self.fail(k, v, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise self.fail(k, v, f"must be <= {hi}")
        return int(v) if integer else float(v)

    def bool(self, k: str, default: Any = None) -> bool:
        v = self._get(k, _REQUIRED if default is None else default)
        if not isinstance(v, bool):
            raise self.fail(k, v, "expected true or false")
        return v

    def list(self, k: str, default: Any = None) -> list:
        v = self._get(k, _REQUIRED if default is None else default)
        if not isinstance(v, list):
            raise self.fail(k, v, "expected a list")
        return v

    def topic(self, k: str, default: Any = None) -> str:
        return self.str(k, default, pattern=_TOPIC_RE)


def _joints(r: _Reader) -> tuple[Joint, ...]:
    items = r.list("joints")
    if len(items) != N_JOINTS:
        raise r.fail("joints", f"{len(items)} joints", f"expected exactly {N_JOINTS} joints "
                     "(two 6-DoF arms + two grippers)")
    joints, names = [], set()
    for i, item in enumerate(items):
        jr = r.child(item, f"{r._key('joints')}[{i}]")
        name = jr.str("name", pattern=_NAME_RE)
        if name in names:
            raise jr.fail("name", name, "duplicate joint name")
        names.add(name)
        lower, upper = jr.num("lower"), jr.num("upper")
        if not lower < upper:
            raise jr.fail("upper", upper, f"must be greater than lower ({lower})")
        vmax = jr.num("max_velocity", lo=0.0, lo_open=True)
        joints.append(Joint(name, lower, upper, vmax,
                            jr.num("max_acceleration", vmax / DEFAULT_RAMP_S, lo=0.0, lo_open=True)))
    return tuple(joints)


def _camera(r: _Reader, is_sim: bool) -> Camera:
    name = r.str("name", pattern=_NAME_RE)
    source = r.get("source", "sim")
    if isinstance(source, int) and not isinstance(source, bool):
        source = str(source)
    if not isinstance(source, str):
        raise r.fail("source", source, "expected a string or a device index")
    from recap_ros.camera_source import SourceError, parse_source  # ROS-free, shared with camera_ingest

    if source == "sim":
        if not is_sim:
            raise r.fail("source", source, "source 'sim' is only valid on a station with robot.type sim")
    else:
        try:
            parse_source(source)
        except SourceError as e:
            raise r.fail("source", source, str(e)) from None
    width = r.num("width", lo=16, hi=8192, integer=True)
    height = r.num("height", lo=16, hi=8192, integer=True)
    return Camera(
        name=name, role=r.str("role", choices=CAMERA_ROLES), source=source, width=width, height=height,
        fps=r.num("fps", lo=0.0, lo_open=True, hi=240.0),
        output_width=r.num("output_width", width, lo=16, hi=8192, integer=True),
        output_height=r.num("output_height", height, lo=16, hi=8192, integer=True),
        resize=r.str("resize", "letterbox", choices=RESIZE_MODES),
        jpeg_quality=r.num("jpeg_quality", 85, lo=1, hi=100, integer=True),
        frame_id=r.str("frame_id", f"{name}_optical_frame"),
        camera_info_file=r.str("camera_info_file", ""),
        loop=r.bool("loop", True),
    )


def _check_beta(r: _Reader, key: str, beta: float) -> float:
    if beta != 1.0 and not (BETA_MIN <= beta <= BETA_MAX):
        raise r.fail(key, beta, f"β must be 1.0 (no guidance) or within [{BETA_MIN}, {BETA_MAX}]")
    return beta


def _policy(r: _Reader) -> Policy:
    table_r = r.sub("beta_table", {})
    table = {}
    for task, b in table_r.data.items():
        table[str(task)] = _check_beta(table_r, str(task), table_r.num(str(task)))
    backend = r.str("backend", "auto", choices=BACKENDS)
    return Policy(
        bundle=r.str("bundle"), backend=backend,
        prompt=r.str("prompt"), beta=_check_beta(r, "beta", r.num("beta", 1.0)), beta_table=table,
        denoise_steps=r.num("denoise_steps", 5, lo=1, hi=100, integer=True),
        replan_every=r.num("replan_every", 25, lo=1, hi=50, integer=True),
        crossfade_ticks=r.num("crossfade_ticks", 5, lo=0, hi=50, integer=True),
        stale_after_s=r.num("stale_after_s", 0.25, lo=0.0, lo_open=True),
        autostart=r.bool("autostart", False),
        command_topic=r.topic("command_topic", "/policy/command"),
        chunk_topic=r.topic("chunk_topic", "/policy/chunk"),
        beta_topic=r.topic("beta_topic", "/policy/beta"),
        prompt_topic=r.topic("prompt_topic", "/task/prompt"),
        stats_topic=r.topic("stats_topic", "/policy/chunk_stats"),
        threads=r.num("threads", 1, lo=0, integer=True),
        **_remote(r, backend),
    )


def _remote(r: _Reader, backend: str) -> dict:
    """policy.server (required) and policy.api_key_env (optional) of backend remote; refused with any other."""
    if backend != "remote":
        for k in ("server", "api_key_env"):
            if k in r.data:
                raise r.fail(k, r.data[k], "only used with backend: remote")
        return {}
    server, env = r.str("server"), r.str("api_key_env", "")
    if not _SERVER_RE.match(server):
        raise r.fail("server", server, "expected ws://host:port or wss://host:port")
    if env and not _ENV_RE.match(env):
        raise r.fail("api_key_env", env, "expected an environment variable name")
    return {"server": server, "api_key_env": env}


def _mux(r: _Reader, policy_topic: str) -> Mux:
    inputs, names, topics = [], set(), set()
    for i, item in enumerate(r.list("inputs")):
        ir = r.child(item, f"{r._key('inputs')}[{i}]")
        name = ir.str("name", pattern=_NAME_RE)
        if name in names or name == "hold":
            raise ir.fail("name", name, "duplicate or reserved input name")
        topic = ir.topic("topic")
        if topic in topics:
            raise ir.fail("topic", topic, "two mux inputs share a topic")
        names.add(name)
        topics.add(topic)
        inputs.append(MuxInput(name, topic, ir.str("type", "joint_state", choices=COMMAND_TYPES),
                               ir.num("priority", lo=0, hi=255, integer=True),
                               ir.num("timeout_s", lo=0.0, lo_open=True), ir.bool("human", False)))
    if "policy" not in names:
        raise r.fail("inputs", sorted(names), "an input named 'policy' is required")
    if not any(i.human for i in inputs):
        raise r.fail("inputs", sorted(names), "at least one input must be human: true (the teleoperator)")
    if inputs[[i.name for i in inputs].index("policy")].topic != policy_topic:
        raise r.fail("inputs", policy_topic, "the 'policy' input must listen on policy.command_topic")
    locks = []
    for i, item in enumerate(r.list("locks", [])):
        lr = r.child(item, f"{r._key('locks')}[{i}]")
        locks.append(MuxLock(lr.str("name", pattern=_NAME_RE), lr.topic("topic"),
                             lr.num("priority", 255, lo=0, hi=255, integer=True), lr.bool("latching", False),
                             lr.num("heartbeat_timeout_s", lo=0.0, lo_open=True, allow_none=True)))
    default = r.str("default_input", "policy")
    if default not in names and default != "hold":
        raise r.fail("default_input", default, f"must be 'hold' or one of {sorted(names)}")
    override_input = r.str("override_input", next(i.name for i in inputs if i.human))
    if override_input not in names:
        raise r.fail("override_input", override_input, f"must be one of {sorted(names)}")
    return Mux(default, r.topic("mode_topic", "/mux/mode"), r.topic("override_topic", "/teleop/override"),
               override_input, r.topic("active_topic", "/mux/active_source"),
               r.topic("intervention_topic", "/mux/intervention"), tuple(inputs), tuple(locks),
               joint_state_timeout_s=r.num("joint_state_timeout_s", 0.2, lo=0.0, lo_open=True),
               tracking_tolerance_s=r.num("tracking_tolerance_s", 0.15, lo=0.0, lo_open=True))


def _recorder(r: _Reader) -> Recorder:
    extra = []
    for i, item in enumerate(r.list("extra_topics", [])):
        er = r.child(item, f"{r._key('extra_topics')}[{i}]")
        extra.append((er.topic("topic"), er.str("type", pattern=re.compile(r"^\w+/msg/\w+$"))))
    return Recorder(output_dir=r.str("output_dir", "bags"), queue_size=r.num("queue_size", 4096, lo=16,
                    integer=True), compression=r.str("compression", "zstd", choices=("zstd", "none")),
                    auto_episodes=r.bool("auto_episodes", False),
                    min_free_disk_mb=r.num("min_free_disk_mb", 512, lo=0, integer=True), extra_topics=tuple(extra))


def _sim(r: _Reader) -> Sim:
    return Sim(seed=r.num("seed", 0, lo=0, integer=True),
               episode_timeout_s=r.num("episode_timeout_s", 12.0, lo=0.0, lo_open=True),
               reset_pause_s=r.num("reset_pause_s", 0.5, lo=0.0),
               corrector=r.bool("corrector", True),
               corrector_patience_s=r.num("corrector_patience_s", 4.0, lo=0.0, lo_open=True),
               render_scale=r.num("render_scale", 1.0, lo=0.0, lo_open=True, hi=1.0),
               corrector_input=r.str("corrector_input", "corrector", pattern=_NAME_RE),
               simulator=r.str("simulator", "kinematic", choices=SIMULATORS), tasks=_sim_tasks(r))


def _sim_tasks(r: _Reader) -> tuple[str, ...]:
    tasks = r.list("tasks", [])
    if r.data.get("simulator", "kinematic") != "aloha":
        if tasks:
            raise r.fail("tasks", tasks, "only a station with sim.simulator aloha has tasks")
        return ()
    if not tasks or any(t not in ALOHA_TASKS for t in tasks):
        raise r.fail("tasks", tasks, f"an aloha station needs a list of tasks from {', '.join(ALOHA_TASKS)}")
    return tuple(tasks)


def _value_monitor(r: _Reader, robot: Robot, sim: Sim | None) -> ValueMonitor | None:
    """``enabled: false`` keeps the section (checked) but runs no monitor; absent: ``{enabled: false}``."""
    enabled = r.bool("enabled", True)
    if not enabled and set(r.data) == {"enabled"}:
        return None
    default_len = round(sim.episode_timeout_s * robot.control_rate_hz) if sim is not None else None
    monitor = ValueMonitor(bundle=r.str("bundle"), rate_hz=r.num("rate_hz", 5.0, lo=0.0, lo_open=True, hi=50.0),
                           max_len=r.num("max_len", default_len, lo=1, integer=True),
                           drop=r.num("drop", 0.15, lo=0.0, lo_open=True, hi=1.0),
                           window_s=r.num("window_s", 2.0, lo=0.0, lo_open=True),
                           value_topic=r.topic("value_topic", "/value"),
                           alert_topic=r.topic("alert_topic", "/value/alert"),
                           threads=r.num("threads", 1, lo=0, integer=True),
                           device=r.str("device", "cpu", pattern=re.compile(r"^(cpu|cuda(:\d+)?)$")))
    return monitor if enabled else None


def parse_station(data: Any, file: str = "<station>") -> Station:
    """Validate a parsed YAML mapping; raises StationConfigError naming file, key and value (for a key the
    schema does not have: the closest valid key)."""
    root = _Reader(file, data)
    robot_r = root.sub("robot")
    rtype = robot_r.str("type", choices=("sim", "hardware"))
    robot = Robot(type=rtype, control_rate_hz=robot_r.num("control_rate_hz", 50.0, lo=1.0, hi=1000.0),
                  joint_states_topic=robot_r.topic("joint_states_topic", "/joint_states"),
                  command_topic=robot_r.topic("command_topic", "/robot/command"),
                  command_type=robot_r.str("command_type", "joint_state", choices=COMMAND_TYPES),
                  joints=_joints(robot_r))
    cams, roles = [], {}
    for i, item in enumerate(root.list("cameras")):
        cam = _camera(root.child(item, f"cameras[{i}]"), rtype == "sim")
        if cam.role in roles or cam.name in [c.name for c in cams]:
            raise root.fail(f"cameras[{i}]", cam.name, "duplicate camera name or role")
        roles[cam.role] = cam
        cams.append(cam)
    if sorted(roles) != sorted(CAMERA_ROLES):
        raise root.fail("cameras", sorted(roles), f"need exactly one camera per role {list(CAMERA_ROLES)}")
    cams.sort(key=lambda c: CAMERA_ROLES.index(c.role))  # model order: base, left wrist, right wrist
    policy = _policy(root.sub("policy"))
    sim = _sim(root.sub("sim", {}))  # checked on a hardware station too (a copied sim file), but not used there
    station = Station(
        file=file, name=root.str("name", pattern=_NAME_RE),
        namespace=root.str("namespace", "", pattern=re.compile(r"^(/?[A-Za-z][A-Za-z0-9_]*)?$")),
        episode_topic=root.topic("episode_topic", "/episode/events"),
        robot=robot, cameras=tuple(cams), policy=policy, mux=_mux(root.sub("mux"), policy.command_topic),
        recorder=_recorder(root.sub("recorder", {})), sim=sim if rtype == "sim" else None, raw=data,
        value_monitor=_value_monitor(root.sub("value_monitor", {"enabled": False}), robot,
                                     sim if rtype == "sim" else None))
    if rtype == "sim" and sim.corrector:
        human = [i.name for i in station.mux.inputs if i.human and i.name != station.mux.override_input]
        if sim.corrector_input not in human:
            raise root.fail("sim.corrector_input", sim.corrector_input,
                            f"the scripted corrector needs a human mux input of its own (not the override input "
                            f"'{station.mux.override_input}'); human inputs: {human}")
    root.refuse_unknown()
    return station


def load_station(name_or_path: str | os.PathLike) -> Station:
    """Load a station by name (``config/stations/<name>.yaml``) or by path to a YAML file."""
    path = paths.station_file(name_or_path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise StationConfigError(path, "<file>", str(name_or_path), f"cannot read station file: {e.strerror}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StationConfigError(path, "<yaml>", str(e).splitlines()[0], "not valid YAML") from None
    return parse_station(data, str(path))
