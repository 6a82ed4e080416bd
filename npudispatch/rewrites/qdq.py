"""QDQ graphs (what quantize_static / AMD Quark emit) compiled without leaving the NPU.

:class:`QdqPass` runs these steps in order; each counts what it did in :class:`QdqReport`:

1. **fold_quantize** - ``QuantizeLinear`` of a constant or of a view of one (quantizers quantize
   scalar constants such as an RMSNorm epsilon too) becomes an integer initializer, computed with the NPU
   operator's ONNX semantics (bit-identical to onnxruntime).
2. **unique_dq** - a DequantizeLinear read by several nodes gets one copy per reader (like
   onnxruntime's QDQ transformers), so each DQ -> op -> Q group can fuse on its own; copies no
   fusion used are merged back in step 7.
3. **views** - ``Q(view(DQ(x)))`` with the same scale, zero point and type (Reshape, Squeeze,
   Unsqueeze, Flatten) becomes ``view(x)``: a zero-copy view of the quantized tensor. Exact,
   since ``Q(DQ(x)) = x`` for every integer of the type.
   A ``view(DQ(x))`` producing a graph output becomes ``DQ(view(x))``, so the output keeps
   its quantization grid (no float view stored in bf16).
4. **dq_q** - a ``Q(DQ(x))`` chain: with the same parameters and type it is ``x`` (the
   redundant pairs quantizers leave between two quantized ops); otherwise it becomes
   ``npudispatch.QDQRequantize``.
5. **qmatmul** - DQ(a) -> MatMul with DQ(constant int8/uint8 weight) -> Q becomes
   ``npudispatch.QMatMul`` (the weight formatted at compile time into 8-bit tiles;
   ``rewrites/matmul.py`` rule).
6. **fused** - (a Gemm weight quantized along axis 1 is first transposed at compile time, with
   ``transB`` flipped, to axis 0) every other DQ -> op -> Q group whose op has a quantized form
   (:data:`npudispatch.opset_quant.QDQ_OPS`: Add, Sub, Mul, Div, Pow, MatMul of two activations or
   with a weight quantized per row (along K), Gemm and Conv with per-channel weights,
   ConvTranspose (an ``output_shape`` as explicit pads), BatchNormalization, Softmax,
   LayerNormalization, ReduceMean, GlobalAveragePool, Transpose, Sigmoid, Tanh, Erf, HardSigmoid, ...) becomes
   ``npudispatch.QDQ<Op>``. A float32 constant operand that was never quantized (a ``Div`` by
   ``sqrt(head_dim)``; BatchNormalization's per-channel mean and variance) is written exactly as
   ``DQ(q=sign(c), scale=|c|, zp=0)``, per tensor for a scalar, per channel where the op takes
   per-channel operands. A chain of such ops between one set of DQs and one Q (``Pow ->
   ReduceMean``) becomes ``npudispatch.QDQChain``. A MatMul, Gemm, Conv or ConvTranspose weight
   quantized in blocks (opset 21 ``block_size``) or per channel along an axis other than the
   fused op's default (a MatMul ``[K, N]`` per column, a ``[B, K, N]`` weight along K or N)
   gives the fused op (or a chain's first stage) ``weight_axis`` / ``weight_block_size``: its
   kernel dequantizes the weight in float32 exactly as DequantizeLinear does. A group is fused
   only when the operator library takes the fused node (else nothing changes).
7. **merge_dq** - identical DequantizeLinear copies left by step 2 are merged again.
8. **nbits** - ``MatMul(a, DQ(W))`` with a constant int4/uint4 ``W [K, N]`` quantized in blocks
   of 16..128 along K becomes ``com.microsoft.MatMulNBits``: the weight is formatted 4-bit at
   compile time instead of being expanded to float (inside a DQ -> MatMul -> Q group step 6
   has already fused it, dequantized in float32 as onnxruntime's QDQ run does).
9. **fold_dequantize** - a DequantizeLinear of a constant whose reader has no quantized form
   (a float MatMul weight, a LayerNormalization scale) becomes a float32 initializer; the float
   op then reads it like any weight (converted to bf16 by the precision pass).

Every QuantizeLinear / DequantizeLinear left over runs as an NPU operator
(:mod:`npudispatch.operators.quantize`), so quantization never splits a partition; nodes with
parameters the NPU cannot take (float8, non-constant scales...) are declined per node with the
reason and run on the CPU.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from npudispatch.domains import is_onnx_domain
from npudispatch.operators import registry
from npudispatch.operators.base import Decline
from npudispatch.operators.quantize import dequantize, expand_param, quantize
from npudispatch.operators.weights import pack_nibbles
from npudispatch.opset import DOMAIN, VERSION
from npudispatch.opset_quant import (
    CHAIN,
    QDQ_OPS,
    WEIGHT_AXIS,
    WEIGHT_BLOCK,
    weight_form_overload,
)
from npudispatch.rewrites._checks import const_array
from npudispatch.rewrites.matmul import qmatmul_rule
from npudispatch.rewrites.qdq_common import (
    SHAPE_VIEWS,
    Namer,
    QdqReport,
    input_at,
    is_op,
    new_initializer,
    qparams_of,
    quantization_summary,
    single_reader,
)
from npudispatch.rewrites.qdq_operands import (
    exact_dq,
    fused_attrs,
    gemm_weights_along_axis_0,
    starts_chain,
    weight_form_dq,
    zero_bias_dq,
)

__all__ = ["QdqPass", "QdqReport", "quantization_summary", "run_qdq_rewrites"]

# ---- 1. Q of constants ------------------------------------------------------------------------


def _const_or_view_of_const(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value``, looking through a Reshape/Flatten/Squeeze/Unsqueeze of a
    constant with a static output shape (exporters reshape per-channel parameters this way)."""
    arr = const_array(value)
    if arr is not None or value is None:
        return arr
    view = value.producer()
    if view is None or view.op_type not in SHAPE_VIEWS or not is_onnx_domain(view.domain):
        return None
    src = const_array(view.inputs[0])
    shape = value.shape
    if src is None or shape is None or not shape.is_static():
        return None
    return src.reshape(tuple(int(d) for d in shape))


