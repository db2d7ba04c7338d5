"""recap-bag-repair (ROS-free): a recorder process killed with SIGKILL mid-episode leaves a bag that rosbags
cannot open; repair makes it readable with at most flush_period_s (<= 1 s) of data lost, the original kept as
``.orig``. Also: a tail torn at any byte, a summary torn, a complete bag (MCAP untouched), a corrupt chunk, and
clear errors for things that are not bags."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mcap.reader import make_reader
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Reader

from recap_ros.recording import BagError, BagWriter, EpisodeFacts, repair
from recap_ros.recording.bag import typestore
from recap_ros.recording.repair import main, repair_bag, scan_mcap

TS = typestore()
ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from recap_ros.recording import EpisodeRecorder, RecorderConfig
    from recap_ros.recording.bag import typestore
    ts = typestore()
    H, T = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    r = EpisodeRecorder(RecorderConfig(station="sim", output_dir=sys.argv[1], min_free_disk_mb=1,
                                       flush_period_s=0.25))
    r.add_topic("/joint_states", "sensor_msgs/msg/JointState")
    r.add_topic("/cam/compressed", "sensor_msgs/msg/CompressedImage")
    r.add_topic("/task/prompt", "std_msgs/msg/String", latched=True)
    r.submit("/task/prompt", ts.serialize_cdr(ts.types["std_msgs/msg/String"](data="crash"), "std_msgs/msg/String"))
    print(r.start(), flush=True)
    jpeg = np.random.default_rng(0).integers(0, 255, 15000, dtype=np.uint8)
    i = 0
    while True:  # 50 Hz joint states, 30 Hz images; each send logged with its time
        now = time.time_ns()
        h = H(stamp=T(sec=now // 10**9, nanosec=now % 10**9), frame_id=str(i))
        js = ts.types["sensor_msgs/msg/JointState"](header=h, name=["a"], position=np.array([float(i)]),
                                                   velocity=np.array([]), effort=np.array([]))
        r.submit("/joint_states", ts.serialize_cdr(js, "sensor_msgs/msg/JointState"), now)
        if i % 5 < 3:
            img = ts.types["sensor_msgs/msg/CompressedImage"](header=h, format="jpeg", data=jpeg)
            r.submit("/cam/compressed", ts.serialize_cdr(img, "sensor_msgs/msg/CompressedImage"), now)
        print(i, now, flush=True)
        i += 1
        time.sleep(0.02)
""")


