"""``npudispatch inspect MODEL``: node counts, topological order, partitions, unsupported nodes."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from npudispatch.cli.common import add_dims_option, parse_dims, parse_shapes, print_json
from npudispatch.cli.compile_cmd import add_precision_options
from npudispatch.domains import is_onnx_domain

if TYPE_CHECKING:  # imported where used: `npudispatch --help` must not load onnx (start-up time)
    import onnx_ir as ir

    from npudispatch import graph


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` command."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's op types, order, NPU/CPU partitions and unsupported nodes",
        description="Load MODEL (shapes inferred, symbolic dims bound with --dims) and report "
        "how it would be partitioned between the NPU and the CPU.",
    )
    parser.add_argument("model", help="path to an .onnx file")
    add_dims_option(parser)
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="run the default rewrite pipeline first (what `compile` partitions)",
    )
    add_precision_options(parser)  # what --rewrite converts (bf16 storage only in bf16)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def op_key(node: ir.Node) -> str:
    """Op type, qualified by its domain unless it is the ONNX default domain."""
    return node.op_type if is_onnx_domain(node.domain) else f"{node.domain}::{node.op_type}"


def inspect_model(model: ir.Model, support: graph.SupportQuery | None = None) -> dict[str, Any]:
    """The JSON document of ``inspect --json`` (stable keys).

    ``support`` defaults to the NPU operator library (views plus every node an operator takes),
    so the reasons are the library's own decline reasons.
    """
    from npudispatch import graph
    from npudispatch.rewrites.qdq import quantization_summary
    from npudispatch.rewrites.support import npu_support

    order = graph.topological_order(model)
    rep = graph.report(model, support if support is not None else npu_support)
    return {
        "nodes": [n.name for n in order],
        "op_types": dict(sorted(Counter(op_key(n) for n in order).items())),
        "partitions": [
            {
                "kind": p.kind,
                "nodes": [n.name for n in p.nodes],
                "inputs": [v.name for v in p.inputs],
                "outputs": [v.name for v in p.outputs],
                "quantization": quantization_summary(p.nodes),
            }
            for p in rep.partitions
        ],
        "unsupported": [
            {"node": u.name, "op_type": op_key(u.node), "reason": u.reason} for u in rep.unsupported
        ],
    }


def _table(header: Sequence[str], rows: list[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _names(values: list[str], limit: int = 6) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... (+{len(values) - limit})" if len(values) > limit else "") or "-"


def render(model: ir.Model, doc: dict[str, Any], source: str, rewritten: bool = True) -> str:
    """Human-readable report with aligned columns (``rewritten``: after the rewrite pipeline)."""
    from npudispatch import graph

    labels = graph.partition_names([graph.Partition(p["kind"], []) for p in doc["partitions"]])
    where = {n: label for label, p in zip(labels, doc["partitions"]) for n in p["nodes"]}
    by_name = {n.name: n for n in model.graph}
    kinds = Counter(p["kind"] for p in doc["partitions"])
    lines = [
        f"model {source}: {len(doc['nodes'])} nodes, {len(model.graph.inputs)} inputs, "
        f"{len(model.graph.outputs)} outputs, {len(model.graph.initializers)} initializers; "
        f"{kinds['npu']} NPU + {kinds['cpu']} CPU partitions"
        + ("" if rewritten else " as loaded (--rewrite: what `compile` partitions)"),
        "",
        "op types:",
        *_table(["count", "op_type"], [(c, k) for k, c in doc["op_types"].items()]),
        "",
        "order:",
    ]
    rows = []
    for i, name in enumerate(doc["nodes"]):
        node = by_name[name]
        out = node.outputs[0] if node.outputs else None
        shape = f"{out.dtype.name if out.dtype else '?'}{list(out.shape or [])}" if out else ""
        rows.append((i, where[name], op_key(node), name, shape))
    lines += _table(["#", "part", "op_type", "node", "first output"], rows)
    lines += ["", "partitions:"]
    rows = [
        (label, p["kind"], len(p["nodes"]), _names(p["inputs"]), _names(p["outputs"]))
        for label, p in zip(labels, doc["partitions"])
    ]
    lines += _table(["part", "kind", "nodes", "inputs", "outputs"], rows)
    lines += ["", "quantization (conversions: nodes turning float data into integers or back):"]
    rows = [
        (
            label,
            ",".join(q["activation_dtypes"]) or "-",
            ",".join(q["weight_dtypes"]) or "-",
            len(q["conversions"]),
            _names(q["conversions"], 3),
        )
        for label, q in zip(labels, (p["quantization"] for p in doc["partitions"]))
    ]
    lines += _table(["part", "activations", "weights", "conversions", "nodes"], rows)
    lines += ["", f"unsupported ({len(doc['unsupported'])} nodes):"]
    if doc["unsupported"]:
        rows = [(u["node"], u["op_type"], u["reason"]) for u in doc["unsupported"]]
        lines += _table(["node", "op_type", "reason"], rows)
    else:
        lines.append("  none: every node can run on the NPU")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load the model and print the report."""
    from npudispatch import graph
    from npudispatch.rewrites import default_pipeline

    model = graph.load(
        args.model, dims=parse_dims(args.dims), input_shapes=parse_shapes(args.shape)
    )
    if args.rewrite:
        default_pipeline(bf16=args.precision == "bf16")(model)
    doc = inspect_model(model)
    if args.json:
        print_json(doc)
    else:
        print(render(model, doc, args.model, rewritten=args.rewrite))
    return 0
