"""Reduced-precision ONNX graphs for strongly typed TensorRT engines (TensorRT 11 has no FP16/BF16 builder flags:
the precision of every tensor comes from the graph).

:func:`reduce_precision` turns an fp32 export into an fp16 or bf16 graph with fp32 islands, using ONNX Runtime's
maintained fp16 converter (``onnxruntime.transformers.float16``) with a node block list; the fp16 round trips it
leaves between two blocked nodes are then removed (:func:`_drop_round_trips`), so casts sit only at island edges.
The islands:

* positions and flow time: every node upstream of a ``Cos`` / ``Sin`` (mask -> position -> angle) and the
  ``Cos`` / ``Sin`` themselves. bf16 has 8 significant bits: position 840 and 841 are the same bf16 number, so
  RoPE angles computed in bf16 would confuse neighbouring tokens of π0.6's 841-token prefix;
* norms: ``ReduceMean`` (the mean of x² of RMSNorm), the square feeding it, ``Sqrt`` and the division by it,
  ``LayerNormalization`` (|x|² overflows fp16 at |x| > 256 in a Gemma residual stream);
* ``Softmax`` (and the other reductions / transcendental ops listed in :data:`FP32_OPS`).

Graph inputs and outputs keep their types, except the KV cache (``keys`` / ``values``: prefix output, denoise
input), which is in the compute precision so that it crosses the engine boundary at half the bytes. bf16: the
converter writes fp16; every fp16 tensor type is then retyped to bf16 and every converted weight is re-rounded
from its fp32 original (no fp16 range clamp, no double rounding).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recap_ros.policy.errors import PolicyError

REDUCED = ("fp16", "bf16")
KV_NAMES = ("keys", "values")
FP32_OPS = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum", "ReduceLogSumExp",
                      "Sqrt", "Reciprocal", "Cos", "Sin", "Exp", "Log", "CumSum", "Range"})
POSITION_SINKS = frozenset({"Cos", "Sin"})


def _takes(node, dtype: str, opset: int) -> bool:
    """Whether the ONNX schema of node's op (at opset) allows dtype ('tensor(bfloat16)') for its float inputs:
    e.g. Conv has no bf16 in any opset, so a bf16 graph keeps its Conv (the patch embedding) in fp32."""
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # onnx.defs.SchemaError: a contrib op; leave it to the converter
        return True
    floats = [c for c in schema.type_constraints if "tensor(float)" in c.allowed_type_strs]
    return all(dtype in c.allowed_type_strs for c in floats)


def fp32_island_nodes(graph, dtype: str = "tensor(float16)", opset: int = 18) -> set[str]:
    """Names of the nodes that stay fp32 (see the module docstring): also those whose op does not take ``dtype``
    (the compute type) at ``opset``."""
    producer = {out: n for n in graph.node for out in n.output}
    keep = {n.name for n in graph.node if n.op_type in FP32_OPS}
    # everything a Cos / Sin depends on: positions from masks, the flow time, the frequency tables
    stack = [n for n in graph.node if n.op_type in POSITION_SINKS]
    while stack:
        node = stack.pop()
        for name in node.input:
            up = producer.get(name)
            if up is not None and up.name not in keep:
                keep.add(up.name)
                stack.append(up)
    keep |= {n.name for n in graph.node if n.op_type in POSITION_SINKS}
    keep |= {n.name for n in graph.node if not _takes(n, dtype, opset)}
    for n in graph.node:
        # the square under a norm's ReduceMean (x.pow(2) or x*x) and the division by its Sqrt
        if n.op_type == "ReduceMean" and n.input[0] in producer and producer[n.input[0]].op_type in ("Pow", "Mul"):
            keep.add(producer[n.input[0]].name)
        if n.op_type in ("Div", "Mul") and len(n.input) > 1 and n.input[1] in producer \
                and producer[n.input[1]].op_type in ("Sqrt", "Reciprocal"):
            keep.add(n.name)
    return keep


def _name_nodes(graph) -> None:
    for i, n in enumerate(graph.node):  # the block list works on node names: give unnamed nodes one
        if not n.name:
            n.name = f"_unnamed_{n.op_type}_{i}"


def _retype_bf16(model, originals: dict) -> None:
    """fp16 -> bf16 in place: tensor types, Cast targets, and weights re-rounded from their fp32 originals."""
    import ml_dtypes
    from onnx import TensorProto, numpy_helper

    def tensor(t, key):
        if t.data_type == TensorProto.FLOAT16:
            src = originals.get(key)
            arr = src if src is not None else numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), t.name))

    g = model.graph
    for t in g.initializer:
        tensor(t, ("init", t.name))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
            if a.HasField("t"):
                tensor(a.t, ("attr", n.name, a.name))


def _drop_round_trips(graph) -> int:
    """Cast(fp32 -> fp16) -> Cast(-> fp32) between two fp32 nodes: the consumer reads the fp32 tensor itself.
    The converter casts every output of a blocked node to fp16 and every input back to fp32, so without this
    an island of several nodes (mask -> position -> angle -> Cos) would still round each edge to fp16. Dead
    casts are removed. Returns how many round trips were dropped."""
    from onnx import TensorProto

    def cast_to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {out: n for n in graph.node for out in n.output}
    outputs = {o.name for o in graph.output}
    alias = {}
    for n in graph.node:
        up = producer.get(n.input[0]) if cast_to(n) == TensorProto.FLOAT else None
        if up is not None and cast_to(up) == TensorProto.FLOAT16 and types.get(up.input[0]) == TensorProto.FLOAT \
                and n.output[0] not in outputs:
            alias[n.output[0]] = up.input[0]
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    while True:  # remove casts nobody reads any more
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            return len(alias)
        for n in dead:
            graph.node.remove(n)


def reduce_precision(model, precision: str):
    """A shape-inferred fp32 ModelProto (weights loaded) -> the fp16 / bf16 graph with fp32 islands.
    Converts ``model`` in place and returns it."""
    from onnx import TensorProto, numpy_helper
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    if precision not in REDUCED:
        raise PolicyError(f"reduce_precision: precision '{precision}' must be one of {', '.join(REDUCED)}")
    _name_nodes(model.graph)
    originals = {}
    if precision == "bf16":
        originals = {("init", t.name): numpy_helper.to_array(t) for t in model.graph.initializer
                     if t.data_type == TensorProto.FLOAT}
        originals.update({("attr", n.name, a.name): numpy_helper.to_array(a.t) for n in model.graph.node
                          for a in n.attribute if a.HasField("t") and a.t.data_type == TensorProto.FLOAT})
    dtype = "tensor(bfloat16)" if precision == "bf16" else "tensor(float16)"
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    keep_io = [v.name for v in list(model.graph.input) + list(model.graph.output) if v.name not in KV_NAMES]
    out = float16.convert_float_to_float16(model, keep_io_types=keep_io, op_block_list=[],
                                           node_block_list=sorted(fp32_island_nodes(model.graph, dtype, opset)),
                                           max_finite_val=65504.0, disable_shape_infer=True)
    _drop_round_trips(out.graph)
    if precision == "bf16":
        _retype_bf16(out, originals)
    OnnxModel(out).topological_sort()  # the converter appends its casts at the end; ONNX (and TensorRT) want order
    return out


def load_for_conversion(onnx_path: Path):
    """Load a graph with its external data and inferred shapes (inference runs on the weight-less skeleton, so
    graphs over protobuf's 2 GB limit work too)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
        load_external_data_for_model(model, str(onnx_path.parent))
    except Exception as e:  # onnx raises DecodeError / FileNotFoundError / InferenceError
        raise PolicyError(f"{onnx_path}: cannot read this ONNX graph ({e})") from None
    return model


def save_graph(model, dst: Path) -> None:
    """Save a converted graph atomically (temporary name, then rename), its weights in one ``<file>.data`` next
    to it when they pass 1 GB."""
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    big = sum(t.ByteSize() for t in model.graph.initializer) > 1_000_000_000
    onnx.save_model(model, str(tmp), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    os.replace(tmp, dst)


def write_reduced(onnx_path: Path, precision: str, dst: Path) -> Path:
    """Convert one bundle graph to ``precision`` and save it as dst. Returns dst."""
    save_graph(reduce_precision(load_for_conversion(onnx_path), precision), dst)
    return dst
