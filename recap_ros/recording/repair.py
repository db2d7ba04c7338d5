"""``recap-bag-repair``: make a bag left by a killed recorder readable again (ROS-free).

A recorder killed mid-episode leaves ``<bag>/<bag>.mcap`` without summary and footer (rosbags' reader needs the
footer: "File end magic is invalid") and a preliminary metadata.yaml without message counts. The recorder
flushes complete zstd chunks every ``flush_period_s``, so the file is a valid data section plus at most one torn
record. Repair, with the maintained ``mcap`` library doing all MCAP reading and writing:

1. stream the records from the start (``mcap.stream_reader``), decompressing every chunk, and stop at the first
   torn or corrupt record (a chunk counts whole or not at all);
2. write what came before it (header profile, schemas, channels, messages, metadata, attachments) as a new
   complete MCAP (``mcap.writer``: zstd chunks, message and chunk indexes, statistics, summary, footer) to
   ``<bag>.mcap.tmp`` next to the original, fsync it, keep the original as ``<bag>.mcap.orig`` (a hard link, so
   no copy is made) and atomically rename the new file over ``<bag>.mcap``;
3. rebuild metadata.yaml from the records read (topics, QoS, counts, times), keeping the episode facts
   (custom_data) of the preliminary one and adding ``recap.repaired``.

Why ``.orig`` is kept: a crashed episode is real robot time; repair drops the torn tail (up to
``flush_period_s`` of data) and any records after a corrupt one, which only a specialist could still recover
from the original bytes. So the original is never deleted: delete ``<bag>.mcap.orig`` by hand once the repaired
bag is checked (readers ignore it: the bag's storage file is the ``.mcap`` named in metadata.yaml).

A bag whose MCAP is complete only gets its metadata.yaml rebuilt (``ros2 bag reindex`` equivalent).
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard  # the mcap library's zstd backend: its decompression error type
from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.reader import SeekingReader
from mcap.records import Attachment, Channel, Chunk, DataEnd, Header, McapRecord, Message, Metadata, Schema
from mcap.stream_reader import StreamReader, breakup_chunk, read_magic
from mcap.writer import LIBRARY_IDENTIFIER, CompressionType, Writer
from rosbags.rosbag2 import Reader
from rosbags.rosbag2.metadata import parse_qos

from recap_ros.recording.bag import (K_END, K_END_REASON, K_REPAIRED, BagError, TopicRecord, _fsync,
                                     metadata_document, read_metadata, typestore, write_metadata)

PROFILE = "ros2"  # rosbag2's MCAP profile; used when the header itself was torn
# What a torn or corrupt record raises inside the mcap library: EndOfFile and its other errors, short fields
# (struct), bad UTF-8 or CRC (ValueError), a truncated zstd frame, a truncated lz4 frame (RuntimeError).
_TORN = (McapError, struct.error, ValueError, zstandard.ZstdError, RuntimeError)


@dataclass(frozen=True)
class ChunkSpan:
    """One complete chunk record of the data section."""

    start: int  # file offset of the chunk record
    end: int  # file offset after it
    compression: str
    messages: int


class _Walk:
    """Iterating yields the data section's content records in file order (header, schemas, channels, messages,
    metadata, attachments; chunks broken up, each whole or not at all), stopping quietly at the first torn or
    corrupt record. Afterwards: ``end`` (offset after the last complete data-section record), ``complete``
    (the footer and closing magic were read), ``error`` (why it stopped early), ``chunks``."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size
        self.end, self.complete, self.error = 8, False, ""
        self.chunks: list[ChunkSpan] = []

    def __iter__(self) -> Iterator[McapRecord]:
        f = self.f
        f.seek(8)  # after the magic, checked by scan_mcap
        records = StreamReader(f, skip_magic=True, emit_chunks=True, record_size_limit=self.size).records
        schemas, channels = {0}, set()  # schema id 0: no schema
        in_data, start = True, f.tell()
        try:
            for record in records:
                end = f.tell()
                if not in_data:
                    pass  # summary section: only read to find the footer
                elif isinstance(record, DataEnd):
                    in_data, self.end = False, end
                else:
                    if (start == 8) != isinstance(record, Header):
                        raise ValueError(f"the header must be the first record and only there, found "
                                         f"{type(record).__name__}")
                    inner = breakup_chunk(record, validate_crc=True) if isinstance(record, Chunk) else [record]
                    for r in inner:  # references checked, so that the copy is a valid MCAP
                        if isinstance(r, Schema):
                            schemas.add(r.id)
                        elif isinstance(r, Channel) and r.schema_id in schemas:
                            channels.add(r.id)
                        elif isinstance(r, Channel) or (isinstance(r, Message) and r.channel_id not in channels):
                            raise ValueError(f"{type(r).__name__} refers to an undefined schema/channel")
                    if isinstance(record, Chunk):
                        self.chunks.append(ChunkSpan(start, end, record.compression,
                                                     sum(isinstance(r, Message) for r in inner)))
                    yield from (r for r in inner if isinstance(r, (Header, Schema, Channel, Message, Metadata,
                                                                   Attachment)))
                    self.end = end
                start = end
            self.complete = True
        except _TORN as e:
            self.error = f"{type(e).__name__} at offset {start}: {e}"


