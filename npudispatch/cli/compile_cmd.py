"""``npudispatch compile MODEL -o DIR``: write the fused programs and ``DIR/report.json``.

Layout: ``DIR/<partition>/`` (program.json, txn.bin, const.bin, params.bin, meta.json — the DD
meta JSON) per NPU partition, and ``DIR/report.json`` with ``partitions`` (kind, nodes, inputs,
outputs; NPU ones add ``program``, ``plan`` and ``txn``), ``npu_node_fraction``,
``kernel_calls_per_run``, ``unsupported`` and ``timings``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from npudispatch.cli.common import add_dims_option, output_dir, parse_dims, print_json, writing


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
    """``--no-pad`` / ``--fp32``: turn off terminal padding / bf16 storage (compile, run, plan)."""
    parser.add_argument(
        "--no-pad",
        dest="pad",
        action="store_false",
        help="keep every NPU tensor at its declared shape (no terminal padding)",
    )
    parser.add_argument(
        "--fp32",
        dest="bf16",
        action="store_false",
        help="store float32 intermediates as float32 (default: bf16 with casts at NPU borders)",
    )


def run(args: argparse.Namespace) -> int:
    """Compile and write the programs and the report."""
    from npudispatch.dispatch.compile import compile_model
    from npudispatch.dispatch.meta import to_dd_meta

    output_dir(args.output, "the compiled programs")  # fail before a long compile
    compiled = compile_model(
        args.model,
        dims=parse_dims(args.dims),
        rewrite=not args.no_rewrite,
        num_cols=args.num_cols,
        pad=args.pad,
        bf16=args.bf16,
    )
    out = output_dir(args.output, "the compiled programs")
    report = compiled.to_report()
    with writing(out, "the compiled programs"):
        for i, entry in enumerate(report["partitions"]):
            if i in compiled.programs:
                program = compiled.programs[i]
                program.save(out / program.name)
                meta = json.dumps(to_dd_meta(program), indent=1)
                (out / program.name / "meta.json").write_text(meta)
                entry["program"] = program.name
        (out / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print_json(report)
    else:
        npu = len(compiled.programs)
        print(
            f"wrote {out}: {len(compiled.partitions)} partitions ({npu} NPU), "
            f"{report['npu_node_fraction']:.0%} of nodes on the NPU, "
            f"{report['kernel_calls_per_run']} kernel call(s) per run"
        )
    return 0
