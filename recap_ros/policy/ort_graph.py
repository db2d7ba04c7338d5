"""Graph rewrites for ONNX Runtime's CPU execution provider, applied to a copy of a bundle's fp32 graph when it is
loaded on the ``onnxruntime`` backend (the bundle's own graphs stay plain ONNX for TensorRT and the GPU EPs).

Fusions into single ONNX Runtime kernels, each replacing a subgraph that :mod:`recap_ros.policy.model` exports:

* tanh-GELU -> ``FastGelu`` and ``x / sqrt(mean(x²) + eps)`` -> ``SimplifiedLayerNormalization``, by ONNX Runtime's
  own fusion passes (``onnxruntime.transformers``);
* rotary embedding -> ``com.microsoft.RotaryEmbedding`` (:func:`fuse_rotary`): :func:`recap_ros.policy.model.rope`
  exports as Split + 4 Mul + Sub + Add + Concat on cos / sin tables computed in the graph; ONNX Runtime's own rotary
  fusion only knows Hugging Face's ``rotate_half`` form;
* attention -> ONNX's ``Attention`` (opset 23, :func:`fuse_attention`): grouped-query heads, the mask bias and the
  prefix KV cache as its past key / value, where :func:`recap_ros.policy.model.attend` exports 10-20 nodes; then run
  on (B, S, heads · D) tensors (:func:`pack_heads`), without the Reshape + Transpose head views around it.

Folds: constant multi-output nodes that onnxscript's folder leaves (:func:`fold_constants`: each unrolled denoise
step's adaRMS Split) and per-channel output scales into the weights before them (:func:`fold_output_scales`: the
adaRMS gates, the Euler step's dt).

ONNX Runtime's own Skip*Norm and Attention fusions assume weight gains and layouts this model does not have (adaRMS
gains are tensors, the prefix KV is attended without a concat). On the tiny bundle (1 thread) the rotary and
attention fusions take the 5-step denoise graph from 1.34 to 1.17 ms; head packing and the folds take it on to
1.04 ms (346 -> 241 nodes run) and the prefix from 1.21 to 1.16 ms. The rewritten graph computes the same function
to float32 rounding (test_ort_graph.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _constant(model, name: str) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node) of an OnnxModel, flattened; None otherwise."""
    value = model.get_constant_value(name)
    return None if value is None else np.asarray(value).reshape(-1)


def fuse_rotary(model, shapes: dict) -> int:
    """Replace every rotary embedding ``cat(x1·cos − x2·sin, x2·cos + x1·sin)`` (x1, x2 = Split(x) on the last axis;
    cos, sin = Cos / Sin(Unsqueeze(pos) · inv_freq)) of an ``onnxruntime.transformers`` OnnxModel by one
    ``RotaryEmbedding`` node reading cos / sin caches built from inv_freq for positions ``0 .. max_pos − 1``.
    Returns the number of rewrites.

    Positions are integers stored as floats (:func:`recap_ros.policy.model.prefix_positions`); a prefix position is
    below the prefix length and a suffix position below kv length + suffix length, so ``max_pos`` = the query
    length + the longest dimension of any graph input (the KV mask's length in a denoise graph) bounds them."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.model.graph
    producer = model.output_name_to_node()
    input_dims = [d.dim_value for i in graph.input for d in i.type.tensor_type.shape.dim]
    longest_input = max(input_dims, default=0)

    def trig(name, op):
        """(pos, inv_freq, angle) of name = op(Mul(Unsqueeze*(pos), inv_freq)), else None."""
        node = producer.get(name)
        if node is None or node.op_type != op or node.input[0] not in producer:
            return None
        mul = producer[node.input[0]]
        if mul.op_type != "Mul":
            return None
        for a, b in ((0, 1), (1, 0)):
            inv_freq = _constant(model, mul.input[b])
            if inv_freq is not None:
                inv_freq = inv_freq.astype(np.float32)
                pos = mul.input[a]
                while pos in producer and producer[pos].op_type == "Unsqueeze":
                    pos = producer[pos].input[0]
                return pos, inv_freq, node.input[0]
        return None

    def operands(mul):
        """(tensor, table) of a Mul whose second factor is a Cos / Sin output."""
        a, b = mul.input
        table = producer.get(b)
        return (a, b) if table is not None and table.op_type in ("Cos", "Sin") else (b, a)

    caches: dict[tuple[bytes, int], str] = {}  # (inv_freq, positions) -> cos / sin cache name
    position_ids: dict[str, str] = {}
    fused, dead = 0, []
    for concat in [n for n in graph.node if n.op_type == "Concat" and len(n.input) == 2]:
        sub, add = producer.get(concat.input[0]), producer.get(concat.input[1])
        if sub is None or add is None or sub.op_type != "Sub" or add.op_type != "Add":
            continue
        muls = [producer.get(i) for i in (*sub.input, *add.input)]
        if any(m is None or m.op_type != "Mul" for m in muls):
            continue
        (x1, cos1), (x2, sin1), (x2b, cos2), (x1b, sin2) = map(operands, muls)
        split = producer.get(x1)
        if (x1, cos1, sin1) != (x1b, cos2, sin2) or x2 != x2b or split is None or split.op_type != "Split" \
                or list(split.output) != [x1, x2]:
            continue
        c, s = trig(cos1, "Cos"), trig(sin1, "Sin")
        if c is None or s is None or c[2] != s[2]:  # cos and sin of different angles: not a rotary embedding
            continue
        pos, inv_freq, _ = c
        x_shape = shapes.get(split.input[0])
        if x_shape is None or len(x_shape) != 4 or None in x_shape:  # RotaryEmbedding takes (B, heads, S, D)
            continue
        max_pos = x_shape[2] + longest_input
        key = (inv_freq.tobytes(), max_pos)
        if key not in caches:
            angle = np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
            caches[key] = name = model.create_node_name("RotaryCache")
            model.add_initializer(numpy_helper.from_array(np.cos(angle), name + "_cos"))
            model.add_initializer(numpy_helper.from_array(np.sin(angle), name + "_sin"))
        if pos not in position_ids:
            position_ids[pos] = name = model.create_node_name("RotaryPositions")
            model.add_node(helper.make_node("Cast", [pos], [name], to=TensorProto.INT64, name=name))
        model.add_node(helper.make_node(
            "RotaryEmbedding", [split.input[0], position_ids[pos], caches[key] + "_cos", caches[key] + "_sin"],
            [concat.output[0]], name=model.create_node_name("RotaryEmbedding"), domain="com.microsoft",
            interleaved=0))
        dead += [concat, sub, add, *muls]
        fused += 1
    model.remove_nodes(dead)
    return fused


def shape_table(model) -> dict[str, list]:
    """Tensor name -> static shape (None for an unknown dimension), by ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model.model).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.value_info, *inferred.input, *inferred.output]}


