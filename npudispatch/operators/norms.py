"""LayerNormalization, SimplifiedLayerNormalization (RMSNorm) and com.microsoft SkipSimplifiedLayerNormalization.

All three normalise over trailing axes. Statistics use only the real (unpadded) lanes of the
normalised axes: the record's ``dims`` carry ``[axis, *real trailing dims]`` and the kernel masks
the rest, so a [1, 4096] row padded to [1, 4104] still gets the [1, 4096] mean and variance.
Scale/bias constants travel unpadded in the const region; the kernel zero-extends them to the
padded row. ``floats = [epsilon]``. Mean / inverse-std outputs are stored like every output
(bf16-rounded, in their declared dtype).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import Decline, OpConfig, Operator, ShapeConstraints, TensorSpec
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import LANES, match_float_node

MS_DOMAIN = "com.microsoft"


def pad_to(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Right-align ``arr`` to ``shape``'s rank and zero-extend axes shorter than ``shape`` (not 1s)."""
    arr = np.asarray(arr)
    arr = arr.reshape((1,) * (len(shape) - arr.ndim) + arr.shape)
    widths = [(0, t - s if s not in (1, t) else 0) for s, t in zip(arr.shape, shape)]
    return np.pad(arr, widths) if any(w for _, w in widths) else arr


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def normalize(
    x: np.ndarray,
    axis: int,
    real: tuple[int, ...],
    eps: float,
    *,
    rms: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(normalised x, mean, inv_std)`` over axes ``axis..``, using only the ``real`` lanes.

    ``rms``: no mean subtraction (RMSNorm); ``mean`` is then returned as zeros. Statistics are
    float32, the ONNX ``stash_type`` (and the NPU's accumulator): a row holding ±1e38 overflows
    its variance to inf and normalises to 0, as in onnxruntime and the ONNX function body.
    """
    x = np.asarray(x, dtype=F32)
    axes = tuple(range(axis, x.ndim))
    mask = np.zeros(x.shape[axis:], dtype=bool)
    mask[tuple(slice(0, r) for r in real)] = True
    n = np.float32(np.prod(real))
    zero = np.float32(0.0)
    xm = np.where(mask, x, zero)
    mean = (
        np.zeros(x.shape[:axis] + (1,) * len(axes), F32)
        if rms
        else xm.sum(axes, keepdims=True, dtype=F32) / n
    )
    centered = np.where(mask, x - mean, zero)
    with np.errstate(over="ignore", invalid="ignore"):
        var = (centered * centered).sum(axes, keepdims=True, dtype=F32) / n
        inv_std = np.float32(1.0) / np.sqrt(var + np.float32(eps))
    return centered * inv_std, mean, inv_std


class _Norm(Operator):
    """Shared matching: float X, constant-or-streamed scale/bias, attrs axis/epsilon."""

    n_inputs: ClassVar[tuple[int, int]]
    rms: ClassVar[bool]
    fixed_last_axis: ClassVar[bool] = False
    scale_inputs: ClassVar[tuple[int, ...]]  # inputs broadcast over the normalised row
    # output index -> meaning: "y", "mean", "inv_std", "sum"
    output_kinds: ClassVar[tuple[str, ...]]

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if node.op_type != self.op_type:
            return Decline(f"op type {node.op_type} is not {self.op_type}")
        cfg = match_float_node(
            self, node, self.n_inputs, const_inputs=self.scale_inputs, unnamed_output=self._omitted
        )
        label = f"{node.op_type} node '{cfg.node_name}'"
        x = cfg.inputs[0]
        assert x is not None
        rank = len(x.shape)
        axis = -1 if self.fixed_last_axis else int(cfg.attrs.get("axis", -1))
        if rank == 0 or not -rank <= axis < rank:
            return Decline(f"{label}: axis {axis} out of range for rank {rank}")
        axis %= rank
        for i, spec in enumerate(cfg.inputs):
            if spec is None or i == 0:
                continue
            if spec.dtype != x.dtype:
                return Decline(f"{label}: input {i} dtype {spec.dtype} differs from X ({x.dtype})")
            if i in self.scale_inputs:  # unpadded constants are zero-extended by the kernel
                targets = {x.shape[axis:], x.logical_shape[axis:]}
            else:
                targets = {x.shape, x.logical_shape}
            if not any(_broadcasts(spec.shape, t) for t in targets):
                return Decline(
                    f"{label}: input {i} shape {spec.shape} does not broadcast to {min(targets)}"
                )
        for j, (spec, kind) in enumerate(zip(cfg.outputs, self.output_kinds)):
            want = x.shape if kind in ("y", "sum") else x.shape[:axis] + (1,) * (rank - axis)
            out = node.outputs[j]
            # Omitted (nameless) or unread: the rewriter names every output it creates.
            if not out.name or (not out.uses() and not out.is_graph_output()):
                if kind in ("mean", "inv_std"):
                    cfg.outputs[j] = TensorSpec(want, F32)
                continue
            if kind == "mean" and self.rms:
                return Decline(f"{label}: output {j} (mean) is not defined for RMS normalisation")
            if int(np.prod(spec.shape)) != int(np.prod(want)):
                return Decline(f"{label}: output {j} shape {spec.shape} is not {want}")
            if kind in ("y", "sum") and spec.dtype != x.dtype:
                return Decline(f"{label}: output {j} dtype {spec.dtype} differs from X ({x.dtype})")
        if len(cfg.outputs) > len(self.output_kinds):
            return Decline(f"{label}: {len(cfg.outputs)} outputs, at most {len(self.output_kinds)}")
        cfg.extra["axis"] = axis
        cfg.extra["epsilon"] = float(cfg.attrs.get("epsilon", 1e-5))
        return cfg

    def _omitted(self, j: int, specs: list[TensorSpec | None]) -> TensorSpec:
        """Spec of an omitted optional output: a row statistic (float32) or X-shaped."""
        x = specs[0]
        if x is None or j >= len(self.output_kinds):
            return TensorSpec((0,), F32)  # rejected below (no X / too many outputs)
        if self.output_kinds[j] in ("y", "sum"):
            return TensorSpec(x.shape, x.dtype)
        return TensorSpec((*x.shape[:-1], 1), F32)

    def op_dims(self, cfg: OpConfig) -> list[int]:
        x = cfg.inputs[0]
        assert x is not None
        axis = cfg.extra["axis"]
        return [axis, *x.logical_shape[axis:]]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [cfg.extra["epsilon"]]

    def _run(
        self,
        inputs: list[np.ndarray | None],
        outputs: list[TensorSpec],
        axis: int,
        real: tuple[int, ...],
        eps: float,
    ) -> list[np.ndarray]:
        """Float32 math on already-rounded inputs; returns values per output (not yet stored)."""
        x = np.asarray(inputs[0], dtype=F32)
        total = x
        if self.op_type == "SkipSimplifiedLayerNormalization":
            total = x + pad_to(inputs[1], x.shape)
            if len(inputs) > 3 and inputs[3] is not None:
                total = total + pad_to(inputs[3], x.shape)
        y, mean, inv_std = normalize(total, axis, real, eps, rms=self.rms)
        row = x.shape[axis:]
        scale_idx = self.scale_inputs[0]
        y = y * pad_to(inputs[scale_idx], row)
        if not self.rms and len(inputs) > 2 and inputs[2] is not None:
            y = y + pad_to(inputs[2], row)
        values = {"y": y, "mean": mean, "inv_std": inv_std, "sum": total}
        return [values[kind].reshape(spec.shape) for kind, spec in zip(self.output_kinds, outputs)]

    def compute(self, inputs, outputs, dims, floats):
        ins = [None if a is None else to_compute(a) for a in inputs]
        vals = self._run(ins, outputs, dims[0], tuple(dims[1:]), floats[0])
        return [store(v, spec.dtype) for v, spec in zip(vals, outputs)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        ins = [None if a is None else np.asarray(a).astype(F32) for a in inputs]
        x = cfg.inputs[0]
        assert x is not None
        axis = cfg.extra["axis"]
        vals = self._run(ins, cfg.outputs, axis, x.shape[axis:], cfg.extra["epsilon"])
        return [v.astype(spec.dtype) for v, spec in zip(vals, cfg.outputs)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Last axis of X (and same-shaped inputs/outputs) a multiple of :data:`LANES`."""
        base = super().granularity(cfg)
        x = cfg.inputs[0]
        assert x is not None
        rank = len(x.shape)
        rule = (1,) * (rank - 1) + (LANES,)
        ins = tuple(
            rule if r is not None and s is not None and s.shape == x.shape else r
            for r, s in zip(base.inputs, cfg.inputs)
        )
        outs = tuple(rule if s.shape == x.shape else (1,) * len(s.shape) for s in cfg.outputs)
        tied = tuple(("in", i, rank - 1) for i, r in enumerate(ins) if r == rule) + tuple(
            ("out", j, rank - 1) for j, r in enumerate(outs) if r == rule
        )
        return ShapeConstraints(ins, outs, (tied,))


class LayerNormalization(_Norm):
    """ONNX LayerNormalization-17: ``(X - mean) / sqrt(var + eps) * Scale + B``."""

    op_type = "LayerNormalization"
    kernel_id = 30
    n_inputs = (2, 3)
    rms = False
    scale_inputs = (1, 2)
    output_kinds = ("y", "mean", "inv_std")


class SimplifiedLayerNormalization(_Norm):
    """ORT SimplifiedLayerNormalization (RMSNorm, default domain): ``X / rms(X) * scale``."""

    op_type = "SimplifiedLayerNormalization"
    kernel_id = 31
    n_inputs = (2, 2)
    rms = True
    scale_inputs = (1,)
    output_kinds = ("y", "inv_std")


class SkipSimplifiedLayerNormalization(_Norm):
    """com.microsoft SkipSimplifiedLayerNormalization: RMSNorm of ``input + skip (+ bias)``.

    Outputs: output, mean (declined if used: RMS has none), inv_std_var, input_skip_bias_sum.
    """

    domain = MS_DOMAIN
    op_type = "SkipSimplifiedLayerNormalization"
    kernel_id = 32
    n_inputs = (3, 4)
    rms = True
    fixed_last_axis = True
    scale_inputs = (2, 3)
    output_kinds = ("y", "mean", "inv_std", "sum")
