"""Cast between float32 and bfloat16 (either direction, or to the same type).

float32 -> bfloat16 rounds to nearest even (ONNX Cast semantics, ml_dtypes rounding);
bfloat16 -> float32 is exact. No extra bf16 compute rounding: the cast *is* the rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import Decline, OpConfig, ShapeConstraints, TensorSpec
from npudispatch.operators.dtypes import FLOAT_DTYPES, np_dtype
from npudispatch.operators.elementwise import FloatUnaryOp, same_axes


class Cast(FloatUnaryOp):
    """ONNX Cast with ``to`` in {FLOAT, BFLOAT16} from float32/bfloat16."""

    op_type = "Cast"
    kernel_id = 50

    def match_unary(
        self, cfg: OpConfig, x: TensorSpec, y: TensorSpec, label: str
    ) -> OpConfig | Decline:
        to = cfg.attrs.get("to")
        if to is not None and not isinstance(to, int):  # Cast-1 named the type as a string
            return Decline(f"{label}: 'to' is {to!r}, not an ONNX type code (opset 1 Cast)")
        target = np_dtype(ir.DataType(int(to))) if to is not None else None
        if target not in FLOAT_DTYPES:
            name = ir.DataType(int(to)).name if to is not None else "missing"
            return Decline(f"{label}: target type {name} not supported (FLOAT or BFLOAT16 only)")
        if y.dtype != target or y.shape != x.shape:
            return Decline(f"{label}: output {y.shape} {y.dtype} does not match to={target}")
        return cfg

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any size; input and output padded alike on every axis (the match needs equal shapes)."""
        rank = len(cfg.outputs[0].shape)
        return ShapeConstraints(((1,) * rank,), ((1,) * rank,), same_axes(rank))

    def compute(self, inputs, outputs, dims, floats):
        return [np.asarray(inputs[0]).astype(outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(inputs[0]).astype(cfg.outputs[0].dtype)]
