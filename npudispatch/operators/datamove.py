"""Data movement: Split, Concat, Slice (ONNX semantics, exact: no bf16 rounding, bytes are moved).

Two execution modes per launch, chosen in ``match`` and written to ``dims[0]``:

* **DMA mode** (``MODE_DMA``): the shim DMA does the data movement with one n-d pattern and the
  kernel only forwards bytes.

  - ``Slice`` reads just the window: one strided MM2S stream (``start`` offset, per-axis
    ``step·stride``), so the operand *is* the output.
  - ``Split`` into equal parts reads the input with one 3-d gather (d0 = one part's contiguous run,
    d1 = the rows before the axis, d2 = the next part), so the operand is the outputs back to back.
  - ``Concat`` writes the output with S2MM scatter patterns: the kernel emits the inputs back to
    back and one pattern (equal parts) or one pattern per input (at most :data:`MAX_SCATTER`
    inputs) places each at its offset along the axis.

  Only a *single* strided operand stream and at most two strided output streams are used, the
  channels a one-column launch has, because the params record (and so the mode) is built before
  the column count is known; the choice therefore never depends on ``num_cols``.
* **Kernel mode** (``MODE_KERNEL``): operands are streamed linearly and the kernel crops every
  input to its real shape, applies the ONNX op with numpy and zero-pads the result to the padded
  output shape. Used when the pattern cannot express the move: the run of a part is not whole
  32-bit words (odd bf16/int8/int16 runs), a wrap exceeds :data:`MAX_WRAP` (10-bit field) or a step
  :data:`MAX_STEP` (20-bit field), unequal Split parts, negative Slice steps, an axis the padding
  pass padded, or more Concat inputs than scatter channels.

Padding (``granularity``): every axis may be padded. Axes other than the split/concat axis and
axes a Slice copies whole are tied between input(s) and output(s), so padding keeps the DMA
layout; the split/concat/sliced axes are left untied. If the padding pass pads one of those anyway
(an upstream op wants it), ``match`` picks kernel mode, which works on real shapes, so padded lanes
never leak into results.

Dtypes: float32, bfloat16 and the 8/16/32-bit integers (moving bytes is dtype-agnostic). int64 is
declined on purpose: exporters use int64 Concat/Slice for shape arithmetic, which stays on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from npudispatch.operators import dma, records
from npudispatch.operators.base import (
    Decline,
    OpConfig,
    ShapeConstraints,
    TensorSpec,
    check_node_kind,
    const_array,
    node_config,
    op_label,
)
from npudispatch.operators.datamove_common import (  # re-exported: other operators import them here
    DATA_DTYPES,
    MAX_SCATTER,
    MODE_DMA,
    MODE_KERNEL,
    Window,
    _axis_extents,
    _bytes_out,
    _crop,
    _data_spec,
    _DataMove,
    _int_param,
    _norm_axis,
    _parts_window,
    _place,
    _through,
    _with_axis,
    strided_window,
)

__all__ = [
    "DATA_DTYPES",
    "MAX_SCATTER",
    "MODE_DMA",
    "MODE_KERNEL",
    "Concat",
    "Slice",
    "Split",
    "Window",
    "slice_bounds",
    "strided_window",
]


# ---- Split ---------------------------------------------------------------------------------


class Split(_DataMove):
    """ONNX Split (``split`` input of opset 13+, ``num_outputs`` of 18, ``split`` attr of <13).

    dims: ``[mode, axis, *sizes]``. DMA mode for equal parts whose run is whole words (one gather
    pattern); kernel mode otherwise.
    """

    op_type = "Split"
    kernel_id = 60

    def match(self, node: ir.Node) -> OpConfig | Decline:
        got = Decline.check(self.match_data_input(node, 2))
        x, label = got
        rank = len(x.shape)
        axis = Decline.check(_norm_axis(int(node.attributes.get_int("axis", 0)), rank, label))
        n = len(node.outputs)
        dim = x.logical_shape[axis]
        sizes = Decline.check(_int_param(node, 1, "split", f"{label} split sizes"))
        num = node.attributes.get_int("num_outputs", None)
        if sizes is not None and num is not None:
            return Decline(f"{label}: both 'split' and num_outputs given (ONNX allows one)")
        if sizes is None:
            parts = num if num is not None else n
            if parts != n:
                return Decline(f"{label}: num_outputs={parts} but the node has {n} outputs")
            chunk = -(-dim // parts) if num is not None else dim // parts
            sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
            if num is None and dim % parts:
                return Decline(
                    f"{label}: axis {axis} of size {dim} does not split into {n} equal parts"
                )
        if len(sizes) != n:
            return Decline(f"{label}: {len(sizes)} split sizes {sizes} for {n} outputs")
        if any(s <= 0 for s in sizes) or sum(sizes) != dim:
            return Decline(
                f"{label}: split sizes {sizes} must be positive and sum to axis {axis} size {dim}"
            )
        outs: list[TensorSpec] = []
        for j, (value, size) in enumerate(zip(node.outputs, sizes)):
            spec = Decline.check(_data_spec(value if value.name else None, f"{label} output {j}"))
            want = _with_axis(x.logical_shape, axis, size)
            if spec.logical_shape != want or spec.dtype != x.dtype:
                return Decline(
                    f"{label}: output {j} is {spec.logical_shape} {spec.dtype}, expected {want} "
                    f"{x.dtype}"
                )
            outs.append(spec)
        return node_config(
            self,
            node,
            [x] + [None] * (len(node.inputs) - 1),  # sizes travel in dims
            outs,
            extra={"axis": axis, "sizes": sizes, "window": self._gather(x, outs, axis, sizes)},
        )

    @staticmethod
    def _gather(
        x: TensorSpec, outs: list[TensorSpec], axis: int, sizes: list[int]
    ) -> Window | None:
        """The one-pattern gather of every output back to back, if the layout allows it."""
        if len(set(sizes)) != 1:
            return None
        for spec, size in zip(outs, sizes):  # outputs padded like the input, never on the axis
            if spec.shape != _with_axis(x.shape, axis, size):
                return None
        return _parts_window(x.shape, axis, sizes[0], len(sizes), np.dtype(x.dtype).itemsize)

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any size; every axis but the split axis tied between the input and all outputs."""
        rank, axis = len(cfg.outputs[0].shape), cfg.extra["axis"]
        return ShapeConstraints(
            ((1,) * rank, *([None] * (len(cfg.inputs) - 1))),
            tuple((1,) * rank for _ in cfg.outputs),
            tuple(
                (("in", 0, ax), *(("out", j, ax) for j in range(len(cfg.outputs))))
                for ax in range(rank)
                if ax != axis
            ),
        )

    def op_dims(self, cfg: OpConfig) -> list[int]:
        mode = MODE_DMA if cfg.extra["window"] is not None else MODE_KERNEL
        return [mode, cfg.extra["axis"], *cfg.extra["sizes"]]

    def move(self, table, inputs, dims):
        axis, sizes = dims[0], dims[1:]
        (_, spec), x = table.inputs[0], inputs[0]
        assert spec is not None and x is not None
        real = _crop(x, spec)
        bounds = np.cumsum([0, *sizes])
        return [
            _place(np.take(real, np.arange(lo, hi), axis=axis), out, f"Split output {j}")
            for j, (lo, hi, out) in enumerate(zip(bounds[:-1], bounds[1:], table.outputs))
        ]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        cuts = np.cumsum(cfg.extra["sizes"])[:-1]
        return [
            np.asarray(p) for p in np.split(np.asarray(inputs[0]), cuts, axis=cfg.extra["axis"])
        ]


