"""ONNX Runtime CPU graph rewrites (recap_ros.policy.ort_graph) and the shared weights of exported graphs."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from recap_ros.policy import load_policy
from recap_ros.policy.bundle import open_bundle
from recap_ros.policy.ort_graph import fold_constants, fold_output_scales, fuse_for_ort, shape_table

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
# Attention node (prefix: 2 vision layers + the first backbone layer; denoise: 2 layers x 5 steps). The denoise
# graphs' only Muls left are each expert MLP's gelu(gate) * up (2 layers x 5 steps) and, with CFG, β(v_c - v_u) and
# the Euler step's dt times the combined velocity (5 steps each): the adaRMS gates and the unguided graph's dt are
# folded into the weights.
@pytest.mark.parametrize("graph,steps,ropes,attentions,muls", [("prefix", None, 3, 3, None), ("cond", 5, 20, 10, 10),
                                                               ("cfg", 5, 20, 10, 20)])
def test_fused_graph_computes_the_bundle_graph(feeds, tmp_path, graph, steps, ropes, attentions, muls):
    bundle, x = feeds
    src = bundle.onnx_path(graph, steps)
    dst = fuse_for_ort(src, tmp_path / "fused.onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(dst)))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("RotaryEmbedding") == ropes and ops.count("Attention") == attentions
    assert "Softmax" not in ops  # every softmax was an attention's
    assert muls is None or ops.count("Mul") == muls
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.value_info, *model.graph.input]}
    producer = {o: n for n in model.graph.node for o in n.output}
    for att in (n for n in model.graph.node if n.op_type == "Attention"):  # (B, S, heads x D): no head views
        # (onnx's shape inference does not know RotaryEmbedding's output: its input has the same shape)
        rotated = [producer[i].input[0] if producer[i].op_type == "RotaryEmbedding" else i for i in att.input[:3]]
        assert [rank[i] for i in rotated] == [3, 3, 3]
        assert rank[att.output[0]] == 3
        assert not any(producer[i].op_type == "Transpose" for i in rotated if i in producer)
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


# the pi06 / pi05 presets at reduced width and depth: Gemma 3's QK-norm, local / global layers and post-norms, and
# π0.5's state-in-the-prompt, through the same rewrites
SMALL = dict(vision_width=32, vision_depth=1, vision_heads=1, vision_mlp=64, vocab_size=512, width=128, depth=2,
             heads=2, kv_heads=1, head_dim=64, mlp_dim=256, expert_width=64, expert_mlp_dim=128, image_size=56,
             vision_tokens=16, state_dim=14, action_dim=14)


@pytest.mark.parametrize("name,overrides", [("pi06", SMALL), ("pi05", SMALL), ("tiny", {"heads": 4, "kv_heads": 2})])
def test_fused_graphs_of_other_architectures_match_torch(tmp_path, monkeypatch, name, overrides):
    from recap_ros.policy.bundle import random_bundle

    monkeypatch.setenv("RECAP_ONNX_EXPORTER", "dynamo")  # the default exporter, whose graphs the rewrites match
    b = random_bundle(name, tmp_path / name, **overrides, denoise_steps=2)
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    q = rng.uniform(-0.3, 0.3, 14)
    fused, ref = load_policy(b.dir, backend="onnxruntime"), load_policy(b.dir, backend="torch")
    ops = [n.op_type for s in fused.backend.sessions.values() for n in onnx.load(s._model_path).graph.node]
    assert ops.count("Attention") > 0 and "Softmax" not in ops
    for beta in (1.0, 2.0):
        np.testing.assert_allclose(fused.infer(views, q, PROMPT, beta=beta, seed=3),
                                   ref.infer(views, q, PROMPT, beta=beta, seed=3), atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "sim_policy", "aloha_sim_policy"])
def test_committed_graphs_hold_each_weight_once(name):
    """The unrolled denoise loop reads every expert weight once per step; the graph stores it once."""
    bundle = open_bundle(name)
    for graph in ("prefix", "cond", "cfg"):
        model = onnx.load(str(bundle.onnx_path(graph, None if graph == "prefix" else 5)))
        big = [t for t in model.graph.initializer if len(t.raw_data) >= 4096]
        digests = [hashlib.sha256(t.raw_data + str(list(t.dims)).encode()).hexdigest() for t in big]
        assert len(big) > 5 and len(set(digests)) == len(digests), f"{name} {graph}: duplicate weights"


def _model(nodes, inputs, initializers):
    from onnx import TensorProto, helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return OnnxModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_output_scale_folds_into_the_weights():
    """(x W + b) * g with g per output channel is x (W g) + b g; a gain that also scales rows stays a Mul."""
    from onnx import helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 4)).astype(np.float32)
    w, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    for gain, folds in ((np.array([[[2.0, -0.5, 0.25]]], np.float32), True),
                        (np.arange(1, 6, dtype=np.float32).reshape(1, 5, 1), False)):
        model = _model([helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
                        helper.make_node("Mul", ["z", "g"], ["y"])], [("x", [1, 5, 4])], {"w": w, "b": b, "g": gain})
        assert fold_output_scales(model, shape_table(model)) == int(folds)
        assert [n.op_type for n in model.model.graph.node] == ["MatMul", "Add"] + ([] if folds else ["Mul"])
        out = ort.InferenceSession(model.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        expected = np.einsum("bsk,kn->bsn", x.astype(np.float64), w) + b  # by hand, then the gain
        np.testing.assert_allclose(out, expected * gain, rtol=1e-5, atol=1e-5)


def test_constant_split_is_folded():
    """A Split of an initializer (each denoise step's adaRMS scale / shift / gate) and what only reads constants
    become initializers; a node reading a graph input stays."""
    from onnx import helper

    mod = np.arange(6, dtype=np.float32).reshape(1, 1, 6)
    model = _model([helper.make_node("Split", ["mod"], ["s0", "s1", "s2"], axis=-1, num_outputs=3),
                    helper.make_node("Add", ["s0", "one"], ["scale"]), helper.make_node("Mul", ["x", "scale"], ["y"])],
                   [("x", [1, 2, 2])], {"mod": mod, "one": np.ones(1, np.float32)})
    assert fold_constants(model) == 2
    assert [n.op_type for n in model.model.graph.node] == ["Mul"]
    np.testing.assert_array_equal(model.get_constant_value("scale"), [[[1.0, 2.0]]])
    np.testing.assert_array_equal(model.get_constant_value("s2"), [[[4.0, 5.0]]])


def test_shared_large_weight_is_not_copied_per_step(monkeypatch):
    """Two steps' gains on one shared W: folded into two scaled copies while W is small, left as Muls when copying
    it would exceed FOLD_MAX_COPY elements."""
    from onnx import helper

    from recap_ros.policy import ort_graph

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Mul", ["a", "g1"], ["b"]),
             helper.make_node("MatMul", ["b", "w2"], ["c"]), helper.make_node("MatMul", ["x", "w"], ["d"]),
             helper.make_node("Mul", ["d", "g2"], ["e"]), helper.make_node("MatMul", ["e", "w2"], ["f"]),
             helper.make_node("Add", ["c", "f"], ["y"])]
    consts = {"w": w, "w2": rng.standard_normal((3, 4)).astype(np.float32),
              "g1": np.array([1.0, 2.0, 3.0], np.float32), "g2": np.array([-1.0, 0.5, 2.0], np.float32)}
    for limit, folds in ((12, 2), (11, 0)):  # W has 12 elements
        monkeypatch.setattr(ort_graph, "FOLD_MAX_COPY", limit)
        model = _model(list(nodes), [("x", [2, 4])], consts)
        assert fold_output_scales(model, shape_table(model)) == folds
        assert [n.op_type for n in model.model.graph.node].count("Mul") == 2 - folds
