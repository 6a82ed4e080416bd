"""Quantized MatMul: npudispatch.QMatMul (from QDQ graphs) and standard QLinearMatMul.

``y = QuantizeLinear(DequantizeLinear(a) @ DequantizeLinear(b), y_scale, y_zp)`` with
``a`` uint8/uint16 or int8/int16 (per-tensor scale and zero point), constant ``b`` int8/uint8
``[K, N]`` with a per-tensor or per-column (``[N]``) scale and zero point, and ``y`` of those
activation types (a8w8, a16w8, and the symmetric int8/int16-activation recipes).
QLinearMatMul has the same inputs in the same order and the same math.

Kernel: integer accumulate ``Σ_k (a - a_zp)(b - b_zp[n])`` (exact: done in float64, whose 53-bit
mantissa holds every such sum for K < 2^20), then requantize in float32 like onnxruntime's
QuantizeLinear: ``rint(acc · a_scale · b_scale[n] / y_scale) + y_zp`` (round half to even),
saturated to the output type.

Const region: the 8-bit tile image (:func:`weights.format_int8`), then one coefficient part
``[b_scale float32 [Np], b_zp int32 [Np]]``. Per-tensor ``a_scale``/``y_scale`` travel as record
floats; ``a_zp``/``y_zp`` as record dims: ``[0, K, N, stripes, 0, a_zp, y_zp]``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    TensorSpec,
    const_array,
    node_config,
    tensor_spec,
)
from npudispatch.operators.dtypes import F32
from npudispatch.operators.matmul import TiledMatMul, TiledOperands, fit, real_dim
from npudispatch.operators.weights import (
    TileLayout,
    decode_int8,
    format_int8,
    int8_layout,
)

ACT_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int8, np.int16))
WEIGHT_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8))


def requantize(x: np.ndarray, y_scale: float, y_zp: int, dtype: np.dtype) -> np.ndarray:
    """QuantizeLinear: ``rint(x / y_scale) + y_zp`` (half to even), saturated to ``dtype``."""
    info = np.iinfo(dtype)
    q = np.rint(np.asarray(x, F32) / np.float32(y_scale)) + np.float32(y_zp)
    return np.clip(q, info.min, info.max).astype(dtype)


def _scalar(node: ir.Node, i: int, what: str) -> np.ndarray | Decline:
    arr = const_array(node.inputs[i] if i < len(node.inputs) else None)
    if arr is None:
        return Decline(f"{what} (input {i}) must be a constant initializer")
    if arr.size != 1:
        return Decline(f"{what} must be per-tensor (a scalar), got shape {arr.shape}")
    return arr.reshape(())


def _per_tensor_coefficients(node: ir.Node, a_dtype: np.dtype) -> dict[int, np.ndarray]:
    """a_scale (1), a_zero_point (2), y_scale (6), y_zero_point (7) as scalars; raises a Decline
    unless they are constant, per-tensor, float32 scales and an a_zero_point of a's dtype."""
    scalars = {}
    for i, what in ((1, "a_scale"), (2, "a_zero_point"), (6, "y_scale"), (7, "y_zero_point")):
        scalars[i] = Decline.check(_scalar(node, i, what))
    for i, what in ((1, "a_scale"), (4, "b_scale"), (6, "y_scale")):
        arr = const_array(node.inputs[i])
        if arr is not None and arr.dtype != np.float32:
            # A bf16 scale (the precision pass tries one) moves the quantization grid.
            raise Decline(f"{what} is {arr.dtype}: float32 scales only")
    if scalars[2].dtype != a_dtype:
        raise Decline(f"a_zero_point dtype {scalars[2].dtype} differs from a ({a_dtype})")
    return scalars


def _per_column_coefficients(node: ir.Node, n: int, b_dtype: np.dtype) -> dict[int, np.ndarray]:
    """b_scale (4) and b_zero_point (5) broadcast to N columns; raises a Decline unless they are
    constant, per-tensor or per-column, with a b_zero_point of b's dtype."""
    col = {}
    for i, what in ((4, "b_scale"), (5, "b_zero_point")):
        arr = const_array(node.inputs[i])
        if arr is None:
            raise Decline(f"{what} must be a constant initializer")
        if arr.size not in (1, n):
            raise Decline(f"{what} has {arr.size} elements: per-tensor or per-column (N={n})")
        col[i] = np.broadcast_to(arr.reshape(-1), (n,))
    if col[5].dtype != b_dtype:
        raise Decline(f"b_zero_point dtype {col[5].dtype} differs from b ({b_dtype})")
    return col


