"""Station config -> node list. The one place that decides which nodes a station runs and with which
parameters; used by ``launch/station.launch.py`` (launch_ros ``Node`` actions) and by the ``recap-station``
runner (plain processes). ROS-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recap_ros import paths
from recap_ros.station import Station, load_station


@dataclass(frozen=True)
class NodeSpec:
    executable: str  # console script installed under lib/recap_ros (== module recap_ros.nodes.<executable>)
    name: str
    namespace: str
    parameters: dict[str, Any]
    remappings: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def module(self) -> str:
        return f"recap_ros.nodes.{self.executable}"

    def ros_args(self, params_file: str | None = None) -> list[str]:
        """The ``--ros-args`` a plain process needs to become this node (name, namespace, remaps, params)."""
        args = ["--ros-args", "-r", f"__node:={self.name}"]
        if self.namespace:
            args += ["-r", f"__ns:={self.namespace}"]
        for src, dst in self.remappings:
            args += ["-r", f"{src}:={dst}"]
        if params_file:
            args += ["--params-file", params_file]
        return args

    def params_yaml(self) -> dict:
        """ROS 2 parameter file content for this node (wildcard node name: the file is per node)."""
        return {"/**": {"ros__parameters": dict(self.parameters)}}


def _ns(station: Station) -> str:
    ns = station.namespace
    return ("/" + ns.lstrip("/")) if ns else ""


DEFAULT_BAG_ROOT = "~/recap_bags"  # + /<station>: where ``ros2 launch`` records when the station names no place


def bag_dir(station: Station, given: str = "", relative_to: str | os.PathLike | None = None) -> Path:
    """The absolute directory the station's episode bags go to (``~`` expanded):

    - ``given`` (launch argument ``bag_dir``, ``recap-station --bag-dir``) when set, relative to the current
      directory;
    - else the station's ``recorder.output_dir`` when it is absolute or starts with ``~``;
    - else a relative ``output_dir`` (the sim stations' ``bags``) under ``relative_to`` (``recap-station``: the
      current directory, which ``./dev`` makes the repository), or ``~/recap_bags/<station>`` when
      ``relative_to`` is None (``ros2 launch``: the directory launch was started from is no stated place).
    """
    if given:
        return Path(given).expanduser().absolute()
    out = Path(station.recorder.output_dir).expanduser()
    if out.is_absolute():
        return out
    if relative_to is None:
        return Path(DEFAULT_BAG_ROOT).expanduser() / station.name
    return (Path(relative_to) / out).absolute()


def node_specs(station: Station, overrides: dict[str, dict[str, Any]] | None = None,
               bags: Path | None = None) -> list[NodeSpec]:
    """The node set for a station. ``overrides`` maps node name -> extra parameters (e.g. a β for tests);
    ``bags`` (see :func:`bag_dir`) is the recorder's ``output_dir`` unless an override sets it."""
    base = {"station": station.file}
    ns = _ns(station)
    specs: list[NodeSpec] = []
    if station.is_sim:
        # node name sim_robot for either simulator; MuJoCo ALOHA runs its corrector inside aloha_sim (the scripted
        # expert reads the physics), the kinematic sim in the scripted_corrector node
        aloha = station.sim.simulator == "aloha"
        specs.append(NodeSpec("aloha_sim" if aloha else "sim_robot", "sim_robot", ns, dict(base)))
        if station.sim.corrector and not aloha:
            specs.append(NodeSpec("scripted_corrector", "scripted_corrector", ns, dict(base)))
    for cam in station.cameras:
        if cam.source != "sim":
            specs.append(NodeSpec("camera_ingest", f"camera_{cam.name}", ns, {**base, "camera": cam.name}))
    specs += [
        NodeSpec("policy_server", "policy_server", ns, dict(base)),
        NodeSpec("cfg_guidance", "cfg_guidance", ns, dict(base)),
        NodeSpec("teleop_mux", "teleop_mux", ns, dict(base)),
        NodeSpec("episode_recorder", "episode_recorder", ns,
                 {**base, "output_dir": str(bags)} if bags is not None else dict(base)),
    ]
    if station.value_monitor is not None:
        specs.append(NodeSpec("value_monitor", "value_monitor", ns, dict(base)))
    if overrides:
        unknown = set(overrides) - {s.name for s in specs}
        if unknown:
            raise KeyError(f"overrides for nodes not in station '{station.name}': {sorted(unknown)}")
        specs = [NodeSpec(s.executable, s.name, s.namespace, {**s.parameters, **overrides.get(s.name, {})},
                          s.remappings) for s in specs]
    return specs


def specs_for(station_name_or_path: str) -> list[NodeSpec]:
    return node_specs(load_station(station_name_or_path))


def launch_plan(station_name_or_path: str, given_bag_dir: str = "") -> tuple[Station, Path, list[NodeSpec]]:
    """What ``station.launch.py`` starts: the station, where it records (:func:`bag_dir` with launch's default
    place) and its nodes."""
    station = load_station(station_name_or_path)
    bags = bag_dir(station, given_bag_dir)
    return station, bags, node_specs(station, bags=bags)


def environment_changes(environ) -> dict[str, str | None]:
    """Environment variables both launchers set for the nodes (value None: unset): the package's Fast DDS
    profile unless the user chose one (see :func:`recap_ros.paths.fastdds_profile_env`)."""
    return paths.fastdds_profile_env(environ)
