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

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch.errors import DeviceError
from npudispatch.operators import dma, records
from npudispatch.operators.base import (
    ArgKind,
    Decline,
    OpConfig,
    Operator,
    ShapeConstraints,
    TensorSpec,
    check_node_kind,
    const_array,
    node_config,
    op_label,
    tensor_spec,
)
from npudispatch.operators.dma import MAX_STEP, MAX_WRAP
from npudispatch.operators.dtypes import BF16, F32
from npudispatch.overlay_abi import ParamsRecord, output_channels

MAX_SCATTER = len(output_channels(1))  # strided output streams a one-column launch can take
MODE_KERNEL, MODE_DMA = 0, 1

DATA_DTYPES = (
    F32,
    BF16,
    np.dtype(np.int8),
    np.dtype(np.uint8),
    np.dtype(np.int16),
    np.dtype(np.uint16),
    np.dtype(np.int32),
)


# ---- n-d windows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A byte range of a buffer read or written by one DMA stream (pattern None = linear)."""

    offset: int
    nbytes: int
    pattern: dma.Pattern | None


def strided_window(offset: int, dims: Sequence[tuple[int, int]], itemsize: int) -> Window | None:
    """The single-BD stream that visits elements ``offset + Σ i_k·stride_k`` in row-major order.

    ``dims`` are ``(count, stride)`` in elements, outermost first. Returns None when one shim BD
    cannot express it in 32-bit words: a contiguous run or offset that is not whole words, a
    strided element narrower than a word, more than 3 dimensions, or wraps/steps over the field
    limits. A contiguous run longer than :data:`MAX_WRAP` words is folded into two dimensions.
    """
    if any(c <= 0 for c, _ in dims):
        return None
    merged: list[tuple[int, int]] = []
    for count, stride in dims:
        if count == 1:
            continue
        if merged and merged[-1][1] == count * stride:  # outer step == this dim's extent
            merged[-1] = (merged[-1][0] * count, stride)
        else:
            merged.append((count, stride))
    if not merged:
        merged = [(1, 1)]
    inner_count, inner_stride = merged[-1]
    if (offset * itemsize) % 4:
        return None
    if inner_stride == 1:  # contiguous run: count it in words
        run = inner_count * itemsize
        if run % 4 or any((s * itemsize) % 4 for _, s in merged[:-1]):
            return None
        words = [(c, s * itemsize // 4) for c, s in merged[:-1]] + [(run // 4, 1)]
    elif itemsize == 4:
        words = list(merged)
    else:
        return None
    if len(words) == 1 and words[0][1] == 1:
        return Window(offset * itemsize, 4 * words[0][0], None)
    count, stride = words[-1]
    if count > MAX_WRAP and len(words) < 3:
        fold = max((b for b in range(2, MAX_WRAP + 1) if count % b == 0), default=None)
        if fold is None:
            return None
        words[-1:] = [(count // fold, fold * stride), (fold, stride)]
    if len(words) > 3 or words[-1][0] > MAX_WRAP:
        return None
    if len(words) == 3 and words[1][0] > MAX_WRAP:
        return None
    if any(not 1 <= s <= MAX_STEP for _, s in words):
        return None
    d0 = words[-1]
    if len(words) == 1:
        pattern = dma.Pattern(d0_wrap=d0[0], d0_step=d0[1])
    elif len(words) == 2:
        pattern = dma.Pattern(d0_wrap=d0[0], d0_step=d0[1], d1_wrap=0, d1_step=words[0][1])
    else:
        pattern = dma.Pattern(d0[0], d0[1], words[1][0], words[1][1], words[0][1])
    total = int(np.prod([c for c, _ in words], dtype=np.int64))
    return Window(offset * itemsize, 4 * total, pattern)


def _with_axis(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
    return (*shape[:axis], size, *shape[axis + 1 :])


def _axis_extents(shape: Sequence[int], axis: int) -> tuple[int, int]:
    """``(outer, inner)`` element counts before and after ``axis``."""
    return int(np.prod(shape[:axis], dtype=np.int64)), int(
        np.prod(shape[axis + 1 :], dtype=np.int64)
    )


def _through(stream: dma.Stream, window: Window) -> dma.Stream:
    """The part of ``stream`` that ``window`` covers, with its pattern."""
    return dma.Stream(stream.argidx, stream.offset + window.offset, window.nbytes, window.pattern)


def _parts_window(
    shape: Sequence[int], axis: int, part: int, n: int, itemsize: int
) -> Window | None:
    """Gather (or scatter) of ``n`` equal parts of ``part`` along ``axis``, parts back to back."""
    outer, inner = _axis_extents(shape, axis)
    run = part * inner
    return strided_window(0, [(n, run), (outer, shape[axis] * inner), (run, 1)], itemsize)


# ---- shared kernel plumbing ---------------------------------------------------------------


def _crop(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return x[tuple(slice(0, r) for r in spec.logical_shape)]


def _place(y: np.ndarray, spec: TensorSpec, what: str) -> np.ndarray:
    """``y`` (real shape) zero-padded to ``spec.shape``."""
    if y.shape != spec.logical_shape:
        raise DeviceError(
            f"{what}: kernel result {y.shape} is not the real shape {spec.logical_shape}"
        )
    out = np.zeros(spec.shape, dtype=spec.dtype)
    out[tuple(slice(0, r) for r in y.shape)] = y
    return out


def _bytes_out(raw: bytes, nbytes: int, what: str) -> np.ndarray:
    if len(raw) > nbytes:
        raise DeviceError(f"{what}: {len(raw)} bytes do not fit the {nbytes}-byte output stream")
    return np.frombuffer(raw + b"\0" * (nbytes - len(raw)), dtype=np.uint8)


def _data_spec(value: ir.Value | None, what: str) -> TensorSpec | Decline:
    spec = tensor_spec(value, what)
    if isinstance(spec, Decline):
        return spec
    assert value is not None  # tensor_spec declines a missing value
    if spec.dtype not in DATA_DTYPES:
        why = (
            " (int64 data is shape arithmetic and stays on the CPU)"
            if spec.dtype == np.int64
            else ""
        )
        return Decline(
            f"{what} '{value.name}' has dtype {spec.dtype}: float32, bfloat16 and 8/16/32-bit "
            f"integers only{why}"
        )
    if 0 in spec.shape:
        return Decline(f"{what} '{value.name}' is empty {spec.shape}: nothing to move")
    return spec


def _int_param(node: ir.Node, index: int, attr: str, what: str) -> list[int] | Decline | None:
    """Integer list from constant input ``index`` or (older opsets) attribute ``attr``."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is not None:
        arr = const_array(value)
        if arr is None:
            return Decline(
                f"{what} '{value.name}' is not a constant (static sizes only: fold it with "
                "FoldShapesPass or make it an initializer)"
            )
        return [int(v) for v in np.asarray(arr).reshape(-1)]
    a = node.attributes.get(attr)
    return [int(v) for v in a.value] if a is not None else None


def _norm_axis(axis: int, rank: int, label: str) -> int | Decline:
    if not -rank <= axis < rank:
        return Decline(f"{label}: axis {axis} is out of range for rank {rank}")
    return axis % rank


class _DataMove(Operator):
    """Shared plumbing: mode in ``dims[0]``, operand sizes from the streams, output streams.

    ``cfg.extra["window"]`` (Split, Slice), when set, is the one strided read of the operand.
    """

    def operand_streams(self, cfg: OpConfig) -> list[dma.Stream]:
        """The linear operand streams, or the one operand read through ``cfg.extra["window"]``."""
        streams = super().operand_streams(cfg)
        window: Window | None = cfg.extra.get("window")
        if window is None:
            return streams
        (s,) = streams
        return [_through(s, window)]

    def output_streams(self, cfg: OpConfig) -> list[dma.Stream]:
        """DMA streams of the outputs (linear unless overridden)."""
        return [
            dma.Stream(a.local_argidx, a.offset, a.nbytes)
            for a in self.io_buffers(cfg)
            if a.kind == ArgKind.OUTPUT
        ]

    def params_record(self, cfg: OpConfig) -> ParamsRecord:
        rec = super().params_record(cfg)
        rec.operand_bytes = [s.nbytes for s in self.operand_streams(cfg)]  # a window may be short
        return rec

    def transaction(self, cfg: OpConfig, num_cols: int = 4):  # -> Transaction
        params = self.buffers_of(cfg, ArgKind.PARAMS)[0]
        return dma.launch(
            params=dma.Stream(params.local_argidx, params.offset, params.nbytes),
            operands=self.operand_streams(cfg),
            outputs=self.output_streams(cfg),
            num_cols=num_cols,
        ).build()

    def match_data_input(self, node: ir.Node, max_inputs: int) -> tuple[TensorSpec, str] | Decline:
        """For a one-data-input op (Split, Slice): op kind, arity ``1..max_inputs`` and input 0;
        returns its spec and the node label."""
        if (bad := check_node_kind(self, node)) is not None:
            return bad
        label = op_label(node)
        if not 1 <= len(node.inputs) <= max_inputs:
            return Decline(f"{label}: expects 1..{max_inputs} inputs, got {len(node.inputs)}")
        x = _data_spec(node.inputs[0], f"{label} input 0")
        return x if isinstance(x, Decline) else (x, label)

    def kernel(self, record: ParamsRecord, operands: Sequence[Any]) -> list[np.ndarray]:
        table = records.decode_table(record.payload)
        dims = list(record.dims)
        if not dims or dims[0] not in (MODE_KERNEL, MODE_DMA):
            raise DeviceError(f"{type(self).__name__} record has no valid mode in dims {dims}")
        if dims[0] == MODE_DMA:
            return self.forward(table, operands, record)
        inputs = records.unpack_inputs(table, operands, record.operand_bytes)
        outs = self.move(table, inputs, dims[1:])
        return records.pack_outputs(outs, table.outputs, record.output_bytes)

    def forward(
        self, table: records.Table, operands: Sequence[Any], record: ParamsRecord
    ) -> list[np.ndarray]:
        """DMA mode: the data already arrived in output order; cut it into the outputs."""
        stream = b"".join(bytes(memoryview(op).cast("B")) for op in operands)
        outs, pos = [], 0
        for j, (spec, nbytes) in enumerate(zip(table.outputs, record.output_bytes)):
            if pos + spec.nbytes > len(stream):
                raise DeviceError(f"{type(self).__name__} output {j}: operand stream too short")
            outs.append(_bytes_out(stream[pos : pos + spec.nbytes], nbytes, f"output {j}"))
            pos += spec.nbytes
        return outs

    @abstractmethod
    def move(
        self, table: records.Table, inputs: list[np.ndarray | None], dims: list[int]
    ) -> list[np.ndarray]:
        """Kernel mode: the op on real-shape crops, results zero-padded to the output shapes."""


# ---- Split ---------------------------------------------------------------------------------


class Split(_DataMove):
    """ONNX Split (``split`` input of opset 13+, ``num_outputs`` of 18, ``split`` attr of <13).

    dims: ``[mode, axis, *sizes]``. DMA mode for equal parts whose run is whole words (one gather
    pattern); kernel mode otherwise.
    """

    op_type = "Split"
    kernel_id = 60

    def match(self, node: ir.Node) -> OpConfig | Decline:
        got = self.match_data_input(node, 2)
        if isinstance(got, Decline):
            return got
        x, label = got
        rank = len(x.shape)
        axis = _norm_axis(int(node.attributes.get_int("axis", 0)), rank, label)
        if isinstance(axis, Decline):
            return axis
        n = len(node.outputs)
        dim = x.logical_shape[axis]
        sizes = _int_param(node, 1, "split", f"{label} split sizes")
        if isinstance(sizes, Decline):
            return sizes
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
            spec = _data_spec(value if value.name else None, f"{label} output {j}")
            if isinstance(spec, Decline):
                return spec
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
            spec = _data_spec(value, f"{label} input {i}")
            if isinstance(spec, Decline):
                return spec
            ins.append(spec)
            if (arr := const_array(value)) is not None:
                consts[i] = arr
        if len(consts) == len(ins):
            return Decline(f"{label}: every input is constant (fold it on the CPU instead)")
        out = _data_spec(node.outputs[0], f"{label} output 0")
        if isinstance(out, Decline):
            return out
        if "axis" not in node.attributes:
            return Decline(f"{label}: attribute 'axis' is required")
        rank = len(out.shape)
        axis = _norm_axis(node.attributes.get_int("axis"), rank, label)
        if isinstance(axis, Decline):
            return axis
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
        got = self.match_data_input(node, 5)
        if isinstance(got, Decline):
            return got
        x, label = got
        rank = len(x.shape)
        params: dict[str, list[int] | None] = {}
        for index, name in enumerate(("starts", "ends", "axes", "steps"), start=1):
            got = _int_param(node, index, name, f"{label} {name}")
            if isinstance(got, Decline):
                return got
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
            ax = _norm_axis(a, rank, label)
            if isinstance(ax, Decline):
                return ax
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
        out = _data_spec(node.outputs[0] if node.outputs else None, f"{label} output 0")
        if isinstance(out, Decline):
            return out
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