# ---- Concat --------------------------------------------------------------------------------


class Concat(_DataMove):
    """ONNX Concat (constant inputs travel in the const region).

    dims: ``[mode, axis]``. DMA mode scatters the inputs into the output with S2MM patterns.
    """

    op_type = "Concat"
    kernel_id = 61

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := check_node_kind(self, node)) is not None:
            return bad
        label = op_label(node)
        if not node.inputs or len(node.outputs) != 1:
            return Decline(f"{label}: needs inputs and one output")
        ins: list[TensorSpec] = []
        consts: dict[int, np.ndarray] = {}
        for i, value in enumerate(node.inputs):
            spec = Decline.check(_data_spec(value, f"{label} input {i}"))
            ins.append(spec)
            if (arr := const_array(value)) is not None:
                consts[i] = arr
        if len(consts) == len(ins):
            return Decline(f"{label}: every input is constant (fold it on the CPU instead)")
        out = Decline.check(_data_spec(node.outputs[0], f"{label} output 0"))
        if "axis" not in node.attributes:
            return Decline(f"{label}: attribute 'axis' is required")
        rank = len(out.shape)
        axis = Decline.check(_norm_axis(node.attributes.get_int("axis"), rank, label))
        for i, spec in enumerate(ins):
            if spec.dtype != out.dtype or len(spec.shape) != rank:
                return Decline(
                    f"{label}: input {i} is rank {len(spec.shape)} {spec.dtype}, the output rank "
                    f"{rank} {out.dtype} (inputs must share rank and dtype)"
                )
            real, want = spec.logical_shape, out.logical_shape
            if real[:axis] + real[axis + 1 :] != want[:axis] + want[axis + 1 :]:
                return Decline(
                    f"{label}: input {i} {real} does not match output {want} off axis {axis}"
                )
        total = sum(s.logical_shape[axis] for s in ins)
        if total != out.logical_shape[axis]:
            return Decline(
                f"{label}: inputs sum to {total} on axis {axis}, output has {out.logical_shape[axis]}"
            )
        return node_config(
            self,
            node,
            list(ins),
            [out],
            consts=consts,
            extra={"axis": axis, "windows": self._scatter(ins, out, axis)},
        )

    @staticmethod
    def _scatter(ins: list[TensorSpec], out: TensorSpec, axis: int) -> list[Window] | None:
        """S2MM scatter windows (one for equal parts, else one per input), if the layout allows."""
        itemsize = np.dtype(out.dtype).itemsize
        for spec in ins:  # inputs padded like the output off the axis, never on the axis
            if spec.shape != _with_axis(out.shape, axis, spec.logical_shape[axis]):
                return None
        sizes = [s.shape[axis] for s in ins]
        if sum(sizes) != out.shape[axis]:  # the output's axis is padded: its tail must be zeros
            return None
        if len(set(sizes)) == 1:
            w = _parts_window(out.shape, axis, sizes[0], len(sizes), itemsize)
            return None if w is None else [w]
        if len(sizes) > MAX_SCATTER:
            return None
        outer, inner = _axis_extents(out.shape, axis)
        windows = []
        for start, size in zip(np.cumsum([0, *sizes[:-1]]), sizes):
            dims = [(outer, out.shape[axis] * inner), (size * inner, 1)]
            w = strided_window(int(start) * inner, dims, itemsize)
            if w is None:
                return None
            windows.append(w)
        return windows

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any size; every axis but the concat axis tied between all inputs and the output
        (constant inputs get zero-padded copies)."""
        rank, axis = len(cfg.outputs[0].shape), cfg.extra["axis"]
        n = len(cfg.inputs)
        return ShapeConstraints(
            tuple((1,) * rank for _ in range(n)),
            ((1,) * rank,),
            tuple(
                (*(("in", i, ax) for i in range(n)), ("out", 0, ax))
                for ax in range(rank)
                if ax != axis
            ),
        )

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [MODE_DMA if cfg.extra["windows"] else MODE_KERNEL, cfg.extra["axis"]]

    def output_streams(self, cfg: OpConfig) -> list[dma.Stream]:
        (s,) = super().output_streams(cfg)
        windows: list[Window] | None = cfg.extra["windows"]
        if not windows:
            return [s]
        return [_through(s, w) for w in windows]

    def forward(self, table, operands, record):
        inputs = records.unpack_inputs(table, operands, record.operand_bytes)
        raw = b"".join(np.ascontiguousarray(x).tobytes() for x in inputs if x is not None)
        return [_bytes_out(raw, record.output_bytes[0], "Concat output")]

    def move(self, table, inputs, dims):
        (axis,) = dims
        parts = [_crop(x, spec) for (_, spec), x in zip(table.inputs, inputs) if x is not None]
        (out,) = table.outputs
        return [_place(np.concatenate(parts, axis=axis), out, "Concat output")]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate([np.asarray(x) for x in inputs], axis=cfg.extra["axis"])]


# ---- Slice ---------------------------------------------------------------------------------


def slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int]:
    """ONNX Slice normalization of one axis: ``(first index, element count)``."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return start, max(0, -(-(end - start) // step))
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return start, max(0, -(-(start - end) // -step))


def _take(x: np.ndarray, axes: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``x`` sliced by per-axis ``(first, step, count)``."""
    index = []
    for first, step, count in axes:
        stop = first + step * count
        index.append(slice(first, stop if stop >= 0 else None, step))
    return x[tuple(index)]


class Slice(_DataMove):
    """ONNX Slice with constant starts/ends/axes/steps (any steps; negative indices; clamping).

    dims: ``[mode, *(first, step, count) per axis]`` in real coordinates. DMA mode reads exactly the
    window with one strided BD (positive steps, whole-word runs); kernel mode slices in the core.
    """

    op_type = "Slice"
    kernel_id = 62

    def match(self, node: ir.Node) -> OpConfig | Decline:
        got = Decline.check(self.match_data_input(node, 5))
        x, label = got
        rank = len(x.shape)
        params: dict[str, list[int] | None] = {}
        for index, name in enumerate(("starts", "ends", "axes", "steps"), start=1):
            got = Decline.check(_int_param(node, index, name, f"{label} {name}"))
            params[name] = got
        starts, ends = params["starts"], params["ends"]
        if starts is None or ends is None or len(starts) != len(ends):
            return Decline(f"{label}: starts {starts} and ends {ends} must be given, same length")
        axes = params["axes"] if params["axes"] is not None else list(range(len(starts)))
        steps = params["steps"] if params["steps"] is not None else [1] * len(starts)
        if not len(axes) == len(steps) == len(starts):
            return Decline(f"{label}: starts/ends/axes/steps lengths differ")
        norm: list[int] = []
        for a in axes:
            ax = Decline.check(_norm_axis(a, rank, label))
            norm.append(ax)
        if len(set(norm)) != len(norm):
            return Decline(f"{label}: repeated axes {axes}")
        if 0 in steps:
            return Decline(f"{label}: steps {steps} contain 0 (invalid in ONNX)")
        real = x.logical_shape
        window = [(0, 1, d) for d in real]  # (first, step, count) per axis
        for ax, s, e, st in zip(norm, starts, ends, steps):
            first, count = slice_bounds(real[ax], s, e, st)
            window[ax] = (first, st, count)
        want = tuple(c for _, _, c in window)
        if 0 in want:
            return Decline(f"{label}: the slice of {real} is empty {want}: nothing to move")
        out = Decline.check(
            _data_spec(node.outputs[0] if node.outputs else None, f"{label} output 0")
        )
        if out.logical_shape != want or out.dtype != x.dtype:
            return Decline(
                f"{label}: output is {out.logical_shape} {out.dtype}, expected {want} {x.dtype}"
            )
        whole = [window[ax] == (0, 1, real[ax]) for ax in range(rank)]
        return node_config(
            self,
            node,
            [x] + [None] * (len(node.inputs) - 1),  # bounds travel in dims
            [out],
            extra={"slices": window, "whole": whole, "window": self._read(x, out, window, whole)},
        )

    @staticmethod
    def _read(
        x: TensorSpec, out: TensorSpec, window: list[tuple[int, int, int]], whole: list[bool]
    ) -> Window | None:
        """One strided read of exactly the output's (padded) layout, if the pattern allows it."""
        strides = np.cumprod([1, *x.shape[::-1]])[:-1][::-1]
        dims, offset = [], 0
        for ax, (first, step, count) in enumerate(window):
            q = out.shape[ax]
            if step < 0 or not (q == count or (whole[ax] and q == x.shape[ax])):
                return None  # reversed, or zeros the DMA cannot produce
            offset += first * int(strides[ax])
            dims.append((q, step * int(strides[ax])))
        return strided_window(offset, dims, np.dtype(x.dtype).itemsize)

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any size; axes the slice copies whole are tied between input and output."""
        rank = len(cfg.outputs[0].shape)
        return ShapeConstraints(
            ((1,) * rank, *([None] * (len(cfg.inputs) - 1))),
            ((1,) * rank,),
            tuple((("in", 0, ax), ("out", 0, ax)) for ax in range(rank) if cfg.extra["whole"][ax]),
        )

    def op_dims(self, cfg: OpConfig) -> list[int]:
        mode = MODE_DMA if cfg.extra["window"] is not None else MODE_KERNEL
        return [mode, *(v for triple in cfg.extra["slices"] for v in triple)]

    def move(self, table, inputs, dims):
        (_, spec), x = table.inputs[0], inputs[0]
        assert spec is not None and x is not None
        axes = [tuple(dims[i : i + 3]) for i in range(0, len(dims), 3)]
        (out,) = table.outputs
        return [_place(_take(_crop(x, spec), axes), out, "Slice output")]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(_take(np.asarray(inputs[0]), cfg.extra["slices"]))]
