"""Episode bags as the operator sees them (ROS-free): the facts of one bag's metadata, one readable line per
episode, a session summary, and a watcher that reports each episode of a station once its bag is finished.

``recap-station`` prints a line per finished episode and the summary at exit from these; ``recap-report`` reads
the same facts. A bag is finished once the recorder has written its end time (``recap.end_ns``); its outcome
may still be labelled later (``~/label`` after stop), so the summary reads every bag again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from recap_ros.recording.bag import (K_END, K_END_REASON, K_EPISODE, K_INTERVENTION_TICKS, K_INTERVENTIONS,
                                     K_OUTCOME, K_PROMPT, K_START, K_STATION, BagError, parse_episode_dir,
                                     read_metadata)


@dataclass(frozen=True)
class EpisodeRecord:
    """One episode bag's custom_data, typed."""

    path: Path
    station: str
    episode: int
    prompt: str
    outcome: str            # success | failure | unlabelled
    start_ns: int
    end_ns: int             # 0: still recording, or never finished (recap-bag-repair)
    interventions: int      # human-driven segments
    intervention_ticks: int  # robot commands from a human input
    end_reason: str

    @property
    def finished(self) -> bool:
        return self.end_ns > 0

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9 if self.finished else 0.0


def _int(custom: dict, key: str, bag: Path) -> int:
    text = str(custom.get(key) or "0")
    try:
        return int(text)
    except ValueError:
        raise BagError(f"{bag}/metadata.yaml: custom_data {key} = {text!r} is not an integer") from None


def read_episode(bag: str | os.PathLike) -> EpisodeRecord:
    """The episode facts of one bag directory; BagError naming the file when they cannot be read."""
    bag = Path(bag)
    custom = read_metadata(bag)["rosbag2_bagfile_information"].get("custom_data") or {}
    return EpisodeRecord(bag, str(custom.get(K_STATION) or ""), _int(custom, K_EPISODE, bag),
                         str(custom.get(K_PROMPT) or ""), str(custom.get(K_OUTCOME) or "unlabelled"),
                         _int(custom, K_START, bag), _int(custom, K_END, bag), _int(custom, K_INTERVENTIONS, bag),
                         _int(custom, K_INTERVENTION_TICKS, bag), str(custom.get(K_END_REASON) or ""))


def _shown(path: Path, root: Path | None) -> str:
    """A bag path relative to ``root`` (the bag directory the session printed at start) when it is under it."""
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def episode_line(rec: EpisodeRecord, root: Path | None = None) -> str:
    """``episode 3  success   4.2 s  human 37 ticks (1 takeover)  'touch the red marker'  sim_..._ep0003``"""
    human = f"human {rec.intervention_ticks} ticks ({_n(rec.interventions, 'takeover')})" \
        if rec.intervention_ticks else "autonomous"
    return (f"episode {rec.episode:<3d} {rec.outcome:<10s} {rec.duration_s:5.1f} s  {human}  '{rec.prompt}'  "
            f"{_shown(rec.path, root)}")


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def session_summary(records: list[EpisodeRecord], root: Path) -> list[str]:
    """Lines for the end of a session: episodes, outcomes, interventions, where the bags are."""
    if not records:
        return [f"no episode recorded (bags go to {root})"]
    counts = {o: sum(r.outcome == o for r in records) for o in ("success", "failure", "unlabelled")}
    done = [r for r in records if r.finished]
    helped = [r for r in records if r.intervention_ticks]
    lines = [f"{_n(len(records), 'episode')}: {counts['success']} success, "
             f"{counts['failure']} failure, {counts['unlabelled']} unlabelled"
             + (f" ({len(records) - len(done)} unfinished: recap-bag-repair)" if len(done) < len(records) else ""),
             f"interventions: {_n(sum(r.interventions for r in records), 'takeover')} in "
             f"{_n(len(helped), 'episode')}, "
             f"{sum(r.intervention_ticks for r in records)} human-driven ticks; "
             f"{sum(r.duration_s for r in done):.1f} s recorded",
             f"bags: {root} ({_shown(records[0].path, root)} .. {_shown(records[-1].path, root)})"]
    return lines


class EpisodeWatcher:
    """Finds the episode bags of one station that appear under ``root`` after it was created and reports each
    once, when it is finished. Cheap to poll: a bag's metadata is read only until it is finished."""

    def __init__(self, root: str | os.PathLike, station: str):
        self.root, self.station = Path(root), station
        self._before = set(self._dirs())
        self._pending: set[Path] = set()
        self.reported: list[Path] = []

    def _dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            parsed = parse_episode_dir(p.name)
            if parsed and parsed[0] == self.station and p.is_dir():
                out.append(p)
        return out

    def poll(self) -> list[EpisodeRecord]:
        """Episodes finished since the last poll, in episode order."""
        self._pending |= set(self._dirs()) - self._before - set(self.reported)
        done = []
        for bag in sorted(self._pending):
            try:
                rec = read_episode(bag)
            except BagError:  # metadata.yaml not written yet (it is replaced atomically once it is)
                continue
            if rec.finished:
                done.append(rec)
        for rec in done:
            self._pending.discard(rec.path)
            self.reported.append(rec.path)
        return sorted(done, key=lambda r: r.episode)

    def session(self) -> list[EpisodeRecord]:
        """Every episode of this session as it is now (outcomes labelled late included), in episode order."""
        self.poll()
        records = []
        for bag in sorted(self._pending | set(self.reported)):
            try:
                records.append(read_episode(bag))
            except BagError:
                continue
        return sorted(records, key=lambda r: r.episode)
