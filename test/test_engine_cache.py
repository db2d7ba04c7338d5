"""TensorRT engine cache logic on CPU with a fake builder (recap_ros.policy.engine_cache): what the key covers,
the user-cache fallback for a read-only bundle, atomic writes, and the build lock."""
import json
import threading
import time

import pytest

from recap_ros.policy import engine_cache
from recap_ros.policy.bundle import open_bundle, write_manifest
from recap_ros.policy.engine_cache import EngineCache, EngineKey, cache_dir, write_atomic

H100, TRT = "NVIDIA H100 80GB HBM3", "11.4.0"


def key(bundle, graph="prefix", steps=None, trt=TRT, gpu=H100, precision="bf16"):
    return EngineKey.of(bundle, bundle.onnx_path(graph, steps), trt, gpu, precision, steps)


class FakeBuilder:
    def __init__(self, data=b"engine", delay=0.0):
        self.calls, self.data, self.delay = 0, data, delay

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        return self.data


def test_key_covers_graph_data_trt_gpu_precision_steps(tiny_copy):
    b = open_bundle(tiny_copy)
    cache = EngineCache(tiny_copy / "engine_cache")
    build = FakeBuilder()
    path = cache.get_or_build(key(b), build, log=lambda m: None)
    assert build.calls == 1 and path.read_bytes() == b"engine"
    assert cache.get_or_build(key(b), build, log=lambda m: None) == path and build.calls == 1  # hit
    for other in (key(b, trt="10.13.0"), key(b, gpu="NVIDIA H200"), key(b, precision="fp16"),
                  key(b, "cfg", 5)):
        assert cache.lookup(other) is None
    assert key(b, "cfg", 5).steps == 5 and key(b).steps is None
    # external data: a graph whose weights live in <graph>.data is keyed by that file too
    data = tiny_copy / "onnx" / "prefix.onnx.data"
    keys = []
    for weights in (b"weights v1", b"weights v2"):
        data.write_bytes(weights)
        write_manifest(tiny_copy)
        keys.append(key(open_bundle(tiny_copy)))
    k1, k2 = keys
    assert k1.data_sha256 is not None and k1.data_sha256 != k2.data_sha256 and k1.digest() != k2.digest()
    assert k1.graph_sha256 == k2.graph_sha256


def test_tampered_engine_is_rebuilt_and_old_engines_removed(tiny_copy):
    b = open_bundle(tiny_copy)
    cache = EngineCache(tiny_copy / "engine_cache")
    path = cache.get_or_build(key(b), FakeBuilder(b"v1"), log=lambda m: None)
    path.write_bytes(b"tampered")
    assert cache.lookup(key(b)) is None
    new = cache.get_or_build(key(b, trt="11.5.0"), FakeBuilder(b"v2"), log=lambda m: None)
    assert [p.name for p in cache.root.glob("prefix-bf16-*.engine")] == [new.name]  # the older one is gone
    assert json.loads(new.with_suffix(".json").read_text())["tensorrt"] == "11.5.0"


def test_read_only_bundle_uses_user_cache(tiny_copy, tmp_path, monkeypatch):
    b = open_bundle(tiny_copy)
    assert cache_dir(b) == tiny_copy / "engine_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(engine_cache, "_writable", lambda path: not str(path).startswith(str(tiny_copy)))
    assert cache_dir(b) == tmp_path / "xdg" / "recap_ros" / "engines" / b.bundle_id
    path = EngineCache(cache_dir(b)).get_or_build(key(b), FakeBuilder(), log=lambda m: None)
    assert path.parent == cache_dir(b) and not (tiny_copy / "engine_cache").exists()


def test_failed_build_leaves_nothing(tiny_copy):
    b = open_bundle(tiny_copy)
    cache = EngineCache(tiny_copy / "engine_cache")

    def broken():
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        cache.get_or_build(key(b), broken, log=lambda m: None)
    assert not list(cache.root.glob("*.engine")) and not list(cache.root.glob("*.json"))


def test_write_atomic_never_shows_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.engine"
    write_atomic(target, b"old")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(engine_cache.os, "fsync", crash)
    with pytest.raises(OSError):
        write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.engine"]


def test_concurrent_starts_build_once(tiny_copy):
    """Two policies starting together (separate caches on one folder): one builds under the lock, the other
    waits and loads the same engine."""
    b = open_bundle(tiny_copy)
    build = FakeBuilder(delay=0.3)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(EngineCache(tiny_copy / "engine_cache").get_or_build(
        key(b), build, log=lambda m: None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1 and len(paths) == 2 and paths[0] == paths[1]
