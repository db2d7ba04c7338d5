"""ONNX Runtime CPU graph rewrites (recap_ros.policy.ort_graph) and the shared weights of exported graphs."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from recap_ros.policy import load_policy
from recap_ros.policy.bundle import open_bundle
from recap_ros.policy.ort_graph import fuse_for_ort

PROMPT = "touch the red marker with the left gripper"


@pytest.fixture(scope="module")
def feeds():
    """Real inputs of the committed tiny bundle's three graphs (prefix outputs feed the denoise graphs)."""
    pol = load_policy("tiny", backend="torch")
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    x = pol.prepare_inputs(views, np.linspace(-0.3, 0.3, 14), PROMPT, seed=2, beta=2.0)
    bundle = open_bundle("tiny")
    prefix = ort.InferenceSession(str(bundle.onnx_path("prefix")), providers=["CPUExecutionProvider"])
    kv = dict(zip(("keys", "values", "kv_mask"), prefix.run(None, {i.name: x[i.name] for i in prefix.get_inputs()})))
    return bundle, {**x, **kv}


def run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})


# tiny: 2 vision layers, 2 backbone / expert layers, 5 denoise steps. Each rotary embedding (query and key of every
# decoder layer; the prefix's last layer has no live query) is one RotaryEmbedding node, each attention one
# Attention node (prefix: 2 vision layers + the first backbone layer; denoise: 2 layers x 5 steps)
@pytest.mark.parametrize("graph,steps,ropes,attentions", [("prefix", None, 3, 3), ("cond", 5, 20, 10),
                                                          ("cfg", 5, 20, 10)])
def test_fused_graph_computes_the_bundle_graph(feeds, tmp_path, graph, steps, ropes, attentions):
    bundle, x = feeds
    src = bundle.onnx_path(graph, steps)
    dst = fuse_for_ort(src, tmp_path / "fused.onnx")
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert ops.count("RotaryEmbedding") == ropes and ops.count("Attention") == attentions
    assert "Softmax" not in ops  # every softmax was an attention's
    for ref, out in zip(run(src, x), run(dst, x)):
        assert ref.shape == out.shape
        if ref.dtype == np.bool_:
            np.testing.assert_array_equal(out, ref)
        else:
            assert np.abs(ref).max() > 0.05
            np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "sim_policy", "aloha_sim_policy"])
def test_onnxruntime_backend_runs_the_fused_graphs(name):
    """The onnxruntime backend loads the derived graphs (not the bundle's) of every committed bundle, and its
    chunks (robot units) match torch's."""
    pol = load_policy(name, backend="onnxruntime")
    loaded = [onnx.load(s._model_path) for s in pol.backend.sessions.values()]
    assert len(loaded) == 3 and all(any(n.op_type == "Attention" for n in m.graph.node) for m in loaded)
    ref = load_policy(name, backend="torch")
    rng = np.random.default_rng(1)
    views = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    q = rng.uniform(-0.3, 0.3, 14)
    for beta in (1.0, 2.0):
        np.testing.assert_allclose(pol.infer(views, q, PROMPT, beta=beta, seed=4),
                                   ref.infer(views, q, PROMPT, beta=beta, seed=4), atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "sim_policy", "aloha_sim_policy"])
def test_committed_graphs_hold_each_weight_once(name):
    """The unrolled denoise loop reads every expert weight once per step; the graph stores it once."""
    bundle = open_bundle(name)
    for graph in ("prefix", "cond", "cfg"):
        model = onnx.load(str(bundle.onnx_path(graph, None if graph == "prefix" else 5)))
        big = [t for t in model.graph.initializer if len(t.raw_data) >= 4096]
        digests = [hashlib.sha256(t.raw_data + str(list(t.dims)).encode()).hexdigest() for t in big]
        assert len(big) > 5 and len(set(digests)) == len(digests), f"{name} {graph}: duplicate weights"
