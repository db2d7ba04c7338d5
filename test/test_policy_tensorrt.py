"""TensorRT backend: engines built from the bundle's ONNX, cached by ONNX hash + GPU + TensorRT version, never stale.
Runs only where the tensorrt package and a CUDA GPU exist (marked ``gpu``)."""
import json

import numpy as np
import pytest

from recap_ros.policy import load_policy
from recap_ros.policy.backends import tensorrt_available
from recap_ros.policy.bundle import open_bundle

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not tensorrt_available(), reason="needs the tensorrt package and a CUDA GPU")]

PROMPT = "touch the red marker with the left gripper"


def views():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 5e-2), ("bf16", 1e-1)])
def test_tensorrt_matches_torch(tiny_copy, precision, atol):
    trt = load_policy(tiny_copy, backend="tensorrt", precision=precision)
    ref = load_policy(tiny_copy, backend="torch")
    assert trt.info.backend == "tensorrt" and trt.info.device.startswith("cuda")
    for beta in (1.0, 2.0):
        feeds = ref.prepare_inputs(views(), np.zeros(14), PROMPT, seed=3, beta=None if beta == 1.0 else beta)
        guided = None if beta == 1.0 else beta
        np.testing.assert_allclose(trt.backend.run(feeds, 5, guided), ref.backend.run(feeds, 5, guided), atol=atol)


def test_engine_cache_reused_and_rebuilt_on_mismatch(tiny_copy):
    from recap_ros.policy.backends import TensorRTBackend

    builds = []
    bundle = open_bundle(tiny_copy)
    TensorRTBackend(bundle, precision="fp16", log=builds.append)
    assert len(builds) == 3  # prefix, denoise cond, denoise cfg
    engines = sorted((tiny_copy / "engine_cache").glob("*.engine"))
    assert len(engines) == 3
    builds.clear()
    TensorRTBackend(bundle, precision="fp16", log=builds.append)
    assert builds == []  # cache hit
    meta = engines[0].with_suffix(".json")  # pretend the engine was built by another TensorRT version
    m = json.loads(meta.read_text())
    m["tensorrt"] = "0.0.0"
    meta.write_text(json.dumps(m))
    TensorRTBackend(bundle, precision="fp16", log=builds.append)
    assert len(builds) == 1


def test_auto_picks_tensorrt(tiny_copy):
    assert load_policy(tiny_copy, backend="auto").info.backend == "tensorrt"
