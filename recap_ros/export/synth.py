"""Synthetic episode bags for export tests and the export benchmark (ROS-free).

Writes real rosbag2 bags through the recorder's own :class:`recap_ros.recording.bag.BagWriter` (v9, MCAP,
zstd, custom_data), with every topic the exporter reads at realistic rates and stamp jitter: JPEG cameras at
their station fps, joint states and commands at the control rate, latched mux state on change, prompt and
episode events. Values are known functions of time so tests can check alignment exactly:

- camera ``c`` frame ``i`` is one flat colour, :func:`frame_level` (c, i), so a decoded pixel tells which frame
  the exporter picked;
- joint j at time t is :func:`joint_value` (j, t); the robot command and the policy command likewise, offset.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from recap_ros import imaging
from recap_ros.recording import bag as rbag
from recap_ros.station import Station

NS = 1_000_000_000
COMMAND_OFFSET, POLICY_OFFSET = 0.01, 0.02


def joint_value(j: int, t: np.ndarray | float) -> np.ndarray:
    return 0.3 * np.sin(0.7 * np.asarray(t) + 0.4 * j) + 0.05 * j


def frame_level(cam: int, i: int) -> int:
    """Flat grey level of camera cam's frame i: steps of 16 survive JPEG with a wide margin."""
    return int(16 + 16 * ((i + 5 * cam) % 14))


@dataclass
class SynthEpisode:
    duration_s: float = 2.0
    outcome: str | None = "success"        # success / failure / unlabelled; None: no recap.outcome at all
    interventions: list[tuple[float, float]] = field(default_factory=list)  # (t0, t1) s human drives
    camera_gaps: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # cam -> no frames in (t0, t1)
    omit_topics: tuple[str, ...] = ()
    camera_fps: float | None = None        # None: the station's camera fps
    jitter_ms: float = 1.0
    prompt: str = "touch the red marker with the left gripper"
    start_ns: int = 1_700_000_000 * NS
    episode: int = 0
    end_event: bool = True
    image_size: tuple[int, int] | None = None  # (h, w); None: the camera's output size
    textured: bool = False                 # textured images (realistic encode/decode cost), not flat colour
    value_hz: float = 0.0                  # > 0: the value monitor's /value at this rate (V = monitor_value(t))
    value_until_s: float | None = None     # no /value after this time (a monitor that stopped)
    malformed_policy_ticks: tuple[int, ...] = ()  # ticks whose policy command lacks its last joint (the mux
    #                                                refuses such a message: it never reaches the robot)


def monitor_value(t: float) -> float:
    """The synthetic episode's value monitor output at t seconds from the start."""
    return -0.5 - 0.25 * t


def _header(T, stamp_ns: int, frame_id: str = ""):
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // NS,
                                                                          nanosec=stamp_ns % NS),
                                    frame_id=frame_id)


