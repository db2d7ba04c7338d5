"""recap-export end to end on real rosbag2 bags (written by the recorder's BagWriter via export.synth):
RECAP labels equal hand-computed values, the dataset loads back, frame counts match durations x 50 Hz,
incremental re-runs, gap splitting."""
import json

import numpy as np
import pytest

from recap_ros.export import cli
from recap_ros.dataset.reader import RecapDataset
from recap_ros.export.synth import (
    COMMAND_OFFSET,
    POLICY_OFFSET,
    SynthEpisode,
    frame_level,
    joint_value,
    write_episode_bag,
)
from recap_ros.station import load_station

NS = 1_000_000_000
MAX_LEN, C_FAIL = 80, 50
BASE_T = 1_700_000_000 * NS


@pytest.fixture(scope="module")
def station():
    return load_station("sim")


def hand_labels(T: int, success: bool, max_len: int = MAX_LEN, c_fail: float = C_FAIL, bins: int = 201):
    """RECAP labels written out step by step (independent of recap_ros.recap.returns)."""
    reward, ret, norm, b = [], [], [], []
    for t in range(T):
        reward.append(-1.0 if t < T - 1 else (0.0 if success else -c_fail))
    for t in range(T):
        R = sum(reward[t:])
        ret.append(R)
        n = min(0.0, max(-1.0, R / max_len))
        norm.append(n)
        b.append(round((n + 1.0) * (bins - 1)))  # Python round: ties to even, as np.rint
    return np.array(reward), np.array(ret), np.array(norm), np.array(b)


EPISODES = [  # (episode, duration s, outcome, interventions)
    (0, 1.0, "success", []),
    (1, 1.2, "failure", [(0.31, 0.61)]),
    (2, 1.4, "success", [(0.21, 0.51), (0.91, 1.11)]),
    (3, 0.8, "failure", []),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, station):
    d = tmp_path_factory.mktemp("export")
    for ep, dur, outcome, inter in EPISODES:
        write_episode_bag(d / "bags", station, SynthEpisode(duration_s=dur, outcome=outcome, interventions=inter,
                                                            episode=ep, start_ns=BASE_T + ep * 100 * NS))
    code = cli.main([str(d / "bags"), "--out", str(d / "ds"), "--max-len", str(MAX_LEN), "--c-fail", str(C_FAIL),
                     "--quiet"])
    return d, code


