"""recap-export with bad bags: unfinished (repairable), corrupt, unlabelled, missing camera topic, foreign
station. Each gets a clear per-bag message, the good bags still export, the exit status says a bag failed."""
import io
import shutil

import numpy as np
import pytest

from recap_ros.export import cli
from recap_ros.dataset.reader import RecapDataset
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.station import load_station

NS = 1_000_000_000
BASE_T = 1_700_000_000 * NS


@pytest.fixture(scope="module")
def station():
    return load_station("sim")


def _run(argv):
    out = io.StringIO()
    code, results = cli.run(cli.build_parser().parse_args(argv + ["--quiet"]), out=out)
    return code, {r.bag[-6:]: r for r in results}, out.getvalue()


def _spec(ep, **kw):
    return SynthEpisode(duration_s=0.6, episode=ep, start_ns=BASE_T + ep * 100 * NS, **kw)


@pytest.fixture
def bad_folder(tmp_path, station):
    bags = tmp_path / "bags"
    write_episode_bag(bags, station, _spec(0))                                         # good
    write_episode_bag(bags, station, _spec(1), finish=False)                           # recorder killed
    corrupt = write_episode_bag(bags, station, _spec(2))
    mcap = next(corrupt.glob("*.mcap"))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 3] + b"\x00garbage" * 64)                      # unrepairable tail
    write_episode_bag(bags, station, _spec(3, outcome=None, end_event=False))          # no outcome label
    write_episode_bag(bags, station, _spec(4, omit_topics=("/cameras/cam_left_wrist/image_raw/compressed",)))
    return tmp_path


def test_bad_bags_get_clear_messages_and_good_bags_still_export(bad_folder):
    code, res, text = _run([str(bad_folder / "bags"), "--out", str(bad_folder / "ds")])
    assert code == 1
    assert res["ep0000"].status == "exported"
    assert res["ep0001"].status == "failed" and res["ep0001"].kind == "unfinished"
    assert "repairable: recap-bag-repair" in res["ep0001"].message
    assert res["ep0002"].status == "failed" and "ep0002" in res["ep0002"].message
    assert res["ep0003"].status == "skipped" and "--assume-outcome" in res["ep0003"].message
    assert res["ep0004"].status == "failed" and res["ep0004"].kind == "missing_topic"
    assert "/cameras/cam_left_wrist/image_raw/compressed (camera cam_left_wrist)" in res["ep0004"].message
    for ep in ("ep0001", "ep0002", "ep0003", "ep0004"):
        assert ep in text  # one line per bad bag on the output
    assert "1 exported" in text and "3 failed" in text
    assert RecapDataset(bad_folder / "ds").num_episodes == 1


def test_a_malformed_policy_command_is_skipped_not_the_episode(tmp_path, station):
    """A policy command lacking a joint (the mux refused it; the robot never got it) is skipped with a note; the
    episode exports with every frame."""
    bags = tmp_path / "bags"
    write_episode_bag(bags, station, _spec(0, malformed_policy_ticks=(10, 11)))
    code, res, _ = _run([str(bags), "--out", str(tmp_path / "ds")])
    assert code == 0 and res["ep0000"].status == "exported"
    assert "2 malformed /policy/command message(s) skipped" in res["ep0000"].message
    ds = RecapDataset(tmp_path / "ds")
    assert ds.num_episodes == 1 and len(ds.episode(0)["action"]) == 30  # 0.6 s at 50 Hz


def test_repair_and_assume_outcome_recover_bags(bad_folder):
    _run([str(bad_folder / "bags"), "--out", str(bad_folder / "ds")])
    code, res, text = _run([str(bad_folder / "bags"), "--out", str(bad_folder / "ds"), "--repair",
                            "--assume-outcome", "failure"])
    assert res["ep0000"].status == "present"
    assert res["ep0001"].status == "exported" and "repaired" in res["ep0001"].message
    assert res["ep0003"].status == "exported"
    assert res["ep0002"].status == "failed" and res["ep0004"].status == "failed" and code == 1
    ds = RecapDataset(bad_folder / "ds")
    assert ds.num_episodes == 3
    e3 = next(e for e in range(3) if ds.episode_meta(e)["recap/source_bag"].endswith("ep0003"))
    assert ds.episode_meta(e3)["recap/outcome_source"] == "--assume-outcome"
    assert not ds.episode(e3)["episode_success"].any()


def test_foreign_station_and_bad_arguments(tmp_path, station):
    bags = tmp_path / "bags"
    write_episode_bag(bags, station, _spec(0))
    code, res, _ = _run([str(bags), "--out", str(tmp_path / "ds"), "--station", "bimanual_aloha", "--max-len", "100"])
    assert res["ep0000"].status == "failed" and res["ep0000"].kind == "station"
    assert "recorded on station 'sim'" in res["ep0000"].message
    assert code == 1
    assert cli.main([str(tmp_path / "nope"), "--out", str(tmp_path / "ds2")]) == 2
    assert cli.main([str(bags), "--out", str(tmp_path / "ds3"), "--task-max-len", "bad"]) == 2


def test_appending_with_other_features_is_refused(tmp_path, station):
    bags = tmp_path / "bags"
    write_episode_bag(bags, station, _spec(0))
    assert cli.main([str(bags), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    info = tmp_path / "ds/meta/info.json"
    info.write_text(info.read_text().replace('"fps": 50', '"fps": 30'))
    assert cli.main([str(bags), "--out", str(tmp_path / "ds"), "--quiet"]) == 2


def test_interrupted_run_leaves_dataset_unchanged(tmp_path, station):
    bags = tmp_path / "bags"
    write_episode_bag(bags, station, _spec(0))
    assert cli.main([str(bags), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    before = sorted(p.relative_to(tmp_path / "ds") for p in (tmp_path / "ds").rglob("*"))
    # a crashed run leaves a staging folder; the dataset itself is untouched and the next run cleans it up
    staging = tmp_path / "ds/.recap-export-staging/data/chunk-000"
    staging.mkdir(parents=True)
    (staging / "file-001.parquet").write_bytes(b"partial")
    assert RecapDataset(tmp_path / "ds").num_episodes == 1
    write_episode_bag(bags, station, _spec(1))
    code, res, text = _run([str(bags), "--out", str(tmp_path / "ds")])
    assert code == 0 and "interrupted export" in text
    assert not (tmp_path / "ds/.recap-export-staging").exists()
    ds = RecapDataset(tmp_path / "ds")
    assert ds.num_episodes == 2 and set(before) <= {p.relative_to(tmp_path / "ds")
                                                    for p in (tmp_path / "ds").rglob("*")}
    np.testing.assert_array_equal(ds.column("index"), np.arange(ds.num_frames))
    shutil.rmtree(tmp_path / "ds")
