"""Softmax (opset >= 13 semantics: normalise along one axis), any axis mapped to the last.

The kernel moves the softmax axis last (the core works on contiguous rows) and normalises only over
the real length of that axis, taken from the params record (``dims = [axis, real_len]``): padded
lanes neither contribute to the max/sum nor receive a value (they stay zero).
"""

from __future__ import annotations

import numpy as np

from npudispatch.operators.base import Decline, OpConfig, ShapeConstraints, TensorSpec
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import LANES, FloatUnaryOp, same_axes


def softmax_last(x: np.ndarray, real_len: int) -> np.ndarray:
    """Softmax over the last axis using only its first ``real_len`` lanes (others -> 0)."""
    x = np.asarray(x, dtype=np.float64)
    valid = x[..., :real_len]
    e = np.exp(valid - valid.max(axis=-1, keepdims=True))
    out = np.zeros_like(x)
    out[..., :real_len] = e / e.sum(axis=-1, keepdims=True)
    return out


class Softmax(FloatUnaryOp):
    """ONNX Softmax-13 for float32/bfloat16."""

    op_type = "Softmax"
    kernel_id = 20

    def match_unary(
        self, cfg: OpConfig, x: TensorSpec, y: TensorSpec, label: str
    ) -> OpConfig | Decline:
        rank = len(x.shape)
        if rank == 0:
            return Decline(f"{label}: scalar input has no axis to normalise")
        axis = int(cfg.attrs.get("axis", -1))
        if not -rank <= axis < rank:
            return Decline(f"{label}: axis {axis} out of range for rank {rank}")
        if (y.shape, y.dtype) != (x.shape, x.dtype):
            return Decline(f"{label}: output shape/dtype differs from the input")
        cfg.extra["axis"] = axis % rank
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        axis = cfg.extra["axis"]
        x = cfg.inputs[0]
        assert x is not None
        return [axis, x.logical_shape[axis]]

    def compute(self, inputs, outputs, dims, floats):
        axis, real_len = dims
        x = np.moveaxis(to_compute(inputs[0]), axis, -1)
        y = np.moveaxis(softmax_last(x, real_len), -1, axis)
        return [store(y, outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        axis = cfg.extra["axis"]
        x = np.moveaxis(np.asarray(inputs[0]).astype(F32), axis, -1)
        y = np.moveaxis(softmax_last(x, x.shape[-1]), -1, axis)
        return [y.astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Last axis a multiple of :data:`LANES`; input and output padded alike (every axis)."""
        rank = len(cfg.outputs[0].shape)
        rule = (1,) * (rank - 1) + (LANES,)
        return ShapeConstraints((rule,), (rule,), same_axes(rank))
