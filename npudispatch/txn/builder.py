"""`TxnBuilder`: write shim-DMA programs as transactions (plain 0.1 format)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from npudispatch.txn.header import TxnHeader
from npudispatch.txn.ops import (
    BlockWrite,
    DdrPatch,
    MaskPoll,
    MaskWrite,
    Op,
    RecordTimer,
    Tct,
    Write,
)
from npudispatch.txn.registers import (
    CHANNEL_IDLE_MASK,
    CHANNEL_IDLE_VALUE,
    Direction,
    shim_bd_addr,
    status_addr,
    task_queue_addr,
)
from npudispatch.txn.shim import ShimBd, TaskQueueEntry
from npudispatch.txn.transaction import Transaction


class TxnBuilder:
    """Accumulates ops and builds a plain-format :class:`Transaction`.

    Low-level methods append one op each; :meth:`shim_bd`, :meth:`push_task` and
    :meth:`wait_channel_idle` emit the op patterns the DD corpus uses for shim data movement.
    """

    def __init__(
        self, num_cols: int = 4, dev_gen: int = 4, num_rows: int = 6, num_mem_tile_rows: int = 1
    ) -> None:
        self.header = TxnHeader(
            major=0,
            minor=1,
            dev_gen=dev_gen,
            num_rows=num_rows,
            num_cols=num_cols,
            num_mem_tile_rows=num_mem_tile_rows,
        )
        self.ops: list[Op] = []

    def __len__(self) -> int:
        return len(self.ops)

    def append(self, op: Op) -> TxnBuilder:
        """Append any typed op (e.g. PREEMPT, LOADPDI, a CustomOp)."""
        self.ops.append(op)
        return self

    # -- one op each ---------------------------------------------------------------------------
    def write(self, reg_off: int, value: int) -> TxnBuilder:
        """WRITE ``value`` to register ``reg_off``."""
        return self.append(Write(reg_off, value))

    def block_write(self, reg_off: int, values: Sequence[int] | np.ndarray) -> TxnBuilder:
        """BLOCKWRITE u32 ``values`` starting at ``reg_off``."""
        return self.append(BlockWrite(reg_off, np.asarray(values, dtype=np.uint32)))

    def mask_write(self, reg_off: int, value: int, mask: int) -> TxnBuilder:
        """MASKWRITE: ``reg = (reg & ~mask) | (value & mask)``."""
        return self.append(MaskWrite(reg_off, value, mask))

    def mask_poll(self, reg_off: int, value: int, mask: int) -> TxnBuilder:
        """MASKPOLL: wait until ``(reg & mask) == value``."""
        return self.append(MaskPoll(reg_off, value, mask))

    def ddr_patch(self, regaddr: int, argidx: int, argplus: int) -> TxnBuilder:
        """DDR_PATCH: write ``argv[argidx] + argplus`` into the BD address word at ``regaddr``."""
        return self.append(DdrPatch(regaddr, argidx, argplus))

    def tct(
        self,
        col: int,
        row: int,
        direction: Direction,
        channel: int,
        col_count: int = 1,
        row_count: int = 1,
    ) -> TxnBuilder:
        """TCT: wait for one task-complete token per tile of the given column/row range."""
        return self.append(
            Tct.make(
                col=col,
                row=row,
                direction=int(direction),
                channel=channel,
                col_count=col_count,
                row_count=row_count,
            )
        )

    def record_timer(self, timer_id: int) -> TxnBuilder:
        """RECORD_TIMER tagged ``timer_id``."""
        return self.append(RecordTimer(timer_id))

    # -- shim DMA patterns -----------------------------------------------------------------
    def shim_bd(
        self, col: int, bd_id: int, bd: ShimBd, *, argidx: int | None = None, argplus: int = 0
    ) -> TxnBuilder:
        """Program shim BD ``bd_id`` of ``col``; with ``argidx``, patch its address to a buffer.

        Like DD, the BD's address field holds ``argplus`` and a DDR_PATCH of BD word 1 follows,
        so the firmware replaces it with ``argv[argidx] + argplus``.
        """
        base = shim_bd_addr(col, bd_id)
        words = replace_address(bd, argplus).encode() if argidx is not None else bd.encode()
        self.block_write(base, words)
        if argidx is not None:
            self.ddr_patch(base + 4, argidx, argplus)
        return self

    def push_task(
        self,
        col: int,
        direction: Direction,
        channel: int,
        start_bd: int,
        repeat_count: int = 0,
        issue_token: bool = False,
    ) -> TxnBuilder:
        """Enqueue a task (start BD, extra repeats, token) on a shim channel's task queue."""
        entry = TaskQueueEntry(start_bd, repeat_count, issue_token)
        return self.write(task_queue_addr(col, direction, channel), entry.encode())

    def wait_channel_idle(self, col: int, direction: Direction, channel: int) -> TxnBuilder:
        """MASKPOLL the channel status until its queue is empty and it is not running."""
        return self.mask_poll(
            status_addr(col, direction, channel), CHANNEL_IDLE_VALUE, CHANNEL_IDLE_MASK
        )

    def build(self) -> Transaction:
        """The transaction of every op appended so far."""
        return Transaction(self.header, list(self.ops))


def replace_address(bd: ShimBd, address: int) -> ShimBd:
    """A copy of ``bd`` whose address field is ``address`` (the DD convention: argplus)."""
    return replace(bd, address=address)