def _fold_quantize(graph: ir.Graph, namer: Namer, report: QdqReport) -> None:
    for node in list(graph):
        if not is_op(node, "QuantizeLinear"):
            continue
        x = _const_or_view_of_const(node.inputs[0])
        out = node.outputs[0]
        params = qparams_of(node, out.dtype)
        if x is None or params is None or x.dtype != np.float32 or out.is_graph_output():
            continue
        axis = params.axis % max(x.ndim, 1)
        scale = expand_param(params.scale, x.shape, axis, params.block, 1.0)
        zp = expand_param(params.zp.astype(np.int64), x.shape, axis, params.block, 0)
        q = quantize(x, scale, zp, params.zp.dtype)
        out.replace_all_uses_with(new_initializer(graph, namer, f"{out.name}__const", q))
        graph.remove(node, safe=True)
        report.counts["fold_quantize"] += 1


# ---- 2/7. unique DQ readers and merging them back --------------------------------------------


def _unique_dq(graph: ir.Graph, namer: Namer, report: QdqReport) -> None:
    for node in list(graph):
        if not is_op(node, "DequantizeLinear"):
            continue
        out = node.outputs[0]
        for reader, idx in out.uses()[1:]:
            copy = ir.node(
                "DequantizeLinear",
                list(node.inputs),
                {k: a.value for k, a in node.attributes.items()},
                name=namer(f"{node.name}__dup"),
            )
            new = copy.outputs[0]
            new.name, new.type, new.shape = namer(f"{out.name}__dup"), out.type, out.shape
            graph.insert_after(node, copy)
            reader.replace_input_with(idx, new)
            report.counts["unique_dq"] += 1


def _dq_key(node: ir.Node) -> tuple:
    attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
    return (*[id(v) if v is not None else None for v in node.inputs], attrs)


def _merge_dq(graph: ir.Graph, report: QdqReport) -> None:
    seen: dict[tuple, ir.Node] = {}
    for node in list(graph):
        if not is_op(node, "DequantizeLinear") or node.outputs[0].is_graph_output():
            continue
        first = seen.setdefault(_dq_key(node), node)
        if first is node:
            continue
        node.outputs[0].replace_all_uses_with(first.outputs[0])
        graph.remove(node, safe=True)
        report.counts["merge_dq"] += 1


# ---- 3. QDQ around views ----------------------------------------------------------------------


