"""A cost model for real NPUs: estimated time of each op and each fused program on a device.

This is a **model estimate, not a measurement**. Its inputs are exact; its device figures are not:

* **DDR bytes** read and written per op come from the fused transaction itself: the shim buffer
  descriptors decoded by :func:`npudispatch.txn.explain` (repeats expanded), attributed to the op
  whose transaction ops queued them (``OpEntry.txn_ops`` gives each op's slice of the fused
  transaction). Nothing is recomputed from shapes. MM2S (DDR to array) counts as read, S2MM
  (array to DDR) as written.
* **MACs** come from each op's params record (kernel id, dims and tensor table, written from the
  operator's config at compile time), so a saved and re-loaded program is estimated the same way.
  Shapes are the padded ones the kernel processes. Matmul family: output elements x K. Conv:
  output elements x (C/G x kernel window); ConvTranspose: input elements x (M/G x window).
  Attention: ``2 x B x S_q x S_kv x hidden`` (QK^T and PV; assumes QK and V head sizes are equal
  and ignores causal masking). Every other op has 0 MACs: vector work (activations, norms,
  softmax...) is not modelled and such ops are costed by their data movement alone.
* **Device figures** live only in :data:`DEVICES` (with their sources), nowhere else.

Time, per op and per program (one fused program = one kernel call)::

    memory  = (bytes read + bytes written) / DDR bandwidth
    compute = MACs / peak MAC rate for the op's operand type (int8, or bf16 at half of it)
    op time = max(memory, compute)                       # the op's bound: memory or compute
    program = call latency + sum(op time)                # ops run one after another in a call

The per-call latency is *added*, not overlapped: a call's command submission and completion
happen before and after its DMAs. The program's bound is the largest of its three parts: launch
(the call latency), memory (the summed time of memory-bound ops) or compute (of compute-bound
ops). Per program the estimate also reports DDR traffic / minimum traffic, where the minimum is
the const image read once plus the inputs plus the outputs: what keeping every intermediate on
the array would cost, versus sending it through DDR (DynamicDispatch's way, and ours). A table
read by a DMA gather counts only its selected rows (one per index), as only those leave DDR. The
ratio can be below 1 when an op reads only part of an input (a Slice of a graph input).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from npudispatch.errors import ModelError
from npudispatch.operators import records, registry
from npudispatch.operators.attention import Attention, GroupQueryAttention, MultiHeadAttention
from npudispatch.operators.base import TensorSpec
from npudispatch.operators.conv import Conv, ConvTranspose
from npudispatch.operators.tiled_matmul import TiledMatMul
from npudispatch.overlay_abi import BufferKind, ParamsRecord
from npudispatch.txn import explain
from npudispatch.txn.registers import Direction

if TYPE_CHECKING:
    from npudispatch.dispatch.emit import FusedProgram

__all__ = [
    "DEVICES",
    "LABEL",
    "Device",
    "OpEstimate",
    "ProgramEstimate",
    "device",
    "estimate_program",
    "estimate_programs",
]

LABEL = "model estimate, not a measurement"
"""Shown next to every estimate (text, JSON, plots)."""


@dataclass(frozen=True)
class Device:
    """One NPU's figures for the cost model; ``sources`` says where each figure comes from."""

    name: str
    title: str
    columns: int
    compute_rows: int
    shim_mm2s_per_column: int
    shim_s2mm_per_column: int
    ddr_bytes_per_s: float
    int8_ops_per_s: float  # peak, 2 ops per MAC (vendor TOPS)
    bf16_ops_per_s: float
    call_latency_s: float
    sources: dict[str, str] = field(default_factory=dict)

    def macs_per_s(self, dtype: np.dtype | None) -> float:
        """Peak MAC rate for an op whose activations have ``dtype`` (8-bit ints: int8 rate,
        anything else: bf16 rate, since float kernels compute in bf16)."""
        if dtype is not None and np.dtype(dtype).itemsize == 1 and np.dtype(dtype).kind in "iu":
            return self.int8_ops_per_s / 2
        return self.bf16_ops_per_s / 2

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "columns": self.columns,
            "compute_rows": self.compute_rows,
            "shim_mm2s_per_column": self.shim_mm2s_per_column,
            "shim_s2mm_per_column": self.shim_s2mm_per_column,
            "ddr_bytes_per_s": self.ddr_bytes_per_s,
            "int8_ops_per_s": self.int8_ops_per_s,
            "bf16_ops_per_s": self.bf16_ops_per_s,
            "call_latency_s": self.call_latency_s,
            "sources": dict(self.sources),
        }


