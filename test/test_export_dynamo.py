"""The dynamo ONNX exporter (torch.export + onnxscript; the default outside the test suite) on the tiny model:
the prefix graph it writes matches torch, and the reduced-precision conversion works on it."""
import warnings

import numpy as np
import pytest
import torch

from recap_ros.policy.bundle import open_bundle
from recap_ros.policy.export import PREFIX_FILE, PrefixGraph, _export, example_inputs
from recap_ros.policy.precision import load_for_conversion, reduce_precision

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

NAMES = ["images", "tokens", "token_mask", "adv_tokens", "adv_mask", "state"]


def test_dynamo_prefix_matches_torch(tmp_path):
    model = open_bundle("tiny").load_model()
    x = example_inputs(model)
    args = tuple(x[n] for n in NAMES)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        _export(PrefixGraph(model), args, NAMES, ["keys", "values", "kv_mask"], tmp_path / PREFIX_FILE, "dynamo")
        ref = [t.numpy() for t in model.encode_prefix(*args)]
    assert not [w for w in caught if "falling back" in str(w.message)]  # dynamo itself wrote the graph
    feeds = {n: x[n].numpy() for n in NAMES}
    out = ort.InferenceSession(str(tmp_path / PREFIX_FILE), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=1e-4)
    fp16 = reduce_precision(load_for_conversion(tmp_path / PREFIX_FILE), "fp16")
    keys = ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert keys.dtype == np.float16 and np.abs(keys.astype(np.float32) - ref[0]).max() < 0.01 * np.abs(ref[0]).max()


def test_large_graph_keeps_its_weights_in_one_side_file(tmp_path, monkeypatch):
    """Past the size limit the weights go to <graph>.onnx.data (one file, read by ONNX Runtime from there)."""
    import recap_ros.policy.export as export

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    model = open_bundle("tiny").load_model()
    x = example_inputs(model)
    args = tuple(x[n] for n in NAMES)
    with torch.no_grad():
        _export(PrefixGraph(model), args, NAMES, ["keys", "values", "kv_mask"], tmp_path / PREFIX_FILE, "torchscript")
        ref = model.encode_prefix(*args)[0].numpy()
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREFIX_FILE, PREFIX_FILE + ".data"]
    assert 5 * (tmp_path / PREFIX_FILE).stat().st_size < (tmp_path / (PREFIX_FILE + ".data")).stat().st_size
    keys = ort.InferenceSession(str(tmp_path / PREFIX_FILE), providers=["CPUExecutionProvider"]).run(
        None, {n: x[n].numpy() for n in NAMES})[0]
    np.testing.assert_allclose(keys, ref, atol=1e-4)
