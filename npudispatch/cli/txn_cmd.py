"""``npudispatch txn dump|stats|explain FILE [--json]``: inspect a transaction binary."""

from __future__ import annotations

import argparse

from npudispatch.cli import trace_cmd
from npudispatch.cli.common import load_transaction, print_json
from npudispatch.txn import Transaction, describe_op, dump, explain, opcode_name, stats


def _load(path: str) -> Transaction:
    return load_transaction(path)


def _dump(args: argparse.Namespace) -> int:
    txn = _load(args.file)
    if args.json:
        _, index = txn.framed()
        ops = [
            {"index": i, "offset": off, "opcode": opcode_name(op.opcode), "fields": describe_op(op)}
            for i, (off, op) in enumerate(zip(index.offsets.tolist(), txn.iter_ops()))
        ]
        print_json({"file": args.file, "header": _header(txn), "ops": ops})
    else:
        print(dump(txn))
    return 0


def _stats(args: argparse.Namespace) -> int:
    info = stats(_load(args.file))
    if args.json:
        print_json({"file": args.file, **info})
        return 0
    print(
        f"{args.file}: {info['format']} dev_gen {info['dev_gen']} cols {info['num_cols']}, "
        f"{info['num_ops']} ops, {info['nbytes']} B"
    )
    for name, count in info["opcodes"].items():
        print(f"  {name:<14} {count:8d} ops {info['bytes_by_opcode'][name]:10d} B")
    by_arg = ", ".join(f"arg {a}: {n}" for a, n in info["ddr_patches_by_argidx"].items())
    print(f"  DDR patches    {info['ddr_patches']:8d} ({by_arg or 'none'})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    movement = explain(_load(args.file))
    if args.json:
        print_json({"file": args.file, **movement.to_json()})
        return 0
    print(movement.render())
    print("totals:")
    for (col, direction, ch, argidx), n in sorted(
        movement.totals().items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], str(kv[0][3]))
    ):
        print(f"  col {col} {direction.name}{ch} arg {argidx}: {n} B")
    return 0


def _header(txn: Transaction) -> dict:
    h = txn.header
    return {
        "major": h.major,
        "minor": h.minor,
        "dev_gen": h.dev_gen,
        "num_rows": h.num_rows,
        "num_cols": h.num_cols,
        "num_mem_tile_rows": h.num_mem_tile_rows,
        "num_ops": h.num_ops,
        "txn_size": h.txn_size,
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``txn`` command and its sub-commands."""
    parser = subparsers.add_parser("txn", help="inspect AIE transaction binaries")
    sub = parser.add_subparsers(dest="txn_command", metavar="SUBCOMMAND", required=True)
    for name, func, text in (
        ("dump", _dump, "one line per op: index, byte offset, opcode, decoded fields"),
        ("stats", _stats, "opcode histogram, sizes, DDR patches per argidx"),
        ("explain", _explain, "the shim data movement the transaction performs"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("file", metavar="FILE", help="transaction binary (.bin)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)
    trace_cmd.add_parser(sub)