def frame_ids(bag: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with Reader(bag) as rd:
        for c, _, raw in rd.messages():
            if c.topic != "/task/prompt":
                out.setdefault(c.topic, []).append(int(TS.deserialize_cdr(raw, c.msgtype).header.frame_id))
    return out


def test_sigkill_recorder_process_then_repair(tmp_path):
    out = tmp_path / "bags"
    log = tmp_path / "child.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(log.read_text().splitlines()) < 150:  # ~3 s of data after start
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        kill_ns = time.time_ns()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    lines = log.read_text().splitlines()
    bag = Path(lines[0])
    sent = [tuple(map(int, ln.split())) for ln in lines[1:] if len(ln.split()) == 2]
    with pytest.raises(Exception, match="magic"):
        with Reader(bag):
            pass
    assert main([str(bag)]) == 0
    assert (bag / f"{bag.name}.mcap.orig").stat().st_size > 0  # the torn original, kept
    got = frame_ids(bag)
    due = [i for i, ns in sent if ns <= kill_ns - 1_000_000_000]
    assert len(due) > 60
    assert set(due) <= set(got["/joint_states"])
    assert {i for i in due if i % 5 < 3} <= set(got["/cam/compressed"])
    assert got["/joint_states"] == sorted(got["/joint_states"])
    with Reader(bag) as rd:
        custom = rd.storage.metadata.custom
        assert rd.message_count == sum(map(len, got.values())) + 1
    assert custom["recap.repaired"] == "true" and custom["recap.prompt"] == "crash"
    assert custom["recap.episode"] == "0" and int(custom["recap.end_ns"]) > int(custom["recap.start_ns"])
    assert main([str(bag)]) == 0  # idempotent: now complete, only the metadata is rebuilt
    assert frame_ids(bag) == got


def _unfinished_bag(tmp_path: Path, n: int = 400) -> Path:
    """A bag whose writer stopped without finishing (no summary, no footer): flushed chunks only."""
    bag = tmp_path / "src" / "sim_20250101-000000_ep0000"
    w = BagWriter(bag, EpisodeFacts("sim", 0, prompt="p").custom_data(), flush_period_s=0.0).open()
    Str = TS.types["std_msgs/msg/String"]
    for i in range(n):
        w.write("/a" if i % 3 else "/b", "std_msgs/msg/String",
                TS.serialize_cdr(Str(data=f"{i:05d}" + "x" * (i % 50)), "std_msgs/msg/String"), 1000 + i)
        if i % 20 == 19:
            w.flush()
    w.abort()
    return bag


def test_repair_torn_tail_at_any_offset(tmp_path):
    src = _unfinished_bag(tmp_path)
    mcap = src / f"{src.name}.mcap"
    size = mcap.stat().st_size
    chunks = scan_mcap(mcap).chunks
    cuts = sorted({size, size - 1, chunks[3].end + 5, chunks[3].end + 40, chunks[5].start + 100,
                   *range(40, size, max(1, size // 23))})
    previous = -1
    for cut in cuts:
        bag = tmp_path / f"cut{cut}" / src.name
        shutil.copytree(src, bag)
        with open(bag / mcap.name, "r+b") as f:
            f.truncate(cut)
        result = repair_bag(bag)
        assert result.repaired_mcap and result.backup.read_bytes() == mcap.read_bytes()[:cut]
        with Reader(bag) as rd:
            msgs = [(c.topic, t, bytes(raw)) for c, t, raw in rd.messages()]
            assert rd.message_count == len(msgs) == result.messages
        times = sorted(t for _, t, _ in msgs)
        assert times == list(range(1000, 1000 + len(msgs)))  # a prefix, nothing invented
        assert len(msgs) >= previous
        previous = len(msgs)
    assert previous == 400
    with AnyReader([bag], default_typestore=TS) as rd:  # the last one: every message deserializes
        assert [int(rd.deserialize(raw, c.msgtype).data[:5]) for c, _, raw in rd.messages()] == list(range(400))


def test_repaired_file_is_a_complete_indexed_mcap_with_the_original_records(tmp_path):
    src = _unfinished_bag(tmp_path)
    mcap = src / f"{src.name}.mcap"
    before = scan_mcap(mcap)
    cut = before.chunks[7].end + 3  # torn inside the 8th chunk's message index
    with open(mcap, "r+b") as f:
        f.truncate(cut)
    result = repair_bag(src)
    assert result.bytes_cut == 3 and result.messages == 160 and result.backup.name == f"{mcap.name}.orig"
    with open(mcap, "rb") as f:
        reader = make_reader(f)
        header, summary = reader.get_header(), reader.get_summary()
        assert header.profile == "ros2" and "recap-bag-repair" in header.library
        assert {c.id: (c.topic, c.schema_id, c.metadata) for c in summary.channels.values()} == {
            c.id: (c.topic, c.schema_id, c.metadata) for c in before.channels.values()}
        assert {s.id: (s.name, s.data) for s in summary.schemas.values()} == {
            s.id: (s.name, s.data) for s in before.schemas.values()}
        assert summary.statistics.message_count == 160
        assert {c.compression for c in summary.chunk_indexes} == {"zstd"}
        assert all(c.message_index_offsets for c in summary.chunk_indexes)
        assert [m.log_time for _, _, m in reader.iter_messages()] == list(range(1000, 1160))
    after = scan_mcap(mcap)
    assert after.complete and after.message_count == 160 and after.time_range() == (1000, 1159)


def test_finished_bag_with_torn_summary_keeps_every_record(tmp_path):
    bag = tmp_path / "sim_20250101-000000_ep0002"
    with BagWriter(bag, EpisodeFacts("sim", 2, outcome="failure").custom_data()) as w:
        for i in range(30):
            w.write("/a", "std_msgs/msg/String", TS.serialize_cdr(TS.types["std_msgs/msg/String"](data=str(i)),
                                                                 "std_msgs/msg/String"), 10 + i)
    mcap = bag / f"{bag.name}.mcap"
    data = mcap.read_bytes()
    mcap.write_bytes(data[:-10])
    r = repair_bag(bag)
    assert r.repaired_mcap and r.messages == 30 and r.custom_data["recap.outcome"] == "failure"
    with open(mcap, "rb") as f:
        assert [m.name for m in make_reader(f).iter_metadata()] == ["rosbag2"]  # rosbags' own record, carried
    with Reader(bag) as rd:
        assert rd.message_count == 30 and len(list(rd.messages())) == 30


def test_complete_bag_mcap_untouched_metadata_rebuilt(tmp_path):
    bag = tmp_path / "sim_20250101-000000_ep0001"
    with BagWriter(bag, EpisodeFacts("sim", 1, outcome="success").custom_data()) as w:
        for i in range(50):
            w.write("/a", "std_msgs/msg/String", TS.serialize_cdr(TS.types["std_msgs/msg/String"](data=str(i)),
                                                                 "std_msgs/msg/String"), 10 + i)
    mcap = (bag / f"{bag.name}.mcap").read_bytes()
    (bag / "metadata.yaml").unlink()
    r = repair_bag(bag)
    assert not r.repaired_mcap and r.messages == 50
    assert (bag / f"{bag.name}.mcap").read_bytes() == mcap
    with Reader(bag) as rd:
        assert rd.message_count == 50 and len(list(rd.messages())) == 50


def test_corrupt_chunk_stops_repair_and_a_finished_file_is_left_alone(tmp_path):
    src = _unfinished_bag(tmp_path)
    mcap = src / f"{src.name}.mcap"
    bad = scan_mcap(mcap).chunks[4]
    data = bytearray(mcap.read_bytes())
    data[bad.start + 60:bad.start + 80] = b"\xff" * 20  # inside its zstd data
    mcap.write_bytes(bytes(data))
    assert "ZstdError" in scan_mcap(mcap).error
    assert repair_bag(src).messages == 80  # the 4 chunks before it; the rest stays in the .orig
    assert (src / f"{mcap.name}.orig").read_bytes() == bytes(data)

    bag = tmp_path / "sim_20250101-000000_ep0003"
    with BagWriter(bag, EpisodeFacts("sim", 3).custom_data(), flush_period_s=0.0) as w:
        for i in range(60):
            w.write("/a", "std_msgs/msg/String", TS.serialize_cdr(TS.types["std_msgs/msg/String"](data=str(i) * 9),
                                                                 "std_msgs/msg/String"), 10 + i)
            if i % 20 == 19:
                w.flush()
    mcap = bag / f"{bag.name}.mcap"
    bad = scan_mcap(mcap).chunks[1]
    data = bytearray(mcap.read_bytes())
    data[bad.start + 60:bad.start + 70] = b"\xff" * 10
    mcap.write_bytes(bytes(data))
    with pytest.raises(BagError, match="finished MCAP with a corrupt record"):
        repair_bag(bag)
    assert mcap.read_bytes() == data and not (bag / f"{mcap.name}.orig").exists()


def test_an_unrelated_backup_is_never_overwritten(tmp_path):
    src = _unfinished_bag(tmp_path, n=40)
    mcap = src / f"{src.name}.mcap"
    (src / f"{mcap.name}.orig").write_bytes(b"someone's file")
    torn = mcap.read_bytes()
    with pytest.raises(BagError, match=r"\.orig already exists"):
        repair_bag(src)
    assert mcap.read_bytes() == torn and (src / f"{mcap.name}.orig").read_bytes() == b"someone's file"
    assert not list(src.glob("*.tmp"))


def test_a_bag_still_being_written_is_left_alone(tmp_path, monkeypatch):
    src = _unfinished_bag(tmp_path, n=40)
    mcap = src / f"{src.name}.mcap"
    real_write = repair._write_mcap

    def recorder_writes_meanwhile(scan, out):
        real_write(scan, out)
        with open(mcap, "ab") as f:
            f.write(b"\x06more")

    monkeypatch.setattr(repair, "_write_mcap", recorder_writes_meanwhile)
    torn = mcap.read_bytes()
    with pytest.raises(BagError, match="grew while being repaired"):
        repair_bag(src)
    assert mcap.read_bytes() == torn + b"\x06more" and not list(src.glob("*.orig")) + list(src.glob("*.tmp"))


def test_not_a_bag_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(BagError, match="is not a bag directory"):
        repair_bag(tmp_path / "missing")
    bag = tmp_path / "b"
    bag.mkdir()
    (bag / "b.mcap").write_bytes(b"hello world, not mcap")
    with pytest.raises(BagError, match="not an MCAP file"):
        repair_bag(bag)
    assert main([str(bag)]) == 1
    assert "FAILED" in capsys.readouterr().err
