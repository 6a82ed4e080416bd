"""MatMul fusions: MatMul + Add(bias) -> npudispatch.MatMulBias; Q/DQ around MatMul -> QMatMul."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from npudispatch.opset import DOMAIN, VERSION
from npudispatch.rewrites._checks import const_array, fail_unless_float, rank

# ---------------------------------------------------------------------------------- MatMulBias


def _bias_pattern(op, a, b, bias):
    return op.Add(op.MatMul(a, b), bias)


def _bias_check(context, a, b, bias, **_):
    r = pattern.MatchResult()
    if not fail_unless_float(r, a, b, bias):
        return r
    if const_array(bias) is None:
        return r.fail(f"bias {bias.name!r} is not a constant", bias)
    if bias.shape is None or bias.shape.rank() != 1:
        return r.fail(f"bias {bias.name!r} has shape {bias.shape}, [N] required", bias)
    if b.shape is None or b.shape.rank() < 2 or b.shape[-1] != bias.shape[0]:
        return r.fail(f"bias {bias.name!r} length does not match N of {b.name!r} {b.shape}", b)
    return r


def _bias_rewrite(op, a, b, bias):
    return op.MatMulBias(a, b, bias, _domain=DOMAIN, _version=VERSION)


matmul_bias_rule = pattern.RewriteRule(
    _bias_pattern, _bias_rewrite, _bias_check, name="FuseMatMulBias"
)

# ------------------------------------------------------------------------------------ QMatMul

_A_TYPES = {ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.INT8, ir.DataType.INT16}
_B_TYPES = {ir.DataType.INT8, ir.DataType.UINT8}


def _qmm_pattern(op, a, a_scale, b, b_scale, y_scale):
    af = op.DequantizeLinear(a, a_scale, _allow_other_inputs=True, _outputs=["af"])
    bf = op.DequantizeLinear(b, b_scale, _allow_other_inputs=True, _outputs=["bf"])
    y = op.MatMul(af, bf)
    return op.QuantizeLinear(y, y_scale, _allow_other_inputs=True, _outputs=["yq"])


def _zero_point(value: ir.Value) -> ir.Value | None:
    node = value.producer()
    return node.inputs[2] if len(node.inputs) > 2 else None


def _is_scalar(v: ir.Value | None) -> bool:
    arr = const_array(v)
    return arr is not None and arr.size == 1


def _qmm_check(context, a, a_scale, b, b_scale, y_scale, af, bf, yq, **_):
    r = pattern.MatchResult()
    if a.dtype not in _A_TYPES:
        return r.fail(f"activation {a.name!r} is {a.dtype}, (u)int8/(u)int16 required", a)
    if b.dtype not in _B_TYPES:
        return r.fail(f"weight {b.name!r} is {b.dtype}, int8/uint8 required", b)
    if rank(b) != 2:
        return r.fail(f"weight {b.name!r} has shape {b.shape}, 2-D [K, N] required", b)
    for node in (af.producer(), bf.producer(), yq.producer()):
        if node.attributes.get_int("block_size", 0):
            return r.fail(f"{node.name!r} uses blocked quantization (block_size)", node)
    for v, what in ((a_scale, "a_scale"), (y_scale, "y_scale")):
        if not _is_scalar(v):
            return r.fail(f"{what} {v.name!r} must be a one-element constant", v)
    for v, what in ((_zero_point(af), "a_zero_point"), (_zero_point(yq), "y_zero_point")):
        if v is not None and not _is_scalar(v):
            return r.fail(f"{what} {v.name!r} must be a one-element constant", v)
    n = b.shape[1]
    b_zp = _zero_point(bf)
    bs = const_array(b_scale)
    if bs is None:
        return r.fail(f"b_scale {b_scale.name!r} must be a constant", b_scale)
    if bs.size != 1:
        axis = bf.producer().attributes.get_int("axis", 1)
        if bs.ndim != 1 or not isinstance(n, int) or bs.size != n or axis not in (1, -1):
            return r.fail(
                f"b_scale {b_scale.name!r} shape {bs.shape} with axis {axis}: per-tensor or "
                f"per-column [N={n}] along axis 1 required",
                b_scale,
            )
    if b_zp is not None:
        zp = const_array(b_zp)
        if zp is None or zp.size != bs.size:
            return r.fail(
                f"b_zero_point {b_zp.name!r} must be a constant shaped like b_scale", b_zp
            )
    return r


def _zp_or_zero(op, zp: ir.Value | None, dtype: ir.DataType, like: np.ndarray | None = None):
    if zp is not None:
        return zp
    zeros = np.zeros(() if like is None else like.shape, dtype.numpy())
    return op.Constant(value=ir.tensor(zeros))


def _qmm_rewrite(op, a, a_scale, b, b_scale, y_scale, af, bf, yq, **_):
    a_zp = _zp_or_zero(op, _zero_point(af), a.dtype)
    b_zp = _zp_or_zero(op, _zero_point(bf), b.dtype, const_array(b_scale))
    # QuantizeLinear without a zero point produces uint8 (its output dtype says which).
    y_zp = _zp_or_zero(op, _zero_point(yq), yq.dtype or ir.DataType.UINT8)
    return op.QMatMul(
        a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, _domain=DOMAIN, _version=VERSION
    )


qmatmul_rule = pattern.RewriteRule(_qmm_pattern, _qmm_rewrite, _qmm_check, name="FuseQMatMul")


def matmul_rules() -> pattern.RewriteRuleSet:
    """QMatMul first (its MatMul must not be taken by MatMulBias), then MatMulBias."""
    return pattern.RewriteRuleSet([qmatmul_rule, matmul_bias_rule], commute=True)
