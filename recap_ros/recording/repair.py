"""``recap-bag-repair``: make a bag left by a killed recorder readable again (ROS-free).

A recorder killed mid-episode leaves ``<bag>/<bag>.mcap`` without summary and footer (rosbags' reader needs the
footer: "File end magic is invalid") and a preliminary metadata.yaml without message counts. The recorder
flushes complete zstd chunks every ``flush_period_s``, each followed by its message-index records, so the file
is always a valid data section plus at most one torn record. Repair, in place:

1. scan the records from the start, checking every chunk (length, decompression, size, CRC);
2. cut the file after the last complete chunk, rebuilding that chunk's message index if it was torn;
3. append DataEnd, a summary (schemas, channels, chunk indexes, statistics, summary offsets) and the footer,
   the layout rosbags' MCAP writer produces;
4. rebuild metadata.yaml from the scan (topics, QoS, counts, times), keeping the episode facts (custom_data)
   of the preliminary one and adding ``recap.repaired``.

A bag whose MCAP is complete only gets its metadata.yaml rebuilt (``ros2 bag reindex`` equivalent).
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from zlib import crc32

from rosbags.rosbag2 import Reader
from rosbags.rosbag2.metadata import parse_qos

from recap_ros.recording.bag import (K_END, K_END_REASON, K_REPAIRED, BagError, TopicRecord, metadata_document,
                                     read_metadata, typestore, write_metadata)

MAGIC = b"\x89MCAP0\r\n"
OP_HEADER, OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
OP_MESSAGE_INDEX, OP_CHUNK_INDEX, OP_STATISTICS, OP_SUMMARY_OFFSET, OP_DATA_END = 0x07, 0x08, 0x0B, 0x0E, 0x0F
FOOTER_LEN = 1 + 8 + 20 + len(MAGIC)


def _zstd_decompress(data: bytes) -> bytes:
    if sys.version_info >= (3, 14):
        from compression import zstd
    else:
        from backports import zstd  # rosbags' own zstd dependency
    return zstd.decompress(data)


def _decompress(data: bytes, compression: str) -> bytes:
    if compression == "":
        return data
    if compression == "zstd":
        return _zstd_decompress(data)
    if compression == "lz4":
        from lz4.frame import decompress  # rosbags dependency

        return decompress(data)
    raise ValueError(f"unsupported chunk compression '{compression}'")


class _Buf:
    """Little-endian MCAP field reader over one record body."""

    def __init__(self, data: bytes | memoryview):
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError("record shorter than its fields")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return bytes(self.take(self.u32())).decode()

    def bytes32(self) -> bytes:
        return bytes(self.take(self.u32()))

    def string_map(self) -> dict[str, str]:
        sub, out = _Buf(self.take(self.u32())), {}
        while sub.pos < len(sub.data):
            k = sub.string()
            out[k] = sub.string()
        return out


def _record(op: int, body: bytes) -> bytes:
    return bytes([op]) + struct.pack("<Q", len(body)) + body


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<I", len(b)) + b


@dataclass
class _Chunk:
    start: int  # file offset of the chunk record
    length: int  # whole record, opcode and length included
    start_time: int
    end_time: int
    compression: str
    compressed_size: int
    uncompressed_size: int
    index: dict[int, list[tuple[int, int]]]  # channel -> [(log_time, offset in chunk)] rebuilt from its content
    index_offsets: dict[int, int] = field(default_factory=dict)  # channel -> file offset of its MessageIndex
    index_end: int = 0  # file offset after its MessageIndex records

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def indexed(self) -> bool:
        return set(self.index_offsets) == set(self.index)


@dataclass
class McapScan:
    path: Path
    size: int
    complete: bool  # has a valid footer: only metadata.yaml needs rebuilding
    schemas: dict[int, tuple[str, str, bytes]] = field(default_factory=dict)  # id -> name, encoding, data
    channels: dict[int, tuple[int, str, str, dict[str, str]]] = field(default_factory=dict)
    chunks: list[_Chunk] = field(default_factory=list)
    data_end: int = 0  # offset after the last good record
    has_header: bool = False
    torn_bytes: int = 0

    def counts(self) -> dict[int, int]:
        out = {cid: 0 for cid in self.channels}
        for c in self.chunks:
            for cid, msgs in c.index.items():
                out[cid] = out.get(cid, 0) + len(msgs)
        return out

    @property
    def message_count(self) -> int:
        return sum(self.counts().values())

    def time_range(self) -> tuple[int, int]:
        chunks = [c for c in self.chunks if c.index]
        if not chunks:
            return 0, 0
        return min(c.start_time for c in chunks), max(c.end_time for c in chunks)


def _has_footer(f, size: int) -> bool:
    if size < len(MAGIC) + FOOTER_LEN:
        return False
    f.seek(size - FOOTER_LEN)
    tail = f.read(FOOTER_LEN)
    return tail[-8:] == MAGIC and tail[0] == OP_FOOTER and struct.unpack("<Q", tail[1:9])[0] == 20


def _parse_chunk(body: bytes, start: int, length: int, scan: McapScan) -> _Chunk:
    b = _Buf(body)
    start_time, end_time, usize, crc = b.u64(), b.u64(), b.u64(), b.u32()
    compression = b.string()
    csize = b.u64()
    raw = _decompress(bytes(b.take(csize)), compression)
    if len(raw) != usize or (crc and crc32(raw) != crc):
        raise ValueError("chunk size or CRC mismatch")
    index: dict[int, list[tuple[int, int]]] = {}
    inner = _Buf(raw)
    while inner.pos < len(raw):
        offset = inner.pos
        op = inner.take(1)[0]
        rec = _Buf(inner.take(inner.u64()))
        if op == OP_SCHEMA:
            sid = rec.u16()
            scan.schemas[sid] = (rec.string(), rec.string(), rec.bytes32())
        elif op == OP_CHANNEL:
            cid, sid = rec.u16(), rec.u16()
            scan.channels[cid] = (sid, rec.string(), rec.string(), rec.string_map())
        elif op == OP_MESSAGE:
            cid = rec.u16()
            rec.u32()
            index.setdefault(cid, []).append((rec.u64(), offset))
    return _Chunk(start, length, start_time, end_time, compression, csize, usize, index)


def scan_mcap(path: str | os.PathLike) -> McapScan:
    """Read every record of an MCAP data section, stopping at the first torn or corrupt one."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(8) != MAGIC:
            raise BagError(f"{path} is not an MCAP file (bad magic)")
        scan = McapScan(path, size, complete=_has_footer(f, size), data_end=8)
        pos = 8
        f.seek(pos)
        last: _Chunk | None = None
        while pos + 9 <= size:
            f.seek(pos)
            op = f.read(1)[0]
            length = struct.unpack("<Q", f.read(8))[0]
            end = pos + 9 + length
            if end > size or op in (OP_DATA_END, OP_FOOTER):
                break  # torn record, or the end of the data section
            body = f.read(length)
            try:
                if (op == OP_HEADER) != (pos == 8):
                    raise BagError(f"{path}: the first record must be the only header (found 0x{op:02x} at "
                                   f"offset {pos})")
                scan.has_header = True
                if op == OP_SCHEMA:
                    b = _Buf(body)
                    sid = b.u16()
                    scan.schemas[sid] = (b.string(), b.string(), b.bytes32())
                elif op == OP_CHANNEL:
                    b = _Buf(body)
                    cid, sid = b.u16(), b.u16()
                    scan.channels[cid] = (sid, b.string(), b.string(), b.string_map())
                elif op == OP_MESSAGE:
                    raise BagError(f"{path} has messages outside chunks at offset {pos}; only chunked MCAP "
                                   "(rosbags / rosbag2 default) can be repaired")
                elif op == OP_CHUNK:
                    last = _parse_chunk(body, pos, 9 + length, scan)
                    scan.chunks.append(last)
                elif op == OP_MESSAGE_INDEX and last is not None and pos == (last.index_end or last.end):
                    last.index_offsets[_Buf(body).u16()] = pos
                    last.index_end = end
            except (ValueError, struct.error, UnicodeDecodeError) as e:
                if scan.complete:
                    raise BagError(f"{path}: corrupt record 0x{op:02x} at offset {pos}: {e}") from None
                break
            pos = end
            scan.data_end = pos
    for c in scan.chunks[:-1]:
        if not c.indexed:
            raise BagError(f"{path}: chunk at offset {c.start} lacks message index records; cannot repair it "
                           "in place")
    if not scan.complete:
        scan.torn_bytes = size - scan.data_end
    return scan