def fuse_attention(model, shapes: dict) -> int:
    """Replace every attention block of :func:`recap_ros.policy.model.attend` by one ONNX ``Attention`` node
    (opset 23: grouped-query heads, additive mask, past key / value): the scaled (grouped) queries' scores against
    the keys (with ``past``: against the cached prefix keys and the new keys, concatenated), plus the mask bias if
    any, softmax, and the value product (with ``past``: split, two products, summed). Returns the number of
    rewrites; with any, the graph's default-domain opset becomes 23."""
    from onnx import TensorProto, helper

    producer, consumers = model.output_name_to_node(), model.input_name_to_nodes()

    def node(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(name, op):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op else None

    fused, masks = 0, {}
    for softmax in [n for n in model.model.graph.node if n.op_type == "Softmax"]:
        scores, bias = softmax.input[0], None
        add = node(node(scores, "Reshape").input[0], "Add") if node(scores, "Reshape") else None
        if add is not None:  # (scores.reshape(b, hkv, g, s, L) + bias[:, None, None]).reshape(b, hkv, g*s, L)
            r1, bias = node(add.input[0], "Reshape"), add.input[1]
            if r1 is None:
                r1, bias = node(add.input[1], "Reshape"), add.input[0]
            if r1 is None:
                continue
            scores = r1.input[0]
        concat = node(scores, "Concat")
        if concat is not None and len(concat.input) == 2:  # [cached prefix | new] keys
            m_past, m_new = node(concat.input[0], "MatMul"), node(concat.input[1], "MatMul")
            if m_past is None or m_new is None or m_past.input[0] != m_new.input[0]:
                continue
            t_past = node(m_past.input[1], "Transpose")
            if t_past is None:
                continue
            past_k = t_past.input[0]
        else:
            m_new, past_k = node(scores, "MatMul"), None
            if m_new is None:
                continue
        t_new, scaled = node(m_new.input[1], "Transpose"), node(m_new.input[0], "Mul")
        scale = scaled and _constant(model, scaled.input[1])
        if t_new is None or scale is None or scale.size != 1:
            continue
        grouped = node(scaled.input[0], "Reshape")  # q.reshape(b, hkv, g * s, d) (absent when g = 1)
        q, k = (grouped.input[0] if grouped else scaled.input[0]), t_new.input[0]
        if past_k is not None:  # probs[..., :P] @ past_v + probs[..., P:] @ v
            slices = consumers.get(softmax.output[0], [])
            if len(slices) != 2 or any(n.op_type != "Slice" for n in slices):
                continue
            starts = [_constant(model, n.input[1]) for n in slices]
            if any(v is None for v in starts):
                continue
            order = sorted(range(2), key=lambda i: int(starts[i][0]))
            pv_mm, v_mm = (only_consumer(slices[i].output[0], "MatMul") for i in order)
            total = pv_mm and only_consumer(pv_mm.output[0], "Add")
            if v_mm is None or total is None or set(total.input) != {pv_mm.output[0], v_mm.output[0]}:
                continue
            v, past_v, last = v_mm.input[1], pv_mm.input[1], total
        else:
            last = only_consumer(softmax.output[0], "MatMul")
            if last is None:
                continue
            v, past_v = last.input[1], None
        out = only_consumer(last.output[0], "Reshape") or last  # .reshape(b, hq, s, d) (absent when g = 1)
        qs, ks = shapes.get(q), shapes.get(k)
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4 or None in qs or None in ks \
                or shapes.get(out.output[0]) != qs:
            continue
        inputs = [q, k, v]
        if bias is not None:
            length = ks[2] + (shapes.get(past_k, [0, 0, 0])[2] if past_k else 0)
            bs = shapes.get(bias)
            if bs is None or None in bs or np.prod(bs) != qs[0] * qs[2] * length:
                continue  # not one (S, L) mask per batch element shared by the heads
            view = (bias, qs[0], qs[2], length)
            if view not in masks:  # the layers (and steps) of a graph share their mask
                masks[view] = mask = model.create_node_name("AttentionMask")
                model.add_initializer(helper.make_tensor(mask + "_shape", TensorProto.INT64, [4],
                                                         [qs[0], 1, qs[2], length]))
                model.add_node(helper.make_node("Reshape", [bias, mask + "_shape"], [mask], name=mask))
            inputs.append(masks[view])
        outputs = [out.output[0]]
        name = model.create_node_name("Attention")
        if past_k is not None:  # (ONNX Runtime wants the present KV outputs when a past is given: unused)
            inputs += [""] * (4 - len(inputs)) + [past_k, past_v]
            outputs += [name + "_present_key", name + "_present_value"]
        model.add_node(helper.make_node("Attention", inputs, outputs, name=name, q_num_heads=qs[1],
                                        kv_num_heads=ks[1], scale=float(scale[0])))
        model.remove_node(out)
        fused += 1
    if fused:
        for opset in model.model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 23)
    return fused


