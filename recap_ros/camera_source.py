"""Camera source strings, parsed once for the station schema and the camera_ingest node (ROS-free).

Accepted forms:
  ``0`` / ``"2"``                   V4L2 device index
  ``/dev/video0``, ``/dev/v4l/...``  V4L2 device path
  ``file:/path/clip.mp4``           video file (looped or stopped at end by the camera's ``loop`` flag)
  ``gst:<pipeline> ! appsink``      GStreamer pipeline (OpenCV's GStreamer backend)
  ``rtsp://``, ``http://``, ``https://`` network stream (FFmpeg backend)
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("device", "file", "gstreamer", "network")


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    kind: str  # one of KINDS
    target: str | int  # device index / path, file path, pipeline, URL

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


def parse_source(text: str | int) -> Source:
    if isinstance(text, bool):
        raise SourceError("expected a device index, a /dev path, file:, gst: or rtsp:// / http(s):// source")
    if isinstance(text, int):
        if text < 0:
            raise SourceError("device index must be >= 0")
        return Source("device", text)
    s = str(text).strip()
    if not s:
        raise SourceError("empty camera source")
    if s.isdigit():
        return Source("device", int(s))
    if s.startswith("/dev/"):
        return Source("device", s)
    if s.startswith("file:"):
        path = s[len("file:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise SourceError("file: source needs a path")
        return Source("file", path)
    if s.startswith("gst:"):
        pipeline = s[len("gst:"):].strip()
        if "appsink" not in pipeline:
            raise SourceError("a GStreamer pipeline must end in an appsink")
        return Source("gstreamer", pipeline)
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if scheme in ("rtsp", "rtsps", "http", "https"):
        return Source("network", s)
    if scheme:
        raise SourceError(f"unknown source scheme '{scheme}://' (use rtsp://, http(s)://, file:, gst: or a device)")
    raise SourceError("unknown camera source (use a device index, /dev/videoN, file:<path>, gst:<pipeline>, "
                      "rtsp:// or http(s)://)")
