"""Resize gather tables: per-axis source indices and weights computed with onnxruntime's
float32 coordinate arithmetic, and their application with vectorized gathers (no loop over
pixels). Used by the Resize and Upsample operators (:mod:`.resize`), which build the tables at
match time and ship them in the const region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npudispatch.operators.dtypes import F32

METHODS = ("nearest", "linear", "cubic")
COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
)
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
SIMPLE = "simple"  # opset < 11: ceil when downsampling, truncation otherwise (onnxruntime)
POLICIES = ("stretch", "not_larger", "not_smaller")


@dataclass(frozen=True)
class ResizeSpec:
    """What one Resize computes, per axis of X (real shapes)."""

    method: str
    coordinate_mode: str
    nearest_mode: str
    cubic_a: float
    exclude_outside: bool
    scales: tuple[float, ...]  # float32 values, one per axis
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    roi: tuple[tuple[float, float], ...] | None = None  # tf_crop_and_resize: (start, end) per axis
    extrapolation_value: float = 0.0


@dataclass(frozen=True)
class AxisTable:
    """Gather table of one resized axis: ``index[o, k]`` is the input position tap ``k`` of output
    position ``o`` reads, ``weight[o, k]`` its weight (None for nearest)."""

    axis: int
    index: np.ndarray  # int32 [out, taps]
    weight: np.ndarray | None  # float32 [out, taps]
    outside: np.ndarray | None = None  # tf_crop_and_resize: int32 [out], 1 = extrapolated


# ---- coordinate tables (onnxruntime's float32 arithmetic) ----------------------------------


def original_coordinates(
    out_len: int, in_len: int, scale: float, mode: str, roi: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Source coordinate of every output position along one axis (float32)."""
    f = np.float32
    x = np.arange(out_len, dtype=f)
    s, half = f(scale), f(0.5)
    if mode == "tf_crop_and_resize":
        start, end = f(roi[0]), f(roi[1])
        if out_len == 1:
            return np.array([0.5 * (float(start) + float(end)) * (in_len - 1)], f)
        return start * f(in_len - 1) + (x * (end - start) * f(in_len - 1)) / f(out_len - 1)
    if mode == "asymmetric":
        return x / s
    if mode == "pytorch_half_pixel":
        return (x + half) / s - half if out_len > 1 else np.zeros(out_len, f)
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / s
    if mode == "align_corners":
        if out_len == 1:
            return np.zeros(1, f)
        return x * f(in_len - 1) / f(out_len - 1)
    if mode == "half_pixel_symmetric":
        adjustment = f(out_len) / (s * f(in_len))
        offset = f(in_len) / f(2) * (f(1) - adjustment)
        return (offset + (x.astype(np.float64) + 0.5) / float(s) - 0.5).astype(f)
    return (x + half) / s - half  # half_pixel


def nearest_index(coords: np.ndarray, mode: str, downsampling: bool) -> np.ndarray:
    """Nearest input position per ``nearest_mode`` (before clamping)."""
    c = coords.astype(np.float64)  # exact widening of the float32 coordinates
    away = np.sign(c) * np.floor(np.abs(c) + 0.5)  # C++ std::round: halves away from zero
    if mode == "round_prefer_floor":
        return np.where(c == np.trunc(c) + 0.5, np.floor(c), away)
    if mode == "round_prefer_ceil":
        return away
    if mode == "floor":
        return np.floor(c)
    if mode == "ceil":
        return np.ceil(c)
    return np.ceil(c) if downsampling else np.trunc(c)  # SIMPLE