def write_episode_bag(out_dir: str | Path, station: Station, spec: SynthEpisode, finish: bool = True) -> Path:
    """Write one episode bag; ``finish=False`` leaves it as a crashed recorder would (unfinished)."""
    ts = rbag.typestore()
    T = ts.types
    rng = np.random.default_rng(spec.episode)
    path = Path(out_dir) / rbag.episode_dir_name(station.name, spec.episode, spec.start_ns / NS)
    facts = rbag.EpisodeFacts(station=station.name, episode=spec.episode, prompt=spec.prompt,
                              outcome=spec.outcome or "unlabelled", model="synth", beta="1.0", operator="test",
                              start_ns=spec.start_ns, end_ns=spec.start_ns + int(spec.duration_s * NS),
                              interventions=len(spec.interventions))
    custom = facts.custom_data()
    if spec.outcome is None:
        del custom[rbag.K_OUTCOME]
    types = dict(station.recorded_topics())
    msgs: list[tuple[int, str, object]] = []  # (receive ns, topic, msg)

    def put(topic, recv_ns, msg):
        if topic not in spec.omit_topics:
            msgs.append((int(recv_ns), topic, msg))

    t0, dur = spec.start_ns, spec.duration_s
    jit = lambda: int(rng.uniform(0, spec.jitter_ms) * 1e6)  # noqa: E731
    for c_i, cam in enumerate(station.cameras):
        fps = spec.camera_fps or cam.fps
        h, w = spec.image_size or (cam.output_height, cam.output_width)
        gaps = spec.camera_gaps.get(cam.name, [])
        # smooth camera-like texture (low-frequency pattern), scrolled a pixel per frame
        noise = cv2.resize(rng.integers(0, 60, (h // 8, w // 8, 3), dtype=np.uint8), (w, h),
                           interpolation=cv2.INTER_CUBIC) if spec.textured else None
        for i in range(int(dur * fps) + 1):
            t = i / fps
            if any(a < t < b for a, b in gaps):
                continue
            img = np.full((h, w, 3), frame_level(c_i, i), dtype=np.uint8)
            if noise is not None:
                img = img + np.roll(noise, i, axis=1)
            stamp = t0 + int(t * NS) + jit()
            msg = T["sensor_msgs/msg/CompressedImage"](header=_header(T, stamp, cam.frame_id),
                                                       format="rgb8; jpeg compressed bgr8",
                                                       data=np.frombuffer(imaging.encode_jpeg(img, cam.jpeg_quality),
                                                                          dtype=np.uint8))
            put(cam.compressed_topic, stamp + 3_000_000, msg)
    rate = station.robot.control_rate_hz
    names = station.robot.joint_names
    j = np.arange(len(names))
    human = lambda t: any(a <= t < b for a, b in spec.interventions)  # noqa: E731
    policy_topic = station.mux.input("policy").topic
    for k in range(int(dur * rate) + 1):
        t = k / rate
        stamp = t0 + int(t * NS) + jit()
        put(station.robot.joint_states_topic, stamp + 500_000,
            T["sensor_msgs/msg/JointState"](header=_header(T, stamp), name=list(names),
                                            position=joint_value(j, t).astype(np.float64),
                                            velocity=np.zeros(0), effort=np.zeros(0)))
        cstamp = t0 + int(t * NS) + 2_000_000
        put(station.robot.command_topic, cstamp + 200_000,
            T["sensor_msgs/msg/JointState"](header=_header(T, cstamp), name=list(names),
                                            position=joint_value(j, t) + COMMAND_OFFSET,
                                            velocity=np.zeros(0), effort=np.zeros(0)))
        keep = len(names) - (k in spec.malformed_policy_ticks)
        put(policy_topic, cstamp - 500_000,
            T["sensor_msgs/msg/JointState"](header=_header(T, cstamp - 1_000_000), name=list(names)[:keep],
                                            position=(joint_value(j, t) + POLICY_OFFSET)[:keep],
                                            velocity=np.zeros(0), effort=np.zeros(0)))
    mon = station.value_monitor
    if spec.value_hz > 0 and mon is not None:
        last = dur if spec.value_until_s is None else spec.value_until_s
        for i in range(int(last * spec.value_hz) + 1):
            t = i / spec.value_hz
            v = monitor_value(t)
            put(mon.value_topic, t0 + int(t * NS) + 30_000_000, T["sensor_msgs/msg/JointState"](
                header=_header(T, t0 + int(t * NS)), name=["value", "steps_to_go"],
                position=np.array([v, -v * mon.max_len]), velocity=np.zeros(0), effort=np.zeros(0)))
    # latched mux state: initial value, then on every change
    changes = sorted({0.0, *[a for a, _ in spec.interventions], *[b for _, b in spec.interventions]})
    human_input = next(i.name for i in station.mux.inputs if i.human)
    for t in changes:
        on = human(t)
        put(station.mux.intervention_topic, t0 + int(t * NS), T["std_msgs/msg/Bool"](data=on))
        put(station.mux.active_topic, t0 + int(t * NS), T["std_msgs/msg/String"](data=human_input if on else "policy"))
    put(station.policy.prompt_topic, t0, T["std_msgs/msg/String"](data=spec.prompt))
    put(station.episode_topic, t0, T["std_msgs/msg/String"](data=json.dumps(
        {"event": "start", "episode": spec.episode, "prompt": spec.prompt, "seed": 0, "stamp_ns": t0})))
    if spec.end_event and spec.outcome in ("success", "failure"):
        end = t0 + int(dur * NS)
        put(station.episode_topic, end, T["std_msgs/msg/String"](data=json.dumps(
            {"event": "end", "episode": spec.episode, "success": spec.outcome == "success",
             "reason": "success" if spec.outcome == "success" else "timeout", "steps": int(dur * rate),
             "stamp_ns": end})))
    msgs.sort(key=lambda m: m[0])
    writer = rbag.BagWriter(path, custom).open()
    for recv, topic, msg in msgs:
        writer.write(topic, types[topic], ts.serialize_cdr(msg, types[topic]), recv)
    if finish:
        writer.close()
    else:
        writer.abort()
    return path
