"""recap-export carries the live value monitor's V as the per-frame column ``monitor.value``: the newest /value
whose observation stamp is at or before each 50 Hz frame (5 Hz values: held for 10 frames), NaN where there is
none or it is more than 1 s old. Expected values are worked out by hand from the synthetic bag's V(t)."""
import numpy as np
import pytest

from recap_ros.dataset.reader import RecapDataset
from recap_ros.export import cli
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.station import load_station

NS = 1_000_000_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    st = load_station("sim")
    d = tmp_path_factory.mktemp("export_value")
    t0 = 1_700_000_000 * NS
    # episode 0: values at 5 Hz all along; episode 1: the monitor stops after 0.4 s; episode 2: no monitor
    for ep, until, hz in ((0, None, 5.0), (1, 0.4, 5.0), (2, None, 0.0)):
        write_episode_bag(d / "bags", st, SynthEpisode(duration_s=2.0, episode=ep, start_ns=t0 + ep * 100 * NS,
                                                       value_hz=hz, value_until_s=until, jitter_ms=0.0))
    assert cli.main([str(d / "bags"), "--out", str(d / "ds"), "--max-len", "600", "--quiet"]) == 0
    return RecapDataset(d / "ds")


def column(ds, ep):
    return np.asarray(ds.episode(ep)["monitor.value"], np.float64).ravel()


def test_value_is_held_from_its_observation_stamp(dataset):
    v = column(dataset, 0)
    assert len(v) == 101  # 2 s at 50 Hz, both ends included
    # frame k (t = k/50 s) holds the value stamped at floor(k / 10) / 5 s: V = -0.5 - 0.25 * that time
    expected = [-0.5 - 0.25 * ((k // 10) / 5) for k in range(101)]
    np.testing.assert_allclose(v, expected, atol=1e-6)


def test_a_stopped_monitor_leaves_nan_after_one_second(dataset):
    v = column(dataset, 1)
    # last value at 0.4 s (V = -0.6); held while at most 1 s old: frames up to t = 1.4 s (k = 70)
    np.testing.assert_allclose(v[20:71], -0.6, atol=1e-6)
    assert np.isnan(v[71:]).all()


def test_an_episode_without_values_is_all_nan(dataset):
    assert np.isnan(column(dataset, 2)).all()
