"""``recap-station <station>``: run a station's node set without ROS's launch system.

Same node list and parameters as ``station.launch.py`` (both come from :mod:`recap_ros.launch_graph`).
Each node is its own process in its own process group. SIGINT/SIGTERM are forwarded to every node, nodes
that do not exit within the grace period are killed (no orphans), and if any node dies on its own the whole
station is stopped and the runner exits non-zero, naming the node.
"""
from __future__ import annotations

import argparse
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


class Station:
    def __init__(self, specs: list[launch_graph.NodeSpec], workdir: Path, grace_s: float = 5.0):
        self.specs, self.workdir, self.grace_s = specs, workdir, grace_s
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        env = node_env(os.environ)
        profile = env.get(paths.FASTDDS_PROFILE_ENV, env.get(paths.FASTDDS_PROFILE_ENV_LEGACY))
        print(f"[recap-station] Fast DDS profile: {profile or 'none (stock settings)'}", flush=True)
        for spec in self.specs:
            params = self.workdir / f"{spec.name}.params.yaml"
            params.write_text(yaml.safe_dump(spec.params_yaml(), sort_keys=False))
            cmd = [sys.executable, "-m", spec.module, *spec.ros_args(str(params))]
            self.procs[spec.name] = subprocess.Popen(cmd, env=env, start_new_session=True)
            print(f"[recap-station] started {spec.name} (pid {self.procs[spec.name].pid})", flush=True)

    def first_dead(self) -> tuple[str, int] | None:
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                return name, rc
        return None

    def stop(self) -> None:
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
                print(f"[recap-station] {name} ignored SIGINT for {self.grace_s:.0f} s: killing it", flush=True)
        for p in self.procs.values():  # the whole group: a node's own children go too
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recap-station", description=__doc__.split("\n\n")[0])
    ap.add_argument("station", nargs="?", default="sim",
                    help=f"station name ({', '.join(paths.available_stations())}) or path to a station YAML")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                    help="override a node parameter, e.g. --set cfg_guidance.beta=2.0")
    ap.add_argument("--only", action="append", default=[], metavar="NODE", help="start only these nodes")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds a node gets to exit after SIGINT")
    ap.add_argument("--list", action="store_true", help="print the node list and exit")
    args = ap.parse_args(argv)
    try:
        station = load_station(args.station)
        specs = launch_graph.node_specs(station, _parse_overrides(args.set))
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

    stop_reason: list[str] = []

    def on_signal(signum, _frame):
        stop_reason.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="recap-station-") as tmp:
        runner = Station(specs, Path(tmp), args.grace)
        print(f"[recap-station] station '{station.name}' from {station.file}: {len(specs)} nodes", flush=True)
        rc = 0
        try:
            runner.start()
            t_end = time.monotonic() + args.duration if args.duration > 0 else None
            while not stop_reason:
                dead = runner.first_dead()
                if dead:
                    print(f"[recap-station] node {dead[0]} exited with code {dead[1]}: stopping the station",
                          file=sys.stderr, flush=True)
                    rc = 1
                    break
                if t_end is not None and time.monotonic() >= t_end:
                    break
                time.sleep(0.1)
        finally:
            runner.stop()
        print(f"[recap-station] stopped ({stop_reason[0] if stop_reason else 'exit'})", flush=True)
        return rc


if __name__ == "__main__":
    sys.exit(main())
