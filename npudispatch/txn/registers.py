"""AIE2/AIE2P register addresses used for data movement (docs/txn_format.md §4).

Register offsets in a transaction are partition-relative: ``(col << 25) | (row << 20) | offset``.
The map is identical on AIE2 (phx, DevGen 3) and AIE2P (stx, DevGen 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

COL_SHIFT = 25
ROW_SHIFT = 20
TILE_OFFSET_MASK = (1 << ROW_SHIFT) - 1

SHIM_ROW = 0
MEMTILE_ROW = 1

# Shim tile (row 0) DMA
SHIM_BD_BASE = 0x1D000
SHIM_BD_STRIDE = 0x20
SHIM_BD_WORDS = 8
SHIM_NUM_BDS = 16
SHIM_S2MM_CTRL = (0x1D200, 0x1D208)
SHIM_S2MM_TASK_QUEUE = (0x1D204, 0x1D20C)
SHIM_MM2S_CTRL = (0x1D210, 0x1D218)
SHIM_MM2S_TASK_QUEUE = (0x1D214, 0x1D21C)
SHIM_S2MM_STATUS = (0x1D220, 0x1D224)
SHIM_MM2S_STATUS = (0x1D228, 0x1D22C)
SHIM_LOCK_VALUE_BASE = 0x14000

# Mask/value of the MASKPOLL the corpus uses to wait until a DMA channel is idle (docs/txn_format.md §4).
CHANNEL_IDLE_MASK = 0x0078003C
CHANNEL_IDLE_VALUE = 0

# Task-queue register fields (docs/txn_format.md §4)
TASK_QUEUE_START_BD_MASK = 0xF
TASK_QUEUE_REPEAT_SHIFT = 16
TASK_QUEUE_REPEAT_MASK = 0xFF
TASK_QUEUE_TOKEN_BIT = 1 << 31

# Memtile (row 1) DMA
MEMTILE_BD_BASE = 0xA0000
MEMTILE_NUM_BDS = 48


class Direction(IntEnum):
    """DMA direction as TCT/sync ops encode it: 0 = S2MM (writes DDR), 1 = MM2S (reads DDR)."""

    S2MM = 0
    MM2S = 1


def tile_addr(col: int, row: int, offset: int) -> int:
    """Partition-relative register address of ``offset`` in tile (col, row)."""
    if not 0 <= offset <= TILE_OFFSET_MASK:
        raise ValueError(f"tile register offset {offset:#x} does not fit in 20 bits")
    if not 0 <= row < 32 or not 0 <= col < 128:
        raise ValueError(f"tile (col={col}, row={row}) is out of range")
    return (col << COL_SHIFT) | (row << ROW_SHIFT) | offset


def split_addr(addr: int) -> tuple[int, int, int]:
    """Inverse of :func:`tile_addr`: ``(col, row, offset)``."""
    return (addr >> COL_SHIFT) & 0x7F, (addr >> ROW_SHIFT) & 0x1F, addr & TILE_OFFSET_MASK


def shim_bd_addr(col: int, bd: int) -> int:
    """Address of word 0 of shim BD ``bd`` in column ``col``."""
    if not 0 <= bd < SHIM_NUM_BDS:
        raise ValueError(f"shim BD id {bd} is out of range 0..{SHIM_NUM_BDS - 1}")
    return tile_addr(col, SHIM_ROW, SHIM_BD_BASE + SHIM_BD_STRIDE * bd)


def task_queue_addr(col: int, direction: Direction, channel: int) -> int:
    """Address of the shim task-queue register of (col, direction, channel)."""
    regs = SHIM_MM2S_TASK_QUEUE if direction == Direction.MM2S else SHIM_S2MM_TASK_QUEUE
    return tile_addr(col, SHIM_ROW, regs[_check_channel(channel)])


def status_addr(col: int, direction: Direction, channel: int) -> int:
    """Address of the shim DMA status register of (col, direction, channel)."""
    regs = SHIM_MM2S_STATUS if direction == Direction.MM2S else SHIM_S2MM_STATUS
    return tile_addr(col, SHIM_ROW, regs[_check_channel(channel)])


def _check_channel(channel: int) -> int:
    if channel not in (0, 1):
        raise ValueError(f"shim DMA channel must be 0 or 1, got {channel}")
    return channel


@dataclass(frozen=True, slots=True)
class ShimChannel:
    """A shim DMA channel: column, direction and channel number."""

    col: int
    direction: Direction
    channel: int

    def __str__(self) -> str:
        return f"col {self.col} {self.direction.name}{self.channel}"


def decode_shim_bd_offset(offset: int) -> int | None:
    """BD id whose 8-word block contains the shim-tile ``offset``, or None."""
    rel = offset - SHIM_BD_BASE
    if 0 <= rel < SHIM_BD_STRIDE * SHIM_NUM_BDS:
        return rel // SHIM_BD_STRIDE
    return None


def decode_shim_queue(offset: int) -> tuple[Direction, int] | None:
    """(direction, channel) of a shim task-queue register offset, or None."""
    if offset in SHIM_MM2S_TASK_QUEUE:
        return Direction.MM2S, SHIM_MM2S_TASK_QUEUE.index(offset)
    if offset in SHIM_S2MM_TASK_QUEUE:
        return Direction.S2MM, SHIM_S2MM_TASK_QUEUE.index(offset)
    return None


def decode_shim_status(offset: int) -> tuple[Direction, int] | None:
    """(direction, channel) of a shim DMA status register offset, or None."""
    if offset in SHIM_MM2S_STATUS:
        return Direction.MM2S, SHIM_MM2S_STATUS.index(offset)
    if offset in SHIM_S2MM_STATUS:
        return Direction.S2MM, SHIM_S2MM_STATUS.index(offset)
    return None