# The one place the model's assumptions live. "estimate" marks a figure nobody measured for us.
DEVICES: dict[str, Device] = {
    "strix": Device(
        name="strix",
        title="Strix (NPU4, XDNA2 / AIE2P)",
        columns=8,
        compute_rows=4,
        shim_mm2s_per_column=2,
        shim_s2mm_per_column=2,
        ddr_bytes_per_s=60e9,
        int8_ops_per_s=50e12,
        bf16_ops_per_s=25e12,
        call_latency_s=52e-6,
        sources={
            "array": "4 compute rows x 8 columns (+ memtile and shim rows); 2 MM2S + 2 S2MM shim "
            "DMA channels per column (AIE2P shim tile; as the emulator models it)",
            "ddr_bytes_per_s": "~60 GB/s DDR to NPU, the measured figure quoted in issue 16 "
            "(not re-measured here)",
            "int8_ops_per_s": "50 TOPS peak, AMD's Ryzen AI 300 announcement (Computex 2024, "
            "e.g. anandtech.com/show/21469)",
            "bf16_ops_per_s": "estimate: half the int8 peak (AIE-ML/AIE2P do half as many bf16 "
            "as int8 MACs per tile per cycle, AMD AM020)",
            "call_latency_s": "~52 us per kernel call: `xrt-smi validate` latency test on Strix, "
            "as quoted in issue 16 (the test's design: XRT PR 8154)",
        },
    ),
    "phoenix": Device(
        name="phoenix",
        title="Phoenix (NPU1, XDNA / AIE2)",
        columns=4,
        compute_rows=4,
        shim_mm2s_per_column=2,
        shim_s2mm_per_column=2,
        ddr_bytes_per_s=30e9,
        int8_ops_per_s=16e12,
        bf16_ops_per_s=8e12,
        call_latency_s=52e-6,
        sources={
            "array": "4 compute rows x 4 columns (+ memtile and shim rows), the partition "
            "mlir-aie's npu1 targets; 4 compute tiles + 1 memtile + 1 shim per column (Riallto "
            "'Ryzen AI column architecture')",
            "ddr_bytes_per_s": "estimate: half of Strix's 60 GB/s (not measured)",
            "int8_ops_per_s": "16 TOPS: AMD's figure for the XDNA1 NPU in Hawk Point (Ryzen "
            "8040); Phoenix (Ryzen 7040) was announced at 10 TOPS",
            "bf16_ops_per_s": "estimate: half the int8 peak (AMD AM020, AIE-ML tile)",
            "call_latency_s": "estimate: assumed equal to Strix (not measured)",
        },
    ),
}


def device(name: str | Device) -> Device:
    """The :data:`DEVICES` entry ``name`` (or ``name`` itself when it is a :class:`Device`)."""
    if isinstance(name, Device):
        return name
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ModelError(
            f"unknown device {name!r}: the cost model knows {', '.join(sorted(DEVICES))}"
        ) from None


@dataclass
class OpEstimate:
    """One op of a fused program: exact DDR bytes and MACs, estimated terms in seconds."""

    name: str
    op_type: str
    read_bytes: int
    written_bytes: int
    bytes_by_buffer: dict[str, dict[str, int]]  # buffer label -> {"read": n, "written": n}
    macs: int
    compute_dtype: str
    memory_s: float
    compute_s: float

    @property
    def ddr_bytes(self) -> int:
        return self.read_bytes + self.written_bytes

    @property
    def time_s(self) -> float:
        """``max(memory, compute)``."""
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        """``"compute"`` when the compute term is the larger one, else ``"memory"``."""
        return "compute" if self.compute_s > self.memory_s else "memory"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "read_bytes": self.read_bytes,
            "written_bytes": self.written_bytes,
            "bytes_by_buffer": self.bytes_by_buffer,
            "macs": self.macs,
            "compute_dtype": self.compute_dtype,
            "memory_s": self.memory_s,
            "compute_s": self.compute_s,
            "time_s": self.time_s,
            "bound": self.bound,
        }


