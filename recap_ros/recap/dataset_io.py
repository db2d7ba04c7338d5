"""Training inputs and label files for the RECAP CLIs (ROS-free).

Training data is either an exported LeRobot dataset (``recap-export``; read with
:class:`recap_ros.export.dataset.RecapDataset`) or a frames cache (.npz) written by ``recap-sim-demos`` /
the sim iteration bench. Labels (``recap-label``) are a parquet table keyed by (episode_index, frame_index) with
the advantage and the indicator, joined back onto the frames by ``recap-train-policy``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recap_ros.recap.data import Frames, chunks, concat, kept_ticks, load_frames_npz

IMAGE_KEY = "observation.images.{role}"
ROLES = ("base", "left_wrist", "right_wrist")


def _max_len(ret: np.ndarray, ret_norm: np.ndarray) -> int:
    """The normalisation length export used: R / R_norm on unclipped, non-zero returns."""
    ok = (ret_norm > -1.0 + 1e-6) & (ret_norm < -1e-9)
    if not ok.any():
        raise ValueError("cannot infer the task's maximum episode length from the returns; pass --max-len")
    return round(float(np.median(ret[ok] / ret_norm[ok])))


def load_frames(source: str | Path, image_size: int, chunk_len: int = 50, stride: int = 1,
                max_len: int | None = None, progress: bool = True) -> Frames:
    """Frames from a .npz frames cache or a LeRobot dataset directory (every ``stride``-th frame + the last)."""
    source = Path(source)
    if source.suffix == ".npz":
        f = load_frames_npz(source)
        if f.images.shape[2] != image_size:
            raise ValueError(f"{source}: images are {f.images.shape[2]} px, the model takes {image_size}")
        return f
    from tqdm import tqdm

    from recap_ros.export.dataset import RecapDataset

    ds = RecapDataset(source, image_size=(image_size, image_size))
    keys = [IMAGE_KEY.format(role=r) for r in ROLES]
    parts = []
    for ep in tqdm(range(ds.num_episodes), desc="load", disable=not progress, dynamic_ncols=True):
        e = ds.episode(ep)
        T = len(e["frame_index"])
        if T == 0:
            continue
        keep = kept_ticks(T, stride)
        imgs = ds.images(ep, keys)
        ret, rn = np.asarray(e["return"], np.float64).reshape(-1), np.asarray(e["return_normalized"]).reshape(-1)
        parts.append(Frames(
            images=np.stack([imgs[k][keep] for k in keys], 1), state=e["observation.state"][keep].astype(np.float32),
            action_chunk=chunks(e["action"].astype(np.float32), chunk_len)[keep],
            intervention=e["intervention"].reshape(-1).astype(bool)[keep],
            episode_index=np.full(len(keep), ep, np.int64), frame_index=keep.astype(np.int64),
            task_index=np.zeros(len(keep), np.int64), prompts=[e["task"]], ret=ret[keep],
            return_normalized=rn[keep].astype(np.float64), return_bin=e["return_bin"].reshape(-1)[keep].astype(np.int64),
            episode_success=e["episode_success"].reshape(-1).astype(bool)[keep],
            max_len=int(max_len or _max_len(ret, rn))))
    if not parts:
        raise ValueError(f"{source}: no frames")
    return concat(parts)


def write_labels(path: str | Path, frames: Frames, advantage: np.ndarray, indicator: np.ndarray,
                 thresholds: dict[int, float], mode: str) -> None:
    table = pa.table({"episode_index": frames.episode_index, "frame_index": frames.frame_index,
                      "advantage": np.asarray(advantage, np.float64), "indicator": np.asarray(indicator, bool)})
    meta = {b"recap.mode": mode.encode(),
            b"recap.thresholds": repr({frames.prompts[k]: v for k, v in thresholds.items()}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), str(path))


def apply_labels(frames: Frames, path: str | Path) -> Frames:
    """Frames with the indicator column from a labels file; every frame must have a label."""
    t = pq.read_table(str(path))
    key = {(int(e), int(f)): bool(i) for e, f, i in zip(t["episode_index"].to_numpy(), t["frame_index"].to_numpy(),
                                                       t["indicator"].to_numpy(zero_copy_only=False))}
    missing = [(int(e), int(f)) for e, f in zip(frames.episode_index, frames.frame_index) if (e, f) not in key]
    if missing:
        raise ValueError(f"{path}: no label for {len(missing)} frames, e.g. (episode, frame) {missing[:3]}")
    return frames.with_indicator(np.array([key[(int(e), int(f))]
                                           for e, f in zip(frames.episode_index, frames.frame_index)]))
