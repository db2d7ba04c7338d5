"""Fig. 4-style value plot: PNG written, rises green, drops red."""
import numpy as np
import pytest

from recap_ros.recap import plots


def test_segment_colours_follow_value_change():
    v = np.r_[np.linspace(-0.8, -0.2, 20), np.linspace(-0.2, -0.9, 20)]
    c = plots.segment_colours(v, smooth=1)
    assert set(c[:19]) == {plots.RISE} and set(c[20:]) == {plots.DROP}
    assert plots.segment_colours(np.zeros(5)) == [plots.FLAT] * 4


def test_plot_writes_png(tmp_path):
    T = 120
    v = np.r_[np.linspace(-0.9, -0.5, 60), np.linspace(-0.5, -0.7, 30), np.linspace(-0.7, 0.0, 30)]
    iv = np.zeros(T, bool)
    iv[70:90] = True
    out = plots.plot_episode_value(v, tmp_path / "ep.png", return_normalized=np.linspace(-1, 0, T),
                                   intervention=iv, title="episode 3", success=True)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="value sequence"):
        plots.plot_episode_value(np.zeros(1), tmp_path / "bad.png")
