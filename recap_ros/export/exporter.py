"""Bag -> dataset episodes: read, align on the control clock, label with RECAP returns, append (ROS-free).

One bag is one recorded episode. Its labels come from :func:`recap_ros.recap.returns.episode_labels` over the
whole control-clock grid of the episode (start .. end), so when gaps split an episode each segment keeps the
rewards and returns of its ticks in the full episode (R_t = steps left to the real end).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from recap_ros import imaging
from recap_ros.dataset.writer import EpisodeData, LeRobotWriter, VideoOptions, vector_feature, video_feature
from recap_ros.export.align import NS, Aligned, Stream, Tolerances, align_episode, latest, segments
from recap_ros.export.bagread import GAPS, UNLABELLED, EpisodeBag, ExportError, read_episode_bag
from recap_ros.recap import returns
from recap_ros.recording import bag as rbag
from recap_ros.station import Station

IMAGE_KEY = "observation.images.{role}"
SOURCE_BAG = "recap/source_bag"
MONITOR_VALUE = "monitor.value"  # the live value monitor's V per frame (NaN: none within VALUE_MAX_AGE_S)
VALUE_MAX_AGE_S = 1.0
NORMALISATION = "normalisation"  # BagResult kind: the task's M / C_fail differ from those the dataset stores
ON_GAP = ("split", "skip")


@dataclass(frozen=True)
class ExportConfig:
    tolerances: Tolerances = Tolerances()
    joint_mode: str = "interpolate"
    on_gap: str = "split"                 # gaps: keep the valid segments, or skip the whole episode
    min_segment_s: float = 1.0            # shorter segments (after a split) are dropped, with a message
    max_len: int | None = None            # task's max episode length in steps (None: station sim timeout)
    task_max_len: dict = field(default_factory=dict)  # prompt -> max episode length in steps
    c_fail: float | None = None           # None: the task's max episode length
    num_bins: int = returns.NUM_BINS
    assume_outcome: str | None = None     # "success" / "failure" for bags without a label
    video: VideoOptions = VideoOptions()

    def __post_init__(self):
        if self.on_gap not in ON_GAP:
            raise ValueError(f"on_gap must be one of {ON_GAP} (got {self.on_gap!r})")
        if self.assume_outcome not in (None, "success", "failure"):
            raise ValueError(f"assume_outcome must be success or failure (got {self.assume_outcome!r})")
        if self.max_len is not None and self.max_len <= 0:
            raise ValueError(f"max episode length must be > 0 steps (got {self.max_len})")
        if self.c_fail is not None and self.c_fail < 0:
            raise ValueError(f"C_fail must be >= 0 (got {self.c_fail})")


@dataclass
class BagResult:
    bag: str
    status: str                 # "exported", "present" (exported by an earlier run), "skipped", "failed"
    message: str = ""
    kind: str = ""              # ExportError kind when skipped / failed
    episodes: list[int] = field(default_factory=list)
    frames: int = 0
    duration_s: float = 0.0     # the episode's recorded duration (start .. end)


def dataset_features(station: Station) -> dict:
    names = station.robot.joint_names
    feats = {IMAGE_KEY.format(role=c.role): video_feature(c.output_height, c.output_width) for c in station.cameras}
    feats.update({
        "observation.state": vector_feature("float32", names),
        "action": vector_feature("float32", names),
        "policy_action": vector_feature("float32", names),
        "intervention": vector_feature("bool", None, 1),
        "next.reward": vector_feature("float32", None, 1),
        "return": vector_feature("float32", None, 1),
        "return_normalized": vector_feature("float32", None, 1),
        "return_bin": vector_feature("int64", None, 1),
        "episode_success": vector_feature("bool", None, 1),
    })
    if station.value_monitor is not None:
        feats[MONITOR_VALUE] = vector_feature("float32", None, 1)
    return feats


def monitor_values(value: Stream | None, ticks: np.ndarray) -> np.ndarray:
    """The live monitor's V at each tick: its newest value whose observation time is at or before the tick,
    NaN where there is none or it is older than VALUE_MAX_AGE_S (the monitor was not running)."""
    out = np.full(len(ticks), np.nan, np.float32)
    if value is None:
        return out
    idx, age = latest(value, ticks)
    ok = age <= VALUE_MAX_AGE_S
    out[ok] = np.asarray(value.values, np.float64)[idx[ok]]
    return out


def open_writer(root: str | Path, station: Station, cfg: ExportConfig) -> LeRobotWriter:
    rate = station.robot.control_rate_hz
    if abs(rate - round(rate)) > 1e-9:
        raise ValueError(f"{station.file}: robot.control_rate_hz {rate} is not an integer; LeRobot fps is")
    return LeRobotWriter(root, int(round(rate)), dataset_features(station), robot_type=station.name,
                         video=cfg.video)


def max_len_for(station: Station, cfg: ExportConfig, task: str) -> int:
    if task in cfg.task_max_len:
        return int(cfg.task_max_len[task])
    if cfg.max_len is not None:
        return int(cfg.max_len)
    if station.sim is not None:
        return int(round(station.sim.episode_timeout_s * station.robot.control_rate_hz))
    raise ValueError(f"station {station.name} has no sim episode timeout: give the task's maximum episode length "
                     "(--max-len or --task-max-len)")


def _frames(ep: EpisodeBag, station: Station, cam_name: str, index: np.ndarray) -> Iterator[np.ndarray]:
    """Decoded, fitted RGB frames for the chosen indices (each JPEG decoded once however often repeated)."""
    cam = station.camera(cam_name)
    jpegs = ep.cameras[cam_name].values
    last, img = -1, None
    for i in index:
        if i != last:
            try:
                img = imaging.decode_jpeg(bytes(jpegs[i]))
            except ValueError:
                raise ExportError(ep.path, "corrupt", f"camera {cam_name}: frame {i} is not a decodable JPEG") \
                    from None
            img = imaging.fit(img, cam.output_width, cam.output_height, cam.resize)
            last = i
        yield img


def align(ep: EpisodeBag, station: Station, cfg: ExportConfig) -> Aligned:
    return align_episode(ep.start_ns, ep.end_ns, station.robot.control_rate_hz, cameras=ep.cameras,
                         joints=ep.joints, command=ep.command, policy=ep.policy, intervention=ep.intervention,
                         active_source=ep.active_source, command_source=ep.command_source,
                         human_inputs=frozenset(i.name for i in station.mux.inputs if i.human),
                         tol=cfg.tolerances, joint_mode=cfg.joint_mode)


def task_normalisation(writer: LeRobotWriter) -> dict[str, tuple[int, float]]:
    """(max length M, C_fail) of every task the dataset already holds, from meta/episodes."""
    eps = writer.episodes
    if eps is None or "recap/max_len" not in eps.column_names:
        return {}
    return {tasks[0]: (int(m), float(c)) for tasks, m, c in zip(eps.column("tasks").to_pylist(),
                                                              eps.column("recap/max_len").to_pylist(),
                                                              eps.column("recap/c_fail").to_pylist())}


def export_bag(writer: LeRobotWriter, bag_path: str | Path, station: Station, cfg: ExportConfig,
               known: dict[str, tuple[int, float]] | None = None) -> BagResult:
    """Export one bag; never raises for bad input (the result says what happened). ``known``: the (M, C_fail)
    per task the dataset already stores (:func:`task_normalisation`); a bag of such a task that this
    configuration would normalise otherwise fails (one normalisation per task, no unit mix)."""
    bag_path = Path(bag_path)
    name = bag_path.name
    try:
        ep = read_episode_bag(bag_path, station)
        success, label_src = ep.outcome(cfg.assume_outcome)
        task = ep.prompt(station.policy.prompt)
        al = align(ep, station, cfg)
    except ExportError as e:
        return BagResult(name, "skipped" if e.kind == UNLABELLED else "failed", str(e), kind=e.kind)
    duration = (ep.end_ns - ep.start_ns) / NS
    max_len = max_len_for(station, cfg, task)
    c_fail = float(max_len if cfg.c_fail is None else cfg.c_fail)
    have = (known or {}).get(task)
    if have is not None and have != (max_len, c_fail):
        return BagResult(name, "failed", f"{bag_path}: the dataset normalises task '{task}' by max length {have[0]}, "
                         f"C_fail {have[1]:g}; this export would use {max_len}, {c_fail:g} (give the same --max-len / "
                         "--task-max-len / --c-fail, or export into a new dataset)", kind=NORMALISATION,
                         duration_s=duration)
    labels = returns.episode_labels(al.num_ticks, success, max_len, c_fail, cfg.num_bins)
    rate = station.robot.control_rate_hz
    notes = list(ep.notes)
    if al.trimmed_start or al.trimmed_end:
        notes.append(f"trimmed {al.trimmed_start} + {al.trimmed_end} edge ticks")
    if al.gaps:
        gap_text = "; ".join(str(g) for g in al.gaps)
        if cfg.on_gap == "skip":
            return BagResult(name, "skipped", kind=GAPS, message=f"{bag_path}: gaps beyond tolerance, episode skipped (--on-gap "
                             f"split keeps the valid segments): {gap_text}", duration_s=duration)
        notes.append(f"split at gaps: {gap_text}")
    segs = segments(al.valid, 1)
    min_ticks = max(1, int(round(cfg.min_segment_s * rate))) if al.gaps else 1  # only split pieces are dropped
    dropped = [(lo, hi) for lo, hi in segs if hi - lo < min_ticks]
    segs = [(lo, hi) for lo, hi in segs if hi - lo >= min_ticks]
    if dropped:
        notes.append(f"dropped {len(dropped)} segment(s) shorter than {cfg.min_segment_s:.2f} s: "
                     + ", ".join(f"{lo / rate:.2f}..{hi / rate:.2f} s" for lo, hi in dropped))
    if not segs:
        return BagResult(name, "skipped", kind=GAPS, message=f"{bag_path}: no segment of at least {cfg.min_segment_s:.2f} s "
                         f"without gaps: {'; '.join(notes)}", duration_s=duration)
    cam_of_role = {c.role: c.name for c in station.cameras}
    values = monitor_values(ep.value, al.ticks) if station.value_monitor is not None else None
    result = BagResult(name, "exported", "; ".join(notes), duration_s=duration)
    for s_i, (lo, hi) in enumerate(segs):
        n = hi - lo
        cols = {
            "observation.state": al.state[lo:hi], "action": al.action[lo:hi],
            "policy_action": al.policy_action[lo:hi], "intervention": al.intervention[lo:hi],
            "next.reward": labels["reward"][lo:hi], "return": labels["return"][lo:hi],
            "return_normalized": labels["return_normalized"][lo:hi], "return_bin": labels["return_bin"][lo:hi],
            "episode_success": np.full(n, success),
        }
        if values is not None:
            cols[MONITOR_VALUE] = values[lo:hi]
        videos = {IMAGE_KEY.format(role=role): (lambda cam=cam, lo=lo, hi=hi: _frames(
            ep, station, cam, al.camera_index[cam][lo:hi])) for role, cam in cam_of_role.items()}
        extra = {SOURCE_BAG: name, "recap/segment": s_i, "recap/segments": len(segs), "recap/success": success,
                 "recap/outcome_source": label_src, "recap/start_ns": int(al.ticks[lo]),
                 "recap/first_tick": int(lo), "recap/episode_ticks": int(al.num_ticks), "recap/max_len": max_len,
                 "recap/c_fail": c_fail, "recap/interventions": int(np.sum(al.intervention[lo:hi])),
                 "recap/model": ep.custom.get(rbag.K_MODEL, ""), "recap/beta": ep.custom.get(rbag.K_BETA, ""),
                 "recap/operator": ep.custom.get(rbag.K_OPERATOR, "")}
        try:
            result.episodes.append(writer.add_episode(EpisodeData(task, cols, videos, extra)))
        except ExportError as e:
            result.status, result.message, result.kind = "failed", str(e), e.kind
            return result
        result.frames += n
    return result

