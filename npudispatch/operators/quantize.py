"""QuantizeLinear and DequantizeLinear as NPU operators (ONNX semantics, opsets 10-23).

So that no Q/DQ node of a QDQ model stays on the CPU for want of a kernel, both run on the NPU:

* ``QuantizeLinear(x, y_scale, y_zero_point)``: ``y = saturate(rint(x / y_scale) + y_zp)``,
  ``rint`` rounding half to even, saturated to the output type (what onnxruntime's MLAS and its
  generic 16/4-bit paths compute: a float32 division, round to nearest even, clamp);
* ``DequantizeLinear(x, x_scale, x_zero_point)``: ``y = float32(x - x_zp) * x_scale``
  (integer subtraction, one float32 product: bit-identical to onnxruntime).

Quantized types: uint8, int8, uint16, int16, uint4, int4 (and int32 for DequantizeLinear, the
bias type, whose zero point must be 0). Scales are float32 constants, zero points constants of the
quantized type; per-tensor (one element), per-axis (``axis``, 1-d scale along it) and blocked
(opset 21+: ``block_size``, the scale has the input's rank with ``ceil(D / block_size)`` entries
along ``axis``). 4-bit values travel one per byte (ml_dtypes ``int4``/``uint4`` storage).

The float side is float32 only: a bf16 ``x`` would add a rounding before quantization (up to 64
uint16 steps), so the precision pass keeps Q/DQ float32 and bridges bf16 neighbours with exact
casts. Parameters the NPU cannot take are declined with the reason, and the node runs on the CPU:
float8/float4 types, non-constant or non-positive scales, zero points of another type or outside
the type's range, ``saturate=0``.

Kernel operands: ``x`` streamed; scale and zero point in the const region (the default
:meth:`Operator.format_consts`); record dims ``[axis, block_size]``. Along a padded axis the
kernel extends the scale with 1 and the zero point with 0 (padded lanes are zeroed on output).
"""

from __future__ import annotations

from typing import ClassVar

import ml_dtypes
import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    Operator,
    TensorSpec,
    check_node_kind,
    const_array,
    node_config,
    op_label,
    tensor_spec,
)
from npudispatch.operators.dtypes import F32

__all__ = [
    "QUANT_DTYPES",
    "DequantizeLinear",
    "QuantizeLinear",
    "dequantize",
    "expand_param",
    "quant_range",
    "quantize",
]

#: ONNX quantized types the NPU Q/DQ kernels take, with their numpy dtypes.
QUANT_DTYPES: dict[ir.DataType, np.dtype] = {
    ir.DataType.UINT8: np.dtype(np.uint8),
    ir.DataType.INT8: np.dtype(np.int8),
    ir.DataType.UINT16: np.dtype(np.uint16),
    ir.DataType.INT16: np.dtype(np.int16),
    ir.DataType.UINT4: np.dtype(ml_dtypes.uint4),
    ir.DataType.INT4: np.dtype(ml_dtypes.int4),
}
_DQ_ONLY = {ir.DataType.INT32: np.dtype(np.int32)}
_FLOAT_NARROW = {
    t
    for t in ir.DataType
    if t.name.startswith(("FLOAT8", "FLOAT4")) or t.name in ("FLOAT16", "BFLOAT16", "DOUBLE")
}


def quant_range(dtype: np.dtype) -> tuple[int, int]:
    """(min, max) of an integer quantized dtype (4-bit types included)."""
    info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


