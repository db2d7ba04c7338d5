"""Camera capture on its own thread (ROS-free): open a V4L2 device, video file, GStreamer pipeline or network
stream with OpenCV, stamp each frame when it is grabbed, keep only the newest frame, reconnect with backoff.

Threads:
  CaptureThread  grab -> stamp -> FrameSlot.put (never waits for the consumer)
  Delivery       FrameSlot.take -> handler (convert + publish) -> latency sample
The slot holds one frame: a slow consumer drops old frames (counted) instead of growing a queue.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from recap_ros import imaging
from recap_ros.camera.settings import CameraSettings
from recap_ros.camera_source import Source


# ------------------------------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # as OpenCV returned it (BGR, BGRA or mono)
    stamp_ns: int      # capture time on the node clock
    seq: int


class FrameSlot:
    """The newest frame only. ``put`` never blocks; a frame replaced before it was taken counts as dropped."""

    def __init__(self):
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()

    def take(self, timeout: float) -> Frame | None:
        """The newest frame not yet taken, waiting up to ``timeout`` s; None on timeout or after close()."""
        with self._cond:
            self._cond.wait_for(lambda: self._frame is not None or self._closed, timeout)
            frame, self._frame = self._frame, None
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def to_output_rgb(image: np.ndarray, s: CameraSettings) -> np.ndarray:
    """OpenCV frame (BGR / BGRA / mono) -> output-size RGB (fit first, so colour conversion runs on fewer
    pixels when downscaling)."""
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif channels != 3:
        raise ValueError(f"unsupported frame with {channels} channels from {s.source_text}")
    return cv2.cvtColor(imaging.fit(image, s.output_width, s.output_height, s.resize), cv2.COLOR_BGR2RGB)


# -------------------------------------------------------------------------------------------------- open
class OpenError(RuntimeError):
    """A source could not be opened. ``permanent``: retrying cannot help (e.g. no GStreamer in this OpenCV)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def backend_available(name: str) -> bool:
    """Whether this OpenCV build has a video I/O backend (``GStreamer``, ``FFMPEG``, ``v4l/v4l2``)."""
    info = cv2.getBuildInformation()
    return re.search(rf"^\s*{re.escape(name)}:\s+YES", info, re.MULTILINE) is not None


def device_path(source: Source) -> str:
    return f"/dev/video{source.target}" if isinstance(source.target, int) else str(source.target)


def open_capture(s: CameraSettings) -> cv2.VideoCapture:
    """An opened cv2.VideoCapture for the settings' source, or OpenError saying why not."""
    try:
        return _open(s)
    except cv2.error as e:
        raise OpenError(f"OpenCV failed opening {s.source_text}: {str(e).strip().splitlines()[-1]}") from None


