"""Per-camera settings of camera_ingest: the station's Camera entry merged with ROS parameter overrides, then
validated as a whole. Every error names the key, the bad value and where it came from (the station file or a
ROS parameter). ROS-free.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recap_ros.camera_source import Source, SourceError, parse_source
from recap_ros.station import RESIZE_MODES, Camera

QOS_CHOICES = ("sensor", "reliable")
MIN_SIZE, MAX_SIZE = 16, 8192
MAX_FPS = 240.0

# Settings that exist only as ROS parameters of camera_ingest (not in the station schema), with defaults.
NODE_DEFAULTS: dict[str, Any] = {
    "qos": "sensor",            # sensor = best effort (rosmsg.SENSOR_QOS); reliable = reliable, same depth
    "open_timeout_s": 5.0,      # network streams: FFmpeg open timeout
    "read_timeout_s": 2.0,      # network streams: FFmpeg read timeout; V4L2: select() timeout (whole seconds)
    "reconnect_min_s": 0.25,    # first retry delay after a failure; doubles up to reconnect_max_s
    "reconnect_max_s": 5.0,
    "fourcc": "",               # V4L2 pixel format request, e.g. MJPG or YUYV ("" = driver default)
    "diagnostics_period_s": 1.0,
    "opencv_threads": 1,        # cv2.setNumThreads for this process (-1 = OpenCV default, one per core)
}
CAMERA_KEYS = ("source", "width", "height", "fps", "output_width", "output_height", "resize", "jpeg_quality",
               "frame_id", "camera_info_file", "loop")


class CameraConfigError(ValueError):
    """Invalid camera configuration; the message names key, value and origin."""


@dataclass(frozen=True)
class CameraSettings:
    name: str
    source: Source
    source_text: str
    width: int          # capture resolution request (devices); files and streams keep their own size
    height: int
    fps: float          # requested rate; files are paced at it
    output_width: int   # published image size
    output_height: int
    resize: str         # letterbox | resize
    jpeg_quality: int
    frame_id: str
    camera_info_file: str
    loop: bool          # files: restart at the end (True) or stop there (False)
    qos: str
    open_timeout_s: float
    read_timeout_s: float
    reconnect_min_s: float
    reconnect_max_s: float
    fourcc: str
    diagnostics_period_s: float
    opencv_threads: int

    @property
    def period_s(self) -> float:
        return 1.0 / self.fps


def camera_settings(camera: Camera, overrides: Mapping[str, Any], station_file: str) -> CameraSettings:
    """Merge ``overrides`` (ROS parameters that differ from the station, plus node-only settings) into the
    station's ``camera`` and validate the result."""
    unknown = set(overrides) - set(CAMERA_KEYS) - set(NODE_DEFAULTS)
    if unknown:
        raise CameraConfigError(f"unknown camera setting(s) {sorted(unknown)}")
    values = {k: getattr(camera, k) for k in CAMERA_KEYS} | NODE_DEFAULTS | dict(overrides)

    def where(key: str) -> str:
        if key in overrides:
            return f"ROS parameter '{key}'"
        if key in NODE_DEFAULTS:
            return f"default of '{key}'"
        return f"{station_file}: camera '{camera.name}' key '{key}'"

    def fail(key: str, why: str) -> CameraConfigError:
        return CameraConfigError(f"{where(key)}: {why} (got {values[key]!r})")

    def number(key: str, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
            raise fail(key, "expected an integer" if integer else "expected a number")
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            raise fail(key, f"must be {'>' if lo_open else '>='} {lo} and <= {hi}")
        return int(v) if integer else float(v)

    def text(key: str, choices: tuple[str, ...] | None = None) -> str:
        v = values[key]
        if not isinstance(v, str):
            raise fail(key, "expected a string")
        if choices is not None and v not in choices:
            raise fail(key, f"must be one of {', '.join(choices)}")
        return v

    source_text = values["source"]
    if isinstance(source_text, int) and not isinstance(source_text, bool):
        source_text = str(source_text)
    if source_text == "sim":
        raise fail("source", "source 'sim' is rendered by sim_robot; camera_ingest needs a V4L2 device, "
                             "file:, gst: or rtsp:// / http(s):// source")
    try:
        source = parse_source(source_text)
    except SourceError as e:
        raise fail("source", str(e)) from None

    sizes = {}
    for key in ("width", "height"):
        sizes[key] = number(key, MIN_SIZE, MAX_SIZE, integer=True)
        if sizes[key] % 2:
            raise fail(key, "capture sizes must be even (YUYV / MJPEG / NV12 modes use 2-pixel blocks)")
    for key in ("output_width", "output_height"):
        sizes[key] = number(key, MIN_SIZE, MAX_SIZE, integer=True)
    frame_id = text("frame_id")
    if not frame_id.strip():
        raise fail("frame_id", "must not be empty")
    fourcc = text("fourcc")
    if fourcc and (len(fourcc) != 4 or not fourcc.isascii()):
        raise fail("fourcc", "must be empty or 4 ASCII characters such as MJPG or YUYV")
    if not isinstance(values["loop"], bool):
        raise fail("loop", "expected true or false")
    reconnect_min = number("reconnect_min_s", 0.0, 60.0, lo_open=True)
    reconnect_max = number("reconnect_max_s", 0.0, 300.0, lo_open=True)
    if reconnect_max < reconnect_min:
        raise fail("reconnect_max_s", f"must be >= reconnect_min_s ({reconnect_min})")
    return CameraSettings(
        name=camera.name, source=source, source_text=source_text, width=sizes["width"], height=sizes["height"],
        fps=number("fps", 0.0, MAX_FPS, lo_open=True),
        output_width=sizes["output_width"], output_height=sizes["output_height"],
        resize=text("resize", RESIZE_MODES), jpeg_quality=number("jpeg_quality", 1, 100, integer=True),
        frame_id=frame_id, camera_info_file=text("camera_info_file"), loop=values["loop"],
        qos=text("qos", QOS_CHOICES), open_timeout_s=number("open_timeout_s", 0.0, 120.0, lo_open=True),
        read_timeout_s=number("read_timeout_s", 0.0, 120.0, lo_open=True),
        reconnect_min_s=reconnect_min, reconnect_max_s=reconnect_max, fourcc=fourcc,
        diagnostics_period_s=number("diagnostics_period_s", 0.0, 60.0, lo_open=True),
        opencv_threads=number("opencv_threads", -1, 64, integer=True),
    )