@dataclass
class ProgramEstimate:
    """One fused program (one kernel call) on one device; see the module docstring."""

    name: str
    device: Device
    ops: list[OpEstimate]
    min_bytes: dict[str, int]  # const (weights, read once), inputs, outputs

    @property
    def read_bytes(self) -> int:
        return sum(o.read_bytes for o in self.ops)

    @property
    def written_bytes(self) -> int:
        return sum(o.written_bytes for o in self.ops)

    @property
    def ddr_bytes(self) -> int:
        return self.read_bytes + self.written_bytes

    @property
    def macs(self) -> int:
        return sum(o.macs for o in self.ops)

    @property
    def launch_s(self) -> float:
        return self.device.call_latency_s

    @property
    def memory_s(self) -> float:
        """Summed time of the memory-bound ops."""
        return sum(o.time_s for o in self.ops if o.bound == "memory")

    @property
    def compute_s(self) -> float:
        """Summed time of the compute-bound ops."""
        return sum(o.time_s for o in self.ops if o.bound == "compute")

    @property
    def time_s(self) -> float:
        """``call latency + sum(max(memory, compute) per op)``."""
        return self.launch_s + self.memory_s + self.compute_s

    @property
    def bound(self) -> str:
        """The largest part of :attr:`time_s`: ``launch``, ``memory`` or ``compute``."""
        parts = {"launch": self.launch_s, "memory": self.memory_s, "compute": self.compute_s}
        return max(parts, key=lambda k: parts[k])

    @property
    def calls_per_s(self) -> float:
        return 1.0 / self.time_s

    @property
    def min_ddr_bytes(self) -> int:
        return sum(self.min_bytes.values())

    @property
    def traffic_ratio(self) -> float:
        """DDR traffic / minimum traffic (const read once + inputs + outputs)."""
        return self.ddr_bytes / self.min_ddr_bytes if self.min_ddr_bytes else math.inf

    def to_json(self) -> dict[str, Any]:
        return {
            "label": LABEL,
            "program": self.name,
            "device": self.device.name,
            "read_bytes": self.read_bytes,
            "written_bytes": self.written_bytes,
            "macs": self.macs,
            "launch_s": self.launch_s,
            "memory_s": self.memory_s,
            "compute_s": self.compute_s,
            "time_s": self.time_s,
            "bound": self.bound,
            "calls_per_s": self.calls_per_s,
            "min_bytes": dict(self.min_bytes),
            "min_ddr_bytes": self.min_ddr_bytes,
            "traffic_ratio": self.traffic_ratio,
            "ops": [o.to_json() for o in self.ops],
        }

    def render(self) -> str:
        """Text table: one line per op, then the program's totals (all labelled estimates)."""
        rows = [
            f"{self.name} on {self.device.title}: {LABEL}",
            f"  {'op':<36} {'type':<20} {'read B':>12} {'written B':>11} {'MACs':>13} "
            f"{'mem us':>9} {'comp us':>9}  bound",
        ]
        for o in self.ops:
            rows.append(
                f"  {_clip(o.name, 36):<36} {_clip(o.op_type, 20):<20} {o.read_bytes:>12,} "
                f"{o.written_bytes:>11,} {o.macs:>13,} {o.memory_s * 1e6:>9.2f} "
                f"{o.compute_s * 1e6:>9.2f}  {o.bound}"
            )
        mb = self.min_bytes
        rows += [
            f"  call: {self.read_bytes:,} B read, {self.written_bytes:,} B written, "
            f"{self.macs:,} MACs",
            f"  estimated time {self.time_s * 1e6:,.1f} us = launch {self.launch_s * 1e6:.1f} "
            f"+ memory-bound ops {self.memory_s * 1e6:,.1f} + compute-bound ops "
            f"{self.compute_s * 1e6:,.1f}: {self.bound}-bound, {self.calls_per_s:,.0f} calls/s",
            f"  DDR traffic / minimum: {self.traffic_ratio:.3f} (minimum {self.min_ddr_bytes:,} B "
            f"= const {mb['const']:,} + inputs {mb['inputs']:,} + outputs {mb['outputs']:,})",
        ]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.render()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


# ---- MACs from the params record ---------------------------------------------------------------


def _record(program: FusedProgram, op_name: str) -> ParamsRecord:
    region = program.plan.params_regions.get(op_name)
    if region is None:
        raise ModelError(
            f"program {program.name!r}: op {op_name!r} has no params region in the plan; "
            "re-compile the model"
        )
    off, size = region
    return ParamsRecord.decode(program.params_image[off : off + size])


def _count(shape: Iterable[int]) -> int:
    return math.prod(int(d) for d in shape)


def _attention_macs(inputs: Sequence[TensorSpec | None], outputs: Sequence[TensorSpec]) -> int:
    out = outputs[0].shape
    if len(out) == 4:  # [B, heads, S_q, head]
        batch, s_q, hidden = out[0], out[2], out[1] * out[3]
    else:  # [B, S_q, heads * head]
        batch, s_q, hidden = out[0], out[1], out[-1]
    key = inputs[1] if len(inputs) > 1 else None
    if len(outputs) > 1:  # present key [B, kv_heads, S_total, head]
        s_kv = outputs[1].shape[-2]
    elif key is not None:
        s_kv = key.shape[-2] if len(key.shape) == 4 else key.shape[1]
    else:
        s_kv = s_q
    return 2 * batch * s_q * s_kv * hidden


