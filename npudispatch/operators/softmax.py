"""Softmax in both of its ONNX meanings, any axis.

* opset >= 13 (``axis`` default -1): normalise along the one axis ``axis``.
* opset 1..12 (``axis`` default 1): coerce the input to 2-D ``[prod(shape[:axis]),
  prod(shape[axis:])]`` and normalise each row, i.e. over *every* axis from ``axis`` on.
  When ``axis`` is the last axis both meanings agree.

The version comes from :func:`~npudispatch.operators.base.opset_version`; a node whose opset is
not declared anywhere is declined (guessing would risk a silently wrong answer).

The params record carries ``dims = [axis, real_len, flatten]``. ``flatten = 0`` moves the softmax
axis last (the core works on contiguous rows) and normalises only over the real length of that
axis: padded lanes neither contribute to the max/sum nor receive a value (they stay zero).
``flatten = 1`` crops every axis to its real length, normalises each row of the 2-D coercion and
zero-pads the result again. Records written before ``flatten`` existed have two dims (opset 13).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    ShapeConstraints,
    TensorSpec,
    op_label,
    opset_version,
)
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import LANES, FloatUnaryOp, match_float_node, same_axes

AXIS_ONLY_SINCE = 13
"""First opset where Softmax normalises one axis instead of the 2-D coercion at ``axis``."""


def softmax_last(x: np.ndarray, real_len: int) -> np.ndarray:
    """Softmax over the last axis using only its first ``real_len`` lanes (others -> 0)."""
    x = np.asarray(x, dtype=np.float64)
    valid = x[..., :real_len]
    e = np.exp(valid - valid.max(axis=-1, keepdims=True))
    out = np.zeros_like(x)
    out[..., :real_len] = e / e.sum(axis=-1, keepdims=True)
    return out


def softmax_coerced(x: np.ndarray, axis: int) -> np.ndarray:
    """Opset 1..12 Softmax: rows of the ``[prod(shape[:axis]), prod(shape[axis:])]`` view."""
    x = np.asarray(x, dtype=np.float64)
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    flat = x.reshape(rows, -1)
    return softmax_last(flat, flat.shape[-1]).reshape(x.shape)


class Softmax(FloatUnaryOp):
    """ONNX Softmax (every opset) for float32/bfloat16."""

    op_type = "Softmax"
    kernel_id = 20

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = match_float_node(self, node, (1, 1))
        if isinstance(cfg, Decline):
            return cfg
        cfg.extra["opset"] = opset_version(node)
        x = cfg.inputs[0]
        assert x is not None
        return self.match_unary(cfg, x, cfg.outputs[0], op_label(node))

    def match_unary(
        self, cfg: OpConfig, x: TensorSpec, y: TensorSpec, label: str
    ) -> OpConfig | Decline:
        rank = len(x.shape)
        if rank == 0:
            return Decline(f"{label}: scalar input has no axis to normalise")
        version = cfg.extra.get("opset")
        if version is None:
            return Decline(
                f"{label}: the model imports no default-domain opset, so which Softmax is meant "
                "(opset >= 13: one axis; <= 12: every axis from 'axis' on) is unknown"
            )
        coerce = version < AXIS_ONLY_SINCE
        axis = int(cfg.attrs.get("axis", 1 if coerce else -1))
        if not -rank <= axis < rank:
            return Decline(f"{label}: axis {axis} out of range for rank {rank}")
        if (y.shape, y.dtype) != (x.shape, x.dtype):
            return Decline(f"{label}: output shape/dtype differs from the input")
        axis %= rank
        cfg.extra["axis"] = axis
        cfg.extra["flatten"] = coerce and axis != rank - 1  # on the last axis both agree
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        axis = cfg.extra["axis"]
        x = cfg.inputs[0]
        assert x is not None
        return [axis, x.logical_shape[axis], int(cfg.extra["flatten"])]

    def compute(self, inputs, outputs, dims, floats):
        axis, real_len, *rest = dims
        flatten = bool(rest[0]) if rest else False
        x = to_compute(inputs[0])
        if flatten:
            out = outputs[0]
            real = out.logical_shape
            region = tuple(slice(0, r) for r in real)
            y = np.zeros(out.shape, dtype=np.float64)
            y[region] = softmax_coerced(x[region], axis)
        else:
            y = np.moveaxis(softmax_last(np.moveaxis(x, axis, -1), real_len), -1, axis)
        return [store(y, outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        axis = cfg.extra["axis"]
        x = np.asarray(inputs[0]).astype(F32)
        if cfg.extra["flatten"]:
            y = softmax_coerced(x, axis)
        else:
            y = np.moveaxis(softmax_last(np.moveaxis(x, axis, -1), x.shape[axis]), -1, axis)
        return [y.astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Last axis a multiple of :data:`LANES`; input and output padded alike (every axis)."""
        rank = len(cfg.outputs[0].shape)
        rule = (1,) * (rank - 1) + (LANES,)
        return ShapeConstraints((rule,), (rule,), same_axes(rank))
