"""Trace ("DMA-only") mode: run any transaction without kernels or buffer contents.

Works on AMD's real transactions, whose kernels and buffer sizes are unknown: every shim task
completes when queued, buffers are unbounded, and each BD execution is recorded as a
:class:`~npudispatch.emulator.dma.Transfer` (repeats expanded), the convention of
``txn.explain``'s ``transfers()``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from npudispatch.emulator.device import MAX_COLS, VirtualNpu
from npudispatch.emulator.dma import Transfer
from npudispatch.emulator.stats import RunStats
from npudispatch.errors import TxnFormatError
from npudispatch.txn.registers import Direction


@dataclass(slots=True)
class TraceResult:
    """Transfers and statistics of one trace run."""

    transfers: list[Transfer]
    stats: RunStats
    num_cols: int

    def totals(self) -> Counter[tuple[int | None, Direction]]:
        """Bytes moved per ``(argidx, direction)``."""
        out: Counter[tuple[int | None, Direction]] = Counter()
        for t in self.transfers:
            out[(t.argidx, t.direction)] += t.nbytes
        return out

    def to_json(self) -> list[dict[str, object]]:
        """One record per transfer: col, direction, channel, argidx, offset, bytes."""
        return [t.to_json() for t in self.transfers]


def trace_transaction(
    program: Any, *, num_cols: int | None = None, argv: Sequence[int] | None = None
) -> TraceResult:
    """Trace a ``Transaction`` or op sequence; ``num_cols`` defaults to the header's (else 4)."""
    header = getattr(program, "header", None)
    cols = num_cols or getattr(header, "num_cols", None) or 4
    if not 1 <= cols <= MAX_COLS:
        raise TxnFormatError(
            f"transaction header field num_cols is {cols}: the emulator models partitions of "
            f"1..{MAX_COLS} columns (AIE2P arrays have at most 8)"
        )
    npu = VirtualNpu(num_cols=cols, argv=argv, trace=True)
    stats = npu.run(program)
    return TraceResult(npu.transfers, stats, cols)