def _views(graph: ir.Graph, report: QdqReport) -> None:
    for view in list(graph):
        if view.op_type not in SHAPE_VIEWS or not is_onnx_domain(view.domain) or not view.inputs:
            continue
        src = view.inputs[0]
        dq = src.producer() if src is not None else None
        q = single_reader(view.outputs[0])
        if not (is_op(dq, "DequantizeLinear") and is_op(q, "QuantizeLinear")):
            continue
        assert dq is not None and q is not None
        if single_reader(dq.outputs[0]) is not view or q.outputs[0].is_graph_output():
            continue
        x = dq.inputs[0]
        pd, pq = qparams_of(dq, x.dtype), qparams_of(q, q.outputs[0].dtype)
        if pd is None or pq is None or not pd.same(pq) or x.dtype != q.outputs[0].dtype:
            continue
        out = view.outputs[0]
        view.replace_input_with(0, x)
        out.type = ir.TensorType(x.dtype)
        q.outputs[0].replace_all_uses_with(out)
        graph.remove([q, dq], safe=True)
        report.counts["views"] += 1


def _dq_after_output_views(graph: ir.Graph, namer: Namer, report: QdqReport) -> None:
    """``view(DQ(x))`` producing a graph output becomes ``DQ(view(x))`` (a per-tensor DQ: the
    same values): the output comes straight from the DequantizeLinear, on its grid, instead of
    from a float view the precision pass would store in bf16 (a third of a step lost at 8
    bits)."""
    for view in reversed(list(graph)):  # last view first: a chain of views moves whole
        if view.op_type not in SHAPE_VIEWS or not is_onnx_domain(view.domain) or not view.inputs:
            continue
        out, src = view.outputs[0], view.inputs[0]
        dq = src.producer() if src is not None else None
        if not out.is_graph_output() or not is_op(dq, "DequantizeLinear"):
            continue
        assert dq is not None and src is not None
        x = dq.inputs[0]
        p = qparams_of(dq, x.dtype)
        if p is None or not p.per_tensor or single_reader(src) is not view:
            continue
        attrs = {k: a.value for k, a in view.attributes.items()}
        moved = ir.node(view.op_type, [x, *view.inputs[1:]], attrs, name=namer(f"{view.name}__q"))
        moved.outputs[0].name = namer(f"{out.name}__q")
        moved.outputs[0].type, moved.outputs[0].shape = x.type, out.shape
        new_dq = ir.node(
            "DequantizeLinear",
            [moved.outputs[0], *dq.inputs[1:]],
            {k: a.value for k, a in dq.attributes.items()},
            name=namer(f"{dq.name}__after_view"),
        )
        new_dq.outputs[0].type, new_dq.outputs[0].shape = out.type, out.shape
        graph.insert_after(view, [moved, new_dq])
        name = out.name
        out.replace_all_uses_with(new_dq.outputs[0], replace_graph_outputs=True)
        graph.remove([view, dq], safe=True)
        out.name = None
        new_dq.outputs[0].name = name
        report.counts["dq_after_view"] += 1


# ---- 4. DQ -> Q chains ------------------------------------------------------------------------


def _dq_q(graph: ir.Graph, namer: Namer, report: QdqReport) -> None:
    for q in list(graph):
        if not is_op(q, "QuantizeLinear") or q.inputs[0] is None:
            continue
        dq = q.inputs[0].producer()
        if not is_op(dq, "DequantizeLinear") or single_reader(dq.outputs[0]) is not q:
            continue
        assert dq is not None
        x, y = dq.inputs[0], q.outputs[0]
        pd, pq = qparams_of(dq, x.dtype), qparams_of(q, y.dtype)
        if pd is None or pq is None:
            continue
        if pd.same(pq) and x.dtype == y.dtype and not y.is_graph_output():
            y.replace_all_uses_with(x)
            graph.remove([q, dq], safe=True)
            report.counts["dq_q_identity"] += 1
        elif (
            pd.per_tensor
            and pq.per_tensor
            and _fuse(graph, namer, [("Identity", {})], [dq], q, [], report)
        ):
            report.counts["dq_q_requantize"] += 1


# ---- 5/6. DQ -> op -> Q ----------------------------------------------------------------------


def _zero_point(graph: ir.Graph, namer: Namer, node: ir.Node, base: str) -> ir.Value:
    zp = input_at(node, 2)
    if zp is not None:
        return zp
    dtype = (node.outputs[0] if is_op(node, "QuantizeLinear") else node.inputs[0]).dtype
    assert dtype is not None
    return new_initializer(graph, namer, base, np.zeros((), dtype.numpy()))


