"""Process handling the live benches share."""
from __future__ import annotations

import os
import random
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


def private_domain() -> str:
    """Give this bench's station a ROS domain of its own (inherited by the nodes it starts), unless the caller
    chose one: two live stations on one machine in the same domain would cross topics (same names). Returns it."""
    if not os.environ.get("ROS_DOMAIN_ID"):
        os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    return os.environ["ROS_DOMAIN_ID"]
