"""Reduced-precision ONNX graphs (recap_ros.policy.precision) at π0.6's real sequence lengths on CPU.

The model is the ``pi06`` preset at reduced width and depth but with the real geometry that sets the sequence
lengths and positions: 3 views of 448² in 14-px patches (1024 patches per view, pooled to 256 tokens), 64 text
tokens, a state token and 8 advantage tokens (prefix 841), chunk 50, head_dim 256 (RoPE's fastest frequency
turns 1 rad per position). Reference: the fp32 export run by ONNX Runtime.

fp16 runs in ONNX Runtime's CPU provider (nodes without an fp16 CPU kernel run in fp32 there: ORT inserts the
casts). ORT has no bf16 CPU kernels, so the bf16 graph runs in ONNX's reference evaluator (numpy over
ml_dtypes.bfloat16: every node computes in bf16 with the graph's casts); both run the converted graph itself.
"""
import numpy as np
import onnx
import pytest
import torch

from recap_ros.policy.config import preset
from recap_ros.policy.export import export_onnx
from recap_ros.policy.model import Pi06Policy
from recap_ros.policy.precision import fp32_island_nodes, load_for_conversion, reduce_precision

ort = pytest.importorskip("onnxruntime")


def small_pi06():
    return preset("pi06", vision_width=32, vision_depth=1, vision_heads=1, vision_mlp=64, vocab_size=512, width=128,
                  depth=1, heads=1, kv_heads=1, head_dim=256, mlp_dim=256, expert_width=64, expert_mlp_dim=128)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    cfg = small_pi06()
    assert cfg.prefix_len == 841  # 3 * 256 image tokens + 64 text + 1 state + 8 advantage, as pi06
    out = tmp_path_factory.mktemp("pi06_small") / "onnx"
    export_onnx(Pi06Policy(cfg), out, steps=(5,))
    return cfg, out


def feeds(cfg):
    rng = np.random.default_rng(1)
    n_text = 20  # a real prompt: padding after it, so positions come from the mask
    return {"images": rng.integers(0, 256, (1, 3, 448, 448, 3), dtype=np.uint8),
            "tokens": rng.integers(0, cfg.vocab_size, (1, cfg.max_text_tokens)),
            "token_mask": np.arange(cfg.max_text_tokens)[None] < n_text,
            "adv_tokens": rng.integers(0, cfg.vocab_size, (1, cfg.max_advantage_tokens)),
            "adv_mask": np.arange(cfg.max_advantage_tokens)[None] < 5,
            "state": rng.standard_normal((1, cfg.state_dim)).astype(np.float32),
            "noise": rng.standard_normal((1, cfg.chunk_len, cfg.action_dim)).astype(np.float32),
            "beta": np.array([2.0], np.float32)}


def run_ort(model, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: x[i.name] for i in s.get_inputs()})


def run_reference(model, x):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, {i.name: x[i.name] for i in model.graph.input})


def chunk(run, prefix, denoise, x):
    keys, values, kv_mask = run(prefix, x)
    return run(denoise, {**x, "keys": keys, "values": values, "kv_mask": kv_mask})[0].astype(np.float32)


def rel_err(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# max |error| / max |fp32 value|, measured 2026-12-05: KV cache fp16 0.07 %, bf16 0.8 %; actions fp16 0.1 %,
# bf16 0.9 %. Without the fp32 islands the bf16 KV cache is off by 156 % (positions 512-1023 are 4 apart in bf16).
TOL = {"fp16": {"kv": 0.005, "actions": 0.01}, "bf16": {"kv": 0.03, "actions": 0.05}}
RUN = {"fp16": run_ort, "bf16": run_reference}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_graph_tracks_fp32_at_real_prefix_length(graphs, precision):
    cfg, out = graphs
    x = feeds(cfg)
    prefix = reduce_precision(load_for_conversion(out / "prefix.onnx"), precision)
    denoise = reduce_precision(load_for_conversion(out / "denoise_s5_cfg.onnx"), precision)
    kv_type = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    io = {v.name: v.type.tensor_type.elem_type for v in list(prefix.graph.output) + list(denoise.graph.input)
          + list(denoise.graph.output)}
    assert io["keys"] == io["values"] == kv_type  # the KV cache crosses the engine boundary in compute precision
    assert io["noise"] == io["actions"] == onnx.TensorProto.FLOAT
    keys32, _, kv_mask = run_ort(str(out / "prefix.onnx"), x)
    keys = RUN[precision](prefix, x)[0].astype(np.float32)
    valid = kv_mask[0]
    assert valid.shape == (841,) and valid[-8:].sum() == 5 and valid[767]  # image, prompt, state, advantage
    assert rel_err(keys[..., valid, :], keys32[..., valid, :]) < TOL[precision]["kv"]
    ref = chunk(run_ort, str(out / "prefix.onnx"), str(out / "denoise_s5_cfg.onnx"), x)
    assert rel_err(chunk(RUN[precision], prefix, denoise, x), ref) < TOL[precision]["actions"]


def test_without_fp32_islands_bf16_positions_break(graphs, monkeypatch):
    """The control: the same conversion with no islands (positions, angles, norms, softmax in bf16)."""
    import recap_ros.policy.precision as precision

    cfg, out = graphs
    x = feeds(cfg)
    keys32, _, kv_mask = run_ort(str(out / "prefix.onnx"), x)
    monkeypatch.setattr(precision, "FP32_OPS", frozenset())
    monkeypatch.setattr(precision, "POSITION_SINKS", frozenset())
    keys = run_reference(reduce_precision(load_for_conversion(out / "prefix.onnx"), "bf16"), x)[0]
    assert rel_err(keys.astype(np.float32)[..., kv_mask[0], :], keys32[..., kv_mask[0], :]) > 0.5


def test_islands_cover_positions_norms_softmax(graphs):
    _, out = graphs
    g = load_for_conversion(out / "denoise_s5.onnx").graph
    islands = fp32_island_nodes(g)
    kept = {n.op_type for n in g.node if n.name in islands}
    assert {"Cos", "Sin", "Softmax", "ReduceMean", "Sqrt", "ReduceSum"} <= kept  # ReduceSum: kv_mask -> positions
    assert "MatMul" not in kept and "Gemm" not in kept  # the heavy ops run in the compute precision
    bf16_prefix = fp32_island_nodes(load_for_conversion(out / "prefix.onnx").graph, "tensor(bfloat16)")
    assert any("patch/Conv" in name for name in bf16_prefix)  # ONNX's Conv takes no bf16
