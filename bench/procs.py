"""Process handling the live benches share."""
from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    """Stop a process started with ``start_new_session=True`` as Ctrl-C would: SIGINT to its process group, then
    SIGKILL if it has not exited after ``timeout_s``. Returns its exit code."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