def _message_index_records(chunk: _Chunk, base: int) -> tuple[bytes, dict[int, int]]:
    out, offsets = bytearray(), {}
    for cid in sorted(chunk.index):
        msgs = chunk.index[cid]
        body = struct.pack("<HI", cid, 16 * len(msgs)) + b"".join(struct.pack("<QQ", t, o) for t, o in msgs)
        offsets[cid] = base + len(out)
        out += _record(OP_MESSAGE_INDEX, body)
    return bytes(out), offsets


def _finish_mcap(scan: McapScan) -> int:
    """Cut the torn tail and append index, summary and footer; returns the number of bytes cut."""
    cut = scan.data_end
    tail = bytearray()
    last = scan.chunks[-1] if scan.chunks else None
    if last is not None and not last.indexed:  # torn inside its message index: rebuild it
        cut = last.end
        records, last.index_offsets = _message_index_records(last, cut)
        tail += records
        last.index_end = cut + len(records)
    elif last is not None:
        cut = max(last.index_end, last.end)
    if not scan.has_header:  # killed while writing the header: nothing else can follow it
        cut = 8
        tail += _record(OP_HEADER, _string("ros2") + _string("recap-bag-repair"))
    with open(scan.path, "r+b") as f:
        f.truncate(cut)
        f.seek(cut)
        base = cut
        tail += _record(OP_DATA_END, struct.pack("<I", 0))
        summary_start = base + len(tail)
        groups: list[tuple[int, int, int]] = []

        def group(op: int, records: list[bytes]) -> None:
            nonlocal tail
            if records:
                start = base + len(tail)
                tail += b"".join(records)
                groups.append((op, start, base + len(tail) - start))

        group(OP_SCHEMA, [_record(OP_SCHEMA, struct.pack("<H", sid) + _string(n) + _string(e)
                                  + struct.pack("<I", len(d)) + d)
                          for sid, (n, e, d) in sorted(scan.schemas.items())])
        group(OP_CHANNEL, [_record(OP_CHANNEL, struct.pack("<HH", cid, sid) + _string(topic) + _string(enc)
                                   + _map(meta)) for cid, (sid, topic, enc, meta) in sorted(scan.channels.items())])
        group(OP_CHUNK_INDEX, [_chunk_index(c) for c in scan.chunks])
        counts = scan.counts()
        t0, t1 = scan.time_range()
        stats = (struct.pack("<QHIIIIQQ", sum(counts.values()), len(scan.schemas), len(scan.channels), 0, 0,
                             len(scan.chunks), t0, t1)
                 + struct.pack("<I", 10 * len(counts))
                 + b"".join(struct.pack("<HQ", cid, n) for cid, n in sorted(counts.items())))
        group(OP_STATISTICS, [_record(OP_STATISTICS, stats)])
        offsets_start = base + len(tail)
        for op, start, length in groups:
            tail += _record(OP_SUMMARY_OFFSET, struct.pack("<BQQ", op, start, length))
        tail += _record(OP_FOOTER, struct.pack("<QQI", summary_start, offsets_start, 0)) + MAGIC
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())
    return scan.size - cut


