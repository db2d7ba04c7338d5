"""EpisodeRecorder core (ROS-free): serialized messages in, real rosbag2 bags out (read back with rosbags),
episode facts in custom_data, queue overflow accounting, lifecycle refusals, disk guard, auto episodes."""
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Reader
from ruamel.yaml import YAML

from recap_ros.recording import (
    BagWriter,
    EpisodeRecorder,
    RecorderConfig,
    RecorderError,
    episode_bags,
    parse_episode_dir,
)
from recap_ros.recording.bag import typestore
from recap_ros.recording.repair import scan_mcap
from recap_ros.station import load_station

TS = typestore()
ST = load_station("sim")
PROMPT, BETA, INTERV, EVENTS = (ST.policy.prompt_topic, ST.policy.beta_topic, ST.mux.intervention_topic,
                                ST.episode_topic)
JS = ST.robot.joint_states_topic
CAM = ST.cameras[0].compressed_topic
ARCH_KEYS = {"recap.station", "recap.episode", "recap.prompt", "recap.outcome", "recap.model", "recap.beta",
             "recap.operator", "recap.start_ns", "recap.end_ns", "recap.interventions"}


def cdr(msgtype: str, **fields) -> bytes:
    return bytes(TS.serialize_cdr(TS.types[msgtype](**fields), msgtype))


def header(seq: int):
    return TS.types["std_msgs/msg/Header"](stamp=TS.types["builtin_interfaces/msg/Time"](sec=seq, nanosec=7),
                                           frame_id=str(seq))


def joint_state(seq: int) -> bytes:
    return cdr("sensor_msgs/msg/JointState", header=header(seq), name=["a"], position=np.array([seq * 0.5]),
               velocity=np.array([], dtype=float), effort=np.array([], dtype=float))


def image(seq: int, size: int = 5000) -> bytes:
    return cdr("sensor_msgs/msg/CompressedImage", header=header(seq), format="jpeg",
               data=np.full(size, seq % 256, "uint8"))


def string(text: str) -> bytes:
    return cdr("std_msgs/msg/String", data=text)


def make(tmp_path, log=None, disk_free_bytes=None, **kw) -> EpisodeRecorder:
    cfg = RecorderConfig.from_station(ST, **{"output_dir": str(tmp_path / "bags"), "min_free_disk_mb": 1,
                                             "auto_episodes": False, "model": "bundle123", "operator": "alice",
                                             **kw})
    r = EpisodeRecorder(cfg, log=log, disk_free_bytes=disk_free_bytes)
    for topic, msgtype in ST.recorded_topics():
        r.add_topic(topic, msgtype, latched=topic in (PROMPT, BETA, INTERV, ST.mux.active_topic))
    return r


def read(bag: Path):
    with Reader(bag) as rd:
        msgs = [(c.topic, t, bytes(raw)) for c, t, raw in rd.messages()]
        return msgs, dict(rd.storage.metadata.custom or {}), {c.topic: c for c in rd.connections}


def test_round_trip_bytes_custom_data_and_format(tmp_path):
    with make(tmp_path) as r:
        r.submit(PROMPT, string("pick it"), 100)
        r.submit(BETA, cdr("std_msgs/msg/Float64", data=2.0), 100)
        assert not r.submit(JS, joint_state(0), 5)  # idle: streams are not queued
        bag = r.start()
        sent = []
        for i in range(300):
            sent.append((JS, time.time_ns(), joint_state(i)))
            r.submit(JS, sent[-1][2], sent[-1][1])
            if i % 2 == 0:
                sent.append((CAM, time.time_ns(), image(i)))
                r.submit(CAM, sent[-1][2], sent[-1][1])
        summary = r.stop()
    assert summary.complete and summary.counts[JS] == 300 and summary.counts[CAM] == 150
    msgs, custom, conns = read(bag)
    streams = [m for m in msgs if m[0] in (JS, CAM)]
    assert sorted(streams, key=lambda m: m[1]) == sorted(sent, key=lambda m: m[1])  # same bytes, receive times
    assert [m[2] for m in msgs if m[0] == PROMPT] == [string("pick it")]
    assert ARCH_KEYS <= set(custom)
    assert custom["recap.prompt"] == "pick it" and custom["recap.beta"] == "2.0"
    assert custom["recap.model"] == "bundle123" and custom["recap.operator"] == "alice"
    assert custom["recap.outcome"] == "unlabelled" and custom["recap.station"] == "sim"
    meta = YAML(typ="safe").load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 9 and meta["storage_identifier"] == "mcap" and meta["message_count"] == 452
    assert {c.compression for c in scan_mcap(bag / f"{bag.name}.mcap").chunks} == {"zstd"}
    assert "float64[] position" in conns[JS].msgdef.data  # definitions embedded (Foxglove, ros2 bag)
    assert conns[JS].digest.startswith("RIHS01_")