@dataclass
class McapScan:
    path: Path
    size: int
    complete: bool  # has a valid summary and footer: only metadata.yaml needs rebuilding
    header: Header | None = None
    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)  # channel id -> messages
    chunks: list[ChunkSpan] = field(default_factory=list)
    start_ns: int = 0  # first and last message log time (0, 0 without messages)
    end_ns: int = 0
    data_end: int = 8  # offset after the last complete data-section record (DataEnd included)
    torn_bytes: int = 0  # bytes after data_end (a torn record, a partial summary) that a repair does not copy
    error: str = ""  # why reading stopped before the footer

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())

    def time_range(self) -> tuple[int, int]:
        return self.start_ns, self.end_ns


def _has_summary(f: BinaryIO, size: int) -> bool:
    """Whether the file ends with a footer and summary a reader can use (what makes an MCAP finished)."""
    f.seek(0)
    try:
        SeekingReader(f, record_size_limit=size).get_summary()
    except (*_TORN, OSError):  # OSError: a file shorter than the footer
        return False
    return True


def scan_mcap(path: str | os.PathLike) -> McapScan:
    """Read every record of an MCAP data section, stopping at the first torn or corrupt one."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            read_magic(ReadDataStream(f))
        except _TORN:
            raise BagError(f"{path} is not an MCAP file (bad magic)") from None
        scan, walk = McapScan(path, size, complete=False), _Walk(f, size)
        for r in walk:
            if isinstance(r, Header):
                scan.header = r
            elif isinstance(r, Schema):
                scan.schemas.setdefault(r.id, r)
            elif isinstance(r, Channel):
                scan.channels.setdefault(r.id, r)
                scan.counts.setdefault(r.id, 0)
            elif isinstance(r, Message):
                first = not any(scan.counts.values())
                scan.counts[r.channel_id] += 1
                scan.start_ns = r.log_time if first else min(r.log_time, scan.start_ns)
                scan.end_ns = max(r.log_time, scan.end_ns)
        if walk.error and _has_summary(f, size):
            raise BagError(f"{path}: finished MCAP with a corrupt record ({walk.error}); not repairing it")
    scan.complete, scan.chunks, scan.data_end, scan.error = walk.complete, walk.chunks, walk.end, walk.error
    scan.torn_bytes = 0 if scan.complete else size - walk.end
    return scan


def _write_mcap(scan: McapScan, out: Path) -> None:
    """Copy the scanned records into a new complete MCAP at ``out`` (ids kept: registered in file order)."""
    with open(scan.path, "rb") as src, open(out, "wb") as dst:
        writer = Writer(dst, compression=CompressionType.ZSTD)  # chunk size 1 MiB, like rosbags' writer
        h = scan.header
        writer.start(h.profile if h else PROFILE,
                     f"{h.library if h else 'unknown'}, repaired by recap-bag-repair ({LIBRARY_IDENTIFIER})")
        schema_ids, channel_ids = {0: 0}, {}
        for r in _Walk(src, scan.size):
            if isinstance(r, Schema) and r.id not in schema_ids:
                schema_ids[r.id] = writer.register_schema(r.name, r.encoding, r.data)
            elif isinstance(r, Channel) and r.id not in channel_ids:
                channel_ids[r.id] = writer.register_channel(r.topic, r.message_encoding, schema_ids[r.schema_id],
                                                            r.metadata)
            elif isinstance(r, Message):
                writer.add_message(channel_ids[r.channel_id], r.log_time, r.data, r.publish_time, r.sequence)
            elif isinstance(r, Metadata):
                writer.add_metadata(r.name, r.metadata)
            elif isinstance(r, Attachment):
                writer.add_attachment(r.create_time, r.log_time, r.name, r.media_type, r.data)
        writer.finish()
        dst.flush()
        os.fsync(dst.fileno())


def _replace_mcap(scan: McapScan) -> Path:
    """Write the repaired MCAP next to the original and swap it in atomically; returns the backup's path."""
    mcap = scan.path
    tmp, backup = mcap.with_name(mcap.name + ".tmp"), mcap.with_name(mcap.name + ".orig")
    if backup.exists() and not backup.samefile(mcap):
        raise BagError(f"{backup} already exists (an earlier repair's original?); move it away, then repair again")
    try:
        _write_mcap(scan, tmp)
        if mcap.stat().st_size != scan.size:
            raise BagError(f"{mcap} grew while being repaired (is its recorder still running?); left as it was")
        if not backup.exists():
            try:
                os.link(mcap, backup)
            except OSError:  # a file system without hard links: the name is missing until the next line
                os.replace(mcap, backup)
        os.replace(tmp, mcap)
    except OSError as e:
        raise BagError(f"cannot write the repaired {mcap}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(mcap.parent)
    return backup


def _topics(scan: McapScan) -> list[TopicRecord]:
    ts, out = typestore(), []
    for cid, ch in sorted(scan.channels.items()):
        msgtype = scan.schemas[ch.schema_id].name if ch.schema_id in scan.schemas else ""
        digest = ts.hash_rihs01(msgtype) if msgtype in ts.fielddefs else ""
        qos = tuple(parse_qos(ch.metadata.get("offered_qos_profiles", "")))
        out.append(TopicRecord(ch.topic, msgtype, qos, digest, scan.counts[cid]))
    return out


@dataclass
class RepairResult:
    bag: Path
    repaired_mcap: bool
    bytes_cut: int  # bytes at the end of the original not carried over (torn record, partial summary)
    messages: int
    custom_data: dict[str, str]
    backup: Path | None = None  # the original MCAP, kept when it was rewritten


def _storage_file(bag: Path) -> Path:
    try:
        files = read_metadata(bag)["rosbag2_bagfile_information"].get("relative_file_paths") or []
    except BagError:
        files = []
    if len(files) == 1 and (bag / Path(files[0]).name).is_file():
        return bag / Path(files[0]).name
    mcaps = sorted(bag.glob("*.mcap"))
    if len(mcaps) != 1:
        raise BagError(f"{bag}: expected exactly one .mcap file, found {[p.name for p in mcaps]}")
    return mcaps[0]


def repair_bag(bag: str | os.PathLike) -> RepairResult:
    """Make one bag directory readable (see the module docstring); raises BagError naming the problem."""
    bag = Path(bag)
    if not bag.is_dir():
        raise BagError(f"{bag} is not a bag directory")
    mcap = _storage_file(bag)
    scan = scan_mcap(mcap)
    backup = None if scan.complete else _replace_mcap(scan)
    try:
        custom = dict(read_metadata(bag)["rosbag2_bagfile_information"].get("custom_data") or {})
    except BagError:
        custom = {}
    t0, t1 = scan.time_range()
    if not scan.complete:
        custom[K_REPAIRED] = "true"
        if not custom.get(K_END):
            custom[K_END] = str(t1)
        if not custom.get(K_END_REASON):
            custom[K_END_REASON] = "recorder stopped without closing the bag (repaired)"
    write_metadata(bag, metadata_document(mcap.name, _topics(scan), t0, t1, custom))
    return RepairResult(bag, not scan.complete, scan.torn_bytes, scan.message_count, custom, backup)


def _bags(paths: list[str]) -> list[Path]:
    """Bag directories named on the command line; a directory of bags stands for each bag in it."""
    out = []
    for p in map(Path, paths):
        if p.is_dir() and not list(p.glob("*.mcap")):
            out += sorted(d for d in p.iterdir() if d.is_dir() and list(d.glob("*.mcap")))
        else:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recap-bag-repair", description=__doc__.split("\n")[0])
    ap.add_argument("bags", nargs="+", help="bag directories, or directories of bags")
    args = ap.parse_args(argv)
    failures = 0
    for bag in _bags(args.bags):
        try:
            r = repair_bag(bag)
            with Reader(bag) as reader:  # the proof: rosbags opens it and agrees on the count
                readable = reader.message_count
        except Exception as e:  # report every bag, then fail
            failures += 1
            print(f"FAILED {bag}: {e}", file=sys.stderr)
            continue
        what = (f"MCAP finished ({r.bytes_cut} torn bytes cut, original kept as {r.backup.name})" if r.repaired_mcap
                else "MCAP was complete")
        print(f"ok {bag}: {what}, metadata.yaml rebuilt, {readable} messages readable")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
