"""ReduceMean, ReduceSum, ReduceMax, ReduceMin over the last axis (kernel ids 130..139).

After axis normalisation the reduced axes must be the last one plus, optionally, axes of size 1
(reducing those is a reshape, e.g. ReduceMean over every axis of a [1, N] row); any other axis
declines. ``axes`` comes from the attribute (ReduceSum < 13, the others < 18) or from a constant
second input (later opsets); ``keepdims`` 0 and 1 are both supported.

Padding: the kernel reduces only the real lanes of the last axis (``dims = [real_len]`` in the
record), so zero-padded lanes neither add to a sum or mean nor win a max/min over negative values.
Kernel math follows the bf16 rule: inputs rounded to bf16, float32 accumulation, result rounded
to bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    Operator,
    ShapeConstraints,
    const_array,
    op_label,
    opset_version,
)
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import LANES, match_float_node

AXES_INPUT_SINCE = {"ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18}
"""Opset from which each reduction takes ``axes`` as an input instead of an attribute."""


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    """Shape of a reduction of ``shape`` over ``axes`` (normalised) with ONNX ``keepdims``."""
    if keepdims:
        return tuple(1 if a in axes else d for a, d in enumerate(shape))
    return tuple(d for a, d in enumerate(shape) if a not in axes)


class _Reduce(Operator):
    """Shared matching, granularity and kernel of the last-axis reductions; subclasses set
    ``func`` (a numpy reduction taking ``axis``/``keepdims``/``dtype``)."""

    func: ClassVar[Callable[..., np.ndarray]]

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = match_float_node(self, node, (1, 2))
        label = op_label(node)
        x, out = cfg.inputs[0], cfg.outputs[0]
        assert x is not None
        axes = Decline.check(self._axes(node, cfg, label))
        rank = len(x.shape)
        if rank == 0:
            return Decline(f"{label}: scalar input has no axis to reduce")
        if axes is None:  # ONNX: no axes = every axis (unless noop_with_empty_axes)
            if cfg.attrs.get("noop_with_empty_axes", 0):
                return Decline(f"{label}: empty axes with noop_with_empty_axes=1 is an identity")
            axes = list(range(rank))
        if any(not -rank <= a < rank for a in axes):
            return Decline(f"{label}: axes {axes} out of range for rank {rank}")
        norm = tuple(sorted({a % rank for a in axes}))
        if rank - 1 not in norm:
            return Decline(
                f"{label}: reduces axes {list(norm)} of {x.shape} but not the last axis; only "
                "last-axis reductions run on the NPU (transpose the axis last first)"
            )
        wide = [a for a in norm if a != rank - 1 and x.shape[a] != 1]
        if wide:
            return Decline(
                f"{label}: also reduces axis {wide[0]} (size {x.shape[wide[0]]}) of {x.shape}; "
                "only the last axis (and size-1 axes) can be reduced on the NPU"
            )
        if x.logical_shape[-1] == 0:
            return Decline(f"{label}: the reduced axis is empty")
        keepdims = bool(cfg.attrs.get("keepdims", 1))
        for what, got, want in (
            ("shape", out.shape, reduced_shape(x.shape, norm, keepdims)),
            ("real shape", out.logical_shape, reduced_shape(x.logical_shape, norm, keepdims)),
        ):
            if got != want:
                return Decline(f"{label}: output {what} {got} is not the reduced {what} {want}")
        if out.dtype != x.dtype:
            return Decline(f"{label}: output dtype {out.dtype} differs from input ({x.dtype})")
        cfg.inputs[1:] = [None] * (len(cfg.inputs) - 1)  # axes travel as the record's dims
        cfg.extra.update(axes=norm, keepdims=keepdims)
        return cfg

    @staticmethod
    def _axes(node: ir.Node, cfg: OpConfig, label: str) -> list[int] | Decline | None:
        """``axes`` from the attribute or the constant second input; None when neither is set."""
        attr = cfg.attrs.get("axes")
        value = node.inputs[1] if len(node.inputs) > 1 else None
        version, since = opset_version(node), AXES_INPUT_SINCE.get(node.op_type, 18)
        if version is not None and (attr is not None, value is not None) != (False, False):
            if version >= since and attr is not None:
                return Decline(
                    f"{label}: 'axes' attribute is not part of {node.op_type}-{version} (an input "
                    f"since opset {since}); onnxruntime rejects this model"
                )
            if version < since and value is not None:
                return Decline(
                    f"{label}: {node.op_type}-{version} has no 'axes' input (an attribute before "
                    f"opset {since}); onnxruntime rejects this model"
                )
        if value is None:
            return None if attr is None else [int(a) for a in attr]
        if attr is not None:
            return Decline(f"{label}: axes given both as attribute and as input")
        arr = const_array(value)
        if arr is None:
            return Decline(
                f"{label}: axes input '{value.name}' is not a constant (fold it first; the NPU "
                "needs the reduced axes at compile time)"
            )
        if arr.dtype.kind not in "iu" or arr.ndim > 1:
            return Decline(f"{label}: axes input '{value.name}' is not a 1-D integer tensor")
        return None if arr.size == 0 else [int(a) for a in arr.reshape(-1)]

    def op_dims(self, cfg: OpConfig) -> list[int]:
        x = cfg.inputs[0]
        assert x is not None
        return [x.logical_shape[-1]]

    def compute(self, inputs, outputs, dims, floats):
        (real_len,) = dims
        x = to_compute(inputs[0])[..., :real_len]
        y = type(self).func(x, axis=-1, dtype=F32)
        return [store(y.reshape(outputs[0].shape), outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0]).astype(np.float64)
        y = type(self).func(x, axis=cfg.extra["axes"], keepdims=cfg.extra["keepdims"])
        return [np.asarray(y).astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Input last axis a multiple of :data:`LANES`; every kept input axis tied to its
        output axis (reduced axes are untied: the output has 1 or nothing there)."""
        x, out = cfg.inputs[0], cfg.outputs[0]
        assert x is not None
        rank = len(x.shape)
        kept = [a for a in range(rank) if a not in cfg.extra["axes"]]
        keepdims = cfg.extra["keepdims"]
        tied = tuple((("in", 0, a), ("out", 0, a if keepdims else j)) for j, a in enumerate(kept))
        ins = ((1,) * (rank - 1) + (LANES,),) + (None,) * (len(cfg.inputs) - 1)
        return ShapeConstraints(ins, ((1,) * len(out.shape),), tied)


def _max(x: np.ndarray, axis, keepdims: bool = False, dtype=None) -> np.ndarray:
    return np.max(x, axis=axis, keepdims=keepdims)  # exact: no accumulator dtype


def _min(x: np.ndarray, axis, keepdims: bool = False, dtype=None) -> np.ndarray:
    return np.min(x, axis=axis, keepdims=keepdims)


class ReduceMean(_Reduce):
    """ONNX ReduceMean over the last axis (mean of the real lanes)."""

    op_type = "ReduceMean"
    kernel_id = 130
    func = staticmethod(np.mean)


class ReduceSum(_Reduce):
    """ONNX ReduceSum over the last axis."""

    op_type = "ReduceSum"
    kernel_id = 131
    func = staticmethod(np.sum)


class ReduceMax(_Reduce):
    """ONNX ReduceMax over the last axis (padded lanes excluded, so negatives stay exact)."""

    op_type = "ReduceMax"
    kernel_id = 132
    func = staticmethod(_max)


class ReduceMin(_Reduce):
    """ONNX ReduceMin over the last axis."""

    op_type = "ReduceMin"
    kernel_id = 133
    func = staticmethod(_min)
