"""Pre-decoded transactions: the static half of every op worked out once per program.

A program runs the same ops every kernel call, so what depends only on the op and the partition
(which tile a register address is in, whether it is a task-queue or status register, the decoded
task-queue entry of a WRITE, the register/value pairs of a BLOCKWRITE) is decided once, in
:func:`prepare_program`, and each op becomes a *step*: a handler of the :class:`VirtualNpu` and its
prepared argument. Running a step still does everything the op does at run time (registers are
written, tasks are queued and snapshot their BD chains from the register file, polls drain their
channels, DMAs move every byte through the address generator and the overlay).

An op whose static checks fail (a register outside the partition, a bad DDR_PATCH argidx, a poll
that can never succeed) keeps the generic handler, which raises the located error when the program
reaches it, exactly as before. A DDR_PATCH step reads ``argidx``/``argplus`` from its op when it
runs (runtime patch sites rewrite ``argplus`` before every run); everything else is snapshotted
when the program is prepared: after other edits to a transaction's ops, prepare it again
(``VirtualNpu.run`` on a Transaction or an op list prepares it each call;
:meth:`VirtualNpu.prepare` once for many runs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from npudispatch.emulator.memory import NUM_ARGS
from npudispatch.emulator.regmap import (
    NUM_ROWS,
    is_idle_status,
    is_lock_request,
    is_queue_register,
    queue_offsets,
)
from npudispatch.txn import ops as txops
from npudispatch.txn.registers import SHIM_ROW, decode_shim_queue, decode_shim_status, split_addr
from npudispatch.txn.shim import TaskQueueEntry

if TYPE_CHECKING:
    from npudispatch.emulator.device import VirtualNpu

Step = tuple[Callable[[Any], None], Any]


@dataclass(frozen=True, slots=True)
class PreparedProgram:
    """A transaction decoded for one :class:`VirtualNpu`: one step per op, in program order.

    ``names`` are the opcode names (for error locations and :attr:`RunStats.ops`), ``counts`` the
    per-name totals of a complete run. Only valid on the virtual NPU that prepared it.
    """

    npu_id: int
    steps: tuple[Step, ...]
    names: tuple[str, ...]
    counts: Counter[str]

    def __len__(self) -> int:
        return len(self.steps)


def prepare_program(npu: VirtualNpu, ops: Sequence[Any], names: Sequence[str]) -> PreparedProgram:
    """One step per op of ``ops`` for ``npu`` (see the module docstring)."""
    steps = tuple(_step(npu, op) for op in ops)
    return PreparedProgram(id(npu), steps, tuple(names), Counter(names))


def _valid_reg(npu: VirtualNpu, addr: int) -> tuple[int, int, int] | None:
    """``(col, row, off)`` of a register inside the partition, None when the access faults."""
    col, row, off = split_addr(addr)
    if addr >> 32 or addr < 0 or col >= npu.num_cols or row >= NUM_ROWS:
        return None
    return col, row, off


def _step(npu: VirtualNpu, op: Any) -> Step:
    kind = type(op)
    if kind is txops.Write:
        return _write_step(npu, op)
    if kind is txops.BlockWrite:
        return _blockwrite_step(npu, op)
    if kind is txops.DdrPatch:
        return _ddr_patch_step(npu, op)
    if kind is txops.MaskPoll or kind is txops.MaskPollBusy:
        return _poll_step(npu, op)
    handler = npu._handlers.get(kind)
    return (handler, op) if handler is not None else (_no_effect, op)


def _no_effect(op: Any) -> None:
    """Ops the emulator accepts and counts without an effect (NOOP, RECORD_TIMER, ...)."""


def _queue_action(npu: VirtualNpu, col: int, row: int, off: int, value: int) -> tuple | None:
    """What a write of ``value`` to a queue register does: ``(channel, entry)`` for a shim task
    queue, ``(col, row, off, value)`` for the generic path, None when it is no queue register."""
    if not is_queue_register(row, off):
        return None
    if row == SHIM_ROW:
        dc = decode_shim_queue(off)
        assert dc is not None
        return (npu.channel(col, *dc), TaskQueueEntry.decode(value))
    return (col, row, off, value)


def _write_step(npu: VirtualNpu, op: txops.Write) -> Step:
    where = _valid_reg(npu, op.reg_off)
    if where is None:
        return npu._op_write, op
    value = op.value & 0xFFFFFFFF
    action = _queue_action(npu, *where, value)
    if action is None:
        return npu._step_store, (op.reg_off, value)
    if len(action) == 2:
        return npu._step_store_enqueue, (op.reg_off, value, *action)
    return npu._op_write, op


def _blockwrite_step(npu: VirtualNpu, op: txops.BlockWrite) -> Step:
    values = op.values.tolist()
    n = len(values)
    if n == 0:
        return _no_effect, op
    where = _valid_reg(npu, op.reg_off)
    if where is None or _valid_reg(npu, op.reg_off + 4 * (n - 1)) is None:
        return npu._op_blockwrite, op
    items = dict(zip(range(op.reg_off, op.reg_off + 4 * n, 4), values))
    col, row, off = where
    actions = []
    for q in queue_offsets(row):
        if off <= q < off + 4 * n:
            action = _queue_action(npu, col, row, q, values[(q - off) // 4])
            if action is None or len(action) != 2:
                return npu._op_blockwrite, op
            actions.append(action)
    return npu._step_blockwrite, (items, tuple(actions))


def _ddr_patch_step(npu: VirtualNpu, op: txops.DdrPatch) -> Step:
    if not 0 <= op.argidx < NUM_ARGS:
        return npu._op_ddr_patch, op
    for addr in (op.regaddr, op.regaddr + 4):
        where = _valid_reg(npu, addr)
        if where is None or _queue_action(npu, *where, 0) is not None:
            return npu._op_ddr_patch, op
    return npu._step_ddr_patch, op


def _poll_step(npu: VirtualNpu, op: txops.MaskPoll | txops.MaskPollBusy) -> Step:
    where = _valid_reg(npu, op.reg_off)
    if where is None:
        return npu._op_maskpoll, op
    col, row, off = where
    if row == SHIM_ROW and (dc := decode_shim_status(off)) is not None:
        if op.value != 0:  # the status reads 0 once drained: this poll can only hang
            return npu._op_maskpoll, op
        return npu._drain, npu.channel(col, *dc)
    if is_lock_request(row, off):
        return _no_effect, op
    if is_idle_status(row, off) and op.value == 0:
        return _no_effect, op
    return npu._op_maskpoll, op
