"""``npudispatch txn trace FILE [--json] [--argv A0,A1,A2,A3,A4]``: run a transaction DMA-only.

Executes the transaction on the emulator's trace mode (no kernels, unbounded buffers) and prints
every shim BD execution: ``col, direction, channel, argidx, offset, bytes``. The ``txn`` command
calls :func:`add_parser` when this module exists.
"""

from __future__ import annotations

import argparse

from npudispatch.cli.common import load_transaction, print_json
from npudispatch.emulator import TraceResult, trace_transaction
from npudispatch.errors import TxnFormatError
from npudispatch.txn import Transaction


def add_parser(txn_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``trace`` sub-command to the ``txn`` command's sub-parsers."""
    p = txn_subparsers.add_parser(
        "trace", help="run the transaction DMA-only on the emulator and list every transfer"
    )
    p.add_argument("file", metavar="FILE", help="transaction binary (.bin), plain or wrapped")
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, one record per transfer (col, direction, channel, argidx, "
        "offset, bytes)",
    )
    p.add_argument(
        "--argv",
        metavar="A0,...,A4",
        help="the five buffer addresses (default (i+1)<<40); offsets are relative to them",
    )
    p.set_defaults(func=run)
    return p


def _load(path: str) -> Transaction:
    return load_transaction(path)


def _parse_argv(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x, 0) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 5:
        raise TxnFormatError(f"--argv expects five integers separated by commas, got {text!r}")
    for i, a in enumerate(values):
        # the emulator's rule for buffer addresses (checked here to report it as a CLI error)
        if a <= 0 or a % 4 or a >= 2**48:
            raise TxnFormatError(
                f"--argv: address {i} ({a:#x}) must be a non-zero, 4-byte aligned address below "
                "2**48"
            )
    return values


def render(result: TraceResult) -> str:
    """Text form: one line per transfer, then byte totals per buffer and direction."""
    lines = []
    for t in result.transfers:
        where = f"arg {t.argidx} + {t.offset:#x}" if t.argidx is not None else f"raw {t.offset:#x}"
        lines.append(
            f"op {t.op_index}: col {t.col} {t.direction.name}{t.channel} BD{t.bd}: "
            f"{where}, {t.nbytes} B"
        )
    lines.append(f"{len(result.transfers)} transfers, {result.stats.tasks} tasks")
    for (argidx, direction), n in sorted(
        result.totals().items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1])
    ):
        lines.append(f"  arg {'?' if argidx is None else argidx} {direction.name}: {n} B")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``npudispatch txn trace``."""
    result = trace_transaction(_load(args.file), argv=_parse_argv(args.argv))
    if args.json:
        print_json(result.to_json())
    else:
        print(render(result))
    return 0
