"""Conversions between numpy and the standard ROS 2 messages the stack uses, plus the QoS profiles.

Shared by every node so that images, joint commands and stamps are converted in exactly one way
(numpy buffers, no per-pixel Python loops). Requires rclpy and the standard message packages.
"""
from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

# Images: best effort, keep the newest few (sensor-data profile, as camera drivers publish).
SENSOR_QOS = qos_profile_sensor_data
# Commands and joint states: reliable, shallow queue (newest wins on the robot anyway).
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
# State-like topics (active source, β, prompt): late joiners get the current value.
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Event-like topics that must not be lost (episode events, chunks, stats).
EVENT_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
# Publisher side of event topics whose recent history late joiners may need (sim_robot's episode events):
# EVENT_QOS subscribers still match it; subscribers using this profile get the last 100 events on joining.
EVENT_HISTORY_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                               durability=DurabilityPolicy.TRANSIENT_LOCAL)


class MessageError(ValueError):
    """A message cannot be converted (wrong size, names, encoding); the text says what is wrong."""


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def header_stamp_ns(raw: bytes) -> int:
    """header.stamp (ns) of a serialized message whose first field is a std_msgs/Header (Image, JointState,
    ...), read from the CDR bytes of a raw subscription without deserialising the rest (e.g. 600 kB of pixels)."""
    if len(raw) < 12 or raw[0] != 0 or raw[1] not in (0, 1):
        raise MessageError(f"not a CDR-encapsulated message ({len(raw)} bytes)")
    sec, nanosec = struct.unpack_from("<iI" if raw[1] == 1 else ">iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def now_ns(node) -> int:
    return node.get_clock().now().nanoseconds


# ------------------------------------------------------------------------------------------------ images
def image_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str) -> Image:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise MessageError(f"expected an HxWx3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    msg = Image()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(rgb).tobytes()
    return msg


def image_from_msg(msg: Image) -> np.ndarray:
    """HxWx3 uint8 RGB view of an rgb8 / bgr8 / mono8 Image (copies only when it has to convert)."""
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1}.get(msg.encoding)
    if channels is None:
        raise MessageError(f"unsupported image encoding '{msg.encoding}' (rgb8, bgr8, mono8)")
    if h <= 0 or w <= 0 or step < w * channels or buf.size < h * step:
        raise MessageError(f"image buffer of {buf.size} bytes does not match {w}x{h} step {step}")
    img = buf[: h * step].reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    if msg.encoding == "bgr8":
        return img[:, :, ::-1]
    if msg.encoding == "mono8":
        return np.repeat(img, 3, axis=2)
    return img


def compressed_msg(jpeg: bytes, stamp_ns: int, frame_id: str) -> CompressedImage:
    msg = CompressedImage()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.format = "rgb8; jpeg compressed bgr8"
    msg.data = jpeg
    return msg


# ------------------------------------------------------------------------------------------------ joints
def joint_state_msg(names: Sequence[str], positions: np.ndarray, stamp_ns: int,
                    velocities: np.ndarray | None = None) -> JointState:
    msg = JointState()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.name = list(names)
    msg.position = np.asarray(positions, dtype=np.float64).tolist()
    if velocities is not None:
        msg.velocity = np.asarray(velocities, dtype=np.float64).tolist()
    return msg


def float_array_msg(positions: np.ndarray) -> Float64MultiArray:
    msg = Float64MultiArray()
    dim = MultiArrayDimension(label="joints", size=int(len(positions)), stride=int(len(positions)))
    msg.layout.dim = [dim]
    msg.data = np.asarray(positions, dtype=np.float64).tolist()
    return msg


def positions_from_joint_state(msg: JointState, names: Sequence[str]) -> np.ndarray:
    """Positions in the station's joint order; joints are matched by name, extra joints are ignored."""
    if len(msg.name) != len(msg.position):
        raise MessageError(f"JointState has {len(msg.name)} names but {len(msg.position)} positions")
    index = {n: i for i, n in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise MessageError(f"JointState lacks joints {missing}")
    pos = np.asarray(msg.position, dtype=np.float64)
    return pos[[index[n] for n in names]]


def velocities_from_joint_state(msg: JointState, names: Sequence[str]) -> np.ndarray | None:
    """Measured velocities in the station's joint order, or None when the message carries none (or not one
    per joint). Call after positions_from_joint_state accepted the message."""
    if len(msg.velocity) != len(msg.name):
        return None
    index = {n: i for i, n in enumerate(msg.name)}
    return np.asarray(msg.velocity, dtype=np.float64)[[index[n] for n in names]]


def positions_from_float_array(msg: Float64MultiArray, n_joints: int) -> np.ndarray:
    if len(msg.data) != n_joints:
        raise MessageError(f"Float64MultiArray has {len(msg.data)} elements, expected {n_joints}")
    return np.asarray(msg.data, dtype=np.float64)


def command_msg(command_type: str, names: Sequence[str], positions: np.ndarray, stamp_ns: int,
                source: str = ""):
    """A joint-position command as the station's command_type ("joint_state" or "float64_multi_array").
    ``source``: the mux input that produced it (or "hold"), carried as a JointState's header.frame_id (a
    joint-space command has no coordinate frame; drivers ignore it), so a recording tells, per command, who
    drove. A Float64MultiArray has no header: it carries no source."""
    if command_type == "joint_state":
        msg = joint_state_msg(names, positions, stamp_ns)
        msg.header.frame_id = source
        return msg
    if command_type == "float64_multi_array":
        return float_array_msg(positions)
    raise MessageError(f"unknown command type '{command_type}'")


def command_msg_class(command_type: str):
    return {"joint_state": JointState, "float64_multi_array": Float64MultiArray}[command_type]


def positions_from_command(msg, command_type: str, names: Sequence[str]) -> np.ndarray:
    if command_type == "joint_state":
        return positions_from_joint_state(msg, names)
    return positions_from_float_array(msg, len(names))


def joint_trajectory_msg(names: Sequence[str], positions: np.ndarray, stamp_ns: int, dt: float) -> JointTrajectory:
    """A (T, n) chunk of joint positions as a JointTrajectory: point k at time_from_start k*dt after stamp."""
    msg = JointTrajectory()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.joint_names = list(names)
    dt_ns = int(round(dt * 1e9))
    for k, row in enumerate(np.asarray(positions, dtype=np.float64)):
        t = k * dt_ns
        msg.points.append(JointTrajectoryPoint(positions=row.tolist(), time_from_start=Duration(
            sec=t // 1_000_000_000, nanosec=t % 1_000_000_000)))
    return msg


def positions_from_trajectory(msg: JointTrajectory) -> np.ndarray:
    return np.asarray([p.positions for p in msg.points], dtype=np.float64)


def diagnostic_array(stamp_ns: int, statuses: Sequence[tuple[str, int, str, dict]],
                     hardware_id: str = "") -> DiagnosticArray:
    """DiagnosticArray from (name, level, message, {key: value}) tuples; values are str()-ed. level is an int
    0..3 or a DiagnosticStatus constant (OK, WARN, ERROR, STALE are bytes in rclpy)."""
    msg = DiagnosticArray()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    for name, level, message, values in statuses:
        msg.status.append(DiagnosticStatus(level=level if isinstance(level, bytes) else bytes([level]), name=name, message=message,
                                           hardware_id=hardware_id,
                                           values=[KeyValue(key=k, value=str(v)) for k, v in values.items()]))
    return msg


def diagnostic_values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}
