"""Which registers of the partition the emulator gives a meaning to (docs/txn_format.md §4).

Shim task-queue and status registers drive the modelled shim DMAs; the memtile and core DMAs are
not modelled: a start-queue write with bit 31 set stands for a task that completes at once and
issues a token, their status registers read idle, and lock requests always succeed.
"""

from __future__ import annotations

from collections.abc import Sequence

from npudispatch.txn.registers import (
    MEMTILE_ROW,
    SHIM_MM2S_TASK_QUEUE,
    SHIM_ROW,
    SHIM_S2MM_TASK_QUEUE,
    Direction,
)

NUM_ROWS = 6  # AIE2P partition: shim, memtile, 4 core rows

# Start-queue registers of the DMAs the emulator does not model (memtile, core tiles). Values:
# (dir, channel).
MEMTILE_QUEUES = {0xA0604 + 8 * n: (Direction.S2MM, n) for n in range(6)} | {
    0xA0634 + 8 * n: (Direction.MM2S, n) for n in range(6)
}
CORE_QUEUES = {
    0x1DE04: (Direction.S2MM, 0),
    0x1DE0C: (Direction.S2MM, 1),
    0x1DE14: (Direction.MM2S, 0),
    0x1DE1C: (Direction.MM2S, 1),
}
SHIM_QUEUES = (*SHIM_S2MM_TASK_QUEUE, *SHIM_MM2S_TASK_QUEUE)
MEMTILE_STATUS = range(0xA0660, 0xA06A0, 4)
CORE_STATUS = (0x1DF00, 0x1DF04, 0x1DF10, 0x1DF14)
TOKEN_BIT = 1 << 31

_QUEUE_OFFSETS = {SHIM_ROW: SHIM_QUEUES, MEMTILE_ROW: tuple(MEMTILE_QUEUES)}
_CORE_QUEUE_OFFSETS = tuple(CORE_QUEUES)
_QUEUE_SETS = {SHIM_ROW: frozenset(SHIM_QUEUES), MEMTILE_ROW: frozenset(MEMTILE_QUEUES)}
_CORE_QUEUE_SET = frozenset(CORE_QUEUES)


def is_lock_request(row: int, off: int) -> bool:
    """True for a lock acquire/release request address of a memtile or core tile."""
    if row == MEMTILE_ROW:
        return 0xD0000 <= off < 0x100000
    return 0x40000 <= off < 0x44000


def is_queue_register(row: int, off: int) -> bool:
    """True when ``off`` in a tile of ``row`` is a DMA task-queue (start-queue) register."""
    return off in _QUEUE_SETS.get(row, _CORE_QUEUE_SET)


def is_idle_status(row: int, off: int) -> bool:
    """True for a memtile/core DMA status register (unmodelled DMAs: always idle)."""
    return (row == MEMTILE_ROW and off in MEMTILE_STATUS) or (row > 1 and off in CORE_STATUS)


def queue_offsets(row: int) -> Sequence[int]:
    """Task-queue register offsets of a tile in ``row``, in the order a BLOCKWRITE serves them."""
    return _QUEUE_OFFSETS.get(row, _CORE_QUEUE_OFFSETS)
