"""Notebook (HTML) summary of a transaction: header, op histogram, DDR patches, data movement.

:func:`transaction_html` is meant to back ``Transaction._repr_html_``; :func:`html_table` is the
small escaped-table helper it uses (also reused by :mod:`npudispatch.viz`). Everything is
derived from :func:`~npudispatch.txn.inspect.stats` (no op decoding) and
:func:`~npudispatch.txn.explain.explain` (static shim DMA decoding).
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable, Sequence

from npudispatch.txn.explain import explain
from npudispatch.txn.inspect import stats
from npudispatch.txn.transaction import Transaction

__all__ = ["html_table", "transaction_html"]

_BAR_PX = 160  # width of the longest histogram bar


def html_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], *, raw_columns: Iterable[int] = ()
) -> str:
    """An HTML table; every cell is escaped except the columns in ``raw_columns`` (pre-built HTML)."""
    raw = set(raw_columns)
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{c if i in raw else html.escape(str(c))}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bar(value: int, largest: int) -> str:
    width = max(1, round(_BAR_PX * value / largest)) if largest else 0
    return f'<div style="background:#4c78a8;height:0.8em;width:{width}px"></div>'


def _section(title: str, body: str) -> str:
    return f"<div><b>{html.escape(title)}</b>{body}</div>"


def transaction_html(txn: Transaction, *, max_movement_rows: int = 64) -> str:
    """HTML summary of ``txn`` for notebooks.

    Sections: header (format, device generation, rows/cols, ops, bytes); op histogram (count,
    bytes, a bar per opcode); DDR patches per ``argidx``; data movement, one row per shim
    channel and buffer with the task count and bytes moved (at most ``max_movement_rows`` rows,
    the largest first, with a note when rows were left out).
    """
    s = stats(txn)
    h = txn.header
    fmt = "optimised 1.0" if txn.is_opt else "plain 0.1"
    header = html_table(
        ("format", "dev_gen", "rows", "cols", "memtile rows", "ops", "bytes"),
        [(fmt, h.dev_gen, h.num_rows, h.num_cols, h.num_mem_tile_rows, s["num_ops"], s["nbytes"])],
    )
    counts: dict[str, int] = s["opcodes"]
    largest = max(counts.values(), default=0)
    histogram = html_table(
        ("opcode", "count", "bytes", ""),
        [
            (name, f"{n:,}", f"{s['bytes_by_opcode'][name]:,}", _bar(n, largest))
            for name, n in sorted(counts.items(), key=lambda kv: -kv[1])
        ],
        raw_columns=(3,),
    )
    by_arg: dict[int, int] = s["ddr_patches_by_argidx"]
    patches = (
        html_table(("argidx", "DDR patches"), sorted(by_arg.items()))
        if by_arg
        else "<div>no DDR_PATCH ops (the transaction uses raw addresses only)</div>"
    )
    return (
        '<div class="npudispatch-txn">'
        f"<div><b>Transaction</b> {fmt}, {s['num_ops']:,} ops, {s['nbytes']:,} B</div>"
        + header
        + _section("op histogram", histogram)
        + _section(f"DDR patches ({s['ddr_patches']})", patches)
        + _section("data movement (shim DMA)", _movement_html(txn, max_movement_rows))
        + "</div>"
    )


def _movement_html(txn: Transaction, max_rows: int) -> str:
    movement = explain(txn)
    if not movement.tasks:
        return "<div>no shim DMA tasks</div>"
    tasks: dict[tuple, int] = defaultdict(int)
    for task in movement.tasks:
        for b in {b.argidx for b in task.bds}:
            tasks[(task.col, task.direction, task.channel, b)] += 1
    totals = sorted(movement.totals().items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][2]))
    rows = [
        (
            col,
            direction.name,
            channel,
            "raw address" if argidx is None else argidx,
            tasks[(col, direction, channel, argidx)],
            f"{nbytes:,}",
        )
        for (col, direction, channel, argidx), nbytes in totals[:max_rows]
    ]
    table = html_table(("col", "direction", "channel", "argidx", "tasks", "bytes"), rows)
    moved = sum(n for _, n in totals)
    note = (
        f"<div>{len(totals) - max_rows} more rows not shown</div>" if len(totals) > max_rows else ""
    )
    return f"<div>{len(movement.tasks)} tasks, {moved:,} B moved in total</div>" + table + note