def pack_heads(model, shapes: dict) -> int:
    """Run each 4-D ``Attention`` of :func:`fuse_attention` on (B, S, heads · D) tensors instead (the ONNX op's
    3-D form), dropping the head views around it: a query / key / value ``Transpose(Reshape(x, (B, S, H, D)),
    (0, 2, 1, 3))`` becomes x (a ``RotaryEmbedding`` on it then runs on x too), a packed vision projection's
    ``Squeeze(Slice(Transpose(Reshape(qkv, (B, S, 3, H, D)), (2, 0, 3, 1, 4))))`` becomes one of three ``Split``
    outputs of qkv, and the output's ``Reshape(Transpose(y, (0, 2, 1, 3)), (B, S, H · D))`` becomes y. ONNX Runtime
    wants query, key and value of one rank: an attention is rewritten only when all three have such a source.
    A rotary output that something else reads too (the prefix graph's cached keys) is rebuilt for it in 4-D.
    Returns the number of attentions rewritten."""
    from onnx import TensorProto, helper

    producer, consumers = model.output_name_to_node(), model.input_name_to_nodes()

    def node(name, op, perm=None):
        n = producer.get(name)
        if n is None or n.op_type != op:
            return None
        if perm is not None and [a.ints for a in n.attribute if a.name == "perm"] != [perm]:
            return None
        return n

    def head_view(name):
        """x of name = Transpose(Reshape(x, (B, S, H, D)), (0, 2, 1, 3)) with x of shape (B, S, H·D), else None."""
        t = node(name, "Transpose", [0, 2, 1, 3])
        r = t and node(t.input[0], "Reshape")
        xs, ts = (shapes.get(r.input[0]), shapes.get(t.input[0])) if r else (None, None)
        if not xs or not ts or len(xs) != 3 or len(ts) != 4 or xs[:2] != ts[:2] or xs[2] != ts[2] * ts[3]:
            return None
        return r.input[0]

    splits: dict[str, tuple[str, list[str]]] = {}  # packed qkv -> its Split (name, outputs), added by a rewrite
    split_of: dict[str, str] = {}  # Split output -> packed qkv

    def packed_part(name):
        """The 3-D part i of a packed qkv projection that name = Squeeze(Slice(Transpose(Reshape(qkv,
        (B, S, 3, H, D)), (2, 0, 3, 1, 4)), i : i + 1, axis 0), 0) views, else None."""
        sq = node(name, "Squeeze")
        sl = sq and node(sq.input[0], "Slice")
        t = sl and node(sl.input[0], "Transpose", [2, 0, 3, 1, 4])
        r = t and node(t.input[0], "Reshape")
        if r is None or len(sl.input) < 4:
            return None
        start, end, axis = (_constant(model, i) for i in sl.input[1:4])
        qkv, rs = r.input[0], shapes.get(t.input[0])
        xs = shapes.get(qkv)
        if any(v is None or v.size != 1 for v in (start, end, axis)) or int(axis[0]) != 0 \
                or int(end[0]) != int(start[0]) + 1 or not xs or not rs or len(xs) != 3 or len(rs) != 5 \
                or rs[2] != 3 or xs[2] != 3 * rs[3] * rs[4]:
            return None
        if qkv not in splits:
            name = model.create_node_name("PackedSplit")
            splits[qkv] = name, [f"{name}_{i}" for i in range(3)]
            split_of.update(dict.fromkeys(splits[qkv][1], qkv))
        return splits[qkv][1][int(start[0])]

    def packed(name):
        """(3-D source, RotaryEmbedding on the 4-D view or None) of a 4-D attention input, else None."""
        rope = producer.get(name)
        if rope is not None and rope.op_type == "RotaryEmbedding" and rope.domain == "com.microsoft":
            x = head_view(rope.input[0])
            return (x, rope) if x else None
        x = head_view(name) or packed_part(name)
        return (x, None) if x else None

    rewritten, roped, split_done = 0, set(), set()
    for att in [n for n in model.model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        sources = [packed(i) for i in att.input[:3]]
        t_out = only = None
        uses = consumers.get(att.output[0], [])
        if len(uses) == 1 and uses[0].op_type == "Transpose" \
                and [a.ints for a in uses[0].attribute if a.name == "perm"] == [[0, 2, 1, 3]]:
            t_out = uses[0]
            nxt = consumers.get(t_out.output[0], [])
            only = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "Reshape" else None
        ys, heads = (shapes.get(only.output[0]), shapes.get(att.output[0])) if only else (None, None)
        if None in sources or not ys or not heads or len(heads) != 4 \
                or ys != [heads[0], heads[2], heads[1] * heads[3]]:  # (B, H, S, D) -> (B, S, H·D)
            continue
        for slot, (x, rope) in enumerate(sources):
            if x in split_of and split_of[x] not in split_done:
                qkv = split_of[x]
                split_done.add(qkv)
                name, parts = splits[qkv]
                model.add_node(helper.make_node("Split", [qkv], parts, name=name, axis=-1, num_outputs=3))
            if rope is None:
                att.input[slot] = x
                continue
            packed_name = rope.output[0] + "_packed"
            att.input[slot] = packed_name
            if rope.output[0] in roped:  # read by an attention rewritten before
                continue
            roped.add(rope.output[0])
            view = shapes[rope.input[0]]  # (B, H, S, D)
            model.add_node(helper.make_node("RotaryEmbedding", [x, *rope.input[1:]], [packed_name],
                                            name=model.create_node_name("RotaryEmbedding"), domain="com.microsoft",
                                            interleaved=0, num_heads=view[1]))
            if any(c.name != att.name for c in consumers.get(rope.output[0], [])):  # also read in 4-D: rebuild it
                shape = model.create_node_name("HeadView")
                model.add_initializer(helper.make_tensor(shape + "_shape", TensorProto.INT64, [4],
                                                         [view[0], view[2], view[1], view[3]]))
                model.add_node(helper.make_node("Reshape", [packed_name, shape + "_shape"], [shape], name=shape))
                model.add_node(helper.make_node("Transpose", [shape], [rope.output[0]], perm=[0, 2, 1, 3],
                                                name=model.create_node_name("HeadView")))
            model.remove_node(rope)
        att.output[0] = only.output[0]
        model.remove_nodes([t_out, only])
        rewritten += 1
    return rewritten


def fold_constants(model) -> int:
    """Evaluate every default-domain node whose inputs are all constant (onnx's reference evaluator) and store its
    outputs as initializers. onnxscript's folder (:func:`recap_ros.policy.export._tidy`) leaves multi-output nodes:
    the Split of each unrolled denoise step's adaRMS modulation into scale, shift and gate. Returns the number of
    nodes folded."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    opsets = list(model.model.opset_import)
    folded = []
    for node in list(model.model.graph.node):
        if node.domain not in ("", "ai.onnx") or not node.input or node.op_type in ("RandomNormal", "RandomUniform"):
            continue
        values = {i: model.get_constant_value(i) for i in node.input if i}
        if any(v is None for v in values.values()):
            continue
        graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, 0, None) for i in values],
                                  [helper.make_tensor_value_info(o, 0, None) for o in node.output])
        outputs = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(None, values)
        for name, value in zip(node.output, outputs):
            model.add_initializer(numpy_helper.from_array(np.asarray(value), name))
        folded.append(node)
    model.remove_nodes(folded)
    return len(folded)


FOLD_MAX_COPY = 1 << 18  # elements (1 MiB of fp32): the largest shared weight fold_output_scales copies


def fold_output_scales(model, shapes: dict) -> int:
    """Fold a constant per-channel scale of a linear layer's output into its weights: ``Mul(MatMul(x, W), g)`` ->
    ``MatMul(x, W·g)`` and ``Mul(Add(MatMul(x, W), b), g)`` -> ``Add(MatMul(x, W·g), b·g)``, where g broadcasts
    along the output channels only (the adaRMS gates of every attention / MLP output, the Euler step's dt). The
    scaled weights are new initializers: the model's W is shared by the unrolled steps, each with its own g, so a W
    read elsewhere too is copied only when it has at most :data:`FOLD_MAX_COPY` elements (a Mul costs a few µs; a
    large model's expert copied once per step would cost gigabytes). Returns the number of rewrites."""
    from onnx import numpy_helper

    producer, consumers = model.output_name_to_node(), model.input_name_to_nodes()

    def sole(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op and len(consumers.get(name, [])) == 1 else None

    folded = 0
    for mul in [n for n in model.model.graph.node if n.op_type == "Mul"]:
        for a, c in ((0, 1), (1, 0)):
            gain = model.get_constant_value(mul.input[c])
            add = sole(mul.input[a], "Add")
            bias_slot = None
            if add is not None:
                bias_slot = next((i for i in (0, 1) if model.get_constant_value(add.input[i]) is not None), None)
            matmul = sole(add.input[1 - bias_slot], "MatMul") if bias_slot is not None else sole(mul.input[a], "MatMul")
            weight = matmul and model.get_constant_value(matmul.input[1])
            if gain is None or weight is None or weight.ndim != 2 \
                    or shapes.get(mul.output[0]) != shapes.get(mul.input[a]):
                continue
            if weight.size > FOLD_MAX_COPY and len(consumers.get(matmul.input[1], [])) > 1:
                continue
            gain = np.asarray(gain)
            if gain.size not in (1, weight.shape[1]) or (gain.size > 1 and gain.shape[-1] != weight.shape[1]):
                continue  # scales more than the output channels
            g = gain.reshape(-1).astype(weight.dtype)
            name = model.create_node_name("ScaledWeight")
            model.add_initializer(numpy_helper.from_array(weight * g[None, :], name))
            matmul.input[1] = name
            if bias_slot is not None:
                bias = np.asarray(model.get_constant_value(add.input[bias_slot]))
                model.add_initializer(numpy_helper.from_array((bias * g).astype(bias.dtype), name + "_bias"))
                add.input[bias_slot] = name + "_bias"
                add.output[0] = mul.output[0]
            else:
                matmul.output[0] = mul.output[0]
            model.remove_node(mul)
            folded += 1
            break
    return folded


def fuse_for_ort(onnx_path: Path, dst: Path) -> Path:
    """The fp32 graph at onnx_path with the fusions of this module, saved as dst (atomically). Returns dst."""
    import onnx
    from onnx import helper
    from onnxruntime.transformers.fusion_fastgelu import FusionFastGelu
    from onnxruntime.transformers.fusion_simplified_layernorm import FusionSimplifiedLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    from recap_ros.policy.precision import save_graph

    model = OnnxModel(onnx.load(str(onnx_path)))
    shapes = shape_table(model)  # of the graph as exported: the rewrites keep the names of the tensors they replace
    fold_constants(model)
    fold_output_scales(model, shapes)
    fuse_rotary(model, shapes)
    fuse_attention(model, shapes)
    pack_heads(model, shapes)
    FusionFastGelu(model).apply()
    FusionSimplifiedLayerNormalization(model).apply()
    model.prune_graph()
    model.topological_sort()
    if not any(o.domain == "com.microsoft" for o in model.model.opset_import):
        model.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_graph(model.model, dst)
    return dst