def _fuse(
    graph: ir.Graph,
    namer: Namer,
    stages: list[tuple[str, dict]],
    dqs: list[ir.Node],
    q: ir.Node,
    remove: list[ir.Node],
    report: QdqReport,
    form: dict | None = None,
) -> bool:
    """Replace ``Q(stage_n(...stage_0(DQ...)))`` by ``npudispatch.QDQ<op>`` (one stage, with
    its weight's ``form`` attributes if any) or ``npudispatch.QDQChain`` if the operator
    library takes the fused node."""
    if len(stages) == 1:
        inner, attrs = stages[0]
        op_type = QDQ_OPS[inner].name
    else:
        op_type = CHAIN
        overload = ".".join(inner for inner, _ in stages)
        attrs = {"stages": overload}
        for k, (_, own) in enumerate(stages):
            attrs |= {f"s{k}_{n}": v for n, v in own.items()}
    attrs = {**attrs, **(form or {})}
    inputs: list[ir.Value] = []
    for dq in dqs:
        zp = _zero_point(graph, namer, dq, f"{dq.name}__zp")
        inputs += [dq.inputs[0], dq.inputs[1], zp]
    inputs += [q.inputs[1], _zero_point(graph, namer, q, f"{q.name}__zp")]
    fused = ir.node(
        op_type,
        inputs,
        attrs,
        domain=DOMAIN,
        version=VERSION,
        name=namer(f"{q.name}__{op_type}"),
    )
    if op_type == CHAIN:  # the function body onnxruntime runs
        fused.overload = (
            attrs["stages"]
            if not form
            else weight_form_overload(form[WEIGHT_AXIS], form[WEIGHT_BLOCK], attrs["stages"])
        )
    y, out = q.outputs[0], fused.outputs[0]
    out.type, out.shape = y.type, y.shape
    out.metadata_props.update(y.metadata_props)
    if isinstance(registry.match(fused), Decline):
        for i in range(len(fused.inputs)):
            fused.replace_input_with(i, None)
        return False
    graph.insert_before(q, fused)
    name = y.name
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove([q, *remove], safe=True)
    for dq in dqs:  # now unread
        if dq.graph is graph and not dq.outputs[0].uses():
            graph.remove(dq, safe=True)
    y.name = None
    out.name = name
    report.fused_ops[op_type] += 1
    return True


MAX_CHAIN = 4
"""Most float ops fused between one set of DQs and one Q (decomposed norms need 2-3)."""


def _stage(node: ir.Node | None, reader: ir.Node, opset: int) -> tuple[str, dict] | None:
    """``(op, attrs)`` when ``node`` is a standard op with a quantized form whose only reader
    is ``reader``, else None."""
    if node is None or not is_onnx_domain(node.domain) or node.graph is None:
        return None
    spec = QDQ_OPS.get(node.op_type)
    if spec is None or spec.inner == "Identity" or opset < spec.min_opset:
        return None
    if single_reader(node.outputs[0]) is not reader or any(v.uses() for v in node.outputs[1:]):
        return None
    required = spec.arity - len(spec.optional)
    if len(node.inputs) < required or any(v is None for v in node.inputs[:required]):
        return None
    attrs = fused_attrs(node, opset)
    return None if attrs is None else (spec.inner, attrs)


def _operand_dq(
    graph: ir.Graph,
    namer: Namer,
    value: ir.Value,
    reader: ir.Node,
    made: list[ir.Node],
    per_axis: bool = False,
    axis: int = 0,
) -> ir.Node | None:
    """The per-tensor DQ feeding ``value`` to ``reader`` only (``per_axis``: or per channel
    along ``axis``), or an exact DQ of a scalar (``per_axis``: or of a 1-d constant)."""
    dq = value.producer()
    if is_op(dq, "DequantizeLinear") and single_reader(value) is reader:
        assert dq is not None
        p = qparams_of(dq, dq.inputs[0].dtype)
        rank = len(dq.inputs[0].shape or ()) or 1
        along = p is not None and p.scale.ndim == 1 and not p.block and p.axis % rank == axis
        if p is not None and (p.per_tensor or (per_axis and along)):
            return dq
    exact = exact_dq(graph, namer, value, reader, per_axis)
    if exact is not None:
        made.append(exact)
    return exact


