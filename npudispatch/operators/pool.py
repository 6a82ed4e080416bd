"""MaxPool, AveragePool, GlobalAveragePool and GlobalMaxPool over 1..3 spatial axes (kernel ids
610..613).

The kernel crops the input to its real shape first, so lanes added by terminal padding never
enter a window (a padded zero would otherwise win a MaxPool of negative values or dilute an
average). Windows are gathered with one strided view (:func:`~.window.windows`) and reduced with
numpy: no loop over pixels or channels. Window padding follows ONNX: MaxPool pads with -inf;
AveragePool pads with zeros and divides by the number of real taps (``count_include_pad=0``) or
by the taps inside input plus explicit pads (``count_include_pad=1``); ``ceil_mode`` adds
trailing windows that only count their in-range taps. Values are rounded to bf16 on entry and the
result once on exit; sums accumulate in float32.

Params record ``dims``: ``[kind, r, ceil_mode, count_include_pad, *window]`` (kind 0 max,
1 average, 2 global average, 3 global max; window = kernel, strides, dilations, pads_begin,
pads_end; global pools carry no window).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch.operators import records
from npudispatch.operators.base import Decline, OpConfig, ShapeConstraints, TensorSpec
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import FloatUnaryOp
from npudispatch.operators.matmul import fit
from npudispatch.operators.window import Window, crop_real, pad_spatial, resolve_window, windows

KIND_MAX, KIND_AVG, KIND_GLOBAL_AVG, KIND_GLOBAL_MAX = 0, 1, 2, 3


def pool(
    x: np.ndarray, kind: int, window: Window | None, ceil_mode: bool, count_include_pad: bool
) -> np.ndarray:
    """Pool float32 ``x`` ``[N, C, *S]`` (real data only) -> float32 ``[N, C, *O]``."""
    r = x.ndim - 2
    spatial = tuple(range(2, 2 + r))
    if kind == KIND_GLOBAL_AVG:
        return x.mean(axis=spatial, keepdims=True, dtype=F32)
    if kind == KIND_GLOBAL_MAX:
        return x.max(axis=spatial, keepdims=True)
    assert window is not None
    out = window.output_size(x.shape[2:], ceil_mode)
    # Extra trailing positions that ceil_mode windows reach beyond the explicit pads.
    extra = [max(0, (o - 1) * s + e - (n + b + p))
             for o, s, e, n, b, p in zip(out, window.strides, window.effective, x.shape[2:],
                                         window.pads_begin, window.pads_end)]  # fmt: skip
    end = [p + q for p, q in zip(window.pads_end, extra)]
    taps = tuple(range(2 + r, 2 + 2 * r))
    if kind == KIND_MAX:
        xp = pad_spatial(x, window.pads_begin, end, -np.inf)
        return windows(xp, window, out).max(axis=taps)
    xp = pad_spatial(x, window.pads_begin, end, 0.0)
    total = windows(xp, window, out).sum(axis=taps, dtype=F32)
    # Divisor per output position: windows over a mask of the taps that count.
    ones = np.ones((1, 1, *x.shape[2:]), F32)
    if count_include_pad:
        mask = pad_spatial(pad_spatial(ones, window.pads_begin, window.pads_end, 1.0),
                           (0,) * r, extra, 0.0)  # fmt: skip
    else:
        mask = pad_spatial(ones, window.pads_begin, end, 0.0)
    count = windows(mask, window, out).sum(axis=taps, dtype=F32)
    return total / count


class _Pool(FloatUnaryOp):
    """Shared matching, record, kernel and padding rules of the four pooling operators."""

    kind: int

    def match_unary(
        self, cfg: OpConfig, x: TensorSpec, y: TensorSpec, label: str
    ) -> OpConfig | Decline:
        rank = len(x.shape)
        if not 3 <= rank <= 5:
            return Decline(f"{label}: input rank {rank}; pooling over 1..3 spatial axes only")
        if y.dtype != x.dtype:
            return Decline(f"{label}: output dtype {y.dtype} differs from the input's {x.dtype}")
        geo = self.geometry(cfg.attrs, x, label)
        if isinstance(geo, Decline):
            return geo
        window, out = geo
        want = (*x.logical_shape[:2], *out)
        if tuple(y.logical_shape) != want:
            return Decline(f"{label}: output shape {y.logical_shape} is not the computed {want}")
        cfg.extra["window"] = window
        return cfg

    def geometry(
        self, attrs: dict[str, Any], x: TensorSpec, label: str
    ) -> tuple[Window | None, tuple[int, ...]] | Decline:
        """Global pools: no window, output spatial 1s."""
        if attrs:
            return Decline(f"{label}: unexpected attributes {sorted(attrs)}")
        return None, (1,) * (len(x.shape) - 2)

    def op_dims(self, cfg: OpConfig) -> list[int]:
        window: Window | None = cfg.extra["window"]
        r = len(cfg.outputs[0].shape) - 2
        ceil = int(cfg.attrs.get("ceil_mode", 0) or 0)
        cip = int(cfg.attrs.get("count_include_pad", 0) or 0)
        return [self.kind, r, ceil, cip, *(window.dims() if window else [])]

    def kernel(self, record, operands):
        """Crop X to its real shape, pool, write into the (padded) output."""
        table = records.decode_table(record.payload)
        (x,) = records.unpack_inputs(table, operands, record.operand_bytes)
        x_spec = table.inputs[0][1]
        assert x is not None and x_spec is not None
        kind, r, ceil, cip = list(record.dims)[:4]
        window = (
            Window.from_dims(r, list(record.dims)[4:]) if kind in (KIND_MAX, KIND_AVG) else None
        )
        y = pool(to_compute(crop_real(x, x_spec.real_shape)), kind, window, bool(ceil), bool(cip))
        out = table.outputs[0]
        return records.pack_outputs([fit(store(y, out.dtype), out.shape)], table.outputs,
                                    record.output_bytes)  # fmt: skip

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """onnx.reference's implementation of the node (float32); global pools in numpy (the
        onnx.reference GlobalMaxPool mishandles 3 spatial axes)."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        x = np.asarray(inputs[0], F32)
        if self.kind in (KIND_GLOBAL_AVG, KIND_GLOBAL_MAX):
            axes = tuple(range(2, x.ndim))
            y = (
                x.mean(axes, keepdims=True)
                if self.kind == KIND_GLOBAL_AVG
                else x.max(axes, keepdims=True)
            )
            return [y.astype(cfg.outputs[0].dtype)]
        attrs = {k: v for k, v in cfg.attrs.items() if v is not None}
        node = helper.make_node(cfg.op_type, ["X"], ["Y"], **attrs)
        (y,) = ReferenceEvaluator(node).run(None, {"X": x})
        return [np.asarray(y).astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any padding on any axis of X (the kernel crops it) and of Y (written zero-filled)."""
        return ShapeConstraints(
            inputs=((1,) * len(cfg.inputs[0].shape),),  # type: ignore[union-attr]
            outputs=((1,) * len(cfg.outputs[0].shape),),
        )


def _window_geometry(
    attrs: dict[str, Any], x: TensorSpec, label: str, allowed: set[str]
) -> tuple[Window, tuple[int, ...]] | Decline:
    extra = set(attrs) - allowed
    if extra:
        return Decline(f"{label}: unsupported attributes {sorted(extra)}")
    kernel = attrs.get("kernel_shape")
    if kernel is None:
        return Decline(f"{label}: kernel_shape is required")
    spatial = x.logical_shape[2:]
    window = resolve_window(attrs, spatial, kernel)
    if isinstance(window, str):
        return Decline(f"{label}: {window}")
    if any(max(b, e) >= k * d for b, e, k, d in zip(window.pads_begin, window.pads_end,
                                                   window.kernel, window.dilations)):  # fmt: skip
        return Decline(f"{label}: pads {window.pads_begin + window.pads_end} reach a whole "
                       "window into the padding (onnxruntime rejects this)")  # fmt: skip
    ceil = bool(attrs.get("ceil_mode", 0) or 0)
    out = window.output_size(spatial, ceil)
    if any(o < 1 for o in out):
        return Decline(f"{label}: the windows do not fit the input (output size {out})")
    return window, out


class MaxPool(_Pool):
    """ONNX MaxPool (output Y only; the Indices output stays on the CPU)."""

    op_type = "MaxPool"
    kernel_id = 610
    kind = KIND_MAX

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if len(node.outputs) != 1:
            return Decline(f"MaxPool node '{node.name}': the Indices output is not supported")
        return super().match(node)

    def geometry(self, attrs, x, label):
        if int(attrs.get("storage_order", 0) or 0):
            return Decline(f"{label}: storage_order=1 only matters for Indices; not supported")
        return _window_geometry(
            attrs, x, label,
            {"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides",
             "storage_order"},
        )  # fmt: skip


class AveragePool(_Pool):
    """ONNX AveragePool (opset 19 dilations included)."""

    op_type = "AveragePool"
    kernel_id = 611
    kind = KIND_AVG

    def geometry(self, attrs, x, label):
        return _window_geometry(
            attrs, x, label,
            {"auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads",
             "strides"},
        )  # fmt: skip


class GlobalAveragePool(_Pool):
    """ONNX GlobalAveragePool: mean over the real spatial extent."""

    op_type = "GlobalAveragePool"
    kernel_id = 612
    kind = KIND_GLOBAL_AVG


class GlobalMaxPool(_Pool):
    """ONNX GlobalMaxPool: max over the real spatial extent."""

    op_type = "GlobalMaxPool"
    kernel_id = 613
    kind = KIND_GLOBAL_MAX


__all__ = ["AveragePool", "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "pool"]