def test_state_topics_and_facts(tmp_path):
    with make(tmp_path) as r:
        r.submit(INTERV, cdr("std_msgs/msg/Bool", data=True))  # a rising edge before the episode: not counted
        r.submit(INTERV, cdr("std_msgs/msg/Bool", data=False))
        bag = r.start(prompt="from the event")
        for on in (True, True, False, True, False, False):
            r.submit(INTERV, cdr("std_msgs/msg/Bool", data=on))
        r.submit(BETA, cdr("std_msgs/msg/Float64", data=1.5))
        r.stop()
    msgs, custom, _ = read(bag)
    # the flag is recorded but counts nothing: segments are runs of human-sourced robot commands (none here)
    assert custom["recap.interventions"] == "0" and custom["recap.beta"] == "1.5"
    assert custom["recap.prompt"] == "from the event"
    interv = [m for m in msgs if m[0] == INTERV]
    assert len(interv) == 1 + 6  # the state at start, written at the episode's start time, then every change
    assert interv[0][1] >= int(custom["recap.start_ns"])


def command(seq: int, source: str) -> bytes:
    h = TS.types["std_msgs/msg/Header"](stamp=TS.types["builtin_interfaces/msg/Time"](sec=seq, nanosec=0),
                                        frame_id=source)
    return cdr("sensor_msgs/msg/JointState", header=h, name=["a"], position=np.array([0.0]),
               velocity=np.array([], dtype=float), effort=np.array([], dtype=float))


def test_human_segment_active_at_start_and_human_ticks_are_counted(tmp_path):
    with make(tmp_path) as r:
        r.submit(ST.robot.command_topic, command(0, "corrector"), 900)  # before the episode: not counted
        bag = r.start()
        # the corrector already drives as the episode starts (segment 1), then the hold and the policy, then the
        # teleoperator (segment 2) and the corrector right after it (the same segment: a human drives throughout),
        # then the policy and the teleoperator again (segment 3): 4 + 5 + 2 + 1 = 12 human-driven commands
        sources = (["corrector"] * 4 + ["hold"] * 2 + ["policy"] * 3 + ["teleop"] * 5 + ["corrector"] * 2
                   + ["policy"] + ["teleop"])
        for i, src in enumerate(sources):
            r.submit(ST.robot.command_topic, command(i + 1, src), 1000 + i)
            if src == "hold":  # the flag toggles as well: it counts nothing
                r.submit(INTERV, cdr("std_msgs/msg/Bool", data=i % 2 == 0))
        r.stop()
    _, custom, _ = read(bag)
    assert custom["recap.interventions"] == "3" and custom["recap.intervention_ticks"] == "12"


def test_a_state_message_older_than_the_last_one_is_never_written(tmp_path):
    active = ST.mux.active_topic
    with make(tmp_path) as r:
        bag = r.start()
        assert r.submit(active, string("corrector"), 2000, source_ns=1500)
        assert not r.submit(active, string("policy"), 2100, source_ns=1000)  # stale latched value, late
        assert not r.submit(active, string("corrector"), 2200, source_ns=1500)  # the same sample again
        assert r.submit(active, string("policy"), 2300, source_ns=1600)
        r.stop()
    msgs, _, _ = read(bag)
    assert [m[2] for m in msgs if m[0] == active] == [string("corrector"), string("policy")]
    assert r.stale_state == 2


def test_queue_overflow_is_counted_per_topic_never_silent(tmp_path, monkeypatch):
    gate = threading.Event()
    real_write = BagWriter.write

    def slow_write(self, *a, **kw):
        gate.wait(10)
        return real_write(self, *a, **kw)

    logs = []
    r = make(tmp_path, log=lambda level, text: logs.append((level, text)), queue_size=16)
    bag = r.start()
    monkeypatch.setattr(BagWriter, "write", slow_write)
    accepted = sum(r.submit(JS, joint_state(i)) for i in range(100))
    accepted += sum(r.submit(CAM, image(0, 10)) for _ in range(10))
    stats = r.stats()
    assert stats["dropped"][JS] + stats["dropped"].get(CAM, 0) == 110 - accepted
    assert stats["dropped"][CAM] == 10 and accepted <= 17
    gate.set()
    summary = r.stop()
    r.close()
    assert summary.message_count == accepted and summary.dropped == stats["dropped"]
    assert read(bag)[1]["recap.dropped"] == str(110 - accepted)
    assert any(level == "error" and "dropped" in text and JS in text for level, text in logs)


