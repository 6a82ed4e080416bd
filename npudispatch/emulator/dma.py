"""Shim DMA tasks: what a task-queue write enqueues, and the per-BD transfer records it produces
(:class:`~npudispatch.txn.explain.Transfer`, the same record ``txn.explain`` derives statically)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from npudispatch.txn.explain import Transfer  # noqa: F401  (re-exported: emulator.dma.Transfer)
from npudispatch.txn.registers import SHIM_NUM_BDS, ShimChannel
from npudispatch.txn.shim import ShimBd, TaskQueueEntry

QUEUE_DEPTH = 4
"""Pending tasks a shim channel queue holds (AIE-ML shim task queues are 4 deep); one more is an
overflow, which the emulator reports as a :class:`DeviceHang` after trying to make room."""


class ChainError(Exception):
    """Internal: a BD chain cannot run (invalid BD or a loop); carries the offending BD id."""

    def __init__(self, message: str, bd: int) -> None:
        super().__init__(message)
        self.bd = bd


@dataclass(slots=True)
class Task:
    """A queued shim DMA task with the BD chain snapshotted when it was queued."""

    channel: ShimChannel
    entry: TaskQueueEntry
    chain: list[tuple[int, ShimBd]]
    op_index: int

    @property
    def runs(self) -> int:
        """Executions of the chain: 1 + repeat count."""
        return self.entry.repeat_count + 1

    @property
    def nbytes(self) -> int:
        """Bytes the task moves in total (all repeats, all chained BDs)."""
        return self.runs * sum(bd.length_bytes for _, bd in self.chain)

    def executions(self) -> Iterator[tuple[int, int, ShimBd]]:
        """``(rep, bd_id, bd)`` for every BD execution in order."""
        for rep in range(self.runs):
            for bd_id, bd in self.chain:
                yield rep, bd_id, bd


_DECODED: dict[tuple[int, ...], ShimBd] = {}
_DECODED_LIMIT = 1 << 14


def decode_bd(words: tuple[int, ...]) -> ShimBd:
    """``ShimBd.decode(words)``, remembered: programs re-queue the same BD words every run.

    The emulator treats decoded BDs as read-only, so one object per distinct word tuple is shared.
    """
    bd = _DECODED.get(words)
    if bd is None:
        if len(_DECODED) >= _DECODED_LIMIT:
            _DECODED.clear()
        bd = _DECODED[words] = ShimBd.decode(words)
    return bd


def snapshot_chain(
    read_bd: Callable[[int, int], tuple[int, ...]],
    col: int,
    start_bd: int,
    *,
    allow_invalid: bool = False,
) -> list[tuple[int, ShimBd]]:
    """Decode the BD chain starting at ``start_bd`` from the register file (``read_bd(col, bd)``
    returns the BD's 8 register words).

    Raises :class:`ChainError` for a BD with ``Valid_BD = 0`` (the channel stops with
    Error_BD_Invalid) or a chain that revisits a BD (the task would never end). With
    ``allow_invalid`` (trace mode) an invalid BD ends the chain and is kept in it instead.
    """
    chain: list[tuple[int, ShimBd]] = []
    seen: set[int] = set()
    bd_id = start_bd
    while True:
        if bd_id in seen:
            raise ChainError(
                f"BD chain loops back to BD {bd_id}: the task would never finish", bd_id
            )
        seen.add(bd_id)
        bd = decode_bd(read_bd(col, bd_id))
        if not bd.valid and allow_invalid:
            chain.append((bd_id, bd))
            return chain
        if not bd.valid:
            raise ChainError(
                f"BD {bd_id} has Valid_BD = 0 (never written or cleared): the channel stops with "
                "Error_BD_Invalid; write the BD before queueing the task",
                bd_id,
            )
        chain.append((bd_id, bd))
        if not bd.use_next_bd:
            return chain
        bd_id = bd.next_bd
        if bd_id >= SHIM_NUM_BDS:  # 4-bit field, cannot happen; keeps the invariant explicit
            raise ChainError(f"next BD {bd_id} out of range", bd_id)
