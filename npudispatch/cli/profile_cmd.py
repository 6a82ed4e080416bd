"""``npudispatch profile MODEL [--device strix|phoenix] [--json]``: the cost model's estimate.

Compiles the model (or loads a folder written by ``npudispatch compile -o``) and prints, per NPU
program and per op, the exact DDR bytes its transaction moves, its MACs and the estimated time on
the device, with the bound named (:mod:`npudispatch.dispatch.estimate`). A model estimate, not a
measurement; CPU segments are not modelled.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from npudispatch.cli.common import add_dims_option, parse_dims, parse_shapes, print_json
from npudispatch.cli.compile_cmd import add_compile_options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``profile`` command."""
    parser = subparsers.add_parser(
        "profile",
        help="estimate time per op and per kernel call on a real NPU (a model, not a measurement)",
        description="Compile the model and estimate each NPU program on a device: exact DDR bytes "
        "from the transaction's buffer descriptors, MACs, and the estimated time with its bound "
        "(memory, compute or launch). The device figures and their sources: --json's 'device'.",
    )
    parser.add_argument("model", type=Path, help="ONNX model file or a compiled folder (-o DIR)")
    parser.add_argument(
        "--device",
        default="strix",
        choices=("strix", "phoenix"),
        help="NPU to estimate for (default strix)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_dims_option(parser)
    add_compile_options(parser)
    parser.set_defaults(func=run)


def _programs(args: argparse.Namespace) -> tuple[list[Any], int]:
    """The NPU programs in run order and the number of CPU segments."""
    from npudispatch.dispatch.artifact import CompiledArtifact, is_program_dir

    if is_program_dir(args.model):
        artifact = CompiledArtifact.load(args.model)
        programs = artifact.programs
        return programs, len(artifact.segments) - len(programs)
    from npudispatch.dispatch.compile import compile_model

    compiled = compile_model(
        args.model,
        dims=parse_dims(args.dims),
        input_shapes=parse_shapes(args.shape),
        pad=args.pad,
        precision=args.precision,
    )
    cpu = sum(1 for p in compiled.partitions if p.kind != "npu")
    return [compiled.programs[i] for i in sorted(compiled.programs)], cpu


def run(args: argparse.Namespace) -> int:
    """Print the estimates."""
    from npudispatch.dispatch.estimate import LABEL, device, estimate_programs

    dev = device(args.device)
    programs, cpu_segments = _programs(args)
    estimates = estimate_programs(programs, dev)
    run_s = sum(e.time_s for e in estimates)
    runs_per_s = 1.0 / run_s if estimates else None
    if args.json:
        print_json(
            {
                "label": LABEL,
                "device": dev.to_json(),
                "programs": [e.to_json() for e in estimates],
                "kernel_calls_per_run": len(estimates),
                "cpu_segments": cpu_segments,
                "run_s": run_s,
                "runs_per_s": runs_per_s,
            }
        )
        return 0
    if not estimates:
        print("no NPU partition: every node runs on the CPU; nothing to estimate")
        return 0
    for e in estimates:
        print(e.render())
        print()
    bounds = ", ".join(f"{e.name} {e.bound}-bound" for e in estimates)
    cpu = f"; {cpu_segments} CPU segment(s) not modelled (add their time)" if cpu_segments else ""
    print(
        f"per run on {dev.title} ({LABEL}): {len(estimates)} kernel call(s), "
        f"{run_s * 1e6:,.1f} us, {runs_per_s:,.1f} runs/s (tokens/s when one run is one decode "
        f"step); {bounds}{cpu}"
    )
    return 0
