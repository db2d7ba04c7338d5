"""Shared test utilities (``from helpers import ...``; pytest puts this folder on sys.path): polling with a
timeout, node modules started as their own processes and stopped with SIGINT, a thread-safe message log."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def poll(cond, timeout: float, period: float = 0.02) -> bool:
    """True as soon as ``cond()`` is true, False once ``timeout`` seconds passed without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(period)
    return False


def wait_for(cond, timeout: float = 10.0, what: str = "") -> None:
    """Until ``cond()`` is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    if not poll(cond, timeout):
        raise AssertionError(f"timed out waiting for {what or cond}")


def node_command(node: str, *params: str, station: str = "sim") -> list[str]:
    """``python -m recap_ros.nodes.<node> --ros-args -p station:=<station> -p <param> ...``"""
    args = [sys.executable, "-m", f"recap_ros.nodes.{node}", "--ros-args", "-p", f"station:={station}"]
    for p in params:
        args += ["-p", p]
    return args


def start_node(node: str, *params: str, station: str = "sim", log=None, **popen) -> subprocess.Popen:
    """The node module as a process in its own process group (see :func:`stop_node`), run from the repository
    root, unbuffered. ``log``: a path (written) or an open file that gets its stdout and stderr; without it,
    ``popen`` says where they go (e.g. ``stdout=subprocess.PIPE``)."""
    popen.setdefault("env", {**os.environ, "PYTHONUNBUFFERED": "1"})
    cmd = node_command(node, *params, station=station)
    if isinstance(log, (str, os.PathLike)):
        with open(log, "w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                    **popen)
    if log is not None:
        popen.update(stdout=log, stderr=subprocess.STDOUT)
    return subprocess.Popen(cmd, start_new_session=True, cwd=REPO, **popen)


def stop_node(proc: subprocess.Popen, timeout: float = 10.0) -> float:
    """SIGINT to the node's process group; returns how long it took to exit (the group is killed after
    ``timeout`` s, so a node that ignores SIGINT shows as taking that long, with a negative return code)."""
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.monotonic() - t0


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie is gone for our purposes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def describe(pids) -> str:
    """'pid: command line' of each given process that is still alive, one per line (for failure messages)."""
    lines = []
    for pid in pids:
        if alive(pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
                lines.append(f"{pid}: {command[:200]}")
            except FileNotFoundError:
                pass
    return "\n".join(lines)


def descendants(pid: int) -> list[int]:
    """The pids of ``pid``'s children, their children, and so on."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


# Tests that measure rates or latencies on the shared 2-core machine (CI runs everything on one): a run that
# other load disturbed is measured again, up to twice; a real regression fails all three runs.
TIMING = pytest.mark.flaky(reruns=2, reruns_delay=2)


class MessageLog:
    """Thread-safe lists of (receive time, message) per key, filled by subscription callbacks."""

    def __init__(self):
        self.lock = threading.RLock()
        self.data: dict[str, list] = {}

    def callback(self, key: str):
        """A subscription callback appending to ``key``'s list."""
        store = self.data.setdefault(key, [])

        def cb(msg):
            with self.lock:
                store.append((time.monotonic(), msg))
        return cb

    def count(self, key: str) -> int:
        with self.lock:
            return len(self.data[key])

    def messages(self, key: str) -> list:
        with self.lock:
            return [m for _, m in self.data[key]]

    def since(self, key: str, t0: float) -> list:
        """(receive time, message) received at or after ``t0`` (time.monotonic())."""
        with self.lock:
            return [(t, m) for t, m in self.data[key] if t >= t0]

    def wait(self, predicate, timeout: float) -> bool:
        """Polls ``predicate()`` (evaluated holding the lock) until true (True) or ``timeout`` s (False)."""
        def locked():
            with self.lock:
                return predicate()
        return poll(locked, timeout, period=0.05)
