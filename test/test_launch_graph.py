"""The shared launch-graph module (used by station.launch.py and recap-station) and the launch files."""
import ast
from pathlib import Path

import pytest

from recap_ros import launch_graph, paths
from recap_ros.runner import main as runner_main
from recap_ros.station import load_station

ROOT = Path(__file__).resolve().parent.parent


def test_sim_graph():
    specs = launch_graph.node_specs(load_station("sim"))
    names = [s.name for s in specs]
    assert names == ["sim_robot", "scripted_corrector", "policy_server", "cfg_guidance", "teleop_mux",
                     "episode_recorder", "value_monitor"]
    assert all(s.parameters["station"] == str(paths.station_file("sim")) for s in specs)
    assert not any(s.executable == "camera_ingest" for s in specs)  # sim renders its own cameras


def test_hardware_graph_has_one_camera_node_per_camera():
    st = load_station("bimanual_aloha")
    specs = launch_graph.node_specs(st)
    cams = [s for s in specs if s.executable == "camera_ingest"]
    assert [s.parameters["camera"] for s in cams] == [c.name for c in st.cameras]
    assert len({s.name for s in specs}) == len(specs)
    assert "sim_robot" not in {s.executable for s in specs}


def test_every_executable_is_a_console_script_and_a_module():
    setup_py = (ROOT / "setup.py").read_text()
    for st in paths.available_stations():
        for spec in launch_graph.specs_for(st):
            assert f'"{spec.executable}"' in setup_py
            assert (ROOT / "recap_ros" / "nodes" / f"{spec.executable}.py").is_file(), spec.module


def test_ros_args_and_params_file():
    spec = launch_graph.NodeSpec("camera_ingest", "camera_a", "/st1", {"station": "x.yaml", "camera": "a"},
                                 (("image", "/cam/image"),))
    args = spec.ros_args("/tmp/p.yaml")
    assert args[:3] == ["--ros-args", "-r", "__node:=camera_a"]
    assert "__ns:=/st1" in args and "image:=/cam/image" in args
    assert args[-2:] == ["--params-file", "/tmp/p.yaml"]
    assert spec.params_yaml() == {"/**": {"ros__parameters": {"station": "x.yaml", "camera": "a"}}}


def test_namespace_and_overrides(tmp_path):
    import yaml

    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["namespace"] = "station_a"
    f = tmp_path / "ns.yaml"
    f.write_text(yaml.safe_dump(data))
    specs = launch_graph.node_specs(load_station(str(f)), {"cfg_guidance": {"beta": 2.0}})
    assert {s.namespace for s in specs} == {"/station_a"}
    assert next(s for s in specs if s.name == "cfg_guidance").parameters["beta"] == 2.0
    with pytest.raises(KeyError, match="not_a_node"):
        launch_graph.node_specs(load_station(str(f)), {"not_a_node": {}})


@pytest.mark.parametrize("launch_file", sorted((ROOT / "launch").glob("*.launch.py")))
def test_launch_files_import_only_launch_and_the_graph_module(launch_file):
    tree = ast.parse(launch_file.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    def allowed(m):
        return m in ("os", "recap_ros") or m.split(".")[0] in ("launch", "launch_ros") or m == "recap_ros.launch_graph"

    assert all(allowed(m) for m in modules), modules
    assert "generate_launch_description" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_per_station_launch_files_exist_for_shipped_stations():
    for st in paths.available_stations():
        assert (ROOT / "launch" / f"{st}.launch.py").is_file()


def test_runner_list_and_bad_station(capsys, tmp_path):
    assert runner_main(["sim", "--list"]) == 0
    out = capsys.readouterr().out
    assert "policy_server" in out and "teleop_mux" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    assert runner_main([str(bad), "--list"]) == 2
    assert "robot" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="NODE.PARAM=VALUE"):
        runner_main(["sim", "--set", "nonsense", "--list"])


def _station_with_output_dir(tmp_path, output_dir):
    import yaml

    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["recorder"]["output_dir"] = output_dir
    f = tmp_path / "st.yaml"
    f.write_text(yaml.safe_dump(data))
    return load_station(str(f))


def test_bag_dir_is_always_a_stated_absolute_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sim = load_station("sim")  # recorder.output_dir: bags (relative)
    assert launch_graph.bag_dir(sim) == tmp_path / "home" / "recap_bags" / "sim"  # ros2 launch's default
    assert launch_graph.bag_dir(sim, relative_to=tmp_path) == tmp_path / "bags"  # recap-station from tmp_path
    monkeypatch.chdir(tmp_path)
    assert launch_graph.bag_dir(sim, "out/b") == tmp_path / "out" / "b"
    assert launch_graph.bag_dir(sim, "~/x") == tmp_path / "home" / "x"
    assert launch_graph.bag_dir(_station_with_output_dir(tmp_path, "~/recap_bags")) == tmp_path / "home" / "recap_bags"
    assert launch_graph.bag_dir(_station_with_output_dir(tmp_path, "/data/b"), relative_to=tmp_path) == Path("/data/b")


def test_launch_plan_gives_the_recorder_its_bag_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    station, bags, specs = launch_graph.launch_plan("sim")
    assert station.name == "sim" and bags == tmp_path / "recap_bags" / "sim"
    rec = next(s for s in specs if s.name == "episode_recorder")
    assert rec.parameters["output_dir"] == str(tmp_path / "recap_bags" / "sim")
    _, bags, specs = launch_graph.launch_plan("sim", str(tmp_path / "mine"))
    assert next(s for s in specs if s.name == "episode_recorder").parameters["output_dir"] == str(tmp_path / "mine")


def test_station_launch_file_declares_bag_dir():
    tree = ast.parse((ROOT / "launch" / "station.launch.py").read_text())
    declared = [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "DeclareLaunchArgument"]
    assert declared == ["station", "bag_dir"]
    assert "launch_plan" in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def test_runner_list_shows_the_resolved_bag_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner_main(["sim", "--list", "--only", "episode_recorder"]) == 0
    assert f"'output_dir': '{tmp_path / 'bags'}'" in capsys.readouterr().out
    assert runner_main(["sim", "--list", "--only", "episode_recorder", "--bag-dir", "b2"]) == 0
    assert f"'output_dir': '{tmp_path / 'b2'}'" in capsys.readouterr().out