def test_labels_equal_hand_computed_values(exported, station):
    d, code = exported
    assert code == 0
    ds = RecapDataset(d / "ds")
    assert ds.num_episodes == len(EPISODES)
    by_bag = {ds.episode_meta(e)["recap/source_bag"]: e for e in range(ds.num_episodes)}
    for ep_no, dur, outcome, inter in EPISODES:
        e = next(v for k, v in by_bag.items() if k.endswith(f"_ep{ep_no:04d}"))
        meta = ds.episode_meta(e)
        frames = ds.episode(e)
        T = meta["recap/episode_ticks"]
        assert T == int(round(dur * 50)) + 1
        first = meta["recap/first_tick"]
        n = len(frames["index"])
        sl = slice(first, first + n)
        r, R, Rn, B = hand_labels(T, outcome == "success")
        np.testing.assert_array_equal(frames["next.reward"], r[sl])
        np.testing.assert_array_equal(frames["return"], R[sl])
        np.testing.assert_allclose(frames["return_normalized"], Rn[sl], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(frames["return_bin"], B[sl])
        assert frames["episode_success"].all() == (outcome == "success")
        assert not frames["episode_success"].any() == (outcome == "failure")
        # intervention flags: ticks inside the human intervals
        t = (first + np.arange(n)) / 50.0
        human = np.zeros(n, bool)
        for a, b in inter:
            human |= (t >= a) & (t < b)
        np.testing.assert_array_equal(frames["intervention"], human)
        # action = command sent (mux output); policy_action only while the policy did not drive
        j = np.arange(14)
        expect_state = np.stack([joint_value(j, x) for x in t])
        np.testing.assert_allclose(frames["observation.state"], expect_state, atol=2e-3)
        np.testing.assert_allclose(frames["action"], expect_state + COMMAND_OFFSET, atol=1e-5)
        assert np.isnan(frames["policy_action"][~human]).all()
        np.testing.assert_allclose(frames["policy_action"][human], expect_state[human] + POLICY_OFFSET, atol=1e-5)
        assert frames["task"] == SynthEpisode().prompt


def test_dataset_loads_back_with_frame_counts_and_images(exported, station):
    d, _ = exported
    ds = RecapDataset(d / "ds", image_size=(56, 56))
    info = json.loads((d / "ds/meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 50
    assert info["total_frames"] == ds.num_frames == sum(len(ds.episode(e)["index"]) for e in range(ds.num_episodes))
    np.testing.assert_array_equal(ds.column("index"), np.arange(ds.num_frames))
    for e, (ep_no, dur, _, _) in enumerate(EPISODES):
        n = len(ds.episode(e)["index"])
        assert abs(n - dur * 50) <= 1, (ep_no, n, dur)
        first = ds.episode_meta(e)["recap/first_tick"]
        imgs = ds.images(e)
        assert set(imgs) == {"observation.images.base", "observation.images.left_wrist",
                             "observation.images.right_wrist"}
        for c_i, cam in enumerate(station.cameras):
            v = imgs[f"observation.images.{cam.role}"]
            assert v.shape == (n, 56, 56, 3) and v.dtype == np.uint8
            # the frame used at tick k: the latest captured at or before it (captures jitter up to 1 ms late)
            t = (first + np.arange(n)) / 50.0
            idx = np.ceil(t * cam.fps - 1e-6).astype(int) - 1
            expect = np.array([frame_level(c_i, max(i, 0)) for i in idx])
            np.testing.assert_allclose(v[:, 20:36, 20:36].mean(axis=(1, 2, 3)), expect, atol=6)
    item = ds[3]
    assert item["observation.images.base"].shape == (56, 56, 3) and item["task"] == SynthEpisode().prompt
    stats = json.loads((d / "ds/meta/stats.json").read_text())
    assert stats["observation.state"]["count"] == [ds.num_frames]
    assert np.array(stats["observation.images.base"]["mean"]).shape == (3, 1, 1)


def test_incremental_rerun_exports_only_new_bags(tmp_path, station):
    bags, out = tmp_path / "bags", tmp_path / "ds"
    for ep in range(2):
        write_episode_bag(bags, station, SynthEpisode(duration_s=0.6, episode=ep, start_ns=BASE_T + ep * 100 * NS))
    code, res = cli.run(cli.build_parser().parse_args([str(bags), "--out", str(out), "--quiet"]))
    assert code == 0 and [r.status for r in res] == ["exported", "exported"]
    code, res = cli.run(cli.build_parser().parse_args([str(bags), "--out", str(out), "--quiet"]))
    assert code == 0 and [r.status for r in res] == ["present", "present"]
    write_episode_bag(bags, station, SynthEpisode(duration_s=0.6, episode=2, outcome="failure",
                                                  start_ns=BASE_T + 300 * NS))
    code, res = cli.run(cli.build_parser().parse_args([str(bags), "--out", str(out), "--quiet"]))
    assert code == 0 and [r.status for r in res] == ["present", "present", "exported"]
    assert sorted(p.name for p in (out / "data/chunk-000").iterdir()) == ["file-000.parquet", "file-001.parquet"]
    ds = RecapDataset(out)
    assert ds.num_episodes == 3
    np.testing.assert_array_equal(ds.column("episode_index"), np.repeat([0, 1, 2], [len(ds.episode(e)["index"])
                                                                                 for e in range(3)]))
    assert all(ds.images(e)["observation.images.base"].shape[0] == len(ds.episode(e)["index"]) for e in range(3))
    assert not ds.episode(2)["episode_success"].any()


def test_camera_gap_splits_episode_keeping_full_episode_returns(tmp_path, station):
    bags = tmp_path / "bags"
    write_episode_bag(bags, station, SynthEpisode(duration_s=3.0, episode=0, outcome="success",
                                                  camera_gaps={"cam_high": [(1.2, 1.6)]}))
    code, res = cli.run(cli.build_parser().parse_args([str(bags), "--out", str(tmp_path / "ds"), "--quiet",
                                                       "--max-len", "200"]))
    assert code == 0 and res[0].status == "exported" and len(res[0].episodes) == 2
    assert "cam_high: gap at" in res[0].message
    ds = RecapDataset(tmp_path / "ds")
    T = 151
    _, R, _, _ = hand_labels(T, True, max_len=200)
    for e in range(2):
        m = ds.episode_meta(e)
        n = len(ds.episode(e)["index"])
        assert m["recap/segments"] == 2 and m["recap/episode_ticks"] == T
        np.testing.assert_array_equal(ds.episode(e)["return"], R[m["recap/first_tick"]:m["recap/first_tick"] + n])
        t = (m["recap/first_tick"] + np.arange(n)) / 50
        assert not np.any((t > 1.3) & (t < 1.6))  # no frame from inside the gap (cam at 30 fps, 0.1 s tolerance)
    code, res = cli.run(cli.build_parser().parse_args([str(bags), "--out", str(tmp_path / "ds2"), "--quiet",
                                                       "--on-gap", "skip"]))
    assert code == 0 and res[0].status == "skipped" and "gaps beyond tolerance" in res[0].message
