"""nodes.start_child: the spawned child starts with the stop signals blocked, also when it is the first child of
its process (multiprocessing then starts its resource tracker, which unblocks SIGINT and SIGTERM), so a Ctrl-C
during the child's imports cannot kill it."""
import json
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _report_mask(_spec, inbox, outbox):
    """Child: report the signal mask it started with, then wait until the parent closes the inbox."""
    outbox.send(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    try:
        inbox.recv()
    except EOFError:
        pass


def first_child_mask() -> list[int]:
    from recap_ros.nodes import start_child

    proc, to_child, _, mask = start_child(_report_mask, None, "mask_child", 30.0)
    to_child.close()
    proc.join(10)
    return mask


def test_first_child_starts_with_stop_signals_blocked():
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_start_child as t, json; print(json.dumps(t.first_child_mask()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mask = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {int(signal.SIGINT), int(signal.SIGTERM), int(signal.SIGHUP)} <= mask, mask
