"""The exported dataset loads with LeRobot's own LeRobotDataset and matches recap_ros.dataset.reader frame by
frame. Skipped where lerobot is not installed (it is not a dependency of recap_ros: it pins torch and pulls
torchvision/torchcodec)."""
import numpy as np
import pytest

from recap_ros.export import cli
from recap_ros.dataset.reader import RecapDataset
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.station import load_station

NS = 1_000_000_000


def test_lerobot_dataset_reads_the_export(tmp_path):
    lerobot_dataset = pytest.importorskip("lerobot.datasets.lerobot_dataset")
    station = load_station("sim")
    for ep in range(2):  # two runs: the second appends new data / video / episodes files
        write_episode_bag(tmp_path / "bags", station, SynthEpisode(
            duration_s=1.0, episode=ep, outcome="failure" if ep else "success", interventions=[(0.3, 0.5)] * ep,
            textured=True, start_ns=1_700_000_000 * NS + ep * 100 * NS))
        assert cli.main([str(tmp_path / "bags"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    ds = lerobot_dataset.LeRobotDataset("local/recap", root=tmp_path / "ds")
    ours = RecapDataset(tmp_path / "ds")
    assert len(ds) == ours.num_frames and ds.num_episodes == ours.num_episodes == 2
    for e in range(ours.num_episodes):
        lo, hi = ours.episode_range(e)
        cols, imgs = ours.episode(e), ours.images(e)
        for i in range(lo, hi):
            item = ds[i]
            for k in ("observation.state", "action", "policy_action", "intervention", "next.reward", "return",
                      "return_normalized", "return_bin", "episode_success", "frame_index", "index"):
                np.testing.assert_allclose(item[k].numpy(), cols[k][i - lo], equal_nan=True)
            assert item["task"] == cols["task"]
            for k, v in imgs.items():
                np.testing.assert_allclose((item[k].numpy().transpose(1, 2, 0) * 255).round(), v[i - lo], atol=1)
