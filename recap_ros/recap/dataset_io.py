"""Training inputs and label files for the RECAP CLIs (ROS-free).

Training data is either an exported LeRobot dataset (``recap-export``; read with
:class:`recap_ros.dataset.reader.RecapDataset`) or a frames cache (.npz) written by ``recap-sim-demos`` /
the sim iteration bench. Each episode's maximum length M and C_fail come from where its returns were made: the
dataset's ``meta/episodes`` (``recap/max_len``, ``recap/c_fail``, written by the export) or the cache's
per-frame columns; they are never inferred or given again. Labels (``recap-label``) are a parquet table keyed
by (episode_index, frame_index) with the advantage and the indicator, joined back onto the frames by
``recap-train-policy``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recap_ros.recap.data import Frames, chunks, kept_ticks, load_frames_npz

IMAGE_KEY = "observation.images.{role}"
ROLES = ("base", "left_wrist", "right_wrist")


def check_max_len(given: int | None, stored: np.ndarray, source, episode: np.ndarray, task: list[str]) -> None:
    """A given max length must be the one the data's returns were normalised by (else labels mix units);
    ``stored``, ``episode``, ``task``: per episode or per frame."""
    if given is None:
        return
    bad = np.flatnonzero(np.asarray(stored) != given)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"--max-len {given} differs from the max length {stored[i]} that {source} stores for "
                         f"episode {episode[i]} ('{task[i]}'); leave --max-len out")


def _normalisation(ds, ep: int) -> tuple[int, float, str]:
    """(M, C_fail, task) of one dataset episode, from meta/episodes."""
    meta = ds.episode_meta(ep)
    missing = [k for k in ("recap/max_len", "recap/c_fail") if meta.get(k) is None]
    if missing:
        raise ValueError(f"{ds.root}/meta/episodes: episode {ep} has no {missing}; export it again with recap-export")
    return int(meta["recap/max_len"]), float(meta["recap/c_fail"]), meta["tasks"][0]


def load_frames(source: str | Path, image_size: int, chunk_len: int = 50, stride: int = 1,
                max_len: int | None = None, progress: bool = True, decode: str = "upfront",
                resize: str = "resize") -> Frames:
    """Frames from a .npz frames cache or a LeRobot dataset directory (every ``stride``-th frame + the last).
    ``max_len``: a check only; refused unless every episode's stored M equals it. ``decode`` (datasets only):
    'upfront' decodes every frame's images now (one sequential pass per video); 'lazy' leaves them in the videos
    (``images`` is a :class:`recap_ros.recap.loader.DatasetImages`, decoded per batch while training). A dataset's
    views are decoded at their stored size and brought to ``image_size`` in mode ``resize`` (the model's
    ``image_resize``; 'resize' stretches, as the value monitor does) by the runtime's own code
    (:func:`recap_ros.recap.loader.decode_views`)."""
    source = Path(source)
    if decode not in ("upfront", "lazy"):
        raise ValueError(f"decode must be 'upfront' or 'lazy' (got {decode!r})")
    if resize not in ("resize", "letterbox"):
        raise ValueError(f"resize must be 'resize' or 'letterbox' (got {resize!r})")
    if source.suffix == ".npz":
        f = load_frames_npz(source)
        if f.images.shape[2] != image_size:
            raise ValueError(f"{source}: images are {f.images.shape[2]} px, the model takes {image_size}")
        check_max_len(max_len, f.max_len, source, f.episode_index, [f.prompts[k] for k in f.task_index])
        return f
    from tqdm import tqdm

    from recap_ros.dataset.reader import RecapDataset
    from recap_ros.recap.loader import DatasetImages, decode_views

    ds = RecapDataset(source)
    norm = [_normalisation(ds, ep) for ep in range(ds.num_episodes)]
    check_max_len(max_len, [m for m, _, _ in norm], source, range(ds.num_episodes), [t for _, _, t in norm])
    keys = [IMAGE_KEY.format(role=r) for r in ROLES]
    prompts: list[str] = []
    cols: dict[str, list] = {}
    for ep in tqdm(range(ds.num_episodes), desc="load", disable=not progress or decode == "lazy",
                   dynamic_ncols=True):
        e = ds.episode(ep)
        T = len(e["frame_index"])
        if T == 0:
            continue
        keep = kept_ticks(T, stride)
        n = len(keep)
        M, c_fail, _ = norm[ep]
        if e["task"] not in prompts:
            prompts.append(e["task"])
        ret, rn = np.asarray(e["return"], np.float64).reshape(-1), np.asarray(e["return_normalized"]).reshape(-1)
        part = dict(
            state=e["observation.state"][keep].astype(np.float32),
            action_chunk=chunks(e["action"].astype(np.float32), chunk_len)[keep],
            intervention=e["intervention"].reshape(-1).astype(bool)[keep],
            episode_index=np.full(n, ep, np.int64), frame_index=keep.astype(np.int64),
            task_index=np.full(n, prompts.index(e["task"]), np.int64), ret=ret[keep],
            return_normalized=rn[keep].astype(np.float64),
            return_bin=e["return_bin"].reshape(-1)[keep].astype(np.int64),
            episode_success=e["episode_success"].reshape(-1).astype(bool)[keep],
            max_len=np.full(n, M, np.int64), c_fail=np.full(n, c_fail))
        if decode == "upfront":
            part["images"] = np.stack([decode_views(ds, ep, k, keep, image_size, resize) for k in keys], 1)
        for k, v in part.items():
            cols.setdefault(k, []).append(v)
    if not cols:
        raise ValueError(f"{source}: no frames")
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    if decode == "lazy":
        cols["images"] = DatasetImages(source, keys, image_size, cols["episode_index"], cols["frame_index"], resize)
    try:
        return Frames(prompts=prompts, **cols)
    except ValueError as err:  # e.g. returns normalised by another length than meta/episodes says
        raise ValueError(f"{source}: {err}") from None


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
