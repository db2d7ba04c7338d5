"""A fixed-rate control loop on its own thread, with period statistics (ROS-free).

rclpy timers are dispatched by the executor, so a timer callback waits behind whatever the executor is doing
(image callbacks, services) and behind the GIL. :class:`DeadlineLoop` instead sleeps on absolute monotonic
deadlines in a dedicated thread (optionally SCHED_FIFO), and :class:`PeriodMonitor` measures what it
achieved: the error of every period against the nominal one, and missed deadlines (a period that took at
least 1.5 nominal periods counts the ticks it swallowed).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Callable

import numpy as np


CONTROL_PRIORITY = 50  # default SCHED_FIFO priority of 50 Hz command loops (below the kernel's IRQ threads)


class PeriodMonitor:
    def __init__(self, period_s: float, window: int = 3000):
        self.period_ns = int(round(period_s * 1e9))
        self.errors_ns: deque[int] = deque(maxlen=window)
        self.missed = 0
        self.ticks = 0
        self._last_ns: int | None = None

    def tick(self, now_ns: int) -> int:
        """Record a tick at now_ns; returns how many nominal periods it covers (1, or more after a miss)."""
        self.ticks += 1
        if self._last_ns is None:
            self._last_ns = now_ns
            return 1
        elapsed = now_ns - self._last_ns
        self._last_ns = now_ns
        self.errors_ns.append(abs(elapsed - self.period_ns))
        periods = max(1, int(elapsed / self.period_ns + 0.5))
        self.missed += periods - 1
        return periods

    def summary(self) -> dict[str, float]:
        """p50 / p99 / max absolute period error in ms over the window, and missed ticks since the start."""
        if not self.errors_ns:
            return {"period_err_p50_ms": 0.0, "period_err_p99_ms": 0.0, "period_err_max_ms": 0.0,
                    "missed_ticks": self.missed}
        e = np.asarray(self.errors_ns, dtype=np.float64) / 1e6
        return {"period_err_p50_ms": float(np.percentile(e, 50)), "period_err_p99_ms": float(np.percentile(e, 99)),
                "period_err_max_ms": float(e.max()), "missed_ticks": self.missed}


def try_realtime(priority: int) -> str:
    """Ask for SCHED_FIFO at this priority for the calling thread; returns what happened (for the log)."""
    if priority <= 0:
        return "normal scheduling (realtime priority disabled)"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return f"SCHED_FIFO priority {priority}"
    except (PermissionError, OSError, AttributeError) as e:
        return f"normal scheduling (SCHED_FIFO {priority} refused: {e})"


class DeadlineLoop:
    """Calls ``fn(periods, now_ns)`` every period on absolute deadlines until :meth:`stop`.

    An exception from fn goes to ``on_error`` and the loop keeps its rate (a stalled stream is worse).
    Deadlines already gone are skipped (``periods`` tells fn how many it covers), unless the loop is at most
    ``max_lag_s`` behind: then the late calls are caught up back to back (a simulator whose time must keep up
    with wall time uses that).
    """

    def __init__(self, period_s: float, fn: Callable[[int, int], None], monitor: PeriodMonitor,
                 on_error: Callable[[Exception], None], priority: int = 0, name: str = "control-loop",
                 max_lag_s: float = 0.0):
        self.period_ns = int(round(period_s * 1e9))
        self.max_lag_ns = int(round(max_lag_s * 1e9))
        self.fn, self.monitor, self.on_error, self.priority = fn, monitor, on_error, priority
        self.scheduling = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        self.scheduling = try_realtime(self.priority)
        deadline = time.monotonic_ns()
        while not self._stop.is_set():
            now = time.monotonic_ns()
            if deadline > now:
                time.sleep((deadline - now) / 1e9)
                now = time.monotonic_ns()
            periods = self.monitor.tick(now)
            try:
                self.fn(periods, now)
            except Exception as e:  # noqa: BLE001 - reported, never allowed to stop the stream
                self.on_error(e)
            deadline += self.period_ns
            after = time.monotonic_ns()
            if deadline <= after - self.max_lag_ns:  # overslept or fn overran: skip the deadlines already gone
                deadline += ((after - deadline) // self.period_ns + 1) * self.period_ns
