"""ROS 2 nodes, one file each; they only wire ROS topics, parameters and timers to the ROS-free modules."""
from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import signal
import sys
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_POLL_S = 0.1  # longest a stop request waits for an idle executor to return (see run_node)


class StopRequest:
    """SIGINT, SIGTERM and SIGHUP only *request* a stop: ``install()`` replaces their handlers with one that sets
    :attr:`requested`, so no signal raises inside a callback or inside the node's cleanup. A terminal Ctrl-C
    under ``ros2 launch`` reaches every process of the group and launch then signals each node again; both
    just land here."""

    def __init__(self):
        self.requested = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        """Take over the stop signals, then unblock them: ``recap-station`` starts each node with SIGINT and
        SIGHUP blocked, so a Ctrl-C that arrives while the node still imports waits for this instead of raising
        KeyboardInterrupt."""
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def ignore_further(self) -> None:
        """Once cleaned up: ignore stop signals. Python's finalisation would reset a handler to the default, and
        a late SIGINT (launch signals each node again after the terminal's Ctrl-C) would then kill the exiting
        process (exit code -2)."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def _on_signal(self, signum, _frame) -> None:
        if not self.requested.is_set():
            self.signal_name = signal.Signals(signum).name
        self.requested.set()


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold stop signals back (they are delivered when the block ends) while a child process is started: it
    inherits the block, so a Ctrl-C that reaches the whole process group cannot interrupt it before it calls
    :func:`ignore_stop_signals`."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals() -> None:
    """In a child process whose parent stops it (by closing a pipe, or by dying): ignore stop signals, then lift
    the block it was started with (:func:`stop_signals_blocked`)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_child(target: Callable, spec, name: str, timeout_s: float):
    """Start ``target(spec, inbox, outbox)`` in a spawned daemon process (a node's real-time part: its own GIL)
    with stop signals blocked (:func:`stop_signals_blocked`; the child calls :func:`ignore_stop_signals` and
    stops when ``inbox`` closes), and wait up to ``timeout_s`` for its first report. Returns (process, the end
    that sends to its inbox, the end that receives from its outbox, the first report); the outbox reaches EOF
    when the child exits. Raises RuntimeError when it does not start or exits at start."""
    from multiprocessing import resource_tracker

    ctx = mp.get_context("spawn")
    # started now, not inside the block below: starting it unblocks SIGINT and SIGTERM again (resource_tracker
    # .ensure_running), and a Ctrl-C then killed the child while it imported (a traceback at an early stop)
    resource_tracker.ensure_running()
    child_in, to_child = ctx.Pipe(duplex=False)
    from_child, child_out = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(spec, child_in, child_out), daemon=True, name=name)
    with stop_signals_blocked():  # a Ctrl-C while the child imports must not kill it
        proc.start()
    child_in.close()
    child_out.close()  # only the child holds the write end: its exit is EOF here
    if not from_child.poll(timeout_s):
        proc.kill()
        raise RuntimeError(f"{name} did not start within {timeout_s:g} s")
    try:
        first = from_child.recv()
    except EOFError:
        proc.join(1.0)
        raise RuntimeError(f"{name} exited at start (exit code {proc.exitcode})") from None
    return proc, to_child, from_child, first


def run_node(name: str, make_node: Callable, args=None,
             config_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Shared ``main`` body: init rclpy, build the node, spin it on a SingleThreadedExecutor until SIGINT,
    SIGTERM or SIGHUP, clean up, exit 0.

    Shutdown order: a stop signal only sets a flag (:class:`StopRequest`; rclpy's own signal handlers are not
    installed: they shut the context down at once, so the node's cleanup could no longer log or publish, which
    printed "Failed to publish log message to rosout: publisher's context is invalid"). The executor waits at
    most ``STOP_POLL_S`` at a time, so an idle node sees the flag within that time; then the node is destroyed
    (e.g. the recorder finalises its bag) with the context still valid, and only then rclpy shuts down.

    rclpy's MultiThreadedExecutor is not used: it costs milliseconds of GIL time per callback and fell seconds
    behind the station's ~250 messages/s. After the node is built, everything allocated so far (imports, model)
    is moved to the permanent GC generation (``gc.freeze``): a full collection over it held the GIL for 10 ms
    (measured, policy_server's imports and model, idle machine), which a 50 Hz tick thread would wait for.

    A configuration error (``config_errors``, plus StationConfigError) is printed as one line naming the node
    and returns exit code 2 instead of a traceback.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from recap_ros.station import StationConfigError

    stop = StopRequest()
    stop.install()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = make_node()
        gc.collect()
        gc.freeze()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.requested.is_set():
            executor.spin_once(timeout_sec=STOP_POLL_S)
        node.get_logger().info(f"{stop.signal_name}: stopping")
    except ExternalShutdownException:  # the context was shut down by someone else: nothing left to spin
        pass
    except (StationConfigError, *config_errors) as e:
        print(f"{name}: refusing to start: {e}", file=sys.stderr)
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(uninstall_handlers=False)  # rclpy installed none; uninstalling would reset ours
        stop.ignore_further()
    return 0
