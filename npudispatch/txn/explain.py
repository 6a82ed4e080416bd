"""Static decoding of the shim data movement a transaction performs (docs/txn_format.md §4, §5, §9).

:func:`explain` walks the ops keeping a register snapshot and the live DDR_PATCH of every shim BD.
Each WRITE to a shim task-queue register becomes a :class:`DmaTask` holding the BD chain as it was
at that moment. :meth:`DataMovement.transfers` expands task repeats with the iteration rule of docs/txn_format.md §9,
producing the same records the emulator's trace mode produces at run time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from npudispatch.txn.ops import (
    BlockWrite,
    DdrPatch,
    MaskPoll,
    MaskPollBusy,
    MaskWrite,
    MergeSync,
    Tct,
    Write,
)
from npudispatch.txn.registers import (
    SHIM_BD_BASE,
    SHIM_BD_STRIDE,
    SHIM_BD_WORDS,
    SHIM_ROW,
    Direction,
    ShimChannel,
    decode_shim_bd_offset,
    decode_shim_queue,
    decode_shim_status,
    split_addr,
    tile_addr,
)
from npudispatch.txn.shim import ShimBd, TaskQueueEntry
from npudispatch.txn.transaction import Transaction

_ADDR_WORDS = (1, 2)  # BD words holding the buffer address; rewriting them voids a patch


@dataclass(frozen=True, slots=True)
class Transfer:
    """One BD execution (repeats expanded), derived statically by :func:`explain` or recorded by
    the emulator while it runs.

    ``offset`` is the byte offset inside buffer ``argidx`` where this execution starts (the BD base
    plus its iteration offset); ``nbytes`` is the BD length. ``argidx`` is None when the address
    lies in no buffer (``offset`` is then the raw address) or, in the emulator's trace mode, when
    the BD was never made valid by the transaction (programmed out of band, e.g. by control
    packets). ``bd`` and ``op_index`` (the op that queued the task) are context, not part of
    :meth:`key`.
    """

    col: int
    direction: Direction
    channel: int
    argidx: int | None
    offset: int
    nbytes: int
    bd: int = -1
    op_index: int = -1

    def key(self) -> tuple[int, Direction, int, int | None, int, int]:
        """``(col, direction, channel, argidx, offset, nbytes)``: what explain and the emulator
        must agree on."""
        return (self.col, self.direction, self.channel, self.argidx, self.offset, self.nbytes)

    def to_json(self) -> dict[str, object]:
        """JSON record with keys col, direction, channel, argidx, offset, bytes."""
        return {
            "col": self.col,
            "direction": self.direction.name,
            "channel": self.channel,
            "argidx": self.argidx,
            "offset": self.offset,
            "bytes": self.nbytes,
        }


@dataclass(slots=True)
class BdTransfer:
    """One BD of a task's chain, as snapshotted when the task was pushed."""

    bd_id: int
    argidx: int | None
    offset: int
    length_bytes: int
    bd: ShimBd


@dataclass(slots=True)
class DmaTask:
    """A task pushed on a shim channel's queue by the WRITE at ``op_index``."""

    col: int
    direction: Direction
    channel: int
    start_bd: int
    repeat_count: int
    issue_token: bool
    op_index: int
    bds: list[BdTransfer] = field(default_factory=list)
    waits: list[int] = field(default_factory=list)

    @property
    def shim_channel(self) -> ShimChannel:
        return ShimChannel(self.col, self.direction, self.channel)

    def transfers(self) -> list[Transfer]:
        """Every BD execution of this task, repeats expanded (docs/txn_format.md §9 iteration rule)."""
        out = []
        for rep in range(self.repeat_count + 1):
            for b in self.bds:
                it = (b.bd.iteration_current + rep) % b.bd.iteration_wrap
                offset = b.offset + it * b.bd.iteration_step * 4
                out.append(
                    Transfer(
                        self.col,
                        self.direction,
                        self.channel,
                        b.argidx,
                        offset,
                        b.length_bytes,
                        bd=b.bd_id,
                        op_index=self.op_index,
                    )
                )
        return out