def _map(meta: dict[str, str]) -> bytes:
    body = b"".join(_string(k) + _string(v) for k, v in meta.items())
    return struct.pack("<I", len(body)) + body


def _chunk_index(c: _Chunk) -> bytes:
    offsets = b"".join(struct.pack("<HQ", cid, off) for cid, off in sorted(c.index_offsets.items()))
    body = (struct.pack("<QQQQ", c.start_time, c.end_time, c.start, c.length)
            + struct.pack("<I", len(offsets)) + offsets
            + struct.pack("<Q", c.index_end - c.end) + _string(c.compression)
            + struct.pack("<QQ", c.compressed_size, c.uncompressed_size))
    return _record(OP_CHUNK_INDEX, body)


def _topics(scan: McapScan) -> list[TopicRecord]:
    counts, ts, out = scan.counts(), typestore(), []
    for cid, (sid, topic, _enc, meta) in sorted(scan.channels.items()):
        msgtype = scan.schemas.get(sid, ("",))[0]
        digest = ts.hash_rihs01(msgtype) if msgtype in ts.fielddefs else ""
        qos = tuple(parse_qos(meta.get("offered_qos_profiles", "")))
        out.append(TopicRecord(topic, msgtype, qos, digest, counts.get(cid, 0)))
    return out


@dataclass
class RepairResult:
    bag: Path
    repaired_mcap: bool
    bytes_cut: int
    messages: int
    custom_data: dict[str, str]


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
    cut = 0 if scan.complete else _finish_mcap(scan)
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
    return RepairResult(bag, not scan.complete, cut, scan.message_count, custom)


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
        what = f"MCAP finished ({r.bytes_cut} torn bytes cut)" if r.repaired_mcap else "MCAP was complete"
        print(f"ok {bag}: {what}, metadata.yaml rebuilt, {readable} messages readable")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