def expand_param(
    param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int, fill: float
) -> np.ndarray:
    """A scale or zero point broadcast to ``shape`` (per-tensor, per-axis or blocked).

    ``shape`` may be larger than the tensor the parameter was made for (padding): entries past
    the parameter's coverage get ``fill``.
    """
    p = np.asarray(param)
    if p.size == 1 and block_size == 0:
        return np.broadcast_to(p.reshape(()), shape)
    rank = len(shape)
    if block_size:
        p = np.repeat(p, block_size, axis=axis)
    else:
        p = p.reshape([-1 if d == axis else 1 for d in range(rank)])
    # Crop or pad each axis to the target shape (blocks overhang the last partial block).
    out_shape = [shape[d] if p.shape[d] != 1 or block_size else 1 for d in range(rank)]
    out = np.full(out_shape, fill, dtype=p.dtype)
    region = tuple(slice(0, min(p.shape[d], out_shape[d])) for d in range(rank))
    out[region] = p[region]
    return np.broadcast_to(out, shape)


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: np.dtype
) -> np.ndarray:
    """``saturate(rint(x / scale) + zero_point)`` in float32, half to even (scale/zp broadcast)."""
    lo, hi = quant_range(dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(np.asarray(x, F32) / np.asarray(scale, F32))
    q = q + np.asarray(zero_point).astype(F32)
    return np.clip(np.nan_to_num(q, nan=0.0), lo, hi).astype(np.int32).astype(dtype)


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """``float32(x - zero_point) * scale`` with the subtraction in int32 (like onnxruntime)."""
    diff = np.asarray(x).astype(np.int64) - np.asarray(zero_point).astype(np.int64)
    return diff.astype(F32) * np.asarray(scale, F32)


class _QdqOperator(Operator):
    """Shared matching: the quantized side's dtype, constant scale/zero point, axis, blocks."""

    quantizes: ClassVar[bool]

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := check_node_kind(self, node)) is not None:
            return bad
        label = op_label(node)
        if not 2 <= len(node.inputs) <= 3 or node.inputs[1] is None:
            return Decline(f"{label}: needs x and a scale (2 or 3 inputs)")
        x_val, scale_val = node.inputs[0], node.inputs[1]
        zp_val = node.inputs[2] if len(node.inputs) > 2 else None
        out_val = node.outputs[0]
        float_val, int_val = (x_val, out_val) if self.quantizes else (out_val, x_val)
        # The quantized side's type: the zero point's, else the output's / input's.
        qtype = (zp_val.dtype if zp_val is not None else None) or int_val.dtype
        if qtype is None:
            return Decline(f"{label}: the quantized type is unknown (run shape inference)")
        if qtype in _FLOAT_NARROW:
            return Decline(
                f"{label}: {qtype.name} quantization: the NPU has no {qtype.name} conversion "
                "(integer uint8/int8/uint16/int16/uint4/int4 only); runs on the CPU"
            )
        allowed = QUANT_DTYPES if self.quantizes else {**QUANT_DTYPES, **_DQ_ONLY}
        if qtype not in allowed:
            return Decline(f"{label}: quantized type {qtype.name} is not supported")
        if int_val.dtype is not None and int_val.dtype != qtype:
            return Decline(
                f"{label}: zero point '{zp_val.name if zp_val else ''}' is {qtype.name} but the "
                f"quantized tensor '{int_val.name}' is {int_val.dtype.name}: the zero point "
                "must have the quantized type"
            )
        if float_val.dtype != ir.DataType.FLOAT:
            return Decline(
                f"{label}: float side '{float_val.name}' is "
                f"{float_val.dtype.name if float_val.dtype else 'unknown'}: float32 only (a bf16 "
                "operand would add a rounding before quantization; the precision pass casts)"
            )
        if const_array(x_val) is not None:
            return Decline(
                f"{label}: input x '{x_val.name}' is a constant: folded at compile time by the "
                "QDQ rewrites (FoldConstantQdq), not a kernel"
            )
        if self.quantizes and node.attributes.get_int("saturate", 1) != 1:
            return Decline(f"{label}: saturate=0 applies to float8 only and is not supported")
        x = tensor_spec(x_val, f"{label} input x")
        if isinstance(x, Decline):
            return x
        y = tensor_spec(out_val, f"{label} output y")
        if isinstance(y, Decline):
            return y
        scale = const_array(scale_val)
        if scale is None:
            return Decline(
                f"{label}: scale '{scale_val.name}' is not a constant (dynamic quantization runs "
                "on the CPU)"
            )
        if scale.dtype != np.float32:
            return Decline(f"{label}: scale '{scale_val.name}' is {scale.dtype}: float32 only")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            return Decline(
                f"{label}: scale '{scale_val.name}' has zero, negative or non-finite entries"
            )
        qdtype = allowed[qtype]
        lo, hi = quant_range(qdtype)
        if zp_val is not None:
            zp = const_array(zp_val)
            if zp is None:
                return Decline(f"{label}: zero point '{zp_val.name}' is not a constant")
            zp_int = zp.astype(np.int64)
            if zp.shape != scale.shape:
                return Decline(
                    f"{label}: zero point shape {zp.shape} differs from scale shape {scale.shape}"
                )
            if zp_int.min(initial=0) < lo or zp_int.max(initial=0) > hi:
                return Decline(
                    f"{label}: zero point '{zp_val.name}' has values outside {qtype.name} "
                    f"[{lo}, {hi}]"
                )
            if qtype == ir.DataType.INT32 and zp_int.any():
                return Decline(f"{label}: int32 dequantization requires a zero point of 0")
        else:
            zp = np.zeros(scale.shape, qdtype)
        rank = len(x.shape)
        axis = node.attributes.get_int("axis", 1)
        block = node.attributes.get_int("block_size", 0)
        if scale.size > 1 or block:
            if rank == 0 or not -rank <= axis < rank:
                return Decline(f"{label}: axis {axis} is out of range for rank {rank}")
            axis %= rank
            shape = x.logical_shape
            if block:
                want = tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
                if block < 0 or scale.shape != want:
                    return Decline(
                        f"{label}: block_size {block} needs a scale of shape {want} along axis "
                        f"{axis}, got {scale.shape}"
                    )
            elif scale.ndim != 1 or scale.shape[0] != shape[axis]:
                return Decline(
                    f"{label}: per-axis scale of shape {scale.shape} does not match axis {axis} "
                    f"of x {shape}"
                )
        else:
            axis, block = 0, 0
        if y.shape != x.shape:
            return Decline(f"{label}: output shape {y.shape} differs from input shape {x.shape}")
        specs: list[TensorSpec | None] = [
            x,
            TensorSpec(tuple(scale.shape), np.dtype(np.float32)),
            TensorSpec(tuple(zp.shape), qdtype),
        ]
        return node_config(
            self,
            node,
            specs,
            [y],
            consts={1: scale, 2: np.asarray(zp).astype(qdtype)},
            attrs={"axis": axis, "block_size": block},
        )

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """``[axis, block_size]``."""
        return [cfg.attrs["axis"], cfg.attrs["block_size"]]

    @staticmethod
    def _params(inputs, shape, dims):
        axis, block = dims[:2]
        scale = expand_param(inputs[1], shape, axis, block, 1.0)
        zp = expand_param(inputs[2], shape, axis, block, 0)
        return scale, zp


