"""recap-report: session numbers by hand, the page from real bags (export.synth) with value curves from a value
bundle, and the page rendered by headless Chromium with every image loaded."""
import re
from pathlib import Path

import numpy as np
import pytest

from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.report import browser
from recap_ros.report.cli import main as report_main
from recap_ros.report.session import EpisodeRow, over_time, runs, session_stats
from recap_ros.station import load_station

NS = 1_000_000_000
T0 = 1_700_000_000


def row(start, outcome, duration=5.0, takeovers=0, ticks=0):
    return EpisodeRow(f"b{start}", 0, "p", outcome, T0 + start, duration, takeovers, ticks)


def test_session_numbers_by_hand():
    rows = [row(0, "success"), row(10, "failure", takeovers=2, ticks=50), row(20, "success"),
            row(30, "unlabelled")]
    st = session_stats(rows)
    assert (st.episodes, st.successes, st.failures, st.takeovers, st.human_ticks, st.helped) == (4, 2, 1, 2, 50, 1)
    assert st.span_s == 35.0 and st.recorded_s == 20.0
    assert st.success_rate == pytest.approx(2 / 3)
    assert st.successes_per_hour == pytest.approx(2 / 35 * 3600)
    t = over_time(rows, window=2)  # labelled episodes end at 5, 15, 25 s
    np.testing.assert_allclose(t["minutes"], [5 / 60, 15 / 60, 25 / 60])
    np.testing.assert_allclose(t["rate"], [1, 1 / 2, 2 / 3])
    np.testing.assert_allclose(t["rolling"], [1, 1 / 2, 1 / 2])
    np.testing.assert_allclose(t["per_hour"], [720, 240, 288])


def test_runs():
    assert runs(np.array([0, 1, 1, 0, 1], bool)) == 2 and runs(np.array([1, 0])) == 1 and runs(np.zeros(0)) == 0


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """Three short episodes: a success, a failure with a takeover, an unlabelled one."""
    root = tmp_path_factory.mktemp("report") / "bags"
    station = load_station("sim")
    for ep, (outcome, inter) in enumerate([("success", []), ("failure", [(0.4, 0.8)]), (None, [])]):
        write_episode_bag(root, station, SynthEpisode(duration_s=1.2, episode=ep, outcome=outcome,
                                                      interventions=inter, start_ns=(T0 + 10 * ep) * NS,
                                                      image_size=(32, 32)))
    return root


@pytest.fixture(scope="module")
def value_bundle(tmp_path_factory):
    from recap_ros.recap.value import ValueConfig, ValueModel, default_backbone, save_value

    return save_value(ValueModel(ValueConfig(default_backbone(image_size=16))),
                      tmp_path_factory.mktemp("value") / "v")


def _images(index: Path) -> list[str]:
    return re.findall(r"<img src='([^']+)'", index.read_text())


def test_report_from_bags_with_a_value_bundle(bags, value_bundle, tmp_path, capsys):
    out = tmp_path / "r"
    assert report_main([str(bags), "--out", str(out), "--value", str(value_bundle), "--value-stride", "3",
                        "--dataset", str(tmp_path / "ds")]) == 0
    text = capsys.readouterr().out
    assert "3 episodes (1 success, 1 failure), 1 takeovers, value: value bundle" in text, text
    page = (out / "index.html").read_text()
    assert "<b>3 episodes</b>: 1 success, 1 failure, 1 unlabelled; success rate 50 %" in page
    images = _images(out / "index.html")
    # the unlabelled bag is not exported: value curves for the two others
    assert images[:3] == ["session.png", "interventions.png", "durations.png"]
    assert sorted(images[3:]) == sorted(f"value_{b.name}.png" for b in sorted(bags.iterdir())[:2])
    assert all((out / i).stat().st_size > 1000 for i in images)
    assert "skipped" in page and "unlabelled" in page  # the export's note on the third bag


def test_report_without_value_says_so(bags, tmp_path):
    out = tmp_path / "r"
    assert report_main([str(bags), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "No value curves" in page and "--value" in page
    assert _images(out / "index.html") == ["session.png", "interventions.png", "durations.png"]


def test_report_from_a_dataset(bags, tmp_path):
    ds = tmp_path / "ds"
    assert report_main([str(bags), "--out", str(tmp_path / "a"), "--dataset", str(ds)]) == 0
    out = tmp_path / "b"
    assert report_main([str(ds), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "<b>2 episodes</b>: 1 success, 1 failure, 0 unlabelled" in page  # the dataset holds the labelled two


@pytest.mark.timeout(120)
def test_page_renders_in_headless_chromium_with_every_image(bags, value_bundle, tmp_path):
    if browser.find_chromium() is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium): the browser check needs it")
    out = tmp_path / "r"
    assert report_main([str(bags), "--out", str(out), "--value", str(value_bundle), "--value-stride", "3"]) == 0
    check = browser.check_page(out / "index.html")
    assert check.title == "recap_ros session report"
    assert [i["src"] for i in check.images] == _images(out / "index.html")
    assert len(check.images) == 5 and not check.broken, check.images
    assert all(i["width"] >= 400 and i["height"] >= 200 for i in check.images), check.images
