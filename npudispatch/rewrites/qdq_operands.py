"""Operands and attributes of the fused quantized ops, as the QDQ rewrites
(:mod:`npudispatch.rewrites.qdq`) build them: exact DequantizeLinear forms of float constants
and of an absent bias, the fused op's attributes from the float node (window attributes spelled
out for the function bodies, a ConvTranspose ``output_shape`` as explicit pads), which ops may
only start a fused chain, and a Gemm weight quantized along axis 1 turned to the fused form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import Decline, op_label
from npudispatch.operators.conv import ConvTranspose
from npudispatch.operators.quantize import dequantize
from npudispatch.opset_quant import QDQ_OPS, WEIGHT_AXIS, WEIGHT_BLOCK, QuantizedOp
from npudispatch.rewrites._checks import const_array
from npudispatch.rewrites.qdq_common import (
    Namer,
    QdqReport,
    input_at,
    is_op,
    new_initializer,
    qparams_of,
    single_reader,
)

__all__ = [
    "exact_dq",
    "fused_attrs",
    "gemm_weights_along_axis_0",
    "starts_chain",
    "weight_form_dq",
    "zero_bias_dq",
]

# Weight types a fused op dequantizes in another form. A 4-bit weight blocked along K inside a
# DQ -> MatMul -> Q group is fused too: MatMulNBits (what a weight-only MatMul(a, DQ(W)) becomes,
# rewrites/qdq.py step 8) computes in bf16, up to ~80 steps off at 16-bit activations.
_FORM_TYPES = {
    ir.DataType.INT8,
    ir.DataType.UINT8,
    ir.DataType.INT16,
    ir.DataType.UINT16,
    ir.DataType.INT4,
    ir.DataType.UINT4,
}


def exact_dq(
    graph: ir.Graph, namer: Namer, value: ir.Value, before: ir.Node, per_axis: bool = False
) -> ir.Node | None:
    """A DQ equal to a float32 constant exactly: ``q = sign(c)`` (int8), ``scale = |c|``
    (1 where c is 0), zero point 0 - per tensor for a scalar, per channel (axis 0) for a 1-d
    constant where the reader allows it (``per_axis``)."""
    arr = const_array(value)
    if arr is None or arr.dtype != np.float32 or not np.isfinite(arr).all():
        return None
    if arr.size != 1 and not (per_axis and arr.ndim == 1):
        return None
    q = np.sign(arr).astype(np.int8)
    scale = np.where(arr == 0, np.float32(1), np.abs(arr)).astype(np.float32)
    if arr.size == 1:
        scale = scale.reshape(())
    zp = np.zeros(scale.shape, np.int8)
    base = value.name or "const"
    node = ir.node(
        "DequantizeLinear",
        [
            new_initializer(graph, namer, f"{base}__q", q),
            new_initializer(graph, namer, f"{base}__scale", scale),
            new_initializer(graph, namer, f"{base}__zp", zp),
        ],
        {"axis": 0} if arr.size != 1 else {},
        name=namer(f"{base}__exact_dq"),
    )
    out = node.outputs[0]
    out.name, out.type, out.shape = (
        namer(f"{base}__dq"),
        ir.TensorType(ir.DataType.FLOAT),
        value.shape,
    )
    assert np.array_equal(dequantize(q, scale, zp), arr)  # exact by construction
    graph.insert_before(before, node)
    return node


def starts_chain(node: ir.Node, spec: QuantizedOp) -> bool:
    """Whether ``node`` must be the first stage of a fused chain. Only stage 0's operands may be
    quantized per channel, so an op with an operand that is not a per-tensor DequantizeLinear
    where it takes per-channel ones (a Conv or Gemm weight, a per-row MatMul weight,
    BatchNormalization's float statistics) ends the walk back from the QuantizeLinear; a MatMul
    of two per-tensor activations can be a later stage."""
    for j in spec.per_axis:
        value = input_at(node, j)
        if value is None:
            continue
        dq = value.producer()
        p = (
            qparams_of(dq, dq.inputs[0].dtype)
            if dq is not None and is_op(dq, "DequantizeLinear")
            else None
        )
        if p is None or not p.per_tensor:
            return True
    return False


def weight_form_dq(value: ir.Value, reader: ir.Node) -> tuple[ir.Node, dict] | None:
    """The DequantizeLinear of a constant 4/8/16-bit weight feeding ``value`` to ``reader`` only,
    quantized per channel along any axis or in blocks (opset 21 ``block_size``), with the
    fused op's ``weight_axis`` / ``weight_block_size`` attributes for it; None otherwise. The
    fused kernel dequantizes such a weight in float32 as DequantizeLinear does."""
    dq = value.producer()
    if not is_op(dq, "DequantizeLinear") or single_reader(value) is not reader:
        return None
    assert dq is not None
    w = const_array(dq.inputs[0])
    p = qparams_of(dq, dq.inputs[0].dtype)
    if w is None or p is None or p.per_tensor or dq.inputs[0].dtype not in _FORM_TYPES:
        return None
    if not -w.ndim <= p.axis < w.ndim:
        return None
    axis = p.axis % w.ndim
    if p.block:
        blocked = tuple(-(-d // p.block) if i == axis else d for i, d in enumerate(w.shape))
        if p.scale.shape != blocked:
            return None
    elif p.scale.shape != (w.shape[axis],):
        return None
    return dq, {WEIGHT_AXIS: axis, WEIGHT_BLOCK: p.block}


def zero_bias_dq(graph: ir.Graph, namer: Namer, node: ir.Node) -> ir.Node | None:
    """An exact zero int32 bias ``[C]`` (C = dim 1 of the output, Conv's M or Gemm's N) for a
    Conv/Gemm without one: ``x + 0`` is ``x``, so one fused form serves both."""
    shape = node.outputs[0].shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    base = node.name or node.op_type
    dq = ir.node(
        "DequantizeLinear",
        [
            new_initializer(graph, namer, f"{base}__zero_bias", np.zeros(shape[1], np.int32)),
            new_initializer(graph, namer, f"{base}__zero_bias_scale", np.ones((), np.float32)),
            new_initializer(graph, namer, f"{base}__zero_bias_zp", np.zeros((), np.int32)),
        ],
        name=namer(f"{base}__zero_bias_dq"),
    )
    out = dq.outputs[0]
    out.name, out.type, out.shape = (
        namer(f"{base}__zero_bias_dq"),
        ir.TensorType(ir.DataType.FLOAT),
        ir.Shape([shape[1]]),
    )
    graph.insert_before(node, dq)
    return dq


def fused_attrs(node: ir.Node, opset: int) -> dict | None:
    """Attributes of the fused op from the float node, or None when it cannot be expressed."""
    op = node.op_type
    if op == "Softmax":
        axis = node.attributes.get_int("axis", 1 if opset < 13 else -1)
        if opset < 13:  # coerced to 2-D at the axis: one-axis semantics on the last axis only
            rank = len(node.inputs[0].shape or ()) if node.inputs[0] is not None else 0
            if rank == 0 or axis % rank != rank - 1:
                return None
        return {"axis": axis}
    if op == "LayerNormalization":
        if len(node.outputs) > 1 and any(v.uses() for v in node.outputs[1:]):
            return None
        if node.attributes.get_int("stash_type", 1) != 1:
            return None
        return {
            "axis": node.attributes.get_int("axis", -1),
            "epsilon": node.attributes.get_float("epsilon", 1e-5),
        }
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return None if perm is None else {"perm": list(perm)}
    if op == "ReduceMean":
        if opset < 18 or node.attributes.get_int("noop_with_empty_axes", 0):
            return None
        axes = node.attributes.get_ints("axes", None)
        if axes is None:
            arr = const_array(input_at(node, 1))
            if arr is None:
                return None
            axes = [int(a) for a in arr.reshape(-1)]
        return {"axes": list(axes), "keepdims": node.attributes.get_int("keepdims", 1)}
    if op in ("Conv", "ConvTranspose"):
        attrs = {k: a.value for k, a in node.attributes.items()}
        if op == "ConvTranspose" and "output_shape" in attrs:
            explicit = _output_shape_as_pads(node, attrs)
            if explicit is None:
                return None
            attrs = explicit
        if any(k not in QDQ_OPS[op].attributes for k in attrs) or len(node.inputs) > 3:
            return None
        w = node.inputs[1].shape if node.inputs[1] is not None else None
        if w is None or not w.is_static() or len(w) < 3:
            return None
        attrs.setdefault("kernel_shape", [int(d) for d in w[2:]])
        if op == "ConvTranspose":
            attrs.setdefault("output_padding", [0] * (len(w) - 2))
        return _window_defaults(attrs, len(w) - 2)
    spec = QDQ_OPS.get(op)
    if spec is None or any(k not in spec.attributes for k in node.attributes):
        return None  # an attribute the fused op would drop
    attrs = {k: a.value for k, a in node.attributes.items()}
    if op in ("MaxPool", "AveragePool"):
        return _window_defaults(attrs, len(attrs.get("kernel_shape") or ()))
    return attrs


def _output_shape_as_pads(node: ir.Node, attrs: dict) -> dict | None:
    """``attrs`` of a ConvTranspose with ``output_shape`` given as the explicit ``pads`` ONNX
    derives from it (``total = stride * (in - 1) + output_padding + (k - 1) * dilation + 1 -
    output_shape``; ``SAME_UPPER`` pads ``total // 2`` at the beginning and the rest at the end,
    every other auto_pad the reverse; any ``pads`` are ignored), by the ConvTranspose operator's
    own geometry (onnxruntime 1.32 splits the same way), so the fused op needs no
    ``output_shape`` (its function body cannot leave an ints attribute unset). None when the
    shapes are not static or the geometry is refused (the float ConvTranspose then declines
    with the reason)."""
    x, w = (v.shape if v is not None else None for v in node.inputs[:2])
    if x is None or w is None or not x.is_static() or not w.is_static() or len(x) != len(w):
        return None
    names = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides",
             "output_padding", "output_shape")  # fmt: skip
    geo = ConvTranspose().geometry(
        {k: attrs.get(k) for k in names},
        [int(d) for d in x],
        [int(d) for d in w],
        op_label(node),
    )
    if isinstance(geo, Decline):
        return None
    kept = {k: v for k, v in attrs.items() if k not in ("output_shape", "auto_pad")}
    return kept | {"pads": [int(p) for p in geo["pads"]]}


def _window_defaults(attrs: dict, rank: int) -> dict | None:
    """``attrs`` of a windowed op with dilations, strides (and pads without auto_pad) spelled
    out: a function body's ``@dilations`` of an absent attribute reaches onnxruntime as an
    empty list, which its shape inference rejects."""
    if rank < 1:
        return None
    attrs.setdefault("dilations", [1] * rank)
    attrs.setdefault("strides", [1] * rank)
    if attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"):
        attrs.setdefault("pads", [0] * (2 * rank))
    return attrs


def gemm_weights_along_axis_0(graph: ir.Graph, namer: Namer, report: QdqReport) -> None:
    """A Gemm whose constant 2-D ``B`` is quantized along axis 1 reads ``DQ(B^T, axis 0)`` with
    ``transB`` flipped instead: the same product (a transposed constant, folded at compile time),
    in the form the fused Gemm takes (its B per channel along axis 0). With ``transB=0`` that is
    quantize_static's per-output-channel ``B [K, N]``; with ``transB=1`` a ``B [N, K]`` quantized
    per K (along the reduction axis), which the fused op dequantizes before its float32 sum."""
    for gemm in list(graph):
        if not is_op(gemm, "Gemm") or len(gemm.inputs) < 2:
            continue
        dq = gemm.inputs[1].producer() if gemm.inputs[1] is not None else None
        if not is_op(dq, "DequantizeLinear") or single_reader(dq.outputs[0]) is not gemm:
            continue
        assert dq is not None
        w = const_array(dq.inputs[0])
        p = qparams_of(dq, dq.inputs[0].dtype)
        if w is None or w.ndim != 2 or p is None or p.block or p.scale.shape != (w.shape[1],):
            continue
        if p.axis % 2 != 1:
            continue
        base = dq.inputs[0].name or "B"
        wt = new_initializer(graph, namer, f"{base}__t", np.ascontiguousarray(w.T))
        dq.replace_input_with(0, wt)
        dq.attributes["axis"] = ir.AttrInt64("axis", 0)
        dq.outputs[0].shape = ir.Shape(wt.shape)
        trans_b = gemm.attributes.get_int("transB", 0)
        gemm.attributes["transB"] = ir.AttrInt64("transB", 1 - trans_b)
        report.counts["gemm_weight_transposed"] += 1