class QuantizeLinear(_QdqOperator):
    """ONNX QuantizeLinear: float32 -> uint8/int8/uint16/int16/uint4/int4."""

    op_type = "QuantizeLinear"
    kernel_id = 800
    quantizes = True

    def compute(self, inputs, outputs, dims, floats):
        x = inputs[0]
        scale, zp = self._params(inputs, x.shape, dims)
        return [quantize(x, scale, zp, outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0])
        ax, blk = cfg.attrs["axis"], cfg.attrs["block_size"]
        scale = expand_param(cfg.consts[1], x.shape, ax, blk, 1.0)
        zp = expand_param(cfg.consts[2], x.shape, ax, blk, 0)
        return [quantize(x, scale, zp, cfg.outputs[0].dtype)]


class DequantizeLinear(_QdqOperator):
    """ONNX DequantizeLinear: uint8/int8/uint16/int16/uint4/int4/int32 -> float32."""

    op_type = "DequantizeLinear"
    kernel_id = 801
    quantizes = False

    def compute(self, inputs, outputs, dims, floats):
        x = inputs[0]
        scale, zp = self._params(inputs, x.shape, dims)
        return [dequantize(x, scale, zp)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0])
        ax, blk = cfg.attrs["axis"], cfg.attrs["block_size"]
        scale = expand_param(cfg.consts[1], x.shape, ax, blk, 1.0)
        zp = expand_param(cfg.consts[2], x.shape, ax, blk, 0)
        return [dequantize(x, scale, zp)]
