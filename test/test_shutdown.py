"""Shutdown: a stop signal (SIGINT, SIGTERM, SIGHUP) only requests a stop, so nodes exit with code 0, without a
traceback, and the recorder finalises the episode's bag; the runner's hang-up or death stops every node."""
import functools
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml
from helpers import REPO, alive, descendants, describe, poll, wait_for

from recap_ros import launch_graph, paths
from recap_ros.nodes import STOP_SIGNALS, StopRequest, stop_signals_blocked
from recap_ros.runner import RUNNER_LOG, _die_with_parent, node_env
from recap_ros.station import load_station


# ------------------------------------------------------------------------------------------ signal handling
def test_stop_signals_only_request_a_stop():
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        stop = StopRequest()
        stop.install()
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt with Python's default handler
        wait_for(stop.requested.is_set, 2.0, "the stop request")
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (launch's SIGTERM) changes nothing
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)
        assert stop.signal_name == "SIGINT"
        stop.ignore_further()
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_process_started_with_die_with_parent_stops_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import functools, os, subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from recap_ros.runner import _die_with_parent
        child = subprocess.Popen(["sleep", "60"], preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        print(child.pid, flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    wait_for(lambda: not alive(child), 5.0, f"the child {child} to stop after its parent's SIGKILL")


def test_die_with_parent_stops_a_child_whose_parent_is_already_gone():
    # the parent pid passed is not the child's parent (as after a runner that died before prctl took effect)
    child = subprocess.Popen(["sleep", "60"], preexec_fn=functools.partial(_die_with_parent, 1))
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_a_child_started_with_stop_signals_blocked_is_not_interrupted_before_it_ignores_them():
    """As policy_server's tick process: a Ctrl-C to the group while the child still imports must not kill it."""
    with stop_signals_blocked():
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import time
            print("importing", flush=True)
            time.sleep(1.0)  # the SIGINT arrives here
            from recap_ros.nodes import ignore_stop_signals
            ignore_stop_signals()
            print("ignoring stop signals", flush=True)
            """)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert not set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's block is lifted
    assert child.stdout.readline() == "importing\n"
    child.send_signal(signal.SIGINT)
    out = child.stdout.read()
    assert child.wait(timeout=10) == 0 and out == "ignoring stop signals\n", out


_FAKE_NODE = textwrap.dedent("""
    import os, signal, sys, time
    from rclpy.node import Node
    from recap_ros.nodes import run_node

    class Slow(Node):
        def __init__(self):
            super().__init__("slow_to_stop")
            print("ready", flush=True)

        def destroy_node(self):
            print("destroying", flush=True)
            time.sleep(1.0)  # the test signals again meanwhile
            self.get_logger().info("cleaned up")  # reaches rosout: the context is still valid
            super().destroy_node()

    rc = run_node("slow_to_stop", Slow)
    os.kill(os.getpid(), signal.SIGINT)  # late, as launch's second SIGINT: ignored
    time.sleep(0.1)
    print("run_node returned", rc, flush=True)
    sys.exit(rc)
    """)


@pytest.mark.ros
@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_run_node_cleanup_is_not_interrupted_by_more_signals(first):
    pytest.importorskip("rclpy")
    p = subprocess.Popen([sys.executable, "-c", _FAKE_NODE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for want in ("ready", "destroying"):
            while not (lines and lines[-1].strip() == want):
                line = p.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
            if want == "ready":
                t0 = time.monotonic()
                p.send_signal(getattr(signal, first))
        stop_s = time.monotonic() - t0
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):  # while destroy_node runs
            p.send_signal(s)
        out = "".join(lines) + p.stdout.read()
        rc = p.wait(timeout=10)
    finally:
        p.kill()
    assert rc == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "Failed to publish" not in out, out
    assert f"[slow_to_stop]: {first}: stopping" in out and "[slow_to_stop]: cleaned up" in out, out
    assert "run_node returned 0" in out, out
    assert stop_s < 1.0, f"an idle node took {stop_s:.2f} s to see the stop request"


# ------------------------------------------------------------------------------------------ whole station
@pytest.fixture
def station_file(tmp_path):
    """The sim station with one long episode: the policy does not start and the corrector does not take over, so
    the stop always lands in the middle of the first episode."""
    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["recorder"]["output_dir"] = str(tmp_path / "bags")
    data["policy"]["autostart"] = False
    data["sim"].update(episode_timeout_s=120.0, corrector_patience_s=120.0)
    f = tmp_path / "sim.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def _wait_for_recording(bags, procs, log):
    """Until every node is up (policy_server, loading its model, is the last) and an episode's bag has been
    written to for a second (every process still running)."""
    def recording():
        for p in procs:
            assert p.poll() is None, log.read_text()[-3000:]
        return "[policy_server]: station '" in log.read_text() and any(bags.glob("*/*.mcap"))
    wait_for(recording, 120, f"policy_server's start and a bag under {bags}")
    time.sleep(1.0)


def _check_bags(bags):
    """The one episode's bag, cut by the stop, reads without repair (rosbags) and is labelled unlabelled."""
    from rosbags.rosbag2 import Reader

    from recap_ros.recording.bag import read_metadata

    dirs = sorted(d for d in bags.iterdir() if d.is_dir())  # recap-station.log sits beside them
    assert len(dirs) == 1, {d.name: read_metadata(d)["rosbag2_bagfile_information"]["custom_data"] for d in dirs}
    bag = dirs[0]
    with Reader(bag) as r:
        assert r.message_count > 0 and sum(1 for _ in r.messages()) == r.message_count
    custom = read_metadata(bag)["rosbag2_bagfile_information"]["custom_data"]
    assert (custom["recap.episode"], custom["recap.outcome"], custom["recap.end_reason"]) == \
        ("0", "unlabelled", "shutdown"), custom


def _start_runner(station_file, log):
    return subprocess.Popen([sys.executable, "-m", "recap_ros.runner", str(station_file)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigint_to_the_runners_process_group_stops_every_node_cleanly(rclpy_context, station_file, tmp_path):
    """As Ctrl-C in the terminal of `./dev station`: exit code 0 from the runner and every node, no traceback,
    the bag being recorded is finalised."""
    log_path = tmp_path / "station.log"
    with open(log_path, "w") as log:
        proc = _start_runner(station_file, log)
        try:
            _wait_for_recording(tmp_path / "bags", [proc], log_path)
            nodes = descendants(proc.pid)
            t0 = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=30)
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    print(f"stopped in {elapsed:.2f} s")
    assert rc == 0 and elapsed < 5.0, text[-3000:]  # 5 s: the runner's grace before it kills a node
    assert "exit codes other than 0" not in text and "ignored SIGINT" not in text, text[-3000:]
    assert "Traceback" not in text and "Failed to publish" not in text, text[-3000:]
    for spec in launch_graph.node_specs(load_station(str(station_file))):
        assert f"[{spec.name}]: SIGINT: stopping" in text, text[-3000:]
    assert not [p for p in nodes if alive(p)]
    _check_bags(tmp_path / "bags")


@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigint_to_a_launch_style_process_group_stops_every_node_cleanly(rclpy_context, station_file, tmp_path):
    """As Ctrl-C under `ros2 launch`: every node is in the terminal's process group, so each gets the SIGINT,
    and then launch sends each one SIGINT again. Every node exits with code 0, without a traceback."""
    specs = launch_graph.node_specs(load_station(str(station_file)))
    log_path = tmp_path / "station.log"
    procs, pgid = {}, 0
    with open(log_path, "w") as log:
        try:
            for spec in specs:
                params = tmp_path / f"{spec.name}.params.yaml"
                params.write_text(yaml.safe_dump(spec.params_yaml()))
                procs[spec.name] = subprocess.Popen(
                    [sys.executable, "-m", spec.module, *spec.ros_args(str(params))], stdout=log,
                    stderr=subprocess.STDOUT, cwd=REPO, env=node_env(os.environ), process_group=pgid)
                pgid = pgid or procs[spec.name].pid
            _wait_for_recording(tmp_path / "bags", procs.values(), log_path)
            os.killpg(pgid, signal.SIGINT)
            time.sleep(0.05)
            for p in procs.values():
                p.send_signal(signal.SIGINT)
            codes = {name: p.wait(timeout=30) for name, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
    text = log_path.read_text()
    assert codes == {s.name: 0 for s in specs}, text[-3000:]
    assert "Traceback" not in text and "Failed to publish" not in text, text[-3000:]
    _check_bags(tmp_path / "bags")


class _Terminal:
    """The runner as `./dev station` runs in a terminal: session leader, a pty as its controlling terminal,
    whose output is copied to ``log_path`` until :meth:`close` hangs the terminal up."""

    def __init__(self, station_file, log_path):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(["setsid", "--ctty", sys.executable, "-m", "recap_ros.runner",
                                      str(station_file)], stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
        os.close(slave)
        self._closing = threading.Event()
        self._copier = threading.Thread(target=self._copy, args=(open(log_path, "wb"),), daemon=True)
        self._copier.start()

    def _copy(self, log):
        with log:
            while not self._closing.is_set():
                if select.select([self.master], [], [], 0.05)[0]:
                    try:
                        log.write(os.read(self.master, 65536))
                    except OSError:  # EIO: every process closed the terminal
                        return
                    log.flush()

    def close(self):
        """The terminal window closes: the kernel sends SIGHUP to the runner (the session leader)."""
        self._closing.set()
        self._copier.join()
        os.close(self.master)


@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["terminal closed", "SIGKILL"])
def test_runner_hang_up_or_death_leaves_no_node_behind(rclpy_context, station_file, tmp_path, how):
    """Closing the runner's terminal (SIGHUP) stops the station as Ctrl-C does: exit code 0 (so every node
    exited with 0). SIGKILL of the runner makes the kernel send every node SIGTERM, so they still stop cleanly.
    Either way no process is left and the bag is finalised."""
    log_path = tmp_path / "station.log"
    processes = []
    if how == "terminal closed":
        terminal = _Terminal(station_file, log_path)
        proc = terminal.proc
    else:
        log = open(log_path, "w")
        proc = _start_runner(station_file, log)
    try:
        _wait_for_recording(tmp_path / "bags", [proc], log_path)
        processes = descendants(proc.pid)  # the nodes and their own children (policy_server's tick process)
        text = log_path.read_text()  # output after a hang-up goes nowhere
        if how == "terminal closed":
            terminal.close()
        else:
            proc.kill()
            log.close()
        rc = proc.wait(timeout=30)
        stopped = poll(lambda: not [p for p in processes if alive(p)], 15)
        assert stopped, (f"still running 15 s after the runner's {how}:\n{describe(processes)}\n"
                         f"log:\n{log_path.read_text()[-3000:]}")
    finally:
        proc.kill()
        for p in processes:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    runner_log = tmp_path / "bags" / RUNNER_LOG
    kept = runner_log.read_text() if runner_log.is_file() else "(no runner log)"
    assert rc == (0 if how == "terminal closed" else -signal.SIGKILL), text[-3000:] + "\nrunner log:\n" + kept
    if how == "terminal closed":  # what the runner said after the hang-up is kept beside the bags
        assert "stopped (SIGHUP)" in kept and "1 episode" in kept, kept
    if how == "SIGKILL":
        text = log_path.read_text()
        assert "Traceback" not in text and "Failed to publish" not in text, text[-3000:]
        assert "[episode_recorder]: SIGTERM: stopping" in text, text[-3000:]
    _check_bags(tmp_path / "bags")
