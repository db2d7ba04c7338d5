"""Read a recap_ros / LeRobot v3.0 dataset for training (numpy, pyarrow, PyAV; no torch, no ROS).

>>> ds = RecapDataset("datasets/sim", image_size=(112, 112))
>>> ds.num_frames, ds.num_episodes, ds.image_keys
>>> ep = ds.episode(0)            # every per-frame column of episode 0 as numpy arrays, plus "task"
>>> imgs = ds.images(0)          # {image key: (T, H, W, 3) uint8}, decoded in one sequential pass per video
>>> ds.column("return_bin")      # one column over the whole dataset, in global frame order

Per-frame columns (docs/ARCHITECTURE.md "Dataset"): observation.state, action, policy_action (NaN while the
policy drove), intervention, next.reward, return, return_normalized, return_bin, episode_success, and
LeRobot's timestamp, frame_index, episode_index, index, task_index.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recap_ros.dataset.layout import CODEBASE_VERSION, INFO_PATH, STATS_PATH, read_episodes, read_tasks


SEEK_GAP = 30  # frames: decode forward up to this far to the next frame asked for, else seek (a GOP is 10)


class DatasetReadError(RuntimeError):
    """The dataset is missing, not LeRobot v3.0, or inconsistent; the text names the file."""


class RecapDataset:
    def __init__(self, root: str | Path, image_size: tuple[int, int] | None = None, cache_episodes: int = 2,
                 keep_open: bool = False):
        """image_size: (height, width) to downscale frames to while decoding (None: stored size); keep_open: keep
        each video open between calls (random access to frames, :meth:`close` ends it)."""
        self.root = Path(root)
        info_path = self.root / INFO_PATH
        try:
            self.info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetReadError(f"{info_path}: cannot read dataset info: {e}") from None
        if self.info.get("codebase_version") != CODEBASE_VERSION:
            raise DatasetReadError(f"{info_path}: codebase_version {self.info.get('codebase_version')!r}, "
                                   f"expected {CODEBASE_VERSION}")
        self.fps = int(self.info["fps"])
        self.features: dict = self.info["features"]
        self.image_keys = [k for k, ft in self.features.items() if ft["dtype"] == "video"]
        self.image_size = tuple(image_size) if image_size is not None else None
        self.tasks = read_tasks(self.root)
        self.episodes = read_episodes(self.root)
        stats_path = self.root / STATS_PATH
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        files = sorted((self.root / "data").glob("chunk-*/file-*.parquet"))
        if self.episodes is None or not files:
            raise DatasetReadError(f"{self.root}: no episodes / data files")
        table = pa.concat_tables([pq.read_table(f) for f in files])
        order = np.argsort(table.column("index").to_numpy())
        table = table.take(order)
        self._columns: dict[str, np.ndarray] = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                width = col.type.list_size
                self._columns[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            else:
                self._columns[name] = col.to_numpy(zero_copy_only=False)
        ep_cols = {c: self.episodes.column(c).to_numpy() for c in ("episode_index", "dataset_from_index",
                                                                   "dataset_to_index", "length")}
        self._ranges = {int(e): (int(a), int(b)) for e, a, b in zip(ep_cols["episode_index"],
                                                                  ep_cols["dataset_from_index"],
                                                                  ep_cols["dataset_to_index"])}
        if len(self._columns["index"]) != int(self.info["total_frames"]):
            raise DatasetReadError(f"{self.root}: {len(self._columns['index'])} frames in data/, info.json says "
                                   f"{self.info['total_frames']}")
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._meta: dict[int, dict] = {}
        self._keep_open, self._open_videos = bool(keep_open), {}
        self._cache_size = max(0, int(cache_episodes))

    # ------------------------------------------------------------------------------------ tabular
    @property
    def num_frames(self) -> int:
        return len(self._columns["index"])

    @property
    def num_episodes(self) -> int:
        return len(self._ranges)

    def __len__(self) -> int:
        return self.num_frames

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def column(self, name: str) -> np.ndarray:
        """A per-frame column over the whole dataset in global index order (vectors as (N, D))."""
        try:
            return self._columns[name]
        except KeyError:
            raise KeyError(f"no column {name!r}; the dataset has {sorted(self._columns)}") from None

    def episode_range(self, ep: int) -> tuple[int, int]:
        try:
            return self._ranges[int(ep)]
        except KeyError:
            raise IndexError(f"episode {ep} not in the dataset (0..{self.num_episodes - 1})") from None

    def episode_meta(self, ep: int) -> dict:
        """The episode's row of meta/episodes (lengths, file locations, recap/* facts; no stats)."""
        if int(ep) not in self._meta:
            cols = [c for c in self.episodes.column_names if not c.startswith("stats/")]
            idx = int(np.flatnonzero(self.episodes.column("episode_index").to_numpy() == int(ep))[0])
            self._meta[int(ep)] = {c: self.episodes.column(c)[idx].as_py() for c in cols}
        return dict(self._meta[int(ep)])

    def episode(self, ep: int) -> dict[str, np.ndarray]:
        lo, hi = self.episode_range(ep)
        out = {k: v[lo:hi] for k, v in self._columns.items()}
        out["task"] = self.tasks[int(out["task_index"][0])] if hi > lo else ""
        return out

    # ------------------------------------------------------------------------------------ images
    def _decode(self, ep: int, key: str) -> np.ndarray:
        lo, hi = self.episode_range(ep)
        return self.frames(ep, key, np.arange(hi - lo))

    def frames(self, ep: int, key: str, ticks) -> np.ndarray:
        """(len(ticks), H, W, 3) uint8 RGB: frames ``ticks`` (0-based in the episode, any order, repeats allowed)
        of one episode's video (not cached). Decoding runs forward from the keyframe before a frame; a frame more
        than :data:`SEEK_GAP` past the last decoded one is reached by a new seek instead."""
        meta = self.episode_meta(ep)
        lo, hi = self.episode_range(ep)
        n = hi - lo
        ticks = np.asarray(ticks, np.int64).reshape(-1)
        h, w = self.image_size or tuple(self.features[key]["shape"][:2])
        if not len(ticks):
            return np.empty((0, h, w, 3), dtype=np.uint8)
        if ticks.min() < 0 or ticks.max() >= n:
            raise IndexError(f"episode {ep} has frames 0..{n - 1}, asked for {ticks.min()}..{ticks.max()}")
        path = self.root / self.info["video_path"].format(video_key=key,
                                                           chunk_index=meta[f"videos/{key}/chunk_index"],
                                                           file_index=meta[f"videos/{key}/file_index"])
        first = int(round(meta[f"videos/{key}/from_timestamp"] * self.fps))
        c = self._open(path)
        try:
            stream = c.streams.video[0]
            uniq, inverse = np.unique(ticks, return_inverse=True)
            out = np.empty((len(uniq), h, w, 3), dtype=np.uint8)
            decoded, at = None, None
            for j, t in enumerate(uniq.tolist()):
                if decoded is None or not at < t <= at + SEEK_GAP:
                    c.seek(int((first + t) / self.fps / stream.time_base), stream=stream, backward=True,
                           any_frame=False)
                    decoded = c.decode(stream)
                for frame in decoded:
                    at = int(round(frame.time * self.fps)) - first
                    if at >= t:
                        break
                if at != t:
                    raise DatasetReadError(f"{path}: episode {ep} needs frame {first + t} of {first}.."
                                           f"{first + n - 1}, the video does not hold it")
                out[j] = frame.to_ndarray(format="rgb24", width=w, height=h)
        finally:
            if not self._keep_open:
                c.close()
        return out if np.array_equal(uniq, ticks) else out[inverse]

    def _open(self, path: Path):
        """The video's container: opened for this call (frame-threaded decoding, for long runs), or kept open
        across calls (``keep_open``: random access, no decoder threads)."""
        if not self._keep_open:
            c = av.open(str(path))
            c.streams.video[0].thread_type = "AUTO"
            return c
        if path not in self._open_videos:
            self._open_videos[path] = av.open(str(path))
        return self._open_videos[path]

    def close(self) -> None:
        """Close the videos kept open (``keep_open``)."""
        for c in self._open_videos.values():
            c.close()
        self._open_videos.clear()

    def images(self, ep: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """{image key: (T, H, W, 3) uint8 RGB} for one episode (cached for the last few episodes)."""
        keys = list(keys or self.image_keys)
        cached = self._cache.get(int(ep), {})
        todo = [k for k in keys if k not in cached]
        for k in todo:
            cached[k] = self._decode(int(ep), k)
        if self._cache_size:
            self._cache[int(ep)] = cached
            self._cache.move_to_end(int(ep))
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return {k: cached[k] for k in keys}

    def __getitem__(self, index: int) -> dict:
        """One frame: every column's value and its images (decodes the frame's episode, then cached)."""
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} out of range (0..{self.num_frames - 1})")
        item = {k: v[index] for k, v in self._columns.items()}
        ep = int(item["episode_index"])
        lo, _ = self.episode_range(ep)
        imgs = self.images(ep)
        item.update({k: v[index - lo] for k, v in imgs.items()})
        item["task"] = self.tasks[int(item["task_index"])]
        return item
