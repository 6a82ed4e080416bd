"""Resize (opset 10, 11, 13, 18, 19) and Upsample (opset 7, 9): kernel ids 770, 771.

Interpolation is separable, so the whole op is a short sequence of per-axis gathers. At match
time every resized axis gets a table (:class:`.resize_tables.AxisTable`): for each output position along that
axis, the input positions it reads (``taps``: 1 nearest, 2 linear, 4 cubic) and their weights.
The tables are computed with onnxruntime's float32 coordinate arithmetic, so nearest-neighbour
ties and edge clamping pick the same pixels as onnxruntime. They travel in the const region
(per table: int32 indices ``[out, taps]``, float32 weights ``[out, taps]`` unless nearest, and
for tf_crop_and_resize int32 ``outside`` flags ``[out]``), described by ``dims = [method,
extrapolate, n_tables, *(axis, out_len, taps) per table]``; ``floats = [extrapolation_value]``.

The kernel crops X to its real shape, then per table does ``taps`` ``np.take`` gathers along the
axis weighted and summed (nearest: one combined fancy-index gather, exact, any data dtype). Linear
and cubic follow the bf16 rule (:mod:`.dtypes`): X rounded to bf16, float32 weights and sums,
result rounded to bf16. No loop runs over pixels.

Supported: modes nearest (every ``nearest_mode``, and opset 10's rule: ``ceil`` when
downsampling, truncation otherwise), linear (any number of axes; onnxruntime's clamp of the
source coordinate to the input) and cubic (``cubic_coeff_a``, ``exclude_outside``);
``coordinate_transformation_mode`` half_pixel, half_pixel_symmetric, pytorch_half_pixel,
align_corners, asymmetric, tf_half_pixel_for_nn (nearest only) and tf_crop_and_resize (constant
roi; output positions whose source lies outside the input get ``extrapolation_value``); constant
``scales`` or ``sizes``, opset 18 ``axes`` and ``keep_aspect_ratio_policy``. Declined with a
reason: antialias, non-constant scales/sizes/roi.

Padding: every axis may be padded and none is tied: the kernel reads only the real input block
(resize windows would otherwise pull padded zeros into edge pixels) and zero-fills the output
outside its real shape.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch.errors import DeviceError
from npudispatch.operators import records
from npudispatch.operators.base import (
    Decline,
    OpConfig,
    Operator,
    ShapeConstraints,
    TensorSpec,
    check_node_kind,
    const_array,
    node_config,
    op_label,
    opset_version,
)
from npudispatch.operators.datamove import _crop, _data_spec, _place
from npudispatch.operators.dtypes import F32, FLOAT_DTYPES, store, to_compute
from npudispatch.operators.resize_tables import (
    COORDINATE_MODES,
    METHODS,
    NEAREST_MODES,
    POLICIES,
    SIMPLE,
    AxisTable,
    ResizeSpec,
    apply_tables,
    resize_tables,
)
from npudispatch.overlay_abi import ParamsRecord

# ---- the operators -------------------------------------------------------------------------


def _str_attr(node: ir.Node, name: str, default: str) -> str:
    return node.attributes.get_string(name, default)


class _ResizeBase(Operator):
    """Shared config, const region, kernel and padding of Resize and Upsample."""

    @abstractmethod
    def parse(self, node: ir.Node, label: str, version: int) -> dict[str, Any] | Decline:
        """Op-specific: ``method``, ``coordinate_mode``, ``nearest_mode``, ``cubic_a``,
        ``exclude_outside``, ``policy`` and the constant ``scales`` or ``sizes`` (with ``axes``)."""
        ...

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := check_node_kind(self, node)) is not None:
            return bad
        label = op_label(node)
        version = opset_version(node)
        if version is None:
            return Decline(
                f"{label}: the model declares no ONNX opset version, so the {node.op_type} "
                "semantics (inputs, coordinate rules) are unknown"
            )
        if len(node.outputs) != 1:
            return Decline(f"{label}: expects one output, got {len(node.outputs)}")
        x = _data_spec(node.inputs[0] if node.inputs else None, f"{label} input 0")
        if isinstance(x, Decline):
            return x
        got = self.parse(node, label, version)
        if isinstance(got, Decline):
            return got
        if got["method"] != "nearest" and x.dtype not in FLOAT_DTYPES:
            return Decline(
                f"{label}: {got['method']} interpolation of {x.dtype} data (float32 or bfloat16 "
                "only; nearest moves any data)"
            )
        sizes = _scales_and_sizes(x.logical_shape, got, label)
        if isinstance(sizes, Decline):
            return sizes
        scales, out_shape = sizes
        out = _data_spec(node.outputs[0], f"{label} output 0")
        if isinstance(out, Decline):
            return out
        if out.logical_shape != out_shape or out.dtype != x.dtype:
            return Decline(
                f"{label}: output is {out.logical_shape} {out.dtype}, the resize gives "
                f"{out_shape} {x.dtype}"
            )
        roi = _roi_per_axis(got, len(x.shape))
        if isinstance(roi, Decline):
            return Decline(f"{label}: {roi.reason}")
        spec = ResizeSpec(
            got["method"],
            got["coordinate_mode"],
            got["nearest_mode"],
            got["cubic_a"],
            got["exclude_outside"],
            scales,
            x.logical_shape,
            out_shape,
            roi=roi,
            extrapolation_value=got.get("extrapolation_value", 0.0),
        )
        inputs: list[TensorSpec | None] = [x] + [None] * (len(node.inputs) - 1)
        return node_config(
            self, node, inputs, [out], extra={"spec": spec, "tables": resize_tables(spec)}
        )

    # ---- records and const region --------------------------------------------------------
    def op_dims(self, cfg: OpConfig) -> list[int]:
        tables: list[AxisTable] = cfg.extra["tables"]
        spec: ResizeSpec = cfg.extra["spec"]
        return [
            METHODS.index(spec.method),
            int(spec.roi is not None),
            len(tables),
            *(v for t in tables for v in (t.axis, t.index.shape[0], t.index.shape[1])),
        ]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [cfg.extra["spec"].extrapolation_value]

    def format_consts(self, cfg: OpConfig) -> bytes:
        """Per table: int32 indices, float32 weights (interpolating methods), int32 outside
        flags (tf_crop_and_resize)."""
        parts: list[np.ndarray] = []
        for t in cfg.extra["tables"]:
            parts.append(np.ascontiguousarray(t.index, "<i4"))
            if t.weight is not None:
                parts.append(np.ascontiguousarray(t.weight, "<f4"))
            if t.outside is not None:
                parts.append(np.ascontiguousarray(t.outside, "<i4"))
        return records.pack_consts(parts)

    def kernel(self, record: ParamsRecord, operands: Sequence[Any]) -> list[np.ndarray]:
        table = records.decode_table(record.payload)
        dims = list(record.dims)
        if len(dims) < 3 or not 0 <= dims[0] < len(METHODS) or len(dims) != 3 + 3 * dims[2]:
            raise DeviceError(f"{self.op_type} record dims {dims} are not a resize plan")
        (value,) = records.decode_floats(record.payload, table)
        x = records.unpack_inputs(table, operands[:1], record.operand_bytes[:1])[0]
        (_, spec) = table.inputs[0]
        assert x is not None and spec is not None
        tables = _read_tables(dims, operands[1] if len(operands) > 1 else b"")
        (out,) = table.outputs
        real = _crop(x, spec)
        if dims[0] == 0:  # nearest: one exact gather
            y = apply_tables(real, tables, F32, value).astype(out.dtype, copy=False)
        else:
            y = store(apply_tables(to_compute(real), tables, F32, value), out.dtype)
        return records.pack_outputs(
            [_place(y, out, f"{self.op_type} output")], table.outputs, record.output_bytes
        )

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """ONNX semantics (onnxruntime's coordinate rules) on X, in float64 for interpolation."""
        x = np.asarray(inputs[0])
        tables, spec = cfg.extra["tables"], cfg.extra["spec"]
        if spec.method == "nearest":
            return [apply_tables(x, tables, np.float64, spec.extrapolation_value)]
        y = apply_tables(x.astype(np.float64), tables, np.float64, spec.extrapolation_value)
        return [y.astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any size on every axis of X and Y, nothing tied (the kernel reads real lanes only)."""
        x = cfg.inputs[0]
        assert x is not None
        return ShapeConstraints(
            ((1,) * len(x.shape), *([None] * (len(cfg.inputs) - 1))),
            ((1,) * len(cfg.outputs[0].shape),),
        )


def _read_tables(dims: list[int], const: Any) -> list[AxisTable]:
    raw = (
        np.frombuffer(memoryview(const).cast("B"), np.uint8)
        if len(const)
        else np.zeros(0, np.uint8)
    )
    interp, extrapolate = dims[0] != 0, dims[1] != 0
    tables, pos = [], 0

    def take(nbytes: int, dtype: str, k: int) -> np.ndarray:
        nonlocal pos
        if pos + nbytes > raw.size:
            raise DeviceError(f"resize table {k} runs past the {raw.size}-byte const region")
        pos += nbytes
        return raw[pos - nbytes : pos].view(dtype)

    for k in range(dims[2]):
        axis, n_out, taps = dims[3 + 3 * k : 6 + 3 * k]
        index = take(4 * n_out * taps, "<i4", k).reshape(n_out, taps)
        weight = take(4 * n_out * taps, "<f4", k).reshape(n_out, taps) if interp else None
        outside = take(4 * n_out, "<i4", k) if extrapolate else None
        tables.append(AxisTable(axis, index, weight, outside))
    return tables


def _roi_per_axis(
    got: dict[str, Any], rank: int
) -> tuple[tuple[float, float], ...] | Decline | None:
    """tf_crop_and_resize's roi as ``(start, end)`` per axis (``[0, 1]`` off ``axes``)."""
    roi = got.get("roi")
    if roi is None:
        return None
    axes = [a % rank for a in (got.get("axes") or range(rank))]
    if len(roi) != 2 * len(axes):
        return Decline(f"roi has {len(roi)} values for {len(axes)} axes (need start and end each)")
    per_axis = [(0.0, 1.0)] * rank
    for k, ax in enumerate(axes):
        per_axis[ax] = (roi[k], roi[k + len(axes)])
    return tuple(per_axis)


def _scales_and_sizes(
    in_shape: tuple[int, ...], got: dict[str, Any], label: str
) -> tuple[tuple[float, ...], tuple[int, ...]] | Decline:
    """Per-axis float32 scales and output sizes from constant scales or sizes (onnxruntime)."""
    rank = len(in_shape)
    axes = got.get("axes") or list(range(rank))
    norm = [a % rank if -rank <= a < rank else None for a in axes]
    if None in norm or len(set(norm)) != len(norm):
        return Decline(f"{label}: axes {axes} are out of range or repeated for rank {rank}")
    f32 = np.float32
    scales = [f32(1.0)] * rank
    out = list(in_shape)
    if got.get("sizes") is not None:
        sizes = [int(v) for v in got["sizes"]]
        if len(sizes) != len(norm):
            return Decline(f"{label}: {len(sizes)} sizes for {len(norm)} axes")
        if any(s <= 0 for s in sizes):
            return Decline(f"{label}: sizes {sizes} must be positive")
        for ax, size in zip(norm, sizes):
            assert ax is not None
            scales[ax] = f32(size) / f32(in_shape[ax])
            out[ax] = size
        policy = got.get("policy", "stretch")
        if policy != "stretch":
            picked = [scales[ax] for ax in norm if ax is not None]
            scale = min(picked) if policy == "not_larger" else max(picked)
            for ax in norm:
                assert ax is not None
                scales[ax] = scale
                out[ax] = int(np.round(np.float64(scale * f32(in_shape[ax]))))
    else:
        given = got.get("scales")
        if given is None:
            return Decline(f"{label}: neither scales nor sizes is given")
        values = [f32(v) for v in given]
        if len(values) != len(norm):
            return Decline(f"{label}: {len(values)} scales for {len(norm)} axes")
        for ax, s in zip(norm, values):
            assert ax is not None
            if not s > 0:
                return Decline(f"{label}: scale {s} on axis {ax} must be positive")
            scales[ax] = s
            out[ax] = int(s * f32(in_shape[ax]))  # float32 product, truncated (onnxruntime)
    if any(o <= 0 for o in out):
        return Decline(f"{label}: the output {tuple(out)} would be empty")
    return tuple(float(s) for s in scales), tuple(out)


def _const_floats(
    node: ir.Node, index: int, what: str, dtypes: tuple[str, ...] = ("float32",)
) -> list[float] | Decline | None:
    """Float constant input ``index`` as a list (None when absent or empty)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or not value.name:
        return None
    arr = const_array(value)
    if arr is None:
        return Decline(
            f"{what} '{value.name}' is not a constant (static resizes only: fold it with "
            "FoldShapesPass or make it an initializer)"
        )
    if arr.size == 0:
        return None
    if arr.dtype.name not in dtypes:
        return Decline(f"{what} '{value.name}' has dtype {arr.dtype}; ONNX requires {dtypes}")
    return [float(v) for v in arr.reshape(-1)]


class Resize(_ResizeBase):
    """ONNX Resize, opset 10 to 19 (see the module docstring for what is supported)."""

    op_type = "Resize"
    kernel_id = 770

    def parse(self, node, label, version):
        method = _str_attr(node, "mode", "nearest")
        if method not in METHODS:
            return Decline(f"{label}: mode {method!r} is not one of {METHODS}")
        if version < 11:
            if len(node.inputs) != 2:
                return Decline(f"{label}: Resize-{version} takes X and scales")
            scales = _const_floats(node, 1, f"{label} scales")
            if isinstance(scales, Decline):
                return scales
            if method == "cubic":
                return Decline(f"{label}: mode 'cubic' needs Resize-11 or later")
            return {
                "method": method,
                "coordinate_mode": "asymmetric",
                "nearest_mode": SIMPLE,
                "cubic_a": -0.75,
                "exclude_outside": False,
                "scales": scales,
            }
        if not 1 <= len(node.inputs) <= 4:
            return Decline(f"{label}: expects 1..4 inputs, got {len(node.inputs)}")
        coord = _str_attr(node, "coordinate_transformation_mode", "half_pixel")
        roi = None
        if coord == "tf_crop_and_resize":
            roi = _const_floats(node, 1, f"{label} roi", ("float32", "float64", "float16"))
            if isinstance(roi, Decline):
                return roi
            if roi is None:
                return Decline(f"{label}: tf_crop_and_resize needs a constant, non-empty roi")
        elif coord not in COORDINATE_MODES or (coord == "half_pixel_symmetric" and version < 19):
            return Decline(
                f"{label}: coordinate_transformation_mode {coord!r} is not supported (one of "
                f"{COORDINATE_MODES}; half_pixel_symmetric needs opset 19)"
            )
        if coord == "tf_half_pixel_for_nn" and method != "nearest":
            return Decline(
                f"{label}: coordinate_transformation_mode 'tf_half_pixel_for_nn' is defined for "
                f"mode 'nearest' only, not {method!r}"
            )
        nearest = _str_attr(node, "nearest_mode", "round_prefer_floor")
        if method == "nearest" and nearest not in NEAREST_MODES:
            return Decline(f"{label}: nearest_mode {nearest!r} is not one of {NEAREST_MODES}")
        if node.attributes.get_int("antialias", 0):
            return Decline(
                f"{label}: antialias=1 (a widened filter when downsampling) is not supported"
            )
        exclude = bool(node.attributes.get_int("exclude_outside", 0))
        if exclude and method != "cubic":
            return Decline(f"{label}: exclude_outside=1 applies to mode 'cubic' only")
        policy = _str_attr(node, "keep_aspect_ratio_policy", "stretch")
        if policy not in POLICIES:
            return Decline(f"{label}: keep_aspect_ratio_policy {policy!r} is not one of {POLICIES}")
        scales = _const_floats(node, 2, f"{label} scales")
        if isinstance(scales, Decline):
            return scales
        sizes_value = node.inputs[3] if len(node.inputs) > 3 else None
        sizes = None
        if sizes_value is not None and sizes_value.name:
            arr = const_array(sizes_value)
            if arr is None:
                return Decline(
                    f"{label} sizes '{sizes_value.name}' is not a constant (static resizes only: "
                    "fold it with FoldShapesPass or make it an initializer)"
                )
            sizes = [int(v) for v in arr.reshape(-1)] if arr.size else None
        if (scales is None) == (sizes is None):
            return Decline(f"{label}: exactly one of scales and sizes must be given")
        if policy != "stretch" and sizes is None:
            return Decline(f"{label}: keep_aspect_ratio_policy={policy!r} needs sizes")
        axes = node.attributes.get_ints("axes", None)
        return {
            "method": method,
            "coordinate_mode": coord,
            "nearest_mode": nearest,
            "cubic_a": float(node.attributes.get_float("cubic_coeff_a", -0.75)),
            "exclude_outside": exclude,
            "scales": scales,
            "sizes": sizes,
            "axes": None if axes is None or version < 18 else [int(a) for a in axes],
            "policy": policy if version >= 18 else "stretch",
            "roi": roi,
            "extrapolation_value": float(node.attributes.get_float("extrapolation_value", 0.0)),
        }


class Upsample(_ResizeBase):
    """ONNX Upsample (opset 7: ``scales`` attribute; opset 9: ``scales`` input), deprecated since
    opset 10: asymmetric coordinates, nearest by truncation, linear with clamping."""

    op_type = "Upsample"
    kernel_id = 771

    def parse(self, node, label, version):
        if version >= 10:
            return Decline(
                f"{label}: Upsample is deprecated since opset 10 (this model: {version})"
            )
        method = _str_attr(node, "mode", "nearest")
        if method == "bilinear":
            method = "linear"
        if method not in ("nearest", "linear"):
            return Decline(f"{label}: mode {method!r} is not nearest or linear")
        if version < 9:
            scales = node.attributes.get_floats("scales", None)
            scales = None if scales is None else [float(s) for s in scales]
        else:
            scales = _const_floats(node, 1, f"{label} scales")
            if isinstance(scales, Decline):
                return scales
        if scales is None:
            return Decline(f"{label}: scales are required")
        if any(s < 1 for s in scales):
            return Decline(f"{label}: Upsample scales {scales} must be >= 1")
        return {
            "method": method,
            "coordinate_mode": "asymmetric",
            "nearest_mode": SIMPLE,
            "cubic_a": -0.75,
            "exclude_outside": False,
            "scales": scales,
        }
