"""Intervention labels through the live sim station: a test teleoperator takes over and hands back at random
moments (one takeover already active when an episode starts), the station records, and the export is checked
against the bag alone: which input each /robot/command came from is decided here by value (the command
equals the newest message of exactly one input published before it), not by the mux's own labels. The
exported ``intervention`` flag must equal "this frame's action came from a human input" on every frame, and
the bag metadata must count the human-driven segments and ticks."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from helpers import TIMING

from recap_ros import paths
from recap_ros.station import load_station

pytestmark = [pytest.mark.ros, pytest.mark.slow, pytest.mark.timeout(300)]
SEEDS = [5000000, 5000001, 5000002]
NUDGE = np.array([1e-3] * 6 + [-1e-3] + [1e-3] * 6 + [-1e-3])  # grippers start fully open (1.0): nudge inwards


@pytest.fixture
def station_file(tmp_path):
    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["recorder"]["output_dir"] = str(tmp_path / "bags")
    data["sim"]["corrector"] = False
    data["sim"]["episode_timeout_s"] = 4.0
    f = tmp_path / "sim.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


class Teleoperator:
    """Publishes the measured position nudged by 1 mrad on every joint on the teleop input while 'on' (which
    preempts the policy; the nudge keeps its values apart from the policy's, which follows the measured position
    meanwhile), and hands back with mode 'policy' when switching off; switches at random moments."""

    def __init__(self, node, st, rng):
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String

        from recap_ros import rosmsg

        self.st, self.node, self.rng, self.rosmsg = st, node, rng, rosmsg
        self.teleop = st.mux.input("teleop")
        self.q = None
        self.on = False
        self.ends = 0
        self.cmd_pub = node.create_publisher(JointState, self.teleop.topic, rosmsg.COMMAND_QOS)
        self.mode_pub = node.create_publisher(String, st.mux.mode_topic, rosmsg.COMMAND_QOS)
        node.create_subscription(JointState, st.robot.joint_states_topic, self._on_joints, rosmsg.COMMAND_QOS)
        node.create_subscription(String, st.episode_topic, self._on_event, rosmsg.EVENT_HISTORY_QOS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_joints(self, msg):
        self.q = self.rosmsg.positions_from_joint_state(msg, self.st.robot.joint_names)

    def _on_event(self, msg):
        if '"end"' in msg.data:
            self.ends += 1

    def _run(self):
        from std_msgs.msg import String

        switch_at = time.monotonic() + 3.0  # the first takeover: during the station's first episode
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= switch_at:
                self.on = not self.on
                if not self.on:
                    self.mode_pub.publish(String(data="policy"))
                # long takeovers now and then, so one spans an episode start
                switch_at = now + (self.rng.uniform(1.0, 2.5) if self.on and self.rng.random() < 0.3
                                   else self.rng.uniform(0.2, 0.8))
            if self.on and self.q is not None:
                self.cmd_pub.publish(self.rosmsg.joint_state_msg(self.st.robot.joint_names, self.q + NUDGE,
                                                                 self.rosmsg.now_ns(self.node)))
            time.sleep(0.02)


def _read_bag(bag, st):
    """Robot commands (stamp, positions, mux's source) and each input's messages, by header stamp."""
    from rosbags.rosbag2 import Reader

    from recap_ros.recording.bag import typestore

    ts = typestore()
    names = st.robot.joint_names
    topics = {st.robot.command_topic: "robot", st.robot.joint_states_topic: "measured",
              **{i.topic: i.name for i in st.mux.inputs}}
    out = {k: [] for k in topics.values()}
    with Reader(bag) as rd:
        conns = [c for c in rd.connections if c.topic in topics]
        for c, _, raw in rd.messages(connections=conns):
            m = ts.deserialize_cdr(raw, c.msgtype)
            idx = [list(m.name).index(n) for n in names]
            stamp = m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
            out[topics[c.topic]].append((stamp, np.asarray(m.position)[idx], m.header.frame_id))
        custom = dict(rd.storage.metadata.custom or {})
    return {k: sorted(v, key=lambda x: x[0]) for k, v in out.items()}, custom


def _source_by_value(cmd_stamp, cmd, inputs, recent=5):
    """The input one of whose ``recent`` newest messages stamped before the command equals it (the mux forwards
    the newest one it has received; newer ones may still be in flight). None: no input, or several."""
    hits = []
    for name, msgs in inputs.items():
        stamps = [s for s, _, _ in msgs]
        i = np.searchsorted(stamps, cmd_stamp, side="left")
        if any(np.array_equal(q, cmd) for _, q, _ in msgs[max(0, i - recent):i]):
            hits.append(name)
    return hits[0] if len(hits) == 1 else None


@TIMING
def test_exported_intervention_flag_is_the_source_of_every_command(rclpy_context, spin, station_file, tmp_path):
    from rclpy.node import Node

    from recap_ros.export.cli import main as export_main
    from recap_ros.dataset.reader import RecapDataset

    st = load_station(str(station_file))
    log = open(tmp_path / "station.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "recap_ros.runner", str(station_file), "--set",
                             f"sim_robot.seeds={SEEDS}"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    node = Node("label_probe")
    op = Teleoperator(node, st, np.random.default_rng(7))
    spin(node)
    op.thread.start()
    try:
        deadline = time.monotonic() + 150
        while op.ends < len(SEEDS) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "station.log").read_text()[-3000:]
            time.sleep(0.2)
        assert op.ends == len(SEEDS), (tmp_path / "station.log").read_text()[-3000:]
        time.sleep(0.5)
    finally:
        op.stop.set()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        log.close()

    bags = sorted((tmp_path / "bags").glob("sim_*"))
    assert len(bags) == len(SEEDS)
    human = {i.name for i in st.mux.inputs if i.human}
    truth, attributed, total = {}, 0, 0
    for bag in bags:
        msgs, custom = _read_bag(bag, st)
        inputs = {k: v for k, v in msgs.items() if k != "robot"}
        measured = inputs.pop("measured")
        # a command that could be a hold is no evidence: a hold sends the measured position (taken when it began)
        # every tick, and a policy's target at an episode start is the measured position too, so an input's value
        # can equal a hold's; such commands (equal to the command before, or to one of the 3 newest measured
        # positions) are left to the mux's label
        sources = [None if (k and np.array_equal(q, msgs["robot"][k - 1][1])) or _source_by_value(
                       s, q, {"measured": measured}, recent=3) else _source_by_value(s, q, inputs)
                   for k, (s, q, _) in enumerate(msgs["robot"])]
        total += len(sources)
        attributed += sum(s is not None for s in sources)
        # where the value tells, the mux's own label (frame_id) agrees
        assert all(s == fid for s, (_, _, fid) in zip(sources, msgs["robot"]) if s is not None)
        by_value = [s in human if s is not None else fid in human for s, (_, _, fid) in zip(sources, msgs["robot"])]
        truth[bag.name] = ([s for s, _, _ in msgs["robot"]], [q for _, q, _ in msgs["robot"]], by_value)
        # bag metadata: human-driven ticks and segments (runs of human commands, one at the start included)
        assert int(custom["recap.intervention_ticks"]) == sum(by_value)
        runs = sum(1 for i, h in enumerate(by_value) if h and (i == 0 or not by_value[i - 1]))
        assert int(custom["recap.interventions"]) == runs, (bag.name, custom["recap.interventions"], runs)
    print(f"{attributed}/{total} robot commands attributed by value")
    assert attributed >= 0.8 * total, f"only {attributed}/{total} commands attributable by value"
    assert sum(any(t[2]) for t in truth.values()) >= 2  # takeovers happened in several episodes

    out = tmp_path / "dataset"
    assert export_main([str(tmp_path / "bags"), "--out", str(out), "--quiet"]) == 0
    ds = RecapDataset(out)
    frames = flagged = 0
    for ep in range(ds.num_episodes):
        meta = ds.episode_meta(ep)
        stamps, positions, by_value = truth[meta["recap/source_bag"]]
        e = ds.episode(ep)
        for action, flag in zip(e["action"], e["intervention"]):
            # the bag command this frame's action is (float32 in the dataset): the one equal to it; equal
            # neighbours (a hold repeats a value) share their source
            match = [i for i, q in enumerate(positions) if np.allclose(q, action, atol=1e-6)]
            assert match, "an exported action is no command of the bag"
            expected = {by_value[i] for i in match}
            if len(expected) == 1:
                assert bool(flag) == expected.pop()
                frames += 1
                flagged += bool(flag)
    assert frames > 100 and flagged > 10, (frames, flagged)