def _fuse_ops(graph: ir.Graph, namer: Namer, opset: int, report: QdqReport) -> None:
    """Walk back from every per-tensor Q through up to :data:`MAX_CHAIN` quantized-form ops
    (following input 0) to DQs; fuse the longest chain whose operands are all DQs."""
    for q in list(graph):
        if q.graph is not graph or not is_op(q, "QuantizeLinear") or q.inputs[0] is None:
            continue
        pq = qparams_of(q, q.outputs[0].dtype)
        if pq is None or not pq.per_tensor:
            continue
        chain: list[tuple[ir.Node, tuple[str, dict]]] = []
        reader, value = q, q.inputs[0]
        while len(chain) < MAX_CHAIN:
            node = value.producer()
            stage = _stage(node, reader, opset)
            if stage is None:
                break
            assert node is not None
            chain.insert(0, (node, stage))
            if starts_chain(node, QDQ_OPS[stage[0]]):
                break  # only the chain's first stage may read per-channel operands
            reader, value = node, node.inputs[0]
        # Longest fusable chain first: its first op's input 0 and every other operand are DQs.
        while chain:
            made: list[ir.Node] = []
            dqs: list[ir.Node] = []
            form: dict | None = None
            ok = True
            for k, (node, (inner, _)) in enumerate(chain):
                first = 0 if k == 0 else 1
                spec = QDQ_OPS[inner]
                for j in range(first, spec.arity):
                    v = input_at(node, j)
                    per_axis = k == 0 and j in spec.per_axis
                    if v is None and j in spec.optional:
                        dq = zero_bias_dq(graph, namer, node)
                        if dq is not None:
                            made.append(dq)
                    else:
                        dq = (
                            None
                            if v is None
                            else _operand_dq(graph, namer, v, node, made, per_axis, spec.axis_of(j))
                        )
                    if dq is None and v is not None and k == 0 and j == spec.weight:
                        found = weight_form_dq(v, node)  # a weight along another axis, blocked
                        dq, form = found if found is not None else (None, None)
                    if dq is None:
                        ok = False
                        break
                    dqs.append(dq)
                if not ok:
                    break
            nodes = [n for n, _ in chain]
            if ok and _fuse(graph, namer, [st for _, st in chain], dqs, q, nodes, report, form):
                break
            for extra in made:  # not fused: drop the exact DQs made for it
                if not extra.outputs[0].uses():
                    graph.remove(extra, safe=True)
            chain = chain[1:]  # retry without the first op (its inputs were not all DQs)


# ---- 8. block-quantized 4-bit weights -> MatMulNBits ------------------------------------------

NBITS_BLOCKS = (16, 32, 64, 128)