@dataclass(slots=True)
class DataMovement:
    """Every shim DMA task of a transaction, in push order."""

    tasks: list[DmaTask]

    def transfers(self) -> list[Transfer]:
        """All BD executions, task by task, repeats expanded."""
        return [t for task in self.tasks for t in task.transfers()]

    def totals(self) -> dict[tuple[int, Direction, int, int | None], int]:
        """Bytes moved per (col, direction, channel, argidx)."""
        sums: dict[tuple[int, Direction, int, int | None], int] = defaultdict(int)
        for task in self.tasks:  # arithmetic, not expanded: repeats x chains can be huge
            for b in task.bds:
                key = (task.col, task.direction, task.channel, b.argidx)
                sums[key] += b.length_bytes * (task.repeat_count + 1)
        return dict(sums)

    def render(self) -> str:
        """Text form: one line per task, one indented line per BD."""
        lines = []
        for task in self.tasks:
            rep = f", repeat {task.repeat_count}" if task.repeat_count else ""
            tok = ", token" if task.issue_token else ""
            waits = ", ".join(map(str, task.waits)) or "never waited on"
            lines.append(
                f"op {task.op_index}: {task.shim_channel} task BD{task.start_bd}{rep}{tok} "
                f"(waits: {waits})"
            )
            for b in task.bds:
                where = f"arg {b.argidx} + {b.offset:#x}" if b.argidx is not None else "addr"
                if b.argidx is None:
                    where = f"raw address {b.offset:#x}"
                lines.append(
                    f"  {task.shim_channel} BD{b.bd_id}: {where}, {b.length_bytes} B, "
                    f"{b.bd.access_pattern()}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def to_json(self) -> dict:
        """JSON-ready dict: tasks with their BDs, and per-channel totals."""
        return {
            "tasks": [
                {
                    "op_index": t.op_index,
                    "col": t.col,
                    "direction": t.direction.name,
                    "channel": t.channel,
                    "start_bd": t.start_bd,
                    "repeat_count": t.repeat_count,
                    "issue_token": t.issue_token,
                    "waits": t.waits,
                    "bds": [
                        {
                            "bd_id": b.bd_id,
                            "argidx": b.argidx,
                            "offset": b.offset,
                            "length_bytes": b.length_bytes,
                            "pattern": b.bd.access_pattern(),
                        }
                        for b in t.bds
                    ],
                }
                for t in self.tasks
            ],
            "totals": [
                {"col": c, "direction": d.name, "channel": ch, "argidx": a, "nbytes": n}
                for (c, d, ch, a), n in self.totals().items()
            ],
        }


class _Walker:
    def __init__(self) -> None:
        self.regs: dict[int, int] = {}
        self.patches: dict[tuple[int, int], tuple[int, int]] = {}  # (col, bd) -> (argidx, argplus)
        self.pending: dict[tuple[int, Direction, int], list[DmaTask]] = defaultdict(list)
        self.tasks: list[DmaTask] = []

    def _touch(self, addr: int, count: int = 1) -> None:
        """Forget patches whose address words a plain write overwrote."""
        col, row, off = split_addr(addr)
        if row != SHIM_ROW or not self.patches:
            return
        for word_off in range(off, off + 4 * count, 4):
            bd = decode_shim_bd_offset(word_off)
            if bd is not None and (word_off - SHIM_BD_BASE) % SHIM_BD_STRIDE // 4 in _ADDR_WORDS:
                self.patches.pop((col, bd), None)

    def write(self, i: int, addr: int, value: int) -> None:
        self.regs[addr] = value & 0xFFFFFFFF
        self._touch(addr)
        col, row, off = split_addr(addr)
        queue = decode_shim_queue(off) if row == SHIM_ROW else None
        if queue is not None:
            self.push(i, col, *queue, TaskQueueEntry.decode(value))

    def block_write(self, addr: int, values: np.ndarray) -> None:
        self.regs.update(zip(range(addr, addr + 4 * len(values), 4), values.tolist()))
        self._touch(addr, len(values))

    def push(self, i: int, col: int, direction: Direction, ch: int, entry: TaskQueueEntry) -> None:
        task = DmaTask(col, direction, ch, entry.start_bd, entry.repeat_count, entry.issue_token, i)
        bd_id, seen = entry.start_bd, set()
        while bd_id not in seen:
            seen.add(bd_id)
            base = tile_addr(col, SHIM_ROW, SHIM_BD_BASE + SHIM_BD_STRIDE * bd_id)
            bd = ShimBd.decode([self.regs.get(base + 4 * w, 0) for w in range(SHIM_BD_WORDS)])
            patch = self.patches.get((col, bd_id))
            if patch is not None:
                argidx, offset = patch[0], patch[1] & ~3
            else:
                argidx, offset = None, bd.address
            task.bds.append(BdTransfer(bd_id, argidx, offset, bd.length_bytes, bd))
            if not bd.use_next_bd:
                break
            bd_id = bd.next_bd
        self.tasks.append(task)
        self.pending[(col, direction, ch)].append(task)

    def wait(self, i: int, key: tuple[int, Direction, int], tokens_only: bool = False) -> None:
        keep = []
        for task in self.pending.pop(key, []):
            if tokens_only and not task.issue_token:
                keep.append(task)
            else:
                task.waits.append(i)
        if keep:
            self.pending[key] = keep


def explain(txn: Transaction) -> DataMovement:
    """Decode the shim DMA tasks of ``txn`` statically (no kernels, no buffers)."""
    w = _Walker()
    for i, op in enumerate(txn.iter_ops()):
        match op:
            case Write():
                w.write(i, op.reg_off, op.value)
            case BlockWrite():
                w.block_write(op.reg_off, op.values)
            case MaskWrite():
                old = w.regs.get(op.reg_off, 0)
                w.regs[op.reg_off] = (old & ~op.mask) | (op.value & op.mask)
                w._touch(op.reg_off)
            case DdrPatch():
                col, row, off = split_addr(op.regaddr)
                bd = decode_shim_bd_offset(off) if row == SHIM_ROW else None
                if bd is not None and (off - SHIM_BD_BASE) % SHIM_BD_STRIDE == 4:
                    w.patches[(col, bd)] = (op.argidx, op.argplus)
            case MaskPoll() | MaskPollBusy():
                col, row, off = split_addr(op.reg_off)
                status = decode_shim_status(off) if row == SHIM_ROW else None
                if status is not None:
                    w.wait(i, (col, *status))
            case Tct():
                if op.row == SHIM_ROW:
                    for col in range(op.col, op.col + max(op.col_count, 1)):
                        w.wait(i, (col, Direction(op.direction & 1), op.channel), True)
            case MergeSync():
                for key in [k for k in w.pending if k[0] < op.num_cols]:
                    w.wait(i, key, True)
    return DataMovement(w.tasks)
