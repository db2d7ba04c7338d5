"""The LeRobot v3.0 layout recap_ros writes and reads: format version, file path templates, default features,
and the two metadata tables both sides need (tasks, episodes).

    meta/info.json                                   fps, features, counts, path templates, splits
    meta/stats.json                                  per feature min/max/mean/std/count/q01..q99
    meta/tasks.parquet                               task (pandas index) -> task_index
    meta/episodes/chunk-CCC/file-FFF.parquet         one row per episode: length, tasks, data/video file and
                                                     frame/timestamp ranges, stats/<feature>/<stat>, recap/*
    data/chunk-CCC/file-FFF.parquet                  one row per frame (every non-video feature)
    videos/<image key>/chunk-CCC/file-FFF.mp4        each episode's frames back to back, pts = frame / fps
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
INFO_PATH, STATS_PATH, TASKS_PATH = "meta/info.json", "meta/stats.json", "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE + ".parquet"
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


def read_tasks(root: Path) -> list[str]:
    path = root / TASKS_PATH
    if not path.is_file():
        return []
    t = pq.read_table(path)
    order = np.argsort(t.column("task_index").to_numpy())
    return [t.column("task").to_pylist()[i] for i in order]


def read_episodes(root: Path, columns: list[str] | None = None) -> pa.Table | None:
    """Every meta/episodes file concatenated in episode order (None for a new dataset)."""
    files = sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    if not files:
        return None
    tables = [pq.read_table(f, columns=columns) for f in files]
    t = pa.concat_tables(tables, promote_options="default")
    return t.take(np.argsort(t.column("episode_index").to_numpy()))
