"""TensorRT engine cache (GPU-free logic; the builder is passed in).

Key (:class:`EngineKey`): the graph's sha256 and its external data's sha256 (from the bundle manifest), the
TensorRT version, the GPU, the precision, the precision converter's version and the denoise step count. An
engine is loaded only for an equal key whose engine bytes still hash to what was stored.

Where: ``<bundle>/engine_cache/`` when the bundle folder is writable, else the user cache
``$XDG_CACHE_HOME/recap_ros/engines/<bundle_id>/`` (``~/.cache`` when unset) — a bundle installed read-only
(``share/recap_ros/models``) still gets engines. Writes are atomic (temporary file + ``os.replace``) and happen
under a per-graph file lock (``filelock``): two processes starting together build an engine once, and a
reader never sees half an engine. The TensorRT timing cache lives next to the engines, one per GPU + version.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from recap_ros.policy.bundle import Bundle, sha256_file
from recap_ros.policy.errors import PolicyError

CONVERTER_VERSION = 1  # bump when recap_ros.policy.precision changes what it writes: engines are rebuilt
LOCK_TIMEOUT_S = 3600.0  # a pi06 engine build takes minutes; a lock held longer than this is a hung builder


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")


@dataclass(frozen=True)
class EngineKey:
    graph: str  # path inside the bundle, e.g. onnx/denoise_s5_cfg.onnx
    graph_sha256: str
    data_sha256: str | None  # <graph>.data (ONNX external data), None when the weights are inside the graph
    tensorrt: str
    gpu: str
    precision: str
    steps: int | None  # denoise step count, None for the prefix graph
    converter: int = CONVERTER_VERSION

    @classmethod
    def of(cls, bundle: Bundle, onnx_path: Path, tensorrt: str, gpu: str, precision: str,
           steps: int | None) -> "EngineKey":
        rel = onnx_path.relative_to(bundle.dir).as_posix()
        files = bundle.manifest["files"]
        if rel not in files:
            raise PolicyError(f"{bundle.dir}: {rel} is not in the bundle manifest (re-export the bundle)")
        data = files.get(rel + ".data")
        return cls(rel, files[rel]["sha256"], data["sha256"] if data else None, tensorrt, gpu, precision, steps)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def stem(self) -> str:
        return Path(self.graph).stem


def _writable(path: Path) -> bool:
    """Whether path (or its nearest existing parent) can be written to by this process."""
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def user_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recap_ros" / "engines"


def cache_dir(bundle: Bundle) -> Path:
    """``<bundle>/engine_cache`` if writable, else the user cache folder for this bundle."""
    local = bundle.dir / "engine_cache"
    return local if _writable(local) else user_cache_root() / bundle.bundle_id


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over path (readers see old or new)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _prepare(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PolicyError(f"engine cache {self.root}: cannot create it ({e}); set XDG_CACHE_HOME to a "
                              "writable folder") from None

    def path(self, key: EngineKey) -> Path:
        return self.root / f"{key.stem}-{key.precision}-{_slug(key.gpu)}-trt{_slug(key.tensorrt)}-{key.digest()}.engine"

    def lock(self, key: EngineKey) -> FileLock:
        return FileLock(str(self.root / f".{key.stem}-{key.precision}.lock"), timeout=LOCK_TIMEOUT_S)

    def lookup(self, key: EngineKey) -> Path | None:
        path = self.path(key)
        meta = path.with_suffix(".json")
        if path.is_file() and meta.is_file():
            try:
                if json.loads(meta.read_text()) == {**asdict(key), "engine_sha256": sha256_file(path)}:
                    return path
            except ValueError:
                pass
        return None

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes], log=print) -> Path:
        """The cached engine for key, built with ``build()`` (under the lock, after a re-check) when missing.
        Older engines of the same graph and precision are removed once the new one is in place."""
        hit = self.lookup(key)
        if hit is not None:
            return hit
        self._prepare()
        with self.lock(key):
            hit = self.lookup(key)  # another process may have built it while this one waited for the lock
            if hit is not None:
                return hit
            log(f"building TensorRT {key.precision} engine for {key.graph} on {key.gpu} (TensorRT {key.tensorrt})"
                f" into {self.root}; this takes a while")
            engine = build()
            path = self.path(key)
            write_atomic(path, engine)
            write_atomic(path.with_suffix(".json"),
                         json.dumps({**asdict(key), "engine_sha256": sha256_file(path)}).encode())
            for old in self.root.glob(f"{key.stem}-{key.precision}-*.engine"):
                if old != path:
                    old.unlink(missing_ok=True)
                    old.with_suffix(".json").unlink(missing_ok=True)
            return path

    def timing_cache_path(self, gpu: str, tensorrt: str) -> Path:
        return self.root / f"timing-{_slug(gpu)}-trt{_slug(tensorrt)}.cache"

    def save_timing_cache(self, path: Path, data: bytes) -> None:
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            write_atomic(path, data)
