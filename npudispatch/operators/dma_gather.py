"""A DMA gather launch: the operand is rows of a const table picked by runtime indices.

An embedding lookup ``Gather(table, ids)`` whose ``ids`` the host writes before every run does not
need the table on the array: the launch reads one row per index straight from the const buffer,
with one MM2S buffer descriptor of ``row_bytes`` per index. The transaction is built with every
row BD pointing at row 0; its DDR_PATCH ``argplus`` is the *runtime patch site* of that index: the
host rewrites it to ``table + index * row_bytes`` before the kernel call (data-dependent
addressing the way a real runtime does it: the address patch is rewritten, then the call is made).
Only the selected rows travel, whatever the table size.

Channel use follows the overlay protocol (docs/overlay_abi.md §3): outputs (S2MM) and the params
record are queued first, then the rows on the operand channels, each channel a contiguous run of
indices (the overlay concatenates operand channels in channel order). When there are more indices
than free shim BDs, the rows go in rounds: queue one BD chain per channel, wait for those channels,
re-program the same BDs with the next rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from npudispatch.errors import PlanError
from npudispatch.operators import dma
from npudispatch.overlay_abi import PARAMS_CHANNEL, operand_channels, output_channels
from npudispatch.txn.builder import TxnBuilder
from npudispatch.txn.rebase import patches
from npudispatch.txn.registers import SHIM_NUM_BDS
from npudispatch.txn.transaction import Transaction

MAX_ROWS = 4096
"""Most indices one DMA gather launch takes (about 100 transaction bytes per index); a Gather
with more indices keeps the row-copy kernel."""


@dataclass(frozen=True)
class GatherLaunch:
    """The launch's transaction and, per DDR_PATCH of it (in transaction order), the flat index
    element whose row that BD reads (None for the params and output patches)."""

    txn: Transaction
    patch_elements: list[int | None]


def gather_launch(
    *,
    params: dma.Stream,
    outputs: list[dma.Stream],
    table_arg: int,
    table_offset: int,
    row_bytes: int,
    count: int,
    num_cols: int = 4,
) -> GatherLaunch:
    """One overlay launch whose single operand is ``count`` rows of ``row_bytes`` read from
    local buffer ``table_arg`` (every row BD addressed at ``table_offset``, row 0, until patched)."""
    if row_bytes <= 0 or row_bytes % 4 or table_offset % 4:
        raise PlanError(
            f"DMA gather rows of {row_bytes} B at offset {table_offset} are not whole 32-bit words"
        )
    if not 1 <= count <= MAX_ROWS:
        raise PlanError(f"DMA gather of {count} rows: 1..{MAX_ROWS} rows per launch")
    builder = TxnBuilder(num_cols=num_cols)
    receivers = dma.stripe(outputs, output_channels(num_cols))
    receivers[PARAMS_CHANNEL] = [dma.Piece(params, 0, params.nbytes)]
    next_bd: dict[int, int] = {}
    dma.queue(builder, receivers, next_bd, what="DMA gather", hint="use more columns")
    row = dma.Stream(table_arg, table_offset, row_bytes)
    plan = _row_plan(operand_channels(num_cols), next_bd, count)
    order: list[int] = []
    for round_runs in plan:
        runs = {chan: [dma.Piece(row, 0, row_bytes)] * len(rows) for chan, rows in round_runs}
        dma.queue(builder, runs, dict(next_bd), what="DMA gather", hint="use more columns")
        for _, rows in round_runs:
            order += rows
        for chan in runs:  # the BDs are re-programmed by the next round
            builder.wait_channel_idle(chan.col, chan.direction, chan.channel)
    for chan in receivers:
        builder.wait_channel_idle(chan.col, chan.direction, chan.channel)
    txn = builder.build()
    rows_left = iter(order)
    elements = [
        next(rows_left) if argidx == table_arg else None for _, _, argidx, _ in patches(txn)
    ]
    return GatherLaunch(txn, elements)


def _row_plan(channels, next_bd: dict[int, int], count: int):
    """Rounds of ``(channel, [row elements])``: each channel a contiguous run of the indices
    (channel order = stream order), at most the BDs its column has left per round."""
    per_col: dict[int, int] = {}
    for chan in channels:
        per_col[chan.col] = per_col.get(chan.col, 0) + 1
    caps = []
    for chan in channels:
        free = SHIM_NUM_BDS - next_bd.get(chan.col, 0)
        caps.append(max(0, free // per_col[chan.col]))
    if sum(caps) == 0:
        raise PlanError("DMA gather: no shim BD left for the rows; use more columns")
    rounds = -(-count // sum(caps))
    spans, start = [], 0
    for cap in caps:
        take = min(cap * rounds, count - start)
        spans.append(range(start, start + take))
        start += take
    plan = []
    for r in range(rounds):
        step = []
        for chan, cap, span in zip(channels, caps, spans):
            rows = list(span[r * cap : (r + 1) * cap])
            if rows:
                step.append((chan, rows))
        plan.append(step)
    return plan