class QMatMul(TiledMatMul):
    """npudispatch.QMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp) -> y."""

    domain = "npudispatch"
    op_type = "QMatMul"
    kernel_id = 120

    def match(self, node: ir.Node) -> OpConfig | Decline:
        """(u)int8/(u)int16 a, constant int8/uint8 b [K, N], constant scales/zero points."""
        if len(node.inputs) < 8 or any(v is None for v in node.inputs[:8]):
            return Decline(f"{node.op_type} needs all 8 inputs (zero points included)")
        a = Decline.check(tensor_spec(node.inputs[0], "input a"))
        if a.dtype not in ACT_DTYPES:
            return Decline(f"activation dtype {a.dtype}: supported are (u)int8 and (u)int16")
        if const_array(node.inputs[0]) is not None:
            return Decline("input a is constant: fold on the CPU")
        b = const_array(node.inputs[3])
        if b is None:
            return Decline("weight b is not a constant initializer")
        if b.dtype not in WEIGHT_DTYPES or b.ndim != 2:
            return Decline(f"weight b must be a 2-d int8/uint8 constant, got {b.dtype} {b.shape}")
        k, n = b.shape
        if real_dim(a, -1) != k:
            return Decline(f"a's last axis is {real_dim(a, -1)} but b has K={k}")
        scalars = _per_tensor_coefficients(node, a.dtype)
        col = _per_column_coefficients(node, n, b.dtype)
        out = Decline.check(tensor_spec(node.outputs[0], "output y"))
        if out.dtype not in ACT_DTYPES or out.dtype != scalars[7].dtype:
            return Decline(
                f"output dtype {out.dtype} must be (u)int8/(u)int16 and match y_zero_point"
            )
        specs: list[TensorSpec | None] = [a]
        consts: dict[int, np.ndarray] = {}
        for i in range(1, 8):
            arr = b if i == 3 else const_array(node.inputs[i])
            assert arr is not None
            specs.append(TensorSpec(tuple(arr.shape), arr.dtype))
            consts[i] = arr
        extra = {
            "K": k,
            "N": n,
            "a_scale": float(scalars[1]),
            "a_zp": int(scalars[2]),
            "y_scale": float(scalars[6]),
            "y_zp": int(scalars[7]),
            "b_scale": col[4].astype(F32),
            "b_zp": col[5].astype(np.int32),
        }
        return node_config(self, node, specs, [out], consts=consts, attrs={}, extra=extra)

    def layout(self, cfg: OpConfig) -> TileLayout:
        """8-bit tiles."""
        return int8_layout(cfg.extra["K"], cfg.extra["N"])

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """8-bit image, then ``[b_scale f32 [Np], b_zp i32 [Np]]``."""
        layout = self.layout(cfg)
        n, np_ = cfg.extra["N"], layout.np_
        coeff = np.zeros(2 * np_, dtype="<u4")
        coeff[:n] = cfg.extra["b_scale"].astype("<f4").view("<u4")
        coeff[np_ : np_ + n] = cfg.extra["b_zp"].astype("<i4").view("<u4")
        return [format_int8(cfg.consts[3]), coeff]

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """``[0, K, N, stripes, 0, a_zp, y_zp]``."""
        return [*super().op_dims(cfg), cfg.extra["a_zp"], cfg.extra["y_zp"]]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        """``[a_scale, y_scale]``."""
        return [cfg.extra["a_scale"], cfg.extra["y_scale"]]

    def compute_tiled(self, t: TiledOperands) -> list[np.ndarray]:
        """Integer accumulate on the decoded image, float32 requantization."""
        k, n, (a_zp, y_zp), (a_scale, y_scale) = t.k, t.n, t.dims[5:7], t.floats[:2]
        w_spec = t.table.inputs[3][1]
        assert w_spec is not None
        np_ = int8_layout(k, n).np_
        b_scale = t.parts[1][: 4 * np_].view("<f4")[:n]
        b_zp = t.parts[1][4 * np_ : 8 * np_].view("<i4")[:n]
        w = decode_int8(t.parts[0], k, n, w_spec.dtype, t.stripes)[:k, :n]
        a = t.acts[0][..., :k].astype(np.float64) - a_zp
        acc = a @ (w.astype(np.float64) - b_zp)  # exact integer sums (see module doc)
        real = acc.astype(F32) * (np.float32(a_scale) * b_scale)
        return [fit(requantize(real, y_scale, y_zp, t.out.dtype), t.out.shape)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """DequantizeLinear → float32 MatMul → QuantizeLinear (ONNX semantics)."""
        a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = inputs
        da = (np.asarray(a, F32) - np.float32(a_zp)) * np.float32(a_s)
        db = (np.asarray(b, F32) - np.asarray(b_zp, F32)) * np.asarray(b_s, F32)
        y = np.matmul(da, db)
        return [requantize(y, float(y_s), int(y_zp), cfg.outputs[0].dtype)]


class QLinearMatMul(QMatMul):
    """ONNX QLinearMatMul (same inputs and math as QMatMul), 2-d constant int8/uint8 b."""

    domain = ""
    op_type = "QLinearMatMul"
    kernel_id = 121


__all__ = ["QLinearMatMul", "QMatMul", "requantize"]
