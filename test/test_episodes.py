"""Episode bags as the operator sees them: facts, per-episode lines, session summary, the runner's watcher."""
from pathlib import Path

from recap_ros.recording.bag import metadata_document, write_metadata
from recap_ros.recording.episodes import EpisodeWatcher, episode_line, read_episode, session_summary

S = 1_000_000_000


def write_bag(root: Path, episode: int, outcome="success", end_s=4.25, ticks=0, segments=0,
              prompt="touch the red marker", station="sim") -> Path:
    bag = root / f"{station}_20260101-120000_ep{episode:04d}"
    bag.mkdir(parents=True)
    custom = {"recap.station": station, "recap.episode": str(episode), "recap.prompt": prompt,
              "recap.outcome": outcome, "recap.start_ns": str(100 * S),
              "recap.end_ns": str(int((100 + end_s) * S)) if end_s else "",
              "recap.interventions": str(segments), "recap.intervention_ticks": str(ticks)}
    write_metadata(bag, metadata_document(f"{bag.name}.mcap", [], 0, 0, custom))
    return bag


def test_record_and_line(tmp_path):
    bag = write_bag(tmp_path, 3, ticks=37, segments=1)
    rec = read_episode(bag)
    assert (rec.episode, rec.outcome, rec.prompt, rec.intervention_ticks) == (3, "success", "touch the red marker", 37)
    assert rec.duration_s == 4.25
    assert episode_line(rec, tmp_path) == ("episode 3   success      4.2 s  human 37 ticks (1 takeover)  "
                                           "'touch the red marker'  sim_20260101-120000_ep0003")
    assert "autonomous" in episode_line(read_episode(write_bag(tmp_path, 4)))


def test_summary_counts(tmp_path):
    recs = [read_episode(write_bag(tmp_path, 0, "success", 2.0)),
            read_episode(write_bag(tmp_path, 1, "failure", 3.0, ticks=10, segments=2)),
            read_episode(write_bag(tmp_path, 2, "unlabelled", None))]
    lines = session_summary(recs, tmp_path)
    assert lines[0] == "3 episodes: 1 success, 1 failure, 1 unlabelled (1 unfinished: recap-bag-repair)"
    assert lines[1] == "interventions: 2 takeovers in 1 episode, 10 human-driven ticks; 5.0 s recorded"
    assert lines[2] == f"bags: {tmp_path} (sim_20260101-120000_ep0000 .. sim_20260101-120000_ep0002)"
    assert session_summary([], tmp_path) == [f"no episode recorded (bags go to {tmp_path})"]


def test_watcher_reports_new_finished_bags_of_its_station_once(tmp_path):
    write_bag(tmp_path, 0)  # from an earlier session
    w = EpisodeWatcher(tmp_path, "sim")
    assert w.poll() == []
    write_bag(tmp_path, 1, end_s=None)  # still recording
    write_bag(tmp_path, 7, station="other")
    (tmp_path / "sim_20260101-120000_ep0002").mkdir()  # metadata.yaml not written yet
    assert w.poll() == []
    bag = tmp_path / "sim_20260101-120000_ep0001"
    write_metadata(bag, metadata_document(f"{bag.name}.mcap", [], 0, 0,
                                          {"recap.episode": "1", "recap.outcome": "failure",
                                           "recap.start_ns": str(S), "recap.end_ns": str(3 * S)}))
    assert [r.episode for r in w.poll()] == [1]
    assert w.poll() == []
    assert [r.episode for r in w.session()] == [1]
