"""The station's ``value_monitor:`` section: defaults, the node in the launch graph, /value and /value/alert in
the recorded topics, and errors naming the file, key and value."""
import copy

import pytest
import yaml

from recap_ros import launch_graph, paths
from recap_ros.station import StationConfigError, load_station


@pytest.fixture(scope="module")
def sim_data():
    return yaml.safe_load(paths.station_file("sim").read_text())


def load(tmp_path, data):
    f = tmp_path / "st.yaml"
    f.write_text(yaml.safe_dump(data))
    return load_station(f)


def test_sim_station_runs_and_records_the_monitor():
    st = load_station("sim")
    assert st.value_monitor.bundle == "sim_value" and st.value_monitor.max_len == 12 * 50
    assert "value_monitor" in [s.name for s in launch_graph.node_specs(st)]
    recorded = dict(st.recorded_topics())
    assert recorded["/value"] == "sensor_msgs/msg/JointState" and recorded["/value/alert"] == "std_msgs/msg/String"


def test_defaults_and_disabled(tmp_path, sim_data):
    d = copy.deepcopy(sim_data)
    d["value_monitor"] = {"bundle": "v"}
    m = load(tmp_path, d).value_monitor
    # max_len from the sim's episode timeout: 12 s x 50 Hz
    assert (m.rate_hz, m.max_len, m.drop, m.window_s, m.value_topic, m.alert_topic) == (
        5.0, 600, 0.15, 2.0, "/value", "/value/alert")
    for section in ({"enabled": False}, {"enabled": False, "bundle": "v"}):
        d["value_monitor"] = section
        st = load(tmp_path, d)
        assert st.value_monitor is None and "/value" not in dict(st.recorded_topics())
        assert "value_monitor" not in [s.name for s in launch_graph.node_specs(st)]
    del d["value_monitor"]
    assert load(tmp_path, d).value_monitor is None


@pytest.mark.parametrize("section, message", [
    ({"bundle": "v", "drop": 1.5}, "value_monitor.drop: must be <= 1.0 (got 1.5)"),
    ({"bundle": "v", "rate_hz": 0}, "value_monitor.rate_hz: must be > 0.0 (got 0)"),
    ({"bundle": "v", "window": 2.0}, "value_monitor.window: unknown key; did you mean 'window_s'? (got 2.0)"),
    ({"rate_hz": 5.0}, "value_monitor.bundle: missing required key (got None)"),
])
def test_errors_name_file_key_and_value(tmp_path, sim_data, section, message):
    d = copy.deepcopy(sim_data)
    d["value_monitor"] = section
    with pytest.raises(StationConfigError) as e:
        load(tmp_path, d)
    assert str(e.value) == f"{tmp_path / 'st.yaml'}: {message}"


def test_a_hardware_station_must_state_max_len(tmp_path):
    d = yaml.safe_load(paths.station_file("bimanual_aloha").read_text())
    d["value_monitor"] = {"bundle": "v"}
    with pytest.raises(StationConfigError, match="value_monitor.max_len: missing required key"):
        load(tmp_path, d)
    d["value_monitor"]["max_len"] = 1500
    assert load(tmp_path, d).value_monitor.max_len == 1500
