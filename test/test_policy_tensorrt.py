"""GPU backends against torch on the tiny bundle: strongly typed TensorRT engines (fp32 / fp16 / bf16 graphs), the
KV cache in the compute precision on the device, pinned inputs, the engine cache, no build during inference, and
ONNX Runtime's CUDA / TensorRT execution providers. Runs only where a CUDA GPU (and the package) exists (``gpu``)."""
import json

import numpy as np
import pytest

from recap_ros.policy import load_policy
from recap_ros.policy.backends import gpu_available, tensorrt_available
from recap_ros.policy.bundle import open_bundle
from recap_ros.policy.errors import PolicyError

pytestmark = pytest.mark.gpu
needs_trt = pytest.mark.skipif(not tensorrt_available(), reason="needs the tensorrt package and a CUDA GPU")

PROMPT = "touch the red marker with the left gripper"


def views():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]


def compare(pol, ref, atol):
    for beta in (1.0, 2.0):
        guided = None if beta == 1.0 else beta
        feeds = ref.prepare_inputs(views(), np.zeros(14), PROMPT, seed=3, beta=guided)
        np.testing.assert_allclose(pol.backend.run(feeds, 5, guided), ref.backend.run(feeds, 5, guided), atol=atol)


@needs_trt
@pytest.mark.parametrize("precision, atol, kv", [("fp32", 1e-3, "float32"), ("fp16", 5e-2, "float16"),
                                                 ("bf16", 1e-1, "bfloat16")])
def test_tensorrt_matches_torch(tiny_copy, precision, atol, kv):
    trt = load_policy(tiny_copy, backend="tensorrt", precision=precision)
    ref = load_policy(tiny_copy, backend="torch")
    assert trt.info.backend == "tensorrt" and trt.info.device.startswith("cuda")
    compare(trt, ref, atol)
    b = trt.backend
    _, _, prefix_out = b.engines[b.bundle.onnx_path("prefix")]
    assert str(prefix_out["keys"].dtype) == f"torch.{kv}" and prefix_out["keys"].is_cuda  # KV on the device
    assert all(t.is_pinned() for t in b.pinned.values())


@needs_trt
def test_engine_cache_reused_and_rebuilt_on_mismatch(tiny_copy):
    from recap_ros.policy.backends import TensorRTBackend

    builds = []
    bundle = open_bundle(tiny_copy)
    TensorRTBackend(bundle, precision="fp16", log=builds.append)
    assert len(builds) == 3  # prefix, denoise cond, denoise cfg
    engines = sorted((tiny_copy / "engine_cache").glob("*.engine"))
    assert len(engines) == 3 and list((tiny_copy / "engine_cache").glob("timing-*.cache"))
    builds.clear()
    TensorRTBackend(bundle, precision="fp16", log=builds.append)
    assert builds == []  # cache hit
    meta = engines[0].with_suffix(".json")  # pretend the engine was built by another TensorRT version
    m = json.loads(meta.read_text())
    m["tensorrt"] = "0.0.0"
    meta.write_text(json.dumps(m))
    TensorRTBackend(bundle, precision="fp16", log=builds.append)
    assert len(builds) == 1


@needs_trt
def test_no_engine_build_during_inference(tiny_copy):
    pol = load_policy(tiny_copy, backend="tensorrt", precision="fp16")
    with pytest.raises(PolicyError, match="recap-build-engine .* --steps 3"):
        pol.backend.run(pol.prepare_inputs(views(), np.zeros(14), PROMPT, seed=0, beta=None), 3, None)


@needs_trt
def test_auto_picks_tensorrt(tiny_copy):
    assert load_policy(tiny_copy, backend="auto").info.backend == "tensorrt"


@pytest.mark.parametrize("backend, provider", [("onnxruntime-cuda", "CUDAExecutionProvider"),
                                               ("onnxruntime-trt", "TensorrtExecutionProvider")])
def test_onnxruntime_gpu_matches_torch(tiny_copy, backend, provider):
    ort = pytest.importorskip("onnxruntime")
    if not gpu_available() or provider not in ort.get_available_providers():
        pytest.skip(f"needs a CUDA GPU and onnxruntime-gpu with {provider}")
    pol = load_policy(tiny_copy, backend=backend)
    assert pol.info.device.startswith("cuda")
    compare(pol, load_policy(tiny_copy, backend="torch"), 1e-3 if backend == "onnxruntime-cuda" else 5e-3)
