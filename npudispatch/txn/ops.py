"""Typed transaction ops (docs/txn_format.md §2-3).

One dataclass per opcode, holding the *semantic* fields only. ``raw`` keeps the op's original
bytes when it was parsed, so padding and "don't care" bytes survive a parse → serialize round trip;
ops built in code have ``raw=None`` and serialize with zeros there. ``raw`` never takes part in
equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

import numpy as np


class Opcode(IntEnum):
    """Opcodes of the aie-rt transaction format (new numbering for 9..15, docs/txn_format.md §2)."""

    WRITE = 0x00
    BLOCKWRITE = 0x01
    BLOCKSET = 0x02  # never serialized
    MASKWRITE = 0x03
    MASKPOLL = 0x04
    NOOP = 0x05
    PREEMPT = 0x06
    MASKPOLL_BUSY = 0x07
    LOADPDI = 0x08
    LOAD_PM_START = 0x09
    CREATE_SCRATCHPAD = 0x0A
    UPDATE_STATE_TABLE = 0x0B
    UPDATE_REG = 0x0C
    UPDATE_SCRATCH = 0x0D
    TCT = 0x80
    DDR_PATCH = 0x81
    READ_REGS = 0x82
    RECORD_TIMER = 0x83
    MERGE_SYNC = 0x84


CUSTOM_OP_BEGIN = 0x80
FIRST_UNKNOWN_CUSTOM_OP = 0x85


def _raw() -> bytes | None:
    return field(default=None, repr=False, compare=False)  # type: ignore[return-value]


@dataclass(slots=True, eq=True)
class Write:
    """WRITE: ``reg[reg_off] = value``."""

    opcode: ClassVar[int] = Opcode.WRITE
    reg_off: int
    value: int
    raw: bytes | None = _raw()


@dataclass(slots=True, eq=False)
class BlockWrite:
    """BLOCKWRITE: ``values`` (u32 words) written to ``reg_off``, ``reg_off + 4``, ..."""

    opcode: ClassVar[int] = Opcode.BLOCKWRITE
    reg_off: int
    values: np.ndarray  # uint32, 1-d
    raw: bytes | None = _raw()

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.uint32).reshape(-1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockWrite):
            return NotImplemented
        return self.reg_off == other.reg_off and np.array_equal(self.values, other.values)

    __hash__ = None  # type: ignore[assignment]


@dataclass(slots=True)
class MaskWrite:
    """MASKWRITE: ``reg = (reg & ~mask) | (value & mask)``."""

    opcode: ClassVar[int] = Opcode.MASKWRITE
    reg_off: int
    value: int
    mask: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class MaskPoll:
    """MASKPOLL: wait until ``(reg & mask) == value``."""

    opcode: ClassVar[int] = Opcode.MASKPOLL
    reg_off: int
    value: int
    mask: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class MaskPollBusy:
    """MASKPOLL_BUSY: busy-wait flavour of MASKPOLL."""

    opcode: ClassVar[int] = Opcode.MASKPOLL_BUSY
    reg_off: int
    value: int
    mask: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class Noop:
    """NOOP (4 bytes)."""

    opcode: ClassVar[int] = Opcode.NOOP
    raw: bytes | None = _raw()


@dataclass(slots=True)
class Preempt:
    """PREEMPT: preemption point at ``level`` (0 NOOP, 1 MEM_TILE, 2 AIE_TILE, 3 AIE_REGISTERS)."""

    opcode: ClassVar[int] = Opcode.PREEMPT
    level: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class LoadPdi:
    """LOADPDI (16 bytes)."""

    opcode: ClassVar[int] = Opcode.LOADPDI
    pdi_id: int
    pdi_size: int = 0
    pdi_address: int = 0
    raw: bytes | None = _raw()


@dataclass(slots=True)
class LoadPmStart:
    """LOAD_PM_START: the next ``load_sequence_count`` ops load program memory ``pm_load_id``."""

    opcode: ClassVar[int] = Opcode.LOAD_PM_START
    load_sequence_count: int
    pm_load_id: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class CreateScratchpad:
    """CREATE_SCRATCHPAD (16 bytes)."""

    opcode: ClassVar[int] = Opcode.CREATE_SCRATCHPAD
    usage_type: int
    size: int
    scratch_offset: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class UpdateStateTable:
    """UPDATE_STATE_TABLE (8 bytes); ``func`` 0 MUL, 1 INCR, 2 DECR."""

    opcode: ClassVar[int] = Opcode.UPDATE_STATE_TABLE
    state_table_idx: int
    func: int
    func_arg: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class UpdateReg:
    """UPDATE_REG (12 bytes): UPDATE_STATE_TABLE layout plus a register offset."""

    opcode: ClassVar[int] = Opcode.UPDATE_REG
    state_table_idx: int
    func: int
    func_arg: int
    reg_off: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class UpdateScratch:
    """UPDATE_SCRATCH (4 bytes)."""

    opcode: ClassVar[int] = Opcode.UPDATE_SCRATCH
    raw: bytes | None = _raw()


@dataclass(slots=True)
class Tct:
    """TCT (custom 0x80): wait for task-complete tokens; ``word``/``config`` as in docs/txn_format.md §3.4."""

    opcode: ClassVar[int] = Opcode.TCT
    word: int
    config: int
    raw: bytes | None = _raw()

    @property
    def direction(self) -> int:
        """0 = S2MM, 1 = MM2S."""
        return self.word & 0xFF

    @property
    def row(self) -> int:
        return (self.word >> 8) & 0xFF

    @property
    def col(self) -> int:
        return (self.word >> 16) & 0xFF

    @property
    def row_count(self) -> int:
        return (self.config >> 8) & 0xFF

    @property
    def col_count(self) -> int:
        return (self.config >> 16) & 0xFF

    @property
    def channel(self) -> int:
        return (self.config >> 24) & 0xFF

    @classmethod
    def make(
        cls,
        *,
        col: int,
        row: int,
        direction: int,
        channel: int,
        col_count: int = 1,
        row_count: int = 1,
    ) -> Tct:
        """Build a TCT wait from its fields."""
        word = (direction & 0xFF) | ((row & 0xFF) << 8) | ((col & 0xFF) << 16)
        config = ((row_count & 0xFF) << 8) | ((col_count & 0xFF) << 16) | ((channel & 0xFF) << 24)
        return cls(word=word, config=config)


@dataclass(slots=True)
class DdrPatch:
    """DDR_PATCH (custom 0x81): write ``argv[argidx] + argplus`` into the BD at ``regaddr``."""

    opcode: ClassVar[int] = Opcode.DDR_PATCH
    regaddr: int
    argidx: int
    argplus: int
    action: int = 0
    raw: bytes | None = _raw()


@dataclass(slots=True)
class ReadRegs:
    """READ_REGS (custom 0x82): firmware dumps these registers (debug)."""

    opcode: ClassVar[int] = Opcode.READ_REGS
    addresses: tuple[int, ...]
    raw: bytes | None = _raw()


@dataclass(slots=True)
class RecordTimer:
    """RECORD_TIMER (custom 0x83): record a timestamp tagged ``timer_id``."""

    opcode: ClassVar[int] = Opcode.RECORD_TIMER
    timer_id: int
    raw: bytes | None = _raw()


@dataclass(slots=True)
class MergeSync:
    """MERGE_SYNC (custom 0x84): wait for ``num_tokens`` tokens over ``num_cols`` column FIFOs."""

    opcode: ClassVar[int] = Opcode.MERGE_SYNC
    word: int
    config: int = 0
    raw: bytes | None = _raw()

    @property
    def num_tokens(self) -> int:
        return self.word & 0xFF

    @property
    def num_cols(self) -> int:
        return (self.word >> 8) & 0xFF

    @classmethod
    def make(cls, num_tokens: int, num_cols: int) -> MergeSync:
        """Build a MERGE_SYNC (legacy opcode 0x11 in the top byte, as DD writes it)."""
        return cls(word=(num_tokens & 0xFF) | ((num_cols & 0xFF) << 8) | (0x11 << 24))


@dataclass(slots=True)
class CustomOp:
    """A custom op with no known layout (opcode >= 0x85), kept as an opaque payload."""

    opcode: int
    payload: bytes
    raw: bytes | None = _raw()


Op = (
    Write
    | BlockWrite
    | MaskWrite
    | MaskPoll
    | MaskPollBusy
    | Noop
    | Preempt
    | LoadPdi
    | LoadPmStart
    | CreateScratchpad
    | UpdateStateTable
    | UpdateReg
    | UpdateScratch
    | Tct
    | DdrPatch
    | ReadRegs
    | RecordTimer
    | MergeSync
    | CustomOp
)
