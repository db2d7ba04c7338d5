"""Write a LeRobot v3.0 dataset with pyarrow (parquet) and PyAV (mp4), appending to an existing one.

The layout (as lerobot.datasets writes it, codebase_version "v3.0") is in :mod:`recap_ros.dataset.layout`.

Like lerobot's own writer resuming a dataset, every export run starts new data / video / episodes files after
the last ones, and rolls over to a further file when one exceeds its size limit. New files are written into a
staging folder and moved into place on :meth:`LeRobotWriter.close`; ``meta/info.json`` is written last, so an
interrupted run leaves the dataset as it was (its staging folder is removed by the next run).
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recap_ros.dataset.layout import (CHUNKS_SIZE, CODEBASE_VERSION, DATA_PATH, DEFAULT_FEATURES, EPISODES_DIR,
                                      EPISODES_PATH, INFO_PATH, STATS_PATH, TASKS_PATH, VIDEO_PATH, read_episodes,
                                      read_tasks)

DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
_STAGING = ".recap-export-staging"
_ARROW = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}


class DatasetError(RuntimeError):
    """The output dataset cannot be written or appended to; the text names the file and the mismatch."""


@dataclass(frozen=True)
class VideoOptions:
    codec: str = "libx264"   # or libsvtav1 (lerobot's default, slower here), hevc, mpeg4
    crf: int = 23
    gop: int = 10            # keyframe interval: random access costs at most gop - 1 extra decoded frames
    preset: str = "ultrafast"  # 1.5x faster export than veryfast here, files ~2x larger (--preset to trade)
    pix_fmt: str = "yuv420p"

    def stream_options(self) -> dict[str, str]:
        opts = {"g": str(self.gop), "crf": str(self.crf)}
        if self.codec in ("libx264", "libx265"):
            opts["preset"] = self.preset
        return opts


@dataclass
class EpisodeData:
    """One episode to append: per-frame columns for every non-video, non-default feature, and per video key a
    callable returning an iterator of HxWx3 uint8 RGB frames (decoded lazily, one frame at a time)."""
    task: str
    columns: dict[str, np.ndarray]
    videos: dict[str, Callable[[], Iterable[np.ndarray]]]
    extra: dict[str, object] = field(default_factory=dict)  # extra episodes-table columns (recap/...)

    @property
    def length(self) -> int:
        return len(next(iter(self.columns.values())))


# ------------------------------------------------------------------------------------------ small helpers
def next_file(chunk: int, file: int, chunks_size: int = CHUNKS_SIZE) -> tuple[int, int]:
    """The file after (chunk, file) (lerobot's update_chunk_file_indices)."""
    return (chunk + 1, 0) if file + 1 >= chunks_size else (chunk, file + 1)


def vector_feature(dtype: str, names: list[str] | None, size: int | None = None) -> dict:
    n = len(names) if names is not None else size
    return {"dtype": dtype, "shape": [int(n)], "names": list(names) if names is not None else None}


def video_feature(height: int, width: int) -> dict:
    return {"dtype": "video", "shape": [int(height), int(width), 3], "names": ["height", "width", "channels"],
            "info": None}


def arrow_type(ft: dict) -> pa.DataType:
    base = _ARROW[ft["dtype"]]
    return base if list(ft["shape"]) == [1] else pa.list_(base, int(ft["shape"][0]))


def data_schema(features: dict) -> pa.Schema:
    return pa.schema([(k, arrow_type(ft)) for k, ft in features.items() if ft["dtype"] != "video"])


def feature_stats(x: np.ndarray, axis) -> dict[str, np.ndarray]:
    """min/max/mean/std/count and quantiles, as lerobot's get_feature_stats (float64)."""
    x = np.asarray(x, dtype=np.float64)
    out = {"min": np.min(x, axis=axis), "max": np.max(x, axis=axis), "mean": np.mean(x, axis=axis),
           "std": np.std(x, axis=axis), "count": np.array([x.shape[0]])}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(x, q, axis=axis)
    return out


def aggregate_stats(stats_list: list[dict]) -> dict:
    """Merge per-episode stats (lerobot's aggregate_feature_stats: count-weighted mean, parallel variance, min
    of mins, max of maxes, quantile envelope: min for q <= 50, max above)."""
    out = {}
    for key in sorted({k for s in stats_list for k in s}):
        items = [s[key] for s in stats_list if key in s and int(np.asarray(s[key]["count"]).sum()) > 0]
        if not items:
            items = [s[key] for s in stats_list if key in s][:1]
        means = np.stack([np.asarray(s["mean"], np.float64) for s in items])
        var = np.stack([np.asarray(s["std"], np.float64) ** 2 for s in items])
        counts = np.array([float(np.asarray(s["count"]).sum()) for s in items])
        total = max(counts.sum(), 1.0)
        w = counts.reshape((-1,) + (1,) * (means.ndim - 1))
        mean = (means * w).sum(axis=0) / total
        variance = ((var + (means - mean) ** 2) * w).sum(axis=0) / total
        agg = {"min": np.min(np.stack([np.asarray(s["min"], np.float64) for s in items]), axis=0),
               "max": np.max(np.stack([np.asarray(s["max"], np.float64) for s in items]), axis=0),
               "mean": mean, "std": np.sqrt(variance), "count": np.array([int(counts.sum())])}
        for q in QUANTILES:
            qk = f"q{int(round(q * 100)):02d}"
            if all(qk in s for s in items):
                qs = np.stack([np.asarray(s[qk], np.float64) for s in items])
                agg[qk] = qs.min(axis=0) if q <= 0.5 else qs.max(axis=0)
        out[key] = agg
    return out


def _jsonable(stats: dict) -> dict:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=4))
    os.replace(tmp, path)


def tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as pandas writes DataFrame({'task_index': ...}, index=Index(tasks, name='task')):
    the pandas metadata makes ``pd.read_parquet`` restore the task strings as the index."""
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                     "numpy_type": "int64", "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def video_info(path: Path) -> dict:
    """The ``info`` of a video feature, probed from the file as lerobot's get_video_info does."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {"video.height": s.height, "video.width": s.width, "video.codec": s.codec.canonical_name,
                "video.pix_fmt": s.pix_fmt, "video.is_depth_map": False, "video.fps": int(s.base_rate),
                "video.channels": 3, "has_audio": False}


# ------------------------------------------------------------------------------------------ the writer
class _VideoFile:
    """One open mp4 receiving episodes back to back (pts in frames, time base 1/fps)."""

    def __init__(self, path: Path, fps: int, width: int, height: int, opts: VideoOptions):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(opts.codec, rate=fps, options=opts.stream_options())
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, opts.pix_fmt
        self.frames = 0

    def add(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames  # codec time base is 1 / fps
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6 if self.path.exists() else 0.0


class LeRobotWriter:
    """Append episodes to a LeRobot v3.0 dataset at ``root`` (created if missing).

    ``features`` are the dataset's features except lerobot's defaults (timestamp, frame_index, episode_index,
    index, task_index), which are added. Appending checks fps and features against the existing info.json."""

    def __init__(self, root: str | os.PathLike, fps: int, features: dict, robot_type: str | None = None,
                 video: VideoOptions = VideoOptions(), data_file_mb: float = DATA_FILE_MB,
                 video_file_mb: float = VIDEO_FILE_MB, image_stats_every: int = 10):
        self.root = Path(root)
        self.fps = int(fps)
        self.features = {**features, **DEFAULT_FEATURES}
        self.video_keys = [k for k, ft in features.items() if ft["dtype"] == "video"]
        self.video = video
        self.data_file_mb, self.video_file_mb = float(data_file_mb), float(video_file_mb)
        self.image_stats_every = max(1, int(image_stats_every))
        self.staging = self.root / _STAGING
        self.notes: list[str] = []
        if self.staging.exists():
            shutil.rmtree(self.staging)
            self.notes.append(f"removed {self.staging} left by an interrupted export")
        self._load_existing(robot_type)
        self._schema = data_schema(self.features)
        self._data_writer: pq.ParquetWriter | None = None
        self._data_frames_in_file = 0
        self._videos: dict[str, _VideoFile] = {}
        self._rows: list[dict] = []
        self._new_stats: list[dict] = []
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.video_keys)), thread_name_prefix="encode")
        self._closed = False

    # ---------------------------------------------------------------------------------- existing dataset
    def _load_existing(self, robot_type: str | None) -> None:
        info_path = self.root / INFO_PATH
        self.tasks = read_tasks(self.root)
        eps = read_episodes(self.root)
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DatasetError(f"{info_path}: cannot read dataset info: {e}") from None
            if info.get("codebase_version") != CODEBASE_VERSION:
                raise DatasetError(f"{info_path}: codebase_version {info.get('codebase_version')!r}, this writer "
                                   f"appends only to {CODEBASE_VERSION}")
            if int(info.get("fps", -1)) != self.fps:
                raise DatasetError(f"{info_path}: dataset fps {info.get('fps')} != control rate {self.fps}")
            old = {k: {x: v.get(x) for x in ("dtype", "shape", "names")} for k, v in info["features"].items()}
            new = {k: {x: v.get(x) for x in ("dtype", "shape", "names")} for k, v in self.features.items()}
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise DatasetError(f"{info_path}: features differ from this export's for {diff} "
                                   "(different station or cameras?); export into a new dataset")
            for k in self.video_keys:  # keep the probed video info
                self.features[k] = dict(self.features[k], info=info["features"][k].get("info"))
            self.info = info
        else:
            if eps is not None:
                raise DatasetError(f"{self.root}: has {EPISODES_DIR} but no {INFO_PATH}; not a LeRobot dataset")
            self.info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": 0,
                         "total_frames": 0, "total_tasks": 0, "chunks_size": CHUNKS_SIZE,
                         "data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB,
                         "fps": self.fps, "splits": {}, "data_path": DATA_PATH,
                         "video_path": VIDEO_PATH if self.video_keys else None, "features": self.features}
        stats_path = self.root / STATS_PATH
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        self.episodes = eps
        self.next_episode = int(self.info["total_episodes"])
        self.next_index = int(self.info["total_frames"])
        cs = int(self.info["chunks_size"])

        def after(prefix: str) -> tuple[int, int]:
            if eps is None or eps.num_rows == 0:
                return 0, 0
            return next_file(int(eps.column(f"{prefix}chunk_index")[-1].as_py()),
                             int(eps.column(f"{prefix}file_index")[-1].as_py()), cs)

        self._data_file = after("data/")
        self._meta_file = after("meta/episodes/")
        self._video_file = {k: after(f"videos/{k}/") for k in self.video_keys}
        self._video_time = {k: 0.0 for k in self.video_keys}

    def exported(self, column: str) -> set:
        """Values of an extra episodes column over the existing dataset (e.g. the source bags)."""
        if self.episodes is None or column not in self.episodes.column_names:
            return set()
        return set(self.episodes.column(column).to_pylist())

    # ---------------------------------------------------------------------------------- writing
    def _staged(self, rel: str) -> Path:
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _data_path(self) -> str:
        c, f = self._data_file
        return DATA_PATH.format(chunk_index=c, file_index=f)

    def _video_path(self, key: str) -> str:
        c, f = self._video_file[key]
        return VIDEO_PATH.format(video_key=key, chunk_index=c, file_index=f)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            self.tasks.append(task)
        return self.tasks.index(task)

    def add_episode(self, ep: EpisodeData) -> int:
        """Write one episode; returns its episode_index."""
        if self._closed:
            raise DatasetError("writer is closed")
        n = ep.length
        if n <= 0:
            raise DatasetError("an episode needs at least one frame")
        want = [k for k, ft in self.features.items() if ft["dtype"] != "video" and k not in DEFAULT_FEATURES]
        missing = [k for k in want if k not in ep.columns]
        if missing or set(ep.videos) != set(self.video_keys):
            raise DatasetError(f"episode lacks columns {missing} or videos {sorted(set(self.video_keys) - set(ep.videos))}")
        idx = self.next_episode
        cols = dict(ep.columns)
        cols["frame_index"] = np.arange(n, dtype=np.int64)
        cols["timestamp"] = (np.arange(n) / self.fps).astype(np.float32)
        cols["episode_index"] = np.full(n, idx, dtype=np.int64)
        cols["index"] = np.arange(self.next_index, self.next_index + n, dtype=np.int64)
        cols["task_index"] = np.full(n, self.task_index(ep.task), dtype=np.int64)

        stats, arrays = {}, []
        for key, ft in self.features.items():
            if ft["dtype"] == "video":
                continue
            v = np.asarray(cols[key])
            if len(v) != n:
                raise DatasetError(f"column {key} has {len(v)} rows, the episode has {n} frames")
            shape = list(ft["shape"])
            if shape == [1]:
                v = v.reshape(n)
                arrays.append(pa.array(v.astype(ft["dtype"]), type=arrow_type(ft)))
                stats[key] = feature_stats(v.reshape(n, 1), axis=0)
            else:
                if v.shape != (n, shape[0]):
                    raise DatasetError(f"column {key} has shape {v.shape}, expected ({n}, {shape[0]})")
                flat = pa.array(v.astype(ft["dtype"]).reshape(-1), type=_ARROW[ft["dtype"]])
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, shape[0]))
                finite = v[np.all(np.isfinite(v), axis=1)] if v.dtype.kind == "f" else v
                stats[key] = feature_stats(finite if len(finite) else np.zeros((1, shape[0])), axis=0)
                if len(finite) == 0:
                    stats[key]["count"] = np.array([0])
        table = pa.Table.from_arrays(arrays, schema=self._schema)

        row = {"episode_index": idx, "tasks": [ep.task], "length": n}
        # Videos first: if a frame source fails midway, the frames already encoded are never referenced
        # (the next episode's from_timestamp counts them) and no data row was written.
        # One thread per camera: JPEG decoding (OpenCV) and encoding (PyAV/FFmpeg) release the GIL.
        futures = [self._pool.submit(self._write_video, key, ep.videos[key](), n) for key in self.video_keys]
        wait(futures)  # all cameras finish (or fail) before anything else touches their files
        for key, fut in zip(self.video_keys, futures):
            meta, stats[key] = fut.result()
            row.update(meta)
        row.update(self._write_data(table, n))
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = self._meta_file
        for key, st in stats.items():
            for s, v in st.items():
                row[f"stats/{key}/{s}"] = np.asarray(v).tolist()
        row.update(ep.extra)
        self._rows.append(row)
        self._new_stats.append(stats)
        self.next_episode += 1
        self.next_index += n
        return idx

    def _write_data(self, table: pa.Table, n: int) -> dict:
        if self._data_writer is not None and self._data_frames_in_file and \
                self._staged(self._data_path()).stat().st_size / 1e6 >= self.data_file_mb:
            self._data_writer.close()
            self._data_writer = None
            self._data_file = next_file(*self._data_file, int(self.info["chunks_size"]))
        if self._data_writer is None:
            self._data_writer = pq.ParquetWriter(self._staged(self._data_path()), self._schema,
                                                 compression="snappy", use_dictionary=True)
            self._data_frames_in_file = 0
        start = self.next_index
        self._data_writer.write_table(table)
        self._data_frames_in_file += n
        c, f = self._data_file
        return {"data/chunk_index": c, "data/file_index": f, "dataset_from_index": start,
                "dataset_to_index": start + n}

    def _write_video(self, key: str, frames: Iterable[np.ndarray], n: int) -> tuple[dict, dict]:
        h, w = self.features[key]["shape"][:2]
        vf = self._videos.get(key)
        if vf is not None and vf.frames and vf.size_mb() >= self.video_file_mb:
            vf.close()
            vf = None
            self._video_file[key] = next_file(*self._video_file[key], int(self.info["chunks_size"]))
        if vf is None:
            vf = self._videos[key] = _VideoFile(self._staged(self._video_path(key)), self.fps, w, h, self.video)
        from_ts = vf.frames / self.fps
        sample = []
        count = 0
        for i, rgb in enumerate(frames):
            if rgb.shape != (h, w, 3) or rgb.dtype != np.uint8:
                raise DatasetError(f"{key}: frame {i} is {rgb.dtype} {rgb.shape}, expected uint8 ({h}, {w}, 3)")
            vf.add(rgb)
            if i % self.image_stats_every == 0:
                sample.append(rgb[::4, ::4])  # stats on a subsample, as lerobot's sample_images
            count += 1
        if count != n:
            raise DatasetError(f"{key}: {count} video frames for an episode of {n} frames")
        px = np.stack(sample).reshape(-1, 3).astype(np.float64) / 255.0
        st = feature_stats(px, axis=0)
        stats = {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in st.items()}
        stats["count"] = np.array([len(sample)])
        c, f = self._video_file[key]
        return {f"videos/{key}/chunk_index": c, f"videos/{key}/file_index": f,
                f"videos/{key}/from_timestamp": from_ts, f"videos/{key}/to_timestamp": from_ts + n / self.fps}, stats

    # ---------------------------------------------------------------------------------- commit
    def close(self) -> None:
        """Finish the files, move them into the dataset and write meta/ (info.json last)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown()
        if self._data_writer is not None:
            self._data_writer.close()
        for vf in self._videos.values():
            vf.close()
        if not self._rows:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        c, f = self._meta_file
        episodes = pa.Table.from_pylist(self._rows)
        pq.write_table(episodes, self._staged(EPISODES_PATH.format(chunk_index=c, file_index=f)),
                       compression="snappy")
        for src in sorted(p for p in self.staging.rglob("*") if p.is_file()):
            dst = self.root / src.relative_to(self.staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        shutil.rmtree(self.staging, ignore_errors=True)
        for key in self.video_keys:
            if not self.features[key].get("info"):
                self.features[key]["info"] = video_info(self.root / VIDEO_PATH.format(
                    video_key=key, chunk_index=0, file_index=0))
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        pq.write_table(tasks_table(self.tasks), self.root / TASKS_PATH)
        new = aggregate_stats(self._new_stats)
        if self.stats:
            old = {k: {s: np.asarray(v) for s, v in d.items()} for k, d in self.stats.items()}
            new = aggregate_stats([old, new])
        _write_json(self.root / STATS_PATH, _jsonable(new))
        self.info.update(total_episodes=self.next_episode, total_frames=self.next_index,
                         total_tasks=len(self.tasks), splits={"train": f"0:{self.next_episode}"},
                         features=self.features)
        _write_json(self.root / INFO_PATH, self.info)

    def abort(self) -> None:
        """Drop everything written in this run (the dataset stays as it was)."""
        self._closed = True
        self._pool.shutdown()
        if self._data_writer is not None:
            self._data_writer.close()
        for vf in self._videos.values():
            try:
                vf.close()
            except Exception:  # a half-written video is discarded anyway
                pass
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "LeRobotWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
