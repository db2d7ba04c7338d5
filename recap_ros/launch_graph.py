"""Station config -> node list. The one place that decides which nodes a station runs and with which
parameters; used by ``launch/station.launch.py`` (launch_ros ``Node`` actions) and by the ``recap-station``
runner (plain processes). ROS-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


def node_specs(station: Station, overrides: dict[str, dict[str, Any]] | None = None) -> list[NodeSpec]:
    """The node set for a station. ``overrides`` maps node name -> extra parameters (e.g. a β for tests)."""
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
        NodeSpec("episode_recorder", "episode_recorder", ns, dict(base)),
    ]
    if overrides:
        unknown = set(overrides) - {s.name for s in specs}
        if unknown:
            raise KeyError(f"overrides for nodes not in station '{station.name}': {sorted(unknown)}")
        specs = [NodeSpec(s.executable, s.name, s.namespace, {**s.parameters, **overrides.get(s.name, {})},
                          s.remappings) for s in specs]
    return specs


def specs_for(station_name_or_path: str) -> list[NodeSpec]:
    return node_specs(load_station(station_name_or_path))


def environment_changes(environ) -> dict[str, str | None]:
    """Environment variables both launchers set for the nodes (value None: unset): the package's Fast DDS
    profile unless the user chose one (see :func:`recap_ros.paths.fastdds_profile_env`)."""
    return paths.fastdds_profile_env(environ)
