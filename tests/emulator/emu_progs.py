"""Hand-built shim-DMA programs for the emulator tests (typed ops, no builder needed)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from npudispatch.overlay_abi import PARAMS_CHANNEL, ParamsRecord
from npudispatch.txn.ops import BlockWrite, DdrPatch, MaskPoll, Write
from npudispatch.txn.registers import (
    CHANNEL_IDLE_MASK,
    CHANNEL_IDLE_VALUE,
    Direction,
    ShimChannel,
    shim_bd_addr,
    status_addr,
    task_queue_addr,
)
from npudispatch.txn.shim import ShimBd, TaskQueueEntry

MM2S, S2MM = Direction.MM2S, Direction.S2MM


@dataclass
class Bd:
    """A BD to emit: buffer ``argidx`` + ``offset``, ``nbytes`` long, extra ShimBd fields."""

    argidx: int | None
    offset: int
    nbytes: int
    fields: dict = field(default_factory=dict)


class Prog:
    """Accumulates ops; BD ids are allocated round-robin per column (tasks snapshot them)."""

    def __init__(self) -> None:
        self.ops: list = []
        self._next: dict[int, int] = defaultdict(int)

    def _alloc(self, col: int) -> int:
        bd = self._next[col] % 16
        self._next[col] += 1
        return bd

    def task(
        self,
        ch: ShimChannel,
        bds: list[Bd],
        *,
        repeat: int = 0,
        token: bool = False,
        patch: bool = True,
    ) -> int:
        """Write and patch the BD chain, queue it on ``ch``; returns the start BD id."""
        ids = [self._alloc(ch.col) for _ in bds]
        for k, (bd_id, spec) in enumerate(zip(ids, bds)):
            chained = k + 1 < len(ids)
            bd = ShimBd(
                length_words=spec.nbytes // 4,
                address=spec.offset,
                use_next_bd=chained,
                next_bd=ids[k + 1] if chained else 0,
                **spec.fields,
            )
            self.ops.append(BlockWrite(shim_bd_addr(ch.col, bd_id), bd.encode()))
            if patch and spec.argidx is not None:
                self.ops.append(DdrPatch(shim_bd_addr(ch.col, bd_id) + 4, spec.argidx, spec.offset))
        self.push(ch, ids[0], repeat=repeat, token=token)
        return ids[0]

    def push(self, ch: ShimChannel, start_bd: int, *, repeat: int = 0, token: bool = False) -> None:
        entry = TaskQueueEntry(start_bd, repeat, token)
        self.ops.append(Write(task_queue_addr(ch.col, ch.direction, ch.channel), entry.encode()))

    def wait(self, ch: ShimChannel) -> None:
        self.ops.append(
            MaskPoll(
                status_addr(ch.col, ch.direction, ch.channel), CHANNEL_IDLE_VALUE, CHANNEL_IDLE_MASK
            )
        )

    def launch(
        self,
        record_offset: int,
        record_nbytes: int,
        operands: list[tuple[ShimChannel, Bd]],
        outputs: list[tuple[ShimChannel, Bd]],
    ) -> None:
        """One overlay launch: record on the params channel, operand and output tasks, waits."""
        self.task(PARAMS_CHANNEL, [Bd(4, record_offset, record_nbytes)])
        for ch, bd in operands:
            self.task(ch, [bd])
        for ch, bd in outputs:
            self.task(ch, [bd])
        for ch in dict.fromkeys(ch for ch, _ in outputs):
            self.wait(ch)
        for ch in dict.fromkeys([PARAMS_CHANNEL, *(ch for ch, _ in operands)]):
            self.wait(ch)


def chan(col: int, direction: Direction, channel: int) -> ShimChannel:
    return ShimChannel(col, direction, channel)


def params_image(*records: ParamsRecord) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate encoded records; returns the params buffer and each record's (offset, size)."""
    parts, spans, off = [], [], 0
    for rec in records:
        data = rec.encode()
        parts.append(data)
        spans.append((off, len(data)))
        off += len(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), spans


def add_one(record: ParamsRecord, operands: list[np.ndarray]) -> list[np.ndarray]:
    """Test kernel 1: every output byte = operand byte + 1 (one operand, one output)."""
    return [(operands[0] + 1).astype(np.uint8)]


def float_add(record: ParamsRecord, operands: list[np.ndarray]) -> list[np.ndarray]:
    """Test kernel 2: float32 a + b."""
    a, b = (o.view(np.float32) for o in operands)
    return [a + b]


def identity(record: ParamsRecord, operands: list[np.ndarray]) -> list[np.ndarray]:
    """Test kernel 3: outputs = operands (a pure copy through the array)."""
    return [o.copy() for o in operands]


def reference_offsets(bd: ShimBd) -> list[int]:
    """docs/txn_format.md §9, one element at a time."""
    n0, n1, s0, s1, s2 = bd.d0_wrap, bd.d1_wrap, bd.d0_step, bd.d1_step, bd.d2_step
    out = []
    for i in range(bd.length_words):
        if n0 == 0:
            out.append(i)
        elif n1 == 0:
            out.append((i % n0) * s0 + (i // n0) * s1)
        else:
            out.append((i % n0) * s0 + ((i // n0) % n1) * s1 + (i // (n0 * n1)) * s2)
    return out


#: Shim buffer descriptors with small random access patterns, for property tests of the
#: address generator and of the host memory's strided reads and writes.
SHIM_BDS = st.builds(
    ShimBd,
    length_words=st.integers(0, 300),
    d0_wrap=st.integers(0, 9),
    d0_step=st.integers(1, 7),
    d1_wrap=st.integers(0, 6),
    d1_step=st.integers(1, 40),
    d2_step=st.integers(1, 400),
)
