"""Station schema: both shipped stations load; bad files are refused with one message naming file, key, value."""
import copy

import numpy as np
import pytest
import yaml

from recap_ros import launch_graph, paths
from recap_ros.station import N_JOINTS, StationConfigError, load_station, parse_station


@pytest.fixture
def sim_data():
    return yaml.safe_load(paths.station_file("sim").read_text())


def _write(tmp_path, data):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    return str(f)


@pytest.mark.parametrize("name", ["sim", "bimanual_aloha"])
def test_shipped_stations_load(name):
    st = load_station(name)
    assert st.name == name
    assert len(st.robot.joints) == N_JOINTS
    assert st.robot.control_rate_hz == 50
    assert [c.role for c in st.cameras] == ["base", "left_wrist", "right_wrist"]
    assert st.mux.input("policy").topic == st.policy.command_topic
    topics = dict(st.recorded_topics())
    assert topics[st.robot.joint_states_topic] == "sensor_msgs/msg/JointState"
    for cam in st.cameras:
        assert topics[cam.compressed_topic] == "sensor_msgs/msg/CompressedImage"


def test_available_stations_lists_both():
    assert {"sim", "bimanual_aloha"} <= set(paths.available_stations())


def _refused(tmp_path, data):
    f = _write(tmp_path, data)
    with pytest.raises(StationConfigError) as e:
        load_station(f)
    msg = str(e.value)
    assert msg.startswith(f), msg  # names the file
    assert "\n" not in msg
    return e.value


def test_missing_key(tmp_path, sim_data):
    del sim_data["policy"]["bundle"]
    err = _refused(tmp_path, sim_data)
    assert err.key == "policy.bundle" and "missing" in err.why


def test_wrong_type(tmp_path, sim_data):
    sim_data["robot"]["control_rate_hz"] = "fast"
    err = _refused(tmp_path, sim_data)
    assert err.key == "robot.control_rate_hz" and err.value == "fast"


def test_thirteen_joints(tmp_path, sim_data):
    sim_data["robot"]["joints"] = sim_data["robot"]["joints"][:13]
    err = _refused(tmp_path, sim_data)
    assert err.key == "robot.joints" and "13" in str(err.value) and "14" in err.why


def test_unknown_camera_source(tmp_path, sim_data):
    sim_data["cameras"][1]["source"] = "ftp://cam.local/stream"
    err = _refused(tmp_path, sim_data)
    assert err.key == "cameras[1].source" and err.value == "ftp://cam.local/stream"
    assert "ftp" in err.why


def test_sim_source_on_hardware_station(tmp_path):
    data = yaml.safe_load(paths.station_file("bimanual_aloha").read_text())
    data["cameras"][0]["source"] = "sim"
    err = _refused(tmp_path, data)
    assert err.key == "cameras[0].source"


@pytest.mark.parametrize("key,value,why", [
    (("policy", "beta"), 3.0, "1.5"),
    (("robot", "joints", 2, "upper"), -5.0, "greater than lower"),
    (("robot", "joints", 0, "max_velocity"), 0.0, "> 0"),
    (("cameras", 0, "fps"), -30, ">"),
    (("cameras", 0, "width"), 7, ">="),
    (("mux", "default_input"), "joystick", "hold"),
    (("robot", "command_type"), "twist", "one of"),
    (("policy", "threads"), -1, ">="),
    (("policy", "threads"), 1.5, "integer"),
])
def test_bad_values(tmp_path, sim_data, key, value, why):
    node = sim_data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    err = _refused(tmp_path, sim_data)
    assert why in err.why and err.value == value


def test_policy_input_must_follow_policy_topic(tmp_path, sim_data):
    sim_data["mux"]["inputs"][0]["topic"] = "/elsewhere"
    err = _refused(tmp_path, sim_data)
    assert err.key == "mux.inputs"


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(StationConfigError, match="cannot read"):
        load_station(str(tmp_path / "nope.yaml"))
    f = tmp_path / "broken.yaml"
    f.write_text("robot: [unclosed\n")
    with pytest.raises(StationConfigError, match="not valid YAML"):
        load_station(str(f))


def test_parse_is_pure(sim_data):
    before = copy.deepcopy(sim_data)
    parse_station(sim_data, "mem.yaml")
    assert sim_data == before


@pytest.mark.parametrize("path,key,value,message", [
    (("policy",), "bta", 2.0, "policy.bta: unknown key; did you mean 'beta'? (got 2.0)"),
    (("sim",), "corector", False, "sim.corector: unknown key; did you mean 'corrector'? (got False)"),
    (("robot",), "control_rate_hs", 50, "robot.control_rate_hs: unknown key; did you mean 'control_rate_hz'? "
                                         "(got 50)"),
    ((), "operator", "ana", "operator: unknown key; valid keys: cameras, episode_topic, mux, name, namespace, "
                            "policy, recorder, robot, sim, value_monitor (got 'ana')"),
    (("robot", "joints", 3), "max_vel", 1.0,
     "robot.joints[3].max_vel: unknown key; did you mean 'max_velocity'? (got 1.0)"),
    (("cameras", 2), "jpeg_qualty", 90, "cameras[2].jpeg_qualty: unknown key; did you mean 'jpeg_quality'? (got 90)"),
    (("mux", "inputs", 1), "timeout", 0.5, "mux.inputs[1].timeout: unknown key; did you mean 'timeout_s'? (got 0.5)"),
])
def test_unknown_keys_refused_with_closest_valid_key(tmp_path, sim_data, path, key, value, message):
    node = sim_data
    for k in path:
        node = node[k]
    node[key] = value
    err = _refused(tmp_path, sim_data)
    assert str(err) == f"{tmp_path / 'bad.yaml'}: {message}"