def test_lifecycle_refusals_and_labels(tmp_path):
    with make(tmp_path) as r:
        with pytest.raises(RecorderError, match="no episode to label"):
            r.label(True)
        with pytest.raises(RecorderError, match="not recording"):
            r.stop()
        bag = r.start()
        r.submit(JS, joint_state(0))
        with pytest.raises(RecorderError, match="already recording episode 0"):
            r.start()
        r.submit(JS, joint_state(1))  # the running episode lost nothing
        r.label(True)
        assert YAML(typ="safe").load((bag / "metadata.yaml").read_text())[  # persisted while recording
            "rosbag2_bagfile_information"]["custom_data"]["recap.outcome"] == "success"
        assert r.stop().counts[JS] == 2
        assert r.label(False) == bag  # after stop: the last episode's finished bag
        with pytest.raises(RecorderError, match="no bag for episode 7"):
            r.label(True, episode=7)
        second = r.start()
        r.stop()
        assert r.label(True, episode=0) == bag
    assert parse_episode_dir(second.name)[2] == 1
    assert read(bag)[1]["recap.outcome"] == "success" and read(second)[1]["recap.outcome"] == "unlabelled"
    assert len(read(bag)[0]) == 2


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = EpisodeRecorder(RecorderConfig(station="sim", output_dir=str(blocker / "bags"), min_free_disk_mb=1))
    with r, pytest.raises(RecorderError, match=f"cannot create output directory {blocker / 'bags'}"):
        r.start()
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with EpisodeRecorder(RecorderConfig(station="sim", output_dir=str(ro), min_free_disk_mb=1)) as r2, \
                pytest.raises(RecorderError, match="not writable"):
            r2.start()


def test_disk_nearly_full_stops_cleanly_and_keeps_data(tmp_path):
    free = {"bytes": 10 * 2**30}
    r = make(tmp_path, disk_free_bytes=lambda path: free["bytes"], disk_check_period_s=0.05,
             min_free_disk_mb=100)
    with r:
        bag = r.start()
        for i in range(20):
            r.submit(JS, joint_state(i))
        time.sleep(0.2)
        free["bytes"] = 50 * 2**20
        deadline = time.monotonic() + 5
        while r.recording and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not r.recording
        assert "disk nearly full" in r.last_error and "min_free_disk_mb = 100" in r.last_error
        with pytest.raises(RecorderError, match="50 MiB free"):
            r.start()
    msgs, custom, _ = read(bag)  # closed cleanly: readable without repair
    assert len([m for m in msgs if m[0] == JS]) == 20 and custom["recap.end_reason"].startswith("error: disk")


def test_auto_episodes_from_sim_events(tmp_path):
    def event(**e):
        return string(json.dumps(e))

    with make(tmp_path, auto_episodes=True) as r:
        r.submit(PROMPT, string("old prompt"))
        r.submit(EVENTS, event(event="start", episode=3, prompt="touch the red marker", seed=1))
        for i in range(5):
            r.submit(JS, joint_state(i))
        r.submit(EVENTS, event(event="end", episode=3, success=True, reason="success", steps=5))
        r.submit(JS, joint_state(99))  # between episodes: not recorded
        r.submit(EVENTS, event(event="start", episode=4, prompt="second"))
        r.submit(JS, joint_state(5))
        r.submit(EVENTS, event(event="start", episode=5, prompt="third"))  # no end for 4
        r.submit(EVENTS, event(event="end", episode=5, success=False, reason="timeout"))
        r.submit(EVENTS, string("not json"))
        deadline = time.monotonic() + 5
        while r.last_episode is None or r.last_episode.episode != 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    bags = episode_bags(tmp_path / "bags", "sim")
    assert sorted(bags) == [3, 4, 5]
    msgs, custom, _ = read(bags[3])
    assert custom["recap.outcome"] == "success" and custom["recap.prompt"] == "touch the red marker"
    assert custom["recap.end_reason"] == "success" and custom["recap.episode"] == "3"
    assert len([m for m in msgs if m[0] == JS]) == 5 and len([m for m in msgs if m[0] == EVENTS]) == 2
    assert read(bags[4])[1]["recap.outcome"] == "unlabelled"
    assert read(bags[5])[1]["recap.outcome"] == "failure" and read(bags[5])[1]["recap.end_reason"] == "timeout"
    assert "not JSON" in r.last_error


def test_episode_index_continues_after_existing_bags(tmp_path):
    (tmp_path / "bags" / "sim_20250101-000000_ep0041").mkdir(parents=True)
    (tmp_path / "bags" / "other_20250101-000000_ep0090").mkdir()
    with make(tmp_path) as r:
        bag = r.start()
        r.stop()
    assert parse_episode_dir(bag.name)[2] == 42
