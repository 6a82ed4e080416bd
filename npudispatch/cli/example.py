"""``npudispatch example NAME -o FILE``: save an example model (``--list`` shows the names)."""

from __future__ import annotations

import argparse
from pathlib import Path

from npudispatch.cli.common import output_file, writing
from npudispatch.errors import ModelError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``example`` command."""
    parser = subparsers.add_parser(
        "example",
        help="write an example ONNX model (DD golden graphs G1-G20, llama2 MLP)",
        description="Build a named example model and save it with onnx.save.",
    )
    parser.add_argument("name", nargs="?", help="example name (see --list)")
    parser.add_argument("-o", "--output", type=Path, help="output .onnx file")
    parser.add_argument("--list", action="store_true", help="list the example names and exit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="store weights in FILE.data beside the model (advisable above ~100 MB)",
    )
    parser.set_defaults(func=run)


def _summary(builder) -> str:
    """First docstring line, without reST markup (the terminal shows it verbatim)."""
    doc = (builder.__doc__ or "").strip().splitlines()
    return doc[0].replace("``", "").replace(":class:", "").replace("`", "") if doc else ""


def run(args: argparse.Namespace) -> int:
    """Save the example (or list the names)."""
    import onnx  # here, not at module level: `npudispatch --help` must not load onnx

    from npudispatch.examples import EXAMPLES, build_example
    from npudispatch.examples.golden import GOLDEN, GOLDEN_PURPOSE

    if args.list:
        width = max(map(len, EXAMPLES))
        golden = [n for n in EXAMPLES if n in GOLDEN]
        runnable = [n for n in EXAMPLES if n not in GOLDEN]
        print("Runnable models (npudispatch run FILE --check):")
        for name in runnable:
            print(f"  {name:<{width}}  {_summary(EXAMPLES[name])}")
        print(f"\nDD golden graphs: {GOLDEN_PURPOSE}.")
        for name in golden:
            print(f"  {name:<{width}}  {_summary(EXAMPLES[name])}")
        return 0
    if not args.name or args.output is None:
        raise ModelError("example needs NAME and -o FILE (or --list to see the names)")
    if args.name not in EXAMPLES:
        raise ModelError(f"unknown example {args.name!r}; run `npudispatch example --list`")
    output_file(args.output, "the example model")
    model = build_example(args.name, seed=args.seed)
    with writing(args.output, "the example model"):
        if args.external_data:
            onnx.save(
                model,
                args.output,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=args.output.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save(model, args.output)
    print(f"wrote {args.output} ({len(model.graph.node)} nodes)")
    return 0
