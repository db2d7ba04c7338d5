"""Read one episode bag (rosbag2 v9 directory, as recap_ros.recording writes it) into time-stamped streams.

ROS-free: ``rosbags`` reads the MCAP and deserializes CDR with the Kilted typestore. Camera JPEGs stay encoded
here (only the frames the alignment picks are decoded, by the exporter). Stamps are header stamps where the
message has a header, else the bag's receive time. Every failure is an :class:`ExportError` naming the bag and
what is wrong with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Reader, ReaderError

from recap_ros.export.align import Stream
from recap_ros.recording import bag as rbag
from recap_ros.station import Station

# ExportError kinds
UNFINISHED, CORRUPT, UNLABELLED, MISSING_TOPIC, GAPS, EMPTY, STATION = (
    "unfinished", "corrupt", "unlabelled", "missing_topic", "gaps", "empty", "station")


class ExportError(RuntimeError):
    """One bag cannot be exported; ``kind`` says why (see the constants above), the text says what to do."""

    def __init__(self, bag: str | Path, kind: str, message: str):
        self.bag, self.kind = str(bag), kind
        super().__init__(f"{bag}: {message}")


@dataclass
class EpisodeBag:
    path: Path
    custom: dict[str, str]
    start_ns: int                      # episode start / end (custom_data, else episode events, else the bag)
    end_ns: int
    cameras: dict[str, Stream]         # camera name -> Stream(stamps, list of JPEG bytes)
    joints: Stream                     # (n, J) positions in station joint order
    command: Stream                    # (n, J) the command the mux sent to the robot
    command_source: Stream | None      # (n,) str: the mux input each command came from (JointState frame_id)
    policy: Stream | None              # (n, J) the policy's command
    intervention: Stream | None        # (n,) bool
    active_source: Stream | None       # (n,) str
    value: Stream | None = None        # (n,) V of the value monitor, stamped with its observation time
    events: list[dict] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things worth telling the user (not errors)

    @property
    def name(self) -> str:
        return self.path.name

    def outcome(self, assume: str | None = None) -> tuple[bool, str]:
        """(success, where the label came from): custom_data recap.outcome, else the sim's end event, else
        ``assume``; raises ExportError(UNLABELLED) when none says."""
        o = self.custom.get(rbag.K_OUTCOME, "")
        if o in ("success", "failure"):
            return o == "success", "recap.outcome"
        ends = [e for e in self.events if e.get("event") == "end" and isinstance(e.get("success"), bool)]
        if ends:
            return bool(ends[-1]["success"]), "episode end event"
        if assume in ("success", "failure"):
            return assume == "success", "--assume-outcome"
        raise ExportError(self.path, UNLABELLED,
                          f"no outcome label (recap.outcome is {o or 'missing'!r}, no episode end event): label "
                          "it in the recorder, or pass --assume-outcome success|failure")

    def prompt(self, default: str) -> str:
        if self.custom.get(rbag.K_PROMPT):
            return self.custom[rbag.K_PROMPT]
        starts = [e["prompt"] for e in self.events if e.get("event") == "start" and e.get("prompt")]
        if starts:
            return str(starts[-1])
        if self.prompts:
            return self.prompts[-1]
        self.notes.append(f"no prompt recorded; using the station prompt {default!r}")
        return default


def _stamp(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def _positions(msg, msgtype: str, names: list[str], where: str) -> np.ndarray:
    if msgtype == "sensor_msgs/msg/JointState":
        index = {n: i for i, n in enumerate(msg.name)}
        missing = [n for n in names if n not in index]
        if missing or len(msg.position) != len(msg.name):
            raise ValueError(f"{where}: JointState lacks joints {missing} or has {len(msg.name)} names for "
                             f"{len(msg.position)} positions")
        return np.asarray(msg.position, dtype=np.float64)[[index[n] for n in names]]
    data = np.asarray(msg.data, dtype=np.float64)
    if len(data) != len(names):
        raise ValueError(f"{where}: Float64MultiArray has {len(data)} values, expected {len(names)}")
    return data


def _int(custom: dict, key: str) -> int | None:
    try:
        v = int(custom.get(key) or 0)
    except ValueError:
        return None
    return v or None


def _mcap_has_data(path: Path) -> bool:
    return any(p.stat().st_size > 64 for p in path.glob("*.mcap"))


def read_episode_bag(path: str | Path, station: Station) -> EpisodeBag:
    """Read the streams the export needs. Raises ExportError (UNFINISHED, CORRUPT, MISSING_TOPIC, EMPTY)."""
    path = Path(path)
    if not (path / "metadata.yaml").is_file():
        if any(path.glob("*.mcap")):
            raise ExportError(path, UNFINISHED, f"unfinished bag (no metadata.yaml); repairable: "
                              f"recap-bag-repair {path}")
        raise ExportError(path, CORRUPT, "not a rosbag2 directory (no metadata.yaml, no .mcap)")
    reader = Reader(path)
    try:
        reader.open()
    except (ReaderError, OSError, ValueError, KeyError) as e:
        kind = UNFINISHED if _mcap_has_data(path) else CORRUPT
        hint = f"; repairable: recap-bag-repair {path}" if kind == UNFINISHED else ""
        raise ExportError(path, kind, f"cannot open bag: {e}{hint}") from None
    try:
        return _read(reader, path, station)
    except (ReaderError, OSError, EOFError, ValueError, AssertionError, IndexError, KeyError) as e:
        raise ExportError(path, CORRUPT, f"cannot read bag: {type(e).__name__}: {e}") from None
    finally:
        reader.close()


def _read(reader: Reader, path: Path, station: Station) -> EpisodeBag:
    try:
        custom = dict(rbag.read_metadata(path)["rosbag2_bagfile_information"].get("custom_data") or {})
    except rbag.BagError as e:
        raise ExportError(path, CORRUPT, str(e)) from None
    recorded_on = custom.get(rbag.K_STATION)
    if recorded_on and recorded_on != station.name:
        raise ExportError(path, STATION, f"recorded on station {recorded_on!r}, exporting for {station.name!r}; "
                          "export it into a dataset of its own station (--station)")
    if reader.message_count == 0:
        if _mcap_has_data(path):
            raise ExportError(path, UNFINISHED, "metadata.yaml lists no messages but the MCAP holds data "
                              f"(recording was interrupted); repairable: recap-bag-repair {path}")
        raise ExportError(path, EMPTY, "bag holds no messages")
    ts = rbag.typestore()
    names = station.robot.joint_names
    by_topic = {c.topic: c for c in reader.connections}
    cam_topics = {c.compressed_topic: c.name for c in station.cameras}
    missing = [f"{t} (camera {cam_topics[t]})" for t in cam_topics if t not in by_topic]
    for t, what in ((station.robot.joint_states_topic, "joint states"), (station.robot.command_topic, "robot command")):
        if t not in by_topic:
            missing.append(f"{t} ({what})")
    if missing:
        raise ExportError(path, MISSING_TOPIC, f"missing topic(s) {', '.join(missing)}; the bag records "
                          f"{sorted(by_topic)}")
    policy_topic = station.mux.input("policy").topic
    wanted = set(cam_topics) | {station.robot.joint_states_topic, station.robot.command_topic, policy_topic,
                                station.mux.intervention_topic, station.mux.active_topic,
                                station.policy.prompt_topic, station.episode_topic}
    value_topic = station.value_monitor.value_topic if station.value_monitor is not None else None
    if value_topic is not None:
        wanted.add(value_topic)
    conns = [c for t, c in by_topic.items() if t in wanted]
    cams: dict[str, tuple[list, list]] = {n: ([], []) for n in cam_topics.values()}
    series: dict[str, tuple[list, list]] = {t: ([], []) for t in wanted - set(cam_topics)}
    events, prompts = [], []
    sources: list[str] = []  # header.frame_id of each robot command: the mux input it came from
    bad_inputs: list[str] = []  # malformed policy-input messages (skipped)
    for conn, t_recv, raw in reader.messages(connections=conns):
        topic, mt = conn.topic, conn.msgtype
        if topic in cam_topics:
            msg = ts.deserialize_cdr(raw, mt)
            st, vals = cams[cam_topics[topic]]
            st.append(_stamp(msg))
            vals.append(msg.data)
            continue
        msg = ts.deserialize_cdr(raw, mt)
        st, vals = series[topic]
        if topic == station.episode_topic:
            try:
                ev = json.loads(msg.data)
            except json.JSONDecodeError:
                continue
            if isinstance(ev, dict):
                events.append(ev)
            continue
        if topic == station.policy.prompt_topic:
            prompts.append(msg.data)
            continue
        if topic == value_topic:  # JointState name ["value", "steps_to_go"] (nodes/value_monitor.py)
            if "value" in msg.name and len(msg.position) == len(msg.name):
                vals.append(float(msg.position[list(msg.name).index("value")]))
                st.append(_stamp(msg))
            continue
        if topic in (station.robot.joint_states_topic, station.robot.command_topic, policy_topic):
            try:
                vals.append(_positions(msg, mt, names, f"{topic} at {t_recv} ns"))
            except ValueError as e:
                if topic != policy_topic:  # what the robot did or was sent: the episode cannot be trusted
                    raise ExportError(path, CORRUPT, str(e)) from None
                # a malformed policy command is one the mux refused: it never reached the robot
                bad_inputs.append(str(e))
                continue
            st.append(_stamp(msg) if hasattr(msg, "header") else t_recv)
            if topic == station.robot.command_topic:
                sources.append(msg.header.frame_id if hasattr(msg, "header") else "")
        else:  # Bool / String state topics: receive time
            vals.append(msg.data)
            st.append(t_recv)

    def stream(topic, dtype=None):
        st, vals = series[topic]
        if not st:
            return None
        return Stream.of(st, np.asarray(vals, dtype=dtype) if dtype is not None else np.asarray(vals, dtype=object))

    cameras = {}
    for name, (st, vals) in cams.items():
        if not st:
            raise ExportError(path, MISSING_TOPIC, f"camera {name} topic has no messages")
        cameras[name] = Stream.of(st, vals)
    joints = stream(station.robot.joint_states_topic, np.float64)
    command = stream(station.robot.command_topic, np.float64)
    for s, t in ((joints, station.robot.joint_states_topic), (command, station.robot.command_topic)):
        if s is None:
            raise ExportError(path, MISSING_TOPIC, f"topic {t} has no messages")
    notes = []
    if bad_inputs:
        notes.append(f"{len(bad_inputs)} malformed {policy_topic} message(s) skipped (the mux refuses them; "
                     f"first: {bad_inputs[0]})")
    intervention = stream(station.mux.intervention_topic, bool)
    if intervention is None:
        notes.append(f"no {station.mux.intervention_topic} messages: no intervention assumed")

    start = _int(custom, rbag.K_START) or next((int(e["stamp_ns"]) for e in events if e.get("event") == "start"
                                                and isinstance(e.get("stamp_ns"), int)), None)
    end = _int(custom, rbag.K_END) or next((int(e["stamp_ns"]) for e in reversed(events)
                                            if e.get("event") == "end" and isinstance(e.get("stamp_ns"), int)), None)
    if start is None:
        start = int(max(s.stamps[0] for s in [*cameras.values(), joints]))
        notes.append("no episode start stamp (recap.start_ns / start event); starting at the first sample")
    if end is None:
        end = int(min(s.stamps[-1] for s in [*cameras.values(), joints]))
        notes.append("no episode end stamp (recap.end_ns / end event); ending at the last sample")
    if end <= start:
        raise ExportError(path, CORRUPT, f"episode end {end} ns is not after its start {start} ns")
    cmd_stamps = series[station.robot.command_topic][0]
    command_source = (Stream.of(cmd_stamps, np.asarray(sources, dtype=object)) if all(sources) else None)
    if command_source is None:
        notes.append(f"{station.robot.command_topic} does not name its source (header.frame_id): intervention "
                     f"from {station.mux.intervention_topic} / {station.mux.active_topic} instead")
    return EpisodeBag(path=path, custom=custom, start_ns=start, end_ns=end, cameras=cameras, joints=joints,
                      command=command, command_source=command_source, policy=stream(policy_topic, np.float64), intervention=intervention,
                      active_source=stream(station.mux.active_topic), events=events, prompts=prompts, notes=notes,
                      value=stream(value_topic, np.float64) if value_topic is not None else None)