def _open(s: CameraSettings) -> cv2.VideoCapture:
    src = s.source
    if src.kind == "gstreamer":
        if not backend_available("GStreamer"):
            raise OpenError(f"cannot open GStreamer pipeline '{src.target}': this OpenCV {cv2.__version__} was "
                            "built without GStreamer (cv2.getBuildInformation() says 'GStreamer: NO'; "
                            "opencv-python(-headless) wheels lack it). Use an OpenCV built with GStreamer "
                            "(e.g. the system python3-opencv) or a V4L2 / file: / rtsp:// source", permanent=True)
        cap = cv2.VideoCapture(src.target, cv2.CAP_GSTREAMER)
        what = f"GStreamer pipeline '{src.target}'"
    elif src.kind == "device":
        path = device_path(src)
        if not os.path.exists(path):
            raise OpenError(f"V4L2 device {path} does not exist (unplugged, or wrong index/path?)")
        if not os.access(path, os.R_OK | os.W_OK):
            raise OpenError(f"no permission to open V4L2 device {path} (is the user in the 'video' group?)")
        # OpenCV's V4L2 backend has no read timeout property; it reads this once per process (default 10 s).
        os.environ.setdefault("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", str(max(1, math.ceil(s.read_timeout_s))))
        cap = cv2.VideoCapture(path, cv2.CAP_V4L2)
        if cap.isOpened():
            if s.fourcc:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*s.fourcc))
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, s.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, s.height)
            cap.set(cv2.CAP_PROP_FPS, s.fps)
        what = f"V4L2 device {path}"
    elif src.kind == "file":
        if not os.path.isfile(src.target):
            raise OpenError(f"video file {src.target} not found")
        cap = cv2.VideoCapture(src.target, cv2.CAP_FFMPEG)
        what = f"video file {src.target} (not a video FFmpeg can decode?)"
    elif src.kind == "network":
        cap = cv2.VideoCapture(src.target, cv2.CAP_FFMPEG, [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(s.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(s.read_timeout_s * 1000)])
        what = f"network stream {src.target} (open timeout {s.open_timeout_s:g} s)"
    else:
        raise OpenError(f"unknown source kind '{src.kind}'", permanent=True)
    if not cap.isOpened():
        cap.release()
        raise OpenError(f"OpenCV could not open {what}")
    return cap


def describe_capture(cap: cv2.VideoCapture) -> str:
    """What the backend negotiated, e.g. 'V4L2 640x480 @ 30 fps MJPG' (for the connected log line)."""
    code = int(cap.get(cv2.CAP_PROP_FOURCC))
    fourcc = "".join(chr((code >> 8 * i) & 0xFF) for i in range(4)).strip("\0 ") if code > 0 else "?"
    return (f"{cap.getBackendName()} {int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))}x"
            f"{int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))} @ {cap.get(cv2.CAP_PROP_FPS):g} fps {fourcc}")


# ------------------------------------------------------------------------------------------------ backoff
class Backoff:
    """Retry delays initial, 2·initial, … capped at maximum; reset() after a success."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum = initial, maximum
        self._next = initial

    def next_delay(self) -> float:
        d = self._next
        self._next = min(self.maximum, self._next * 2.0)
        return d

    def reset(self) -> None:
        self._next = self.initial


# ------------------------------------------------------------------------------------------------ capture
STARTING, STREAMING, RECONNECTING, ENDED, FAILED = "starting", "streaming", "reconnecting", "ended", "failed"


@dataclass(frozen=True)
class CaptureStats:
    state: str                # starting | streaming | reconnecting | ended | failed
    frames: int               # frames captured since start
    dropped: int              # frames replaced in the slot before the consumer took them
    reconnects: int           # successful re-opens after an outage
    loops: int                # file restarts (loop: true)
    read_failures: int
    open_failures: int
    outage_s: float           # length of the current outage (0 while streaming)
    total_outage_s: float     # all outages so far, current one included
    last_error: str
    frame_width: int          # size of the frames the source delivers (0 before the first frame)
    frame_height: int
    last_frame_age_s: float   # since the last frame was captured (inf before the first)

    @property
    def connected(self) -> bool:
        return self.state == STREAMING


class CaptureThread:
    """Reads frames from ``settings.source`` into ``slot`` until stop().

    ``clock()`` gives the node time in ns (frame stamps); ``on_event(level, text)`` receives one line per state
    change (connected, lost, reconnected, ended, failed) - never one per failed retry.
    Files are paced at ``settings.fps`` and stamped when released; live sources are stamped right after
    ``grab()`` returns, i.e. when the frame was handed over by the driver / stream.
    """

    def __init__(self, settings: CameraSettings, slot: FrameSlot, clock: Callable[[], int],
                 on_event: Callable[[str, str], None] = lambda level, text: None):
        self.s, self.slot, self.clock, self.on_event = settings, slot, clock, on_event
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"capture-{settings.name}", daemon=True)
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._state, self._frames, self._reconnects, self._loops = STARTING, 0, 0, 0
        self._read_failures, self._open_failures = 0, 0
        self._outage_start: float | None = None
        self._closed_outage_s = 0.0
        self._last_error = ""
        self._frame_size = (0, 0)
        self._last_frame_t: float | None = None
        self._next_release: float | None = None
        self._ever_streamed = False
        self._mode = ""

    # ---- public
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Ask the thread to stop; True when it has. A live read blocks at most read_timeout_s."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> CaptureStats:
        now = time.monotonic()
        with self._lock:
            outage = now - self._outage_start if self._outage_start is not None else 0.0
            return CaptureStats(
                state=self._state, frames=self._frames, dropped=self.slot.dropped, reconnects=self._reconnects,
                loops=self._loops, read_failures=self._read_failures, open_failures=self._open_failures,
                outage_s=outage, total_outage_s=self._closed_outage_s + outage, last_error=self._last_error,
                frame_width=self._frame_size[0], frame_height=self._frame_size[1],
                last_frame_age_s=now - self._last_frame_t if self._last_frame_t is not None else math.inf)

    # ---- thread
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug, not a camera fault: report it instead of dying silently
            self._fail(f"capture thread crashed: {type(e).__name__}: {e}", opening=False)
            self._set_state(FAILED)
            self.on_event("error", f"camera {self.s.name}: capture thread crashed: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        cap = None
        frames_since_open = 0
        try:
            while not self._stop.is_set():
                if cap is None:
                    try:
                        cap = open_capture(self.s)
                    except OpenError as e:
                        self._fail(str(e), opening=True)
                        if e.permanent:
                            self._set_state(FAILED)
                            self.on_event("error", f"camera {self.s.name}: {e} - giving up")
                            return
                        self._stop.wait(self._backoff.next_delay())
                        continue
                    frames_since_open = 0
                    self._mode = describe_capture(cap)
                try:
                    ok = cap.grab()
                    stamp = self.clock()
                    image = cap.retrieve()[1] if ok else None
                except cv2.error:  # some backends raise instead of returning False on a lost device
                    image = None
                if image is None or image.size == 0:
                    cap.release()
                    cap = None
                    if self.s.source.kind == "file" and frames_since_open > 0:
                        if not self.s.loop:
                            self._set_state(ENDED)
                            self.on_event("info", f"camera {self.s.name}: end of {self.s.source.target} "
                                                  "(loop: false), stopped")
                            return
                        with self._lock:
                            self._loops += 1
                        continue  # reopen at once: a loop, not an outage
                    self._fail(f"no frame from {self.s.source_text} (unplugged, stream dropped or empty file)",
                               opening=False)
                    self._stop.wait(self._backoff.next_delay())
                    continue
                if self.s.source.kind == "file":
                    stamp = self._pace()
                    if stamp is None:
                        return
                frames_since_open += 1
                self._got_frame(image)
                self.slot.put(Frame(image, stamp, self._frames))
        finally:
            if cap is not None:
                cap.release()

    def _pace(self) -> int | None:
        """Wait for this frame's release time at the requested fps; returns its stamp (None when stopping)."""
        period = self.s.period_s
        now = time.monotonic()
        if self._next_release is None or now - self._next_release > period:
            self._next_release = now  # first frame, or fell behind by more than a frame: do not burst
        elif self._stop.wait(max(0.0, self._next_release - now)):
            return None
        self._next_release += period
        return self.clock()

    def _got_frame(self, image: np.ndarray) -> None:
        now = time.monotonic()
        with self._lock:
            self._frames += 1
            self._frame_size = (int(image.shape[1]), int(image.shape[0]))
            self._last_frame_t = now
            if self._state == STREAMING:
                return
            outage = now - self._outage_start if self._outage_start is not None else None
            self._closed_outage_s += outage or 0.0
            self._outage_start = None
            reconnected = self._ever_streamed
            self._reconnects += int(reconnected)
            self._ever_streamed = True
            self._state = STREAMING
        self._backoff.reset()
        size = f"frames {image.shape[1]}x{image.shape[0]}, {self._mode}"
        if reconnected:
            self.on_event("info", f"camera {self.s.name}: reconnected to {self.s.source_text} after "
                                  f"{outage:.1f} s ({size})")
        else:
            self.on_event("info", f"camera {self.s.name}: streaming from {self.s.source_text} ({size})")

    def _fail(self, error: str, opening: bool) -> None:
        with self._lock:
            if opening:
                self._open_failures += 1
            else:
                self._read_failures += 1
            first = self._outage_start is None
            if first:
                self._outage_start = time.monotonic()
            changed = error != self._last_error
            self._last_error = error
            self._state = RECONNECTING
        if first or changed:  # once per outage (and when the reason changes), not once per retry
            self.on_event("warn", f"camera {self.s.name}: {error}; retrying every <= {self.s.reconnect_max_s:g} s")

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state


# ----------------------------------------------------------------------------------------------- delivery
class Delivery:
    """Consumer thread: takes the newest frame from the slot and calls ``handler(frame)`` (convert + publish),
    which returns the clock time (ns) at which the frame went out; records capture-to-publish latency
    (that time minus the frame stamp) into ``latency`` (anything with ``add(seconds)``)."""

    def __init__(self, slot: FrameSlot, handler: Callable[[Frame], int], latency,
                 on_error: Callable[[str], None], name: str = "delivery"):
        self.slot, self.handler, self.latency, self.on_error = slot, handler, latency, on_error
        self.delivered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        self._stop.set()
        self.slot.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        last_error = ""
        while not self._stop.is_set():
            frame = self.slot.take(timeout=0.2)
            if frame is None:
                continue
            try:
                published_ns = self.handler(frame)
            except Exception as e:  # one bad frame must not stop the stream; report each new kind once
                text = f"{type(e).__name__}: {e}"
                if text != last_error:
                    self.on_error(f"dropped frame {frame.seq}: {text}")
                last_error = text
                continue
            self.delivered += 1
            self.latency.add((published_ns - frame.stamp_ns) / 1e9)
