"""config/foxglove/station.json: a well-formed Foxglove layout (every panel of the mosaic tree configured, every
configured panel placed) whose topics are all ones the sim station publishes AND records (the station's
``recorded_topics()``, so the layout works live and on the episode bags), with each message path naming a
field of that topic's message type (the Kilted type store) and joint indices within the station's joints."""
import json
import re

import pytest

from recap_ros import paths
from recap_ros.recording import bag as rbag
from recap_ros.station import load_station

LAYOUT = paths.share_dir() / "config" / "foxglove" / "station.json"
PATH_RE = re.compile(r"^(/[A-Za-z0-9_/]+?)\.([A-Za-z_]+)(?:\[(\d+)\])?$")  # /topic.field or /topic.field[i]


@pytest.fixture(scope="module")
def layout():
    return json.loads(LAYOUT.read_text())


def leaves(node):
    if isinstance(node, str):
        return [node]
    assert set(node) <= {"first", "second", "direction", "splitPercentage"}, node
    assert node["direction"] in ("row", "column")
    return leaves(node["first"]) + leaves(node["second"])


def message_paths(config):
    """Every Foxglove message path of a panel config (Plot / StateTransitions paths, Indicator / Gauge path)."""
    out = [p["value"] for p in config.get("paths", [])]
    if "path" in config:
        out.append(config["path"])
    return out


def test_every_panel_is_placed_and_configured(layout):
    placed = leaves(layout["layout"])
    assert sorted(placed) == sorted(layout["configById"])
    assert len(set(placed)) == len(placed)
    for pid, config in layout["configById"].items():
        kind = pid.split("!")[0]
        if kind in ("Plot", "StateTransitions"):
            assert config["paths"] and all(p["enabled"] is True for p in config["paths"]), pid
        if kind == "Indicator":
            assert config["rules"] and all(isinstance(r["rawValue"], str) for r in config["rules"]), pid


def test_layout_names_only_topics_the_station_publishes_and_records(layout):
    st = load_station("sim")
    recorded = dict(st.recorded_topics())
    types = rbag.typestore().types
    images = set()
    for pid, config in layout["configById"].items():
        if "imageMode" in config:
            topic, calib = config["imageMode"]["imageTopic"], config["imageMode"]["calibrationTopic"]
            assert recorded.get(topic) == "sensor_msgs/msg/CompressedImage", (pid, topic)
            assert recorded.get(calib) == "sensor_msgs/msg/CameraInfo", (pid, calib)
            images.add(topic)
        for path in message_paths(config):
            m = PATH_RE.match(path)
            assert m, f"{pid}: unexpected message path {path!r}"
            topic, field, index = m.group(1), m.group(2), m.group(3)
            assert topic in recorded, f"{pid}: {topic} is not a topic the station records"
            assert field in types[recorded[topic]].__dataclass_fields__, f"{pid}: {recorded[topic]} has no {field}"
            if index is not None:
                assert int(index) < len(st.robot.joints), f"{pid}: {path}"
    assert images == {c.compressed_topic for c in st.cameras}  # the three cameras


def test_layout_shows_what_the_operator_needs(layout):
    st = load_station("sim")
    all_paths = [p for c in layout["configById"].values() for p in message_paths(c)]
    topics = {p.split(".")[0] for p in all_paths}
    assert {st.robot.command_topic, st.robot.joint_states_topic, st.value_monitor.value_topic,
            st.value_monitor.alert_topic, st.mux.active_topic, st.mux.intervention_topic,
            st.policy.beta_topic} <= topics
    for j in range(len(st.robot.joints)):  # every joint: command vs state
        assert f"{st.robot.command_topic}.position[{j}]" in all_paths
        assert f"{st.robot.joint_states_topic}.position[{j}]" in all_paths
