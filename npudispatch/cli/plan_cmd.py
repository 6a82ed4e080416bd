"""``npudispatch plan MODEL [--json]``: the buffer plan of every NPU partition."""

from __future__ import annotations

import argparse
from pathlib import Path

from npudispatch.cli.common import add_dims_option, parse_dims, parse_shapes, print_json
from npudispatch.cli.compile_cmd import add_compile_options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command."""
    parser = subparsers.add_parser(
        "plan",
        help="show the buffer plan of each NPU partition",
        description="Compile the model and print each NPU partition's five-buffer plan.",
    )
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print JSON (BufferPlan.to_dict())")
    add_dims_option(parser)
    add_compile_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the plans."""
    from npudispatch.dispatch.compile import compile_model

    compiled = compile_model(
        args.model,
        dims=parse_dims(args.dims),
        input_shapes=parse_shapes(args.shape),
        pad=args.pad,
        precision=args.precision,
    )
    programs = [compiled.programs[i] for i in sorted(compiled.programs)]
    if args.json:
        print_json({"plans": {p.name: p.plan.to_dict() for p in programs}})
        return 0
    if not programs:
        print("no NPU partition: every node runs on the CPU")
    for p in programs:
        print(f"== {p.name}: {len(p.ops)} ops ({', '.join(op.name for op in p.ops)})")
        print(p.plan.summary())
        print()
    return 0