def test_misspelled_required_key_names_the_misspelling(tmp_path, sim_data):
    sim_data["policy"]["bundel"] = sim_data["policy"].pop("bundle")
    err = _refused(tmp_path, sim_data)
    assert str(err) == (f"{tmp_path / 'bad.yaml'}: policy.bundle: missing required key (is 'bundel' a misspelling "
                        "of it?) (got None)")


def test_sim_section_of_a_hardware_station_is_checked(tmp_path):
    data = yaml.safe_load(paths.station_file("bimanual_aloha").read_text())
    data["sim"] = {"seed": 3, "sed": 4}
    err = _refused(tmp_path, data)
    assert str(err) == f"{tmp_path / 'bad.yaml'}: sim.sed: unknown key; did you mean 'seed'? (got 4)"


def test_hardware_template_estop_has_a_heartbeat():
    """A dead e-stop publisher must hold the robot: the template's e-stop lock masks every input (255), latches,
    and engages after 0.5 s without a message."""
    (estop,) = load_station("bimanual_aloha").mux.locks
    assert (estop.name, estop.topic, estop.priority, estop.latching, estop.heartbeat_timeout_s) == \
        ("estop", "/estop", 255, True, 0.5)


def test_hardware_template_holds_the_robot_when_the_estop_publisher_dies():
    from recap_ros.control.mux import HOLD, TeleopMux

    st = load_station("bimanual_aloha")
    mux = TeleopMux(st.mux, st.robot)
    q = np.array([(j.lower + j.upper) / 2 for j in st.robot.joints])
    clock = [100.0]

    def tick(estop_publishes: bool):
        clock[0] += 0.02  # one control period
        mux.on_joint_state(q, clock[0])
        mux.on_command("policy", q, clock[0])
        if estop_publishes:
            mux.on_lock("estop", False, clock[0])
        return mux.tick(clock[0])

    assert [tick(True).source for _ in range(10)][-1] == "policy"
    silent = [tick(False) for _ in range(30)]  # ticks 0.02, 0.04, ... s after the last heartbeat
    held_after_s = 0.02 * ([t.source for t in silent].index(HOLD) + 1)
    assert 0.5 <= held_after_s <= 0.52 + 1e-9
    assert "lock 'estop' heartbeat lost (silent" in silent[-1].reason
    assert tick(True).source == "policy"  # the publisher is back: its next false releases the lock


# ------------------------------------------------------------------------- value_monitor section

def test_value_monitor_sim_station_runs_and_records_it():
    st = load_station("sim")
    assert st.value_monitor.bundle == "sim_value" and st.value_monitor.max_len == 12 * 50
    assert "value_monitor" in [s.name for s in launch_graph.node_specs(st)]
    recorded = dict(st.recorded_topics())
    assert recorded["/value"] == "sensor_msgs/msg/JointState" and recorded["/value/alert"] == "std_msgs/msg/String"


def test_value_monitor_defaults_and_disabled(tmp_path, sim_data):
    d = copy.deepcopy(sim_data)
    d["value_monitor"] = {"bundle": "v"}
    m = load_station(_write(tmp_path, d)).value_monitor
    # max_len from the sim's episode timeout: 12 s x 50 Hz
    assert (m.rate_hz, m.max_len, m.drop, m.window_s, m.value_topic, m.alert_topic) == (
        5.0, 600, 0.15, 2.0, "/value", "/value/alert")
    for section in ({"enabled": False}, {"enabled": False, "bundle": "v"}):
        d["value_monitor"] = section
        st = load_station(_write(tmp_path, d))
        assert st.value_monitor is None and "/value" not in dict(st.recorded_topics())
        assert "value_monitor" not in [s.name for s in launch_graph.node_specs(st)]
    del d["value_monitor"]
    assert load_station(_write(tmp_path, d)).value_monitor is None


@pytest.mark.parametrize("section, message", [
    ({"bundle": "v", "drop": 1.5}, "value_monitor.drop: must be <= 1.0 (got 1.5)"),
    ({"bundle": "v", "rate_hz": 0}, "value_monitor.rate_hz: must be > 0.0 (got 0)"),
    ({"bundle": "v", "window": 2.0}, "value_monitor.window: unknown key; did you mean 'window_s'? (got 2.0)"),
    ({"bundle": "v", "device": "gpu0"}, "value_monitor.device: must match ^(cpu|cuda(:\\d+)?)$ (got 'gpu0')"),
    ({"rate_hz": 5.0}, "value_monitor.bundle: missing required key (got None)"),
])
def test_value_monitor_errors_name_file_key_and_value(tmp_path, sim_data, section, message):
    d = copy.deepcopy(sim_data)
    d["value_monitor"] = section
    with pytest.raises(StationConfigError) as e:
        load_station(_write(tmp_path, d))
    assert str(e.value) == f"{tmp_path / 'bad.yaml'}: {message}"


def test_value_monitor_on_hardware_must_state_max_len(tmp_path):
    d = yaml.safe_load(paths.station_file("bimanual_aloha").read_text())
    d["value_monitor"] = {"bundle": "v"}
    with pytest.raises(StationConfigError, match="value_monitor.max_len: missing required key"):
        load_station(_write(tmp_path, d))
    d["value_monitor"]["max_len"] = 1500
    assert load_station(_write(tmp_path, d)).value_monitor.max_len == 1500


def test_policy_threads_default_to_one(tmp_path, sim_data):
    """The policy backend gets one CPU thread unless the station says otherwise (0: the backend's own default)."""
    del sim_data["policy"]["threads"]
    assert load_station(_write(tmp_path, sim_data)).policy.threads == 1
    sim_data["policy"]["threads"] = 0
    assert load_station(_write(tmp_path, sim_data)).policy.threads == 0
