"""Camera health for diagnostics (ROS-free): latency window, measured rates, status level and key/values."""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from recap_ros.camera.capture import ENDED, FAILED, STREAMING, CaptureStats

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels


class LatencyWindow:
    """The last ``size`` capture-to-publish latencies (s); thread-safe."""

    def __init__(self, size: int = 300):
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def percentiles_ms(self, *qs: float) -> list[float]:
        """Percentiles in ms (NaN while empty)."""
        with self._lock:
            values = np.fromiter(self._values, dtype=np.float64)
        if values.size == 0:
            return [math.nan] * len(qs)
        return [float(v) * 1e3 for v in np.percentile(values, qs)]


class RateMeter:
    """Rate of a monotonically increasing counter between successive update() calls."""

    def __init__(self):
        self._last: tuple[float, int] | None = None

    def update(self, t: float, count: int) -> float:
        last, self._last = self._last, (t, count)
        if last is None or t <= last[0]:
            return math.nan
        return (count - last[1]) / (t - last[0])


@dataclass(frozen=True)
class CameraHealth:
    level: int
    message: str
    values: list[tuple[str, str]]


def camera_health(stats: CaptureStats, *, requested_fps: float, capture_fps: float, publish_fps: float,
                  published: int, latency_p50_ms: float, latency_p99_ms: float, source: str) -> CameraHealth:
    stale_after = max(1.0, 5.0 / requested_fps)
    if stats.state == FAILED:
        level, message = ERROR, f"failed: {stats.last_error}"
    elif stats.state == ENDED:
        level, message = WARN, "stopped at end of file (loop: false)"
    elif stats.state != STREAMING:
        since = f" for {stats.outage_s:.1f} s" if stats.outage_s > 0 else ""
        level, message = ERROR, f"no frames{since}: {stats.last_error or 'opening ' + source}"
    elif stats.last_frame_age_s > stale_after:
        level, message = WARN, f"stalled: last frame {stats.last_frame_age_s:.1f} s ago"
    elif math.isfinite(capture_fps) and capture_fps < 0.8 * requested_fps:
        level, message = WARN, f"capturing {capture_fps:.1f} fps, {requested_fps:g} requested"
    else:
        level, message = OK, "streaming"

    def f(x: float) -> str:
        return f"{x:.2f}" if math.isfinite(x) else "nan"

    values = [
        ("source", source), ("state", stats.state), ("connected", str(stats.connected).lower()),
        ("fps", f(publish_fps)), ("capture_fps", f(capture_fps)), ("requested_fps", f"{requested_fps:g}"),
        ("frames_captured", str(stats.frames)), ("frames_published", str(published)),
        ("dropped_frames", str(stats.dropped)),
        ("latency_p50_ms", f(latency_p50_ms)), ("latency_p99_ms", f(latency_p99_ms)),
        ("reconnects", str(stats.reconnects)), ("loops", str(stats.loops)),
        ("read_failures", str(stats.read_failures)), ("open_failures", str(stats.open_failures)),
        ("outage_s", f(stats.outage_s)), ("total_outage_s", f(stats.total_outage_s)),
        ("frame_size", f"{stats.frame_width}x{stats.frame_height}"),
        ("last_frame_age_s", f(stats.last_frame_age_s)), ("last_error", stats.last_error),
    ]
    return CameraHealth(level, message, values)