def _nbits(graph: ir.Graph, namer: Namer, report: QdqReport) -> None:
    """``MatMul(a, DQ(W))`` with a constant 4-bit ``W [K, N]`` quantized in blocks along K
    (``axis=0``, ``block_size`` 16..128) becomes ``com.microsoft.MatMulNBits``: the weight stays
    4-bit and is formatted at compile time. Codes are shifted to unsigned (``int4 + 8``) with
    the zero point shifted alike, so ``(code - zp) * scale`` is unchanged."""
    for dq in list(graph):
        if not is_op(dq, "DequantizeLinear") or dq.outputs[0].is_graph_output():
            continue
        w = const_array(dq.inputs[0])
        qtype = dq.inputs[0].dtype
        if w is None or w.ndim != 2 or qtype not in (ir.DataType.INT4, ir.DataType.UINT4):
            continue
        params = qparams_of(dq, qtype)
        if params is None or params.block not in NBITS_BLOCKS or params.axis % 2 != 0:
            continue
        k, n = w.shape
        k_blocks = -(-k // params.block)
        if params.scale.shape != (k_blocks, n):
            continue
        readers = dq.outputs[0].uses()
        if not readers or any(
            not is_op(r, "MatMul")
            or i != 1
            or r.inputs[0] is None
            or r.inputs[0].dtype != ir.DataType.FLOAT
            for r, i in readers
        ):
            continue
        shift = 8 if qtype == ir.DataType.INT4 else 0
        codes = np.zeros((n, k_blocks * params.block), np.uint8)
        codes[:, :k] = (w.astype(np.int16) + shift).T
        zps = (params.zp.astype(np.int16) + shift).T.astype(np.uint8)  # [N, k_blocks]
        base = dq.inputs[0].name or "w"
        b_val = new_initializer(
            graph, namer, f"{base}__nbits", pack_nibbles(codes).reshape(n, k_blocks, -1)
        )
        s_val = new_initializer(
            graph, namer, f"{base}__nbits_scales", np.ascontiguousarray(params.scale.T).reshape(-1)
        )
        inputs = [b_val, s_val]
        if not (zps == 8).all():
            inputs.append(
                new_initializer(graph, namer, f"{base}__nbits_zp", pack_nibbles(zps).reshape(-1))
            )
        for reader, _ in readers:
            node = ir.node(
                "MatMulNBits",
                [reader.inputs[0], *inputs],
                {"K": k, "N": n, "bits": 4, "block_size": params.block},
                domain="com.microsoft",
                version=1,
                name=namer(f"{reader.name}__nbits"),
            )
            out, y = node.outputs[0], reader.outputs[0]
            out.type, out.shape = y.type, y.shape
            out.metadata_props.update(y.metadata_props)
            if isinstance(registry.match(node), Decline):
                for i in range(len(node.inputs)):
                    node.replace_input_with(i, None)
                continue
            graph.insert_before(reader, node)
            name = y.name
            y.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(reader, safe=True)
            y.name = None
            out.name = name
            report.counts["nbits"] += 1
        if not dq.outputs[0].uses():
            graph.remove(dq, safe=True)


# ---- 9. DQ of constants ----------------------------------------------------------------------


def _fold_dequantize(graph: ir.Graph, namer: Namer, report: QdqReport) -> None:
    for node in list(graph):
        if not is_op(node, "DequantizeLinear"):
            continue
        x = const_array(node.inputs[0])
        out = node.outputs[0]
        params = qparams_of(node, node.inputs[0].dtype)
        if x is None or params is None or out.is_graph_output() or out.dtype != ir.DataType.FLOAT:
            continue
        axis = params.axis % max(x.ndim, 1)
        scale = expand_param(params.scale, x.shape, axis, params.block, 1.0)
        zp = expand_param(params.zp.astype(np.int64), x.shape, axis, params.block, 0)
        value = new_initializer(graph, namer, f"{out.name}__const", dequantize(x, scale, zp))
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        report.counts["fold_dequantize"] += 1


def _remove_unused_initializers(graph: ir.Graph, before: set[str]) -> None:
    for name in list(graph.initializers):
        v = graph.initializers[name]
        if name not in before and not v.uses() and not v.is_graph_output():
            graph.initializers.pop(name)


def run_qdq_rewrites(model: ir.Model) -> QdqReport:
    """Run the QDQ steps (module docstring) on ``model`` in place; returns what they did."""
    graph = model.graph
    report = QdqReport()
    if not any(is_op(n, "QuantizeLinear") or is_op(n, "DequantizeLinear") for n in graph):
        return report
    opset = model.opset_imports.get("", 1)
    before = set(graph.initializers)
    namer = Namer(graph)
    _fold_quantize(graph, namer, report)
    _unique_dq(graph, namer, report)
    _views(graph, report)
    _dq_after_output_views(graph, namer, report)
    _dq_q(graph, namer, report)
    count = pattern.RewriteRuleSet([qmatmul_rule]).apply_to_model(model)
    if count:
        report.fused_ops["QMatMul"] += count
        report.counts["qmatmul"] += count
        namer = Namer(graph)
    if opset >= 13:  # per-channel DQs exist from opset 13
        gemm_weights_along_axis_0(graph, namer, report)
    _fuse_ops(graph, namer, opset, report)
    report.counts["fused"] += sum(v for k, v in report.fused_ops.items() if k != "QMatMul")
    _merge_dq(graph, report)
    _nbits(graph, namer, report)
    _fold_dequantize(graph, namer, report)
    _remove_unused_initializers(graph, before)
    if report.fused_ops:
        model.opset_imports.setdefault(DOMAIN, VERSION)
    if report.counts["nbits"]:
        model.opset_imports.setdefault("com.microsoft", 1)
    return report


class QdqPass(ir.passes.InPlacePass):
    """onnx_ir in-place pass wrapping :func:`run_qdq_rewrites`; ``report`` holds the last run's."""

    def __init__(self) -> None:
        super().__init__()
        self.report: QdqReport | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = run_qdq_rewrites(model)
        return ir.passes.PassResult(model, self.report.modified)
