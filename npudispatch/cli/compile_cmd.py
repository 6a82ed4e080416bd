"""``npudispatch compile MODEL -o DIR``: write the whole compiled model, runnable without MODEL.

Layout (:mod:`npudispatch.dispatch.artifact`): ``DIR/compiled.json`` (inputs, outputs, segments
in run order, file hashes), ``DIR/npuN/`` (program.json, txn.bin, const.bin, params.bin, meta.json
— the DD meta JSON) per NPU partition, ``DIR/cpuN/model.onnx`` per CPU segment, and
``DIR/report.json`` with ``partitions`` (kind, nodes, inputs, outputs; NPU ones add ``program``,
``plan`` and ``txn``), ``npu_node_fraction``, ``kernel_calls_per_run``, ``unsupported`` and
``timings``. Segment folders of an earlier compile into the same DIR are removed.
``npudispatch run DIR`` and ``Session(DIR)`` run it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from npudispatch.cli.common import (
    add_dims_option,
    output_dir,
    parse_dims,
    parse_shapes,
    print_json,
    writing,
)
from npudispatch.precision import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compile`` command."""
    parser = subparsers.add_parser(
        "compile",
        help="compile a model into fused NPU programs (+ report.json)",
        description="Load, rewrite, partition, plan and emit one fused program per NPU partition.",
    )
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    parser.add_argument("--num-cols", type=int, default=4, help="AIE columns to use (default 4)")
    parser.add_argument("--no-rewrite", action="store_true", help="skip the rewrite pipeline")
    parser.add_argument("--json", action="store_true", help="print report.json on stdout")
    add_dims_option(parser)
    add_compile_options(parser)
    parser.set_defaults(func=run)


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    """``--no-pad``: no terminal padding; ``--precision`` (``--fp32``): the compute precision."""
    parser.add_argument(
        "--no-pad",
        dest="pad",
        action="store_false",
        help="keep every NPU tensor at its declared shape (no terminal padding)",
    )
    add_precision_options(parser)


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    """``--precision bf16|mixed|fp32`` and its alias ``--fp32`` (sets ``args.precision``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16",
        help="bf16 (default): bf16 storage with casts at NPU borders, bf16 operands with float32 "
        "accumulation; mixed: float32 storage, bf16 operands only for matmuls, convolutions and "
        "attention; fp32: float32 storage and compute (docs/numerics.md)",
    )
    group.add_argument(
        "--fp32",
        dest="precision",
        action="store_const",
        const="fp32",
        help="same as --precision fp32",
    )


def run(args: argparse.Namespace) -> int:
    """Compile and write the whole compiled model (programs, CPU segments, report)."""
    from npudispatch.dispatch.artifact import CompiledArtifact
    from npudispatch.dispatch.compile import compile_model

    output_dir(args.output, "the compiled programs")  # fail before a long compile
    dims = parse_dims(args.dims)
    shapes = parse_shapes(args.shape)
    compiled = compile_model(
        args.model,
        dims=dims,
        input_shapes=shapes,
        rewrite=not args.no_rewrite,
        num_cols=args.num_cols,
        pad=args.pad,
        precision=args.precision,
    )
    out = output_dir(args.output, "the compiled programs")
    options = {
        "pad": args.pad,
        "precision": args.precision,
        "dims": dims,
        "input_shapes": {name: list(shape) for name, shape in (shapes or {}).items()},
        "num_cols": args.num_cols,
    }
    artifact = CompiledArtifact.from_compiled(compiled, options)
    with writing(out, "the compiled programs"):
        artifact.save(out)
    report = artifact.report
    if args.json:
        print_json(report)
    else:
        npu = len(compiled.programs)
        print(
            f"wrote {out}: {len(compiled.partitions)} partitions ({npu} NPU), "
            f"{report['npu_node_fraction']:.0%} of nodes on the NPU, "
            f"{report['kernel_calls_per_run']} kernel call(s) per run; "
            f"run it with `npudispatch run {out}`"
        )
    return 0