def cubic_weights(frac: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights of taps ``-1, 0, 1, 2`` for fractional offsets ``frac``."""
    s = np.abs(frac.astype(np.float64))[:, None]
    d = np.concatenate([s + 1, s, 1 - s, 2 - s], axis=1)  # distance of each tap
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far)


def axis_table(spec: ResizeSpec, axis: int) -> AxisTable:
    """The gather table of one axis."""
    n_in, n_out, scale = spec.in_shape[axis], spec.out_shape[axis], spec.scales[axis]
    roi = spec.roi[axis] if spec.roi is not None else (0.0, 1.0)
    coords = original_coordinates(n_out, n_in, scale, spec.coordinate_mode, roi)
    table = _axis_taps(spec, axis, coords, n_in, scale)
    if spec.roi is None:
        return table
    outside = ((coords < 0) | (coords > np.float32(n_in - 1))).astype(np.int32)
    return AxisTable(axis, table.index, table.weight, outside)


def _axis_taps(
    spec: ResizeSpec, axis: int, coords: np.ndarray, n_in: int, scale: float
) -> AxisTable:
    if spec.method == "nearest":
        idx = nearest_index(coords, spec.nearest_mode, scale < 1.0)
        return AxisTable(axis, np.clip(idx, 0, n_in - 1).astype(np.int32)[:, None], None)
    if spec.method == "linear":
        c = np.clip(coords, np.float32(0), np.float32(n_in - 1))
        x1 = np.minimum(np.trunc(c).astype(np.int64), n_in - 1)
        x2 = np.minimum(x1 + 1, n_in - 1)
        d1 = np.abs(c - x1.astype(np.float32))  # weight of x2
        d2 = np.abs(c - x2.astype(np.float32))  # weight of x1
        same = x1 == x2
        d1, d2 = np.where(same, 0.5, d1), np.where(same, 0.5, d2)
        index = np.stack([x1, x2], axis=1)
        weight = np.stack([d2, d1], axis=1)
        return AxisTable(axis, index.astype(np.int32), weight.astype(F32))
    base = np.floor(coords.astype(np.float64))
    weight = cubic_weights(coords.astype(np.float64) - base, spec.cubic_a)
    index = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    if spec.exclude_outside:
        weight = np.where((index >= 0) & (index < n_in), weight, 0.0)
        weight = weight / weight.sum(axis=1, keepdims=True)
    index = np.clip(index, 0, n_in - 1)
    return AxisTable(axis, index.astype(np.int32), weight.astype(F32))


def _is_identity(table: AxisTable, n_in: int) -> bool:
    if table.index.shape[0] != n_in or (table.outside is not None and table.outside.any()):
        return False
    own = table.index == np.arange(n_in)[:, None]
    if table.weight is None:
        return bool(own.all())
    w = table.weight.astype(np.float64)
    return bool(np.all(np.where(own, w, 0).sum(1) == 1) and np.all(np.where(own, 0, w) == 0))


def resize_tables(spec: ResizeSpec) -> list[AxisTable]:
    """Tables of every axis the resize changes. An axis with scale 1 and its size unchanged is
    left alone whatever the coordinate mode (as onnxruntime does: tf_half_pixel_for_nn would
    otherwise shift it by one pixel), and so is any axis whose table is the identity."""
    tables = [
        axis_table(spec, ax)
        for ax, (n, m, s) in enumerate(zip(spec.in_shape, spec.out_shape, spec.scales))
        if spec.roi is not None or not (s == 1.0 and n == m)
    ]
    return [t for t in tables if not _is_identity(t, spec.in_shape[t.axis])]


def apply_tables(
    x: np.ndarray, tables: Sequence[AxisTable], dtype: Any, extrapolation_value: float = 0.0
) -> np.ndarray:
    """Resize ``x`` (real shape) with ``tables``: gathers, weighted sums in ``dtype``; output
    positions a table marks ``outside`` get ``extrapolation_value`` (tf_crop_and_resize)."""
    y = _gather(x, tables, dtype)
    masks = [t for t in tables if t.outside is not None and t.outside.any()]
    if not masks:
        return y
    outside = np.zeros(y.shape, bool)
    for t in masks:
        shape = [1] * y.ndim
        shape[t.axis] = t.outside.shape[0]
        outside |= t.outside.astype(bool).reshape(shape)
    return np.where(outside, np.asarray(extrapolation_value).astype(y.dtype), y)


def _gather(x: np.ndarray, tables: Sequence[AxisTable], dtype: Any) -> np.ndarray:
    if not tables or tables[0].weight is None:
        # Nearest: one take per resized axis (the same elements as one np.ix_ gather over every
        # axis, several times faster).
        y = x
        for t in tables:
            y = np.take(y, t.index[:, 0], axis=t.axis)
        return y if tables else np.array(x)
    y = np.asarray(x, dtype=dtype)
    for t in tables:
        assert t.weight is not None
        shape = [1] * y.ndim
        shape[t.axis] = t.index.shape[0]
        acc = None
        for k in range(t.index.shape[1]):
            term = np.take(y, t.index[:, k], axis=t.axis) * t.weight[:, k].astype(dtype).reshape(
                shape
            )
            acc = term if acc is None else acc + term
        y = acc
    return y
