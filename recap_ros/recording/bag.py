"""One episode bag: a real rosbag2 directory (metadata.yaml version 9, MCAP storage, zstd chunks) written with
the ``rosbags`` library from serialized CDR bytes. ROS-free, so a ROS-free sim rollout writes the same bags.

Crash safety: rosbags' MCAP writer keeps messages in memory until a 1 MiB chunk is full and writes the index and
metadata.yaml only on close. :class:`BagWriter` closes the open chunk and flushes the file every
``flush_period_s`` (so after SIGKILL at most that much data is lost) and writes a preliminary metadata.yaml with
the episode facts (custom_data) at open and whenever they change. ``recap-bag-repair`` (recording.repair)
turns such an unfinished bag back into a readable one.

Also the one place for the episode facts' keys (``recap.*`` custom_data, docs/ARCHITECTURE.md) and the
metadata.yaml layout, shared by the writer, the labeller and the repair tool.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Iterable, Sequence

from rosbags.interfaces import Qos, QosDurability, QosReliability
from rosbags.rosbag2 import Writer, WriterError
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin
from rosbags.rosbag2.metadata import dump_qos_v9
from rosbags.typesys import Stores, get_typestore
from ruamel.yaml import YAML

BAG_VERSION = 9
COMPRESSIONS = ("zstd", "none")

# custom_data keys (docs/ARCHITECTURE.md "Bags"); values are strings.
K_STATION, K_EPISODE, K_PROMPT, K_OUTCOME = "recap.station", "recap.episode", "recap.prompt", "recap.outcome"
K_MODEL, K_BETA, K_OPERATOR = "recap.model", "recap.beta", "recap.operator"
K_START, K_END, K_INTERVENTIONS = "recap.start_ns", "recap.end_ns", "recap.interventions"
K_INTERVENTION_TICKS = "recap.intervention_ticks"
# additive keys: why the episode ended, messages lost to queue overflow, set by recap-bag-repair
K_END_REASON, K_DROPPED, K_REPAIRED = "recap.end_reason", "recap.dropped", "recap.repaired"
OUTCOMES = ("success", "failure", "unlabelled")

_DIR_RE = re.compile(r"^(?P<station>[A-Za-z][A-Za-z0-9_]*)_(?P<stamp>\d{8}-\d{6})_ep(?P<episode>\d{4,})$")


class BagError(RuntimeError):
    """A bag cannot be created, written, labelled or repaired; the text names the bag and the cause."""


_TYPESTORE = None


def typestore():
    """The Kilted typestore: message definitions (embedded in the MCAP for Foxglove / ros2 bag) and CDR codecs."""
    global _TYPESTORE
    if _TYPESTORE is None:
        _TYPESTORE = get_typestore(Stores.ROS2_KILTED)
    return _TYPESTORE


def check_msgtype(msgtype: str) -> None:
    if msgtype not in typestore().fielddefs:
        raise BagError(f"message type '{msgtype}' is unknown to the rosbags Kilted typestore, "
                       "so its definition cannot be embedded in the bag")


def ensure_writable_dir(path: str | os.PathLike) -> None:
    """Create an output directory (with parents); BagError naming it when it cannot be created or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BagError(f"cannot create output directory {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BagError(f"output directory {path} is not writable")


def episode_dir_name(station: str, episode: int, when_s: float | None = None) -> str:
    """``<station>_<YYYYmmdd-HHMMSS>_ep<NNNN>`` (local time)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if when_s is None else when_s))
    return f"{station}_{stamp}_ep{episode:04d}"


def parse_episode_dir(name: str) -> tuple[str, str, int] | None:
    """(station, stamp, episode) of a bag directory name, None for any other name."""
    m = _DIR_RE.match(name)
    return (m["station"], m["stamp"], int(m["episode"])) if m else None


def episode_bags(output_dir: str | os.PathLike, station: str) -> dict[int, Path]:
    """Episode index -> bag directory for one station's bags under output_dir (newest wins on duplicates)."""
    out: dict[int, Path] = {}
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        parsed = parse_episode_dir(p.name)
        if parsed and parsed[0] == station and p.is_dir():
            out[parsed[2]] = p
    return out


@dataclass(frozen=True)
class EpisodeFacts:
    """What RECAP needs to know about an episode, stored as the bag's custom_data."""

    station: str
    episode: int
    prompt: str = ""
    outcome: str = "unlabelled"
    model: str = ""
    beta: str = ""
    operator: str = ""
    start_ns: int = 0
    end_ns: int = 0
    interventions: int = 0  # human-driven segments (one already active at the start included)
    intervention_ticks: int = 0  # robot commands that came from a human input
    end_reason: str = ""
    dropped: int = 0

    def custom_data(self) -> dict[str, str]:
        if self.outcome not in OUTCOMES:
            raise BagError(f"outcome '{self.outcome}' is not one of {OUTCOMES}")
        return {K_STATION: self.station, K_EPISODE: str(self.episode), K_PROMPT: self.prompt,
                K_OUTCOME: self.outcome, K_MODEL: self.model, K_BETA: self.beta, K_OPERATOR: self.operator,
                K_START: str(self.start_ns), K_END: str(self.end_ns) if self.end_ns else "",
                K_INTERVENTIONS: str(self.interventions), K_INTERVENTION_TICKS: str(self.intervention_ticks),
                K_END_REASON: self.end_reason,
                K_DROPPED: str(self.dropped)}


def outcome_of(success: bool) -> str:
    return "success" if success else "failure"


# ------------------------------------------------------------------------------------------- QoS
def matched_subscription_qos(offered: Sequence[Qos]) -> tuple[bool, bool]:
    """(reliable, transient_local) for a subscription that matches every offered publisher QoS.

    As rosbag2's recorder: reliable only if all publishers are reliable (a reliable subscription does not match
    a best-effort publisher), transient-local only if all are (so late-joiner state is received)."""
    if not offered:
        return True, False
    reliable = all(q.reliability == QosReliability.RELIABLE for q in offered)
    latched = all(q.durability == QosDurability.TRANSIENT_LOCAL for q in offered)
    return reliable, latched


# ------------------------------------------------------------------------------------------- metadata.yaml
def _yaml() -> YAML:
    y = YAML(typ="safe")
    y.default_flow_style = False
    return y


@dataclass(frozen=True)
class TopicRecord:
    """One topic of a bag as metadata.yaml lists it."""

    topic: str
    msgtype: str
    qos: tuple[Qos, ...]
    digest: str
    count: int


def metadata_document(storage_file: str, topics: Iterable[TopicRecord], start_ns: int, end_ns: int,
                      custom_data: dict[str, str]) -> dict:
    """metadata.yaml content in the layout rosbags' Writer.close writes (rosbag2 version 9, MCAP)."""
    topics = list(topics)
    count = sum(t.count for t in topics)
    start = start_ns if count else 0
    duration = max(0, end_ns - start_ns) if count else 0
    return {"rosbag2_bagfile_information": {
        "version": BAG_VERSION, "storage_identifier": "mcap", "relative_file_paths": [storage_file],
        "duration": {"nanoseconds": duration}, "starting_time": {"nanoseconds_since_epoch": start},
        "message_count": count,
        "topics_with_message_count": [
            {"topic_metadata": {"name": t.topic, "type": t.msgtype, "serialization_format": "cdr",
                                "offered_qos_profiles": dump_qos_v9(list(t.qos)),
                                "type_description_hash": t.digest},
             "message_count": t.count} for t in topics],
        "compression_format": "", "compression_mode": "",  # zstd is MCAP chunk compression (storage level)
        "files": [{"path": storage_file, "starting_time": {"nanoseconds_since_epoch": start},
                   "duration": {"nanoseconds": duration}, "message_count": count}],
        "custom_data": dict(custom_data) or None, "ros_distro": "rosbags",
    }}


def write_metadata(bag: str | os.PathLike, document: dict) -> None:
    """Atomically replace ``<bag>/metadata.yaml``."""
    path = Path(bag) / "metadata.yaml"
    stream = StringIO()
    _yaml().dump(document, stream)
    tmp = path.with_suffix(".yaml.tmp")
    try:
        with open(tmp, "w", encoding="utf8") as f:
            f.write(stream.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise BagError(f"cannot write {path}: {e.strerror or e}") from None


def read_metadata(bag: str | os.PathLike) -> dict:
    path = Path(bag) / "metadata.yaml"
    try:
        doc = _yaml().load(path.read_text(encoding="utf8"))
    except OSError as e:
        raise BagError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # ruamel raises several YAML error types
        raise BagError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rosbag2_bagfile_information"), dict):
        raise BagError(f"{path} has no rosbag2_bagfile_information mapping")
    return doc


def update_custom_data(bag: str | os.PathLike, updates: dict[str, str]) -> dict[str, str]:
    """Set custom_data keys in a bag's metadata.yaml (e.g. an outcome labelled after stop); returns the result."""
    doc = read_metadata(bag)
    info = doc["rosbag2_bagfile_information"]
    custom = dict(info.get("custom_data") or {})
    custom.update({k: str(v) for k, v in updates.items()})
    info["custom_data"] = custom
    write_metadata(bag, doc)
    return custom


# ------------------------------------------------------------------------------------------- the writer
class BagWriter:
    """Writes serialized CDR messages of any topics into one new rosbag2 directory.

    >>> with BagWriter("/tmp/ep", facts.custom_data()) as bag:
    ...     bag.write("/joint_states", "sensor_msgs/msg/JointState", cdr_bytes, receive_time_ns)

    Not thread-safe: one thread writes (recording.writer.EpisodeRecorder's writer thread)."""

    def __init__(self, path: str | os.PathLike, custom_data: dict[str, str] | None = None,
                 compression: str = "zstd", flush_period_s: float = 0.25):
        if compression not in COMPRESSIONS:
            raise BagError(f"compression '{compression}' is not one of {COMPRESSIONS}")
        self.path = Path(path)
        self.custom_data: dict[str, str] = dict(custom_data or {})
        self.compression = compression
        self.flush_period_s = float(flush_period_s)
        self._writer: Writer | None = None
        self._connections: dict[str, object] = {}
        self.counts: dict[str, int] = {}
        self.bytes_written = 0
        self._last_flush = 0.0
        self.closed = False

    # -- lifecycle
    def open(self) -> "BagWriter":
        ensure_writable_dir(self.path.parent)
        writer = Writer(self.path, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
        if self.compression == "zstd":
            writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        try:
            writer.open()
        except (WriterError, OSError) as e:
            raise BagError(f"cannot create bag {self.path}: {getattr(e, 'strerror', None) or e}") from None
        storage = writer.storage
        if not all(hasattr(storage, a) for a in ("close_chunk", "chunk", "bio")):  # rosbags McapWriter internals
            writer.abort()
            raise BagError("this rosbags version's MCAP writer lacks close_chunk/chunk/bio; cannot flush chunks")
        self._writer = writer
        self._last_flush = time.monotonic()
        self._write_preliminary_metadata()
        return self

    def __enter__(self) -> "BagWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None:
            self.close()

    @property
    def storage_file(self) -> str:
        return f"{self.path.name}.mcap"

    def _write_preliminary_metadata(self) -> None:
        """metadata.yaml while recording: no message counts yet, but the episode facts survive a crash."""
        write_metadata(self.path, metadata_document(self.storage_file, [], 0, 0, self.custom_data))

    def set_custom_data(self, updates: dict[str, str], persist: bool = True) -> None:
        for k, v in updates.items():
            if not isinstance(v, str):
                raise BagError(f"custom_data value for '{k}' must be a string, got {v!r}")
        self.custom_data.update(updates)
        if persist and self._writer is not None:
            self._write_preliminary_metadata()

    # -- data
    def write(self, topic: str, msgtype: str, data: bytes | memoryview, timestamp_ns: int,
              qos: Sequence[Qos] = ()) -> None:
        """Append one serialized message (timestamp = receive time). The topic's connection is created on its
        first message with the publishers' offered QoS and the embedded message definition."""
        w = self._writer
        if w is None:
            raise BagError(f"bag {self.path} is not open")
        conn = self._connections.get(topic)
        if conn is None:
            check_msgtype(msgtype)
            try:
                conn = w.add_connection(topic, msgtype, typestore=typestore(), offered_qos_profiles=list(qos))
            except WriterError as e:
                raise BagError(f"bag {self.path}: cannot add topic {topic} ({msgtype}): {e}") from None
            self._connections[topic] = conn
            self.counts[topic] = 0
        elif conn.msgtype != msgtype:
            raise BagError(f"topic {topic} is recorded as {conn.msgtype}, got a {msgtype} message")
        w.write(conn, int(timestamp_ns), data)
        self.counts[topic] += 1
        self.bytes_written += len(data)

    def maybe_flush(self, now: float | None = None) -> bool:
        """Flush if flush_period_s passed since the last flush; returns whether it flushed."""
        now = time.monotonic() if now is None else now
        if now - self._last_flush < self.flush_period_s:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        """Close the open MCAP chunk (a complete, compressed record) and push it to the OS, so a killed
        process loses nothing written so far."""
        w = self._writer
        if w is None:
            return
        storage = w.storage
        if storage.chunk.bio.tell():
            storage.close_chunk()
        storage.bio.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Finish the MCAP (summary, footer) and metadata.yaml (rosbags), fsync. Idempotent."""
        w, self._writer = self._writer, None
        if w is None:
            return
        for k, v in self.custom_data.items():
            w.set_custom_data(k, v)
        try:
            w.close()
        except (WriterError, OSError) as e:
            w.abort()
            raise BagError(f"cannot finish bag {self.path}: {getattr(e, 'strerror', None) or e} "
                           f"(run recap-bag-repair {self.path})") from None
        for p in (self.path / self.storage_file, self.path / "metadata.yaml"):
            _fsync(p)
        self.closed = True

    def abort(self) -> None:
        """Stop writing after an error, keeping what reached the file (recap-bag-repair makes it readable)."""
        w, self._writer = self._writer, None
        if w is not None:
            try:
                self._writer = w
                self.flush()
            except (OSError, ValueError):
                pass  # e.g. the disk is full: the chunks flushed before stay readable
            finally:
                self._writer = None
                w.abort()

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