def op_macs(record: ParamsRecord) -> tuple[int, np.dtype | None]:
    """MACs of one launch and the dtype of its first streamed activation (which picks the MAC
    rate), from its params record (see the module docstring for the formulas)."""
    table = records.decode_table(record.payload)
    inputs = [spec for _, spec in table.inputs]
    act = next((s.dtype for src, s in table.inputs if src == records.SRC_OPERAND and s), None)
    try:
        operator = registry.operator_for_kernel(record.kernel_id)
    except KeyError:
        raise ModelError(
            f"kernel id {record.kernel_id} has no registered operator; load the program with the "
            "npudispatch version that compiled it"
        ) from None
    out = table.outputs[0].shape if table.outputs else ()
    if isinstance(operator, TiledMatMul):
        return _count(out) * int(record.dims[1]), act  # dims = [variant, K, N, ...]
    if isinstance(operator, Conv) and len(inputs) > 1 and inputs[0] and inputs[1]:
        window = _count(inputs[1].shape[1:])
        if isinstance(operator, ConvTranspose):
            return _count(inputs[0].shape) * window, act
        return _count(out) * window, act
    if isinstance(operator, Attention | GroupQueryAttention | MultiHeadAttention):
        return _attention_macs(inputs, table.outputs), act
    return 0, act


# ---- the estimate ------------------------------------------------------------------------------


def _op_of_txn_op(program: FusedProgram) -> np.ndarray:
    """Fused-transaction op index -> program op index (each op's transaction is one slice)."""
    counts = [op.txn_ops for op in program.ops]
    if sum(counts) != program.txn.num_ops:
        raise ModelError(
            f"program {program.name!r}: its ops account for {sum(counts)} transaction ops, the "
            f"fused transaction has {program.txn.num_ops}; re-compile the model"
        )
    return np.repeat(np.arange(len(counts)), counts)


def estimate_program(program: FusedProgram, device_name: str | Device = "strix") -> ProgramEstimate:
    """Estimate ``program`` (one kernel call) on a device of :data:`DEVICES`: exact DDR bytes
    per op from the transaction's buffer descriptors, MACs from the params records, and the
    estimated time (module docstring). Raises ModelError when the program needs more columns
    than the device has."""
    dev = device(device_name)
    if program.num_cols > dev.columns:
        raise ModelError(
            f"program {program.name!r} uses {program.num_cols} columns, {dev.title} has "
            f"{dev.columns}; compile with --num-cols {dev.columns}"
        )
    owner = _op_of_txn_op(program)
    moved: list[dict[str, dict[str, int]]] = [{} for _ in program.ops]
    for t in explain(program.txn).transfers():
        if t.argidx is None or t.op_index < 0:
            raise ModelError(
                f"program {program.name!r}: transaction op {t.op_index} moves {t.nbytes} B with "
                "a buffer descriptor that no DDR_PATCH binds to a buffer; the program is corrupt"
            )
        label = BufferKind(t.argidx).label
        way = "read" if t.direction == Direction.MM2S else "written"
        per = moved[owner[t.op_index]].setdefault(label, {"read": 0, "written": 0})
        per[way] += t.nbytes
    ops = []
    for op, by_buffer in zip(program.ops, moved):
        macs, act = op_macs(_record(program, op.name))
        read = sum(v["read"] for v in by_buffer.values())
        written = sum(v["written"] for v in by_buffer.values())
        ops.append(
            OpEstimate(
                name=op.name,
                op_type=op.op_type,
                read_bytes=read,
                written_bytes=written,
                bytes_by_buffer=by_buffer,
                macs=macs,
                compute_dtype=str(act) if act is not None else "none",
                memory_s=(read + written) / dev.ddr_bytes_per_s,
                compute_s=macs / dev.macs_per_s(act),
            )
        )
    plan = program.plan
    return ProgramEstimate(
        name=program.name,
        device=dev,
        ops=ops,
        min_bytes={
            "const": plan.const_bytes - _unread_table_bytes(program),
            "inputs": plan.input_bytes,
            "outputs": plan.output_bytes,
        },
    )


def _unread_table_bytes(program: FusedProgram) -> int:
    """Const bytes no run reads: the rows of DMA-gathered tables that are not selected (a
    DMA gather reads one row per index, its runtime patch sites)."""
    tables: dict[str, tuple[int, int]] = {}
    for s in program.patch_sites:
        rows, picked = tables.get(s.node, (s.rows * s.row_bytes, 0))
        tables[s.node] = (rows, picked + s.row_bytes)
    return sum(max(0, table - picked) for table, picked in tables.values())


def estimate_programs(
    programs: Iterable[FusedProgram], device_name: str | Device = "strix"
) -> list[ProgramEstimate]:
    """:func:`estimate_program` of each program, in order (one model run = one call of each)."""
    return [estimate_program(p, device_name) for p in programs]
