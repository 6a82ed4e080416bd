"""BatchNormalization in inference mode (kernel id 750).

``Y = (X - mean) / sqrt(var + epsilon) * scale + B`` per channel (axis 1). The four statistics
must be constants; at compile time they are folded (float64) into one per-channel multiplier
``a = scale / sqrt(var + epsilon)`` and offset ``b = B - mean * a``, stored as float32 in the const
region (``[a | b]``, ``C`` values each), so the kernel is one multiply-add per element: ``X``
rounded to bf16, ``x * a + b`` in float32, result rounded to bf16 (:mod:`.dtypes`).

Padding: the op is lane-local (last axis a multiple of :data:`~.elementwise.LANES`, every axis
tied between X and Y). When the channel axis is padded, the kernel zero-extends ``a`` and ``b``
to the padded channel count; the padded channels' outputs are zeroed like every padded lane.

Declines: training mode (``training_mode=1`` or more than one output), ``spatial=0`` (opset 7/
8 per-activation statistics), statistics that are not constants, rank < 2.
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
)
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import LANES, match_float_node, same_axes
from npudispatch.operators.unary import UnaryOp

_STATS = ("scale", "B", "mean", "var")


def fold_batchnorm(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(a, b)`` in float64 with ``BN(x) = x * a + b``."""
    a = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + epsilon)
    return a, np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * a


class BatchNormalization(UnaryOp):
    """ONNX BatchNormalization (opset 7..15), inference mode, constant statistics."""

    op_type = "BatchNormalization"
    kernel_id = 750

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = match_float_node(self, node, (5, 5), const_inputs=(1, 2, 3, 4))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        x, y = cfg.inputs[0], cfg.outputs[0]
        assert x is not None
        if int(cfg.attrs.get("training_mode", 0)) != 0:
            return Decline(f"{label}: training_mode=1 (batch statistics) is not an inference op")
        if len(node.outputs) != 1:
            return Decline(
                f"{label}: {len(node.outputs)} outputs (running mean/var outputs are training "
                "mode); only inference mode with one output runs on the NPU"
            )
        if int(cfg.attrs.get("spatial", 1)) != 1:
            return Decline(f"{label}: spatial=0 (per-activation statistics) is not supported")
        if len(x.shape) < 2:
            return Decline(f"{label}: X has rank {len(x.shape)}; BatchNormalization needs N, C")
        channels = x.logical_shape[1]
        stats: list[np.ndarray] = []
        for i, name in enumerate(_STATS, start=1):
            value = node.inputs[i]
            assert value is not None
            if i not in cfg.consts:
                return Decline(
                    f"{label}: {name} '{value.name}' is not a constant (the statistics are "
                    "folded at compile time; make them initializers)"
                )
            arr = np.asarray(cfg.consts[i])
            if arr.shape != (channels,):
                return Decline(
                    f"{label}: {name} '{value.name}' has shape {arr.shape}, expected ({channels},)"
                )
            stats.append(arr)
        epsilon = float(cfg.attrs.get("epsilon", 1e-5))
        a, b = fold_batchnorm(*stats, epsilon)
        cfg.extra.update(stats=stats, epsilon=epsilon)
        folded = TensorSpec((channels,), F32)
        cfg.inputs = [x, folded, folded, None, None]
        cfg.consts = {1: a.astype(F32), 2: b.astype(F32)}
        return self.match_unary(cfg, x, y, label)

    def check_attrs(self, cfg: OpConfig, label: str) -> OpConfig | Decline:
        return cfg  # validated in match

    def compute(self, inputs, outputs, dims, floats):
        x, a, b = inputs[0], inputs[1], inputs[2]
        assert x is not None and a is not None and b is not None
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        a_full = np.zeros(x.shape[1], F32)
        b_full = np.zeros(x.shape[1], F32)
        a_full[: a.size], b_full[: b.size] = a, b  # zero-extended to the padded channels
        y = to_compute(x) * a_full.reshape(shape) + b_full.reshape(shape)
        return [store(y, outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """ONNX semantics on ``X = inputs[0]`` with the node's constant statistics (the only
        statistics this operator takes; ``inputs[1:]`` are ignored)."""
        x = np.asarray(inputs[0]).astype(np.float64)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale, bias, mean, var = (
            np.asarray(s, np.float64).reshape(shape) for s in cfg.extra["stats"]
        )
        y = (x - mean) / np.sqrt(var + cfg.extra["epsilon"]) * scale + bias
        return [y.astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Like every lane-local op: last axis a multiple of LANES, X and Y tied on every axis;
        the folded constants keep their shape (the kernel zero-extends them)."""
        rank = len(cfg.outputs[0].shape)
        rule = (1,) * (rank - 1) + (LANES,)
        return ShapeConstraints((rule, None, None, None, None), (rule,), same_axes(rank))
