"""Shared plumbing of the data-movement operators (Split, Concat, Slice in
:mod:`npudispatch.operators.datamove`, Pad/Tile/... in :mod:`~npudispatch.operators.spatial`):
n-d DMA windows, cropping and placing real shapes, the data-dtype check and :class:`_DataMove`,
the base class that runs a launch in DMA or kernel mode. See the datamove module for the modes.
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
    TensorSpec,
    check_node_kind,
    const_array,
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
