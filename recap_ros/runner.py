"""``recap-station <station>``: run a station's node set without ROS's launch system.

Same node list and parameters as ``station.launch.py`` (both come from :mod:`recap_ros.launch_graph`).
Each node is its own process in its own session, so a terminal's Ctrl-C or hang-up reaches only the runner,
which stops the nodes once, in order: SIGINT, SIGTERM or SIGHUP to the runner sends SIGINT to every node's
process group, and nodes that do not exit within the grace period are killed with their group. Each node
gets SIGTERM from the kernel when the runner dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so none is left
behind. If any node dies on its own the whole station is stopped; the runner exits non-zero when a node died
or did not exit with code 0 when stopped, naming it.

What it prints besides the nodes' logs: where the episode bags go (:func:`recap_ros.launch_graph.bag_dir`), one
line per finished episode (number, outcome, duration, human-driven ticks, prompt, bag) and, at exit, a summary
of the session (:mod:`recap_ros.recording.episodes`). When the station records, the same lines, time-stamped, are
appended to ``recap-station.log`` beside the bags, so what happened at the stop (a node killed after the grace
period, exit codes, the session summary) is kept when the terminal that started the station has closed.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from recap_ros import launch_graph, paths
from recap_ros.nodes import StopRequest
from recap_ros.recording.episodes import EpisodeWatcher, episode_line, session_summary
from recap_ros.station import StationConfigError, load_station


def _parse_overrides(items: list[str]) -> dict[str, dict]:
    """``node.param=value`` (value parsed as YAML) -> {node: {param: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        node, dot, param = key.partition(".")
        if not sep or not dot or not node or not param:
            raise SystemExit(f"recap-station: bad --set '{item}': expected NODE.PARAM=VALUE")
        out.setdefault(node, {})[param] = yaml.safe_load(value)
    return out


def node_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every node process gets: the caller's, unbuffered output, and the package's Fast DDS
    profile unless the caller chose one (:func:`recap_ros.launch_graph.environment_changes`)."""
    env = {"PYTHONUNBUFFERED": "1", **environ}
    for name, value in launch_graph.environment_changes(env).items():
        if value is None:
            del env[name]
        else:
            env[name] = value
    return env


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# a node stopped while it starts finishes starting first: policy_server (model load, warm-up inference, its tick
# process) took 5-8 s on the loaded 2-core machine
GRACE_S = 10.0


def _die_with_parent(parent_pid: int) -> None:
    """In a node's process, before it execs: SIGTERM (a clean stop, see :func:`recap_ros.nodes.run_node`) when
    the runner dies. If the runner already died before this took effect, stop at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


HELD_BACK = (signal.SIGINT, signal.SIGHUP)  # the runner's stop signal, and a hang-up; SIGTERM is the death signal


def _start_node(parent_pid: int) -> None:
    """A node's process before it execs: SIGINT and SIGHUP stay blocked until the node takes them over
    (:meth:`recap_ros.nodes.StopRequest.install`), so a Ctrl-C while it still imports is a stop request, not a
    KeyboardInterrupt traceback; then :func:`_die_with_parent`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_BACK)
    _die_with_parent(parent_pid)


RUNNER_LOG = "recap-station.log"  # beside the episode bags
_log_file = None  # the open RUNNER_LOG while a recording station runs


def _say(text: str, err: bool = False) -> None:
    """Print a runner message (and append it to the runner's log file); a terminal that hung up (SIGHUP) must
    not stop the runner from stopping nodes."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except OSError:
        pass
    if _log_file is not None:
        try:
            _log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            _log_file.flush()
        except OSError:
            pass


def _open_log(bags: Path):
    """RUNNER_LOG in ``bags`` (created if missing), appended to; None, having said why, when it cannot be."""
    try:
        bags.mkdir(parents=True, exist_ok=True)
        return open(bags / RUNNER_LOG, "a", encoding="utf-8")
    except OSError as e:
        _say(f"[recap-station] not keeping a log file in {bags}: {e}", err=True)
        return None


class Station:
    def __init__(self, specs: list[launch_graph.NodeSpec], workdir: Path, grace_s: float = GRACE_S,
                 log_level: str = ""):
        self.specs, self.workdir, self.grace_s = specs, workdir, grace_s
        self.log_args = ["--log-level", log_level] if log_level else []
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        env = node_env(os.environ)
        profile = env.get(paths.FASTDDS_PROFILE_ENV, env.get(paths.FASTDDS_PROFILE_ENV_LEGACY))
        _say(f"[recap-station] Fast DDS profile: {profile or 'none (stock settings)'}")
        for spec in self.specs:
            params = self.workdir / f"{spec.name}.params.yaml"
            params.write_text(yaml.safe_dump(spec.params_yaml(), sort_keys=False))
            cmd = [sys.executable, "-m", spec.module, *spec.ros_args(str(params)), *self.log_args]
            self.procs[spec.name] = subprocess.Popen(cmd, env=env, start_new_session=True,
                                                     preexec_fn=functools.partial(_start_node, os.getpid()))
            _say(f"[recap-station] started {spec.name} (pid {self.procs[spec.name].pid})")

    def first_dead(self) -> tuple[str, int] | None:
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                return name, rc
        return None

    def stop(self) -> dict[str, int]:
        """Stop every node (SIGINT, SIGKILL after the grace period); returns each node's exit code."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.grace_s
        for name, p in self.procs.items():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"[recap-station] {name} ignored SIGINT for {self.grace_s:.0f} s (still starting, or hung): "
                     "killing it")
        for p in self.procs.values():  # the whole group: a node's own children go too
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        return {name: p.returncode for name, p in self.procs.items()}


LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
EPISODE_POLL_S = 0.5  # how often the runner looks for finished episode bags


def _report_episodes(watcher: EpisodeWatcher, bags: Path) -> None:
    for rec in watcher.poll():
        _say(f"[recap-station] {episode_line(rec, bags)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recap-station", description=__doc__.split("\n\n")[0])
    ap.add_argument("station", nargs="?", default="sim",
                    help=f"station name ({', '.join(paths.available_stations())}) or path to a station YAML")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                    help="override a node parameter, e.g. --set cfg_guidance.beta=2.0")
    ap.add_argument("--bag-dir", default="", metavar="DIR",
                    help="where episode bags go (default: the station's recorder.output_dir, relative to the "
                         "current directory)")
    ap.add_argument("--only", action="append", default=[], metavar="NODE", help="start only these nodes")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    ap.add_argument("--grace", type=float, default=GRACE_S,
                    help=f"seconds a node gets to exit after SIGINT (default: {GRACE_S:g})")
    ap.add_argument("--log-level", choices=LOG_LEVELS, default="",
                    help="the nodes' ROS log level (default: info); warn shows the episode lines, the summary and "
                         "what needs attention")
    ap.add_argument("--list", action="store_true", help="print the node list and exit")
    args = ap.parse_args(argv)
    overrides = _parse_overrides(args.set)
    try:
        station = load_station(args.station)
        bags = launch_graph.bag_dir(station, args.bag_dir or str(overrides.get("episode_recorder", {}).get(
            "output_dir", "")), relative_to=Path.cwd())
        specs = launch_graph.node_specs(station, overrides, bags)
    except (StationConfigError, KeyError) as e:
        print(f"recap-station: {e}", file=sys.stderr)
        return 2
    if args.only:
        unknown = set(args.only) - {s.name for s in specs}
        if unknown:
            print(f"recap-station: --only names unknown nodes {sorted(unknown)}", file=sys.stderr)
            return 2
        specs = [s for s in specs if s.name in args.only]
    if args.list:
        for s in specs:
            print(f"{s.name}: {s.executable} {' '.join(s.ros_args())} {s.parameters}")
        return 0

    global _log_file
    stop = StopRequest()
    stop.install()
    recording = any(s.name == "episode_recorder" for s in specs)
    _log_file = _open_log(bags) if recording else None
    try:
        return _run(station, specs, bags, args, stop, recording)
    finally:
        if _log_file is not None:
            _log_file.close()
            _log_file = None


def _run(station, specs, bags: Path, args, stop: StopRequest, recording: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="recap-station-") as tmp:
        runner = Station(specs, Path(tmp), args.grace, args.log_level)
        _say(f"[recap-station] station '{station.name}' from {station.file}: {len(specs)} nodes")
        watcher = EpisodeWatcher(bags, station.name) if recording else None
        if recording:
            _say(f"[recap-station] episode bags go to {bags}")
            if _log_file is not None:
                _say(f"[recap-station] this runner's messages are also kept in {bags / RUNNER_LOG}")
        rc = 0
        try:
            runner.start()
            t_end = time.monotonic() + args.duration if args.duration > 0 else None
            next_poll = 0.0
            while not stop.requested.is_set():
                if watcher is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + EPISODE_POLL_S
                    _report_episodes(watcher, bags)
                dead = runner.first_dead()
                if dead:
                    _say(f"[recap-station] node {dead[0]} exited with code {dead[1]}: stopping the station",
                         err=True)
                    rc = 1
                    break
                if t_end is not None and time.monotonic() >= t_end:
                    break
                time.sleep(0.1)
        finally:
            codes = runner.stop()
        failed = {name: code for name, code in codes.items() if code != 0}
        if failed:
            _say(f"[recap-station] exit codes other than 0: {failed}", err=True)
            rc = 1
        if watcher is not None:  # after the stop: the recorder has finished the last bag
            _report_episodes(watcher, bags)
            for line in session_summary(watcher.session(), bags):
                _say(f"[recap-station] {line}")
        _say(f"[recap-station] stopped ({stop.signal_name or 'exit'})")
    stop.ignore_further()
    return rc


if __name__ == "__main__":
    sys.exit(main())
