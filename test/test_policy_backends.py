"""Backend choice and the TensorRT 11 API surface, on CPU: ``auto``'s order with faked provider lists, clear
errors for GPU backends on a CPU machine, and no TensorRT API that TensorRT 11 removed anywhere in the code."""
import ast
from pathlib import Path

import numpy as np
import pytest

from recap_ros.policy import load_policy
from recap_ros.policy.backends import AUTO_ORDER, pick_backend
from recap_ros.policy.errors import PolicyError

ROOT = Path(__file__).resolve().parents[1]
CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

# TensorRT 11 "Removed Python APIs and Replacements" (docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/
# tensorrt-10x-to-11x-python-api-reference.html): weak typing, implicit quantization, calibrators, layer precision
# constraints, platform capability queries.
REMOVED_BUILDER_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                         "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"}
REMOVED_ATTRIBUTES = {"int8_calibrator", "set_calibration_profile", "get_calibration_profile",
                      "set_quantization_flag", "get_quantization_flag", "quantization_flags",
                      "clear_quantization_flag", "device_memory_size", "platform_has_fast_fp16",
                      "platform_has_fast_int8", "set_output_type", "precision_is_set", "reset_precision",
                      "IInt8Calibrator", "IInt8EntropyCalibrator2", "IAlgorithmSelector", "algorithm_selector"}


@pytest.mark.parametrize("tensorrt_ok, gpu_ok, providers, expected", [
    (True, True, ALL, "tensorrt"),
    (False, True, ALL, "onnxruntime-trt"),
    (False, True, CUDA, "onnxruntime-cuda"),
    (False, False, ALL, "onnxruntime"),  # onnxruntime-gpu installed but no GPU visible
    (False, False, CPU, "onnxruntime"),
    (False, False, None, "torch"),  # onnxruntime not importable
    (True, True, None, "tensorrt"),
])
def test_auto_order(tensorrt_ok, gpu_ok, providers, expected):
    assert pick_backend(tensorrt_ok, gpu_ok, providers) == expected


def test_auto_order_is_stated():
    assert AUTO_ORDER == ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda", "onnxruntime", "torch")


@pytest.mark.parametrize("backend, provider", [("onnxruntime-cuda", "CUDAExecutionProvider"),
                                               ("onnxruntime-trt", "TensorrtExecutionProvider")])
def test_gpu_ort_backend_without_its_provider_is_a_clear_error(backend, provider):
    ort = pytest.importorskip("onnxruntime")
    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    with pytest.raises(PolicyError, match=f"{backend} backend: ONNX Runtime here has no {provider}"):
        load_policy("tiny", backend=backend)


def test_options_of_other_backends_refused():
    with pytest.raises(PolicyError, match=r"does not take options \['steps'\]"):
        load_policy("tiny", backend="onnxruntime", steps=(5,))


def test_onnxruntime_fp16_graph_on_cpu(tiny_copy):
    """precision fp16 on the onnxruntime backends runs the reduced-precision graphs (converted once into the
    engine cache folder)."""
    ref = load_policy(tiny_copy, backend="onnxruntime")
    pol = load_policy(tiny_copy, backend="onnxruntime", precision="fp16")
    made = sorted(p.name.split(".")[0] + "." + p.name.split(".")[2].split("-")[0]
                  for p in (tiny_copy / "engine_cache" / "onnx").iterdir())
    assert made == ["denoise_s5.fp16", "denoise_s5.fused", "denoise_s5_cfg.fp16", "denoise_s5_cfg.fused",
                    "prefix.fp16", "prefix.fused"]  # fused: the fp32 reference's graphs (ort_graph's fusions)
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    feeds = ref.prepare_inputs(views, np.zeros(14), "touch the red marker", seed=3, beta=2.0)
    a, b = pol.backend.run(feeds, 5, 2.0), ref.backend.run(feeds, 5, 2.0)
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max()


def test_derived_graphs_of_older_code_are_removed(tiny_copy):
    """Deriving a graph removes its variants of the same kind from older code or an older export (with their
    weights files); other graphs and other kinds stay."""
    cache = tiny_copy / "engine_cache" / "onnx"
    cache.mkdir(parents=True, exist_ok=True)
    stale = [cache / "prefix.0123456789ab.fused-deadbeef.onnx", cache / "prefix.0123456789ab.fused-deadbeef.onnx.data",
             cache / "prefix.feedfacecafe.fused-00000000.onnx"]
    kept = [cache / "prefix.0123456789ab.fp16-deadbeef.onnx", cache / "notes.txt"]
    for f in stale + kept:
        f.write_bytes(b"x")
    load_policy(tiny_copy, backend="onnxruntime")
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
    assert sorted(p.name.split(".")[0] for p in cache.glob("*.fused-*.onnx")) == [
        "denoise_s5", "denoise_s5_cfg", "prefix"]


def removed_api_uses(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Attribute) and base.attr == "BuilderFlag" and node.attr in REMOVED_BUILDER_FLAGS:
                found.append(f"{where}:{node.lineno} BuilderFlag.{node.attr}")
            elif node.attr in REMOVED_ATTRIBUTES:
                found.append(f"{where}:{node.lineno} .{node.attr}")
    return found


def test_no_tensorrt_api_removed_in_11():
    """Fails if any removed TensorRT 11 name comes back: BuilderFlag.<FP16|BF16|...> or a removed attribute."""
    sources = [p for d in ("recap_ros", "bench") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 50
    assert [hit for p in sources for hit in removed_api_uses(p.read_text(), str(p.relative_to(ROOT)))] == []


def test_removed_api_scan_catches_the_old_build_code():
    """The scan itself: the pre-TensorRT-11 build code of this package is flagged."""
    old = "config.set_flag(trt.BuilderFlag.FP16)\nconfig.set_flag(trt.BuilderFlag.BF16)\nconfig.int8_calibrator = c\n"
    assert sorted(removed_api_uses(old, "old.py")) == ["old.py:1 BuilderFlag.FP16", "old.py:2 BuilderFlag.BF16",
                                                       "old.py:3 .int8_calibrator"]


def test_tensorrt_network_is_strongly_typed():
    src = (ROOT / "recap_ros" / "policy" / "backends.py").read_text()
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in src and "create_network(0)" not in src
