"""Pictures of a partitioned model: matplotlib partition view, DOT/graphviz export, HTML tables.

Every function takes a *source*: a compiled model (``npudispatch.compile_model`` result), a
:class:`~npudispatch.graph.PartitionReport`, or a model (``onnx_ir.Model``, ``onnx.ModelProto``
or path) which is then partitioned with the NPU support query of the compiler (or ``supported``).

* :func:`plot_partitions` draws nodes left to right by topological generation (a node's column
  is its longest path from the graph inputs), edges between them, each node coloured by its
  partition: blues for NPU partitions, oranges for CPU ones;
* :func:`to_dot` returns the same view as Graphviz DOT text (no dependency);
  :func:`to_graphviz` renders it with the ``graphviz`` package when that is installed;
* :func:`partition_html` is a table of the partitions (kind, ops, inputs, outputs) and of the
  nodes left on the CPU with the reason.

This is also the presentation side of the core types: :func:`plot_plan` draws a buffer plan's
scratch memory, and the notebook views of ``BufferPlan``, ``FusedProgram``, ``CompiledModel`` and
``Transaction`` (:func:`plan_html`, :func:`program_html`, :func:`compiled_html`,
``txn.html.transaction_html``) are registered here with :mod:`npudispatch.display`; the core
types never import them.

matplotlib is an optional dependency (``pip install npudispatch[viz]``).
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import onnx_ir as ir

from npudispatch import graph
from npudispatch.dispatch.plan import PAD_NAME, BufferKind, BufferPlan, Placement
from npudispatch.display import register_html
from npudispatch.errors import ModelError
from npudispatch.graph import Partition, PartitionReport
from npudispatch.graph.support import Supported
from npudispatch.txn.html import html_table, transaction_html

if TYPE_CHECKING:
    from npudispatch.dispatch.emit import FusedProgram

__all__ = [
    "PartitionView",
    "partition_html",
    "partition_view",
    "plot_partitions",
    "short_op",
    "to_dot",
    "to_graphviz",
]

_NPU_COLORS = ("#4c78a8", "#72b7b2", "#54a24b", "#9ecae9", "#2f5d8a")
_CPU_COLORS = ("#f58518", "#e45756", "#ffbf79", "#b279a2", "#ff9d98")
_SHORT = (("Normalization", "Norm"), ("Simplified", "Simp"))


def short_op(op_type: str) -> str:
    """A compact box label: ``SkipSimplifiedLayerNormalization`` -> ``SkipSimpLayerNorm``."""
    for long, short in _SHORT:
        op_type = op_type.replace(long, short)
    return op_type


@dataclass
class PartitionView:
    """A partitioned graph ready to draw.

    ``partitions`` and ``labels`` (``npu0``, ``cpu0``...) are in run order; ``digraph`` has the
    ``ir.Node`` objects as nodes; ``position`` maps a node to ``(column, row)``; ``owner`` to the
    index of its partition; ``unsupported`` maps CPU nodes to the reason they are not on the NPU.
    """

    partitions: list[Partition]
    labels: list[str]
    digraph: nx.DiGraph
    position: dict[ir.Node, tuple[float, float]]
    owner: dict[ir.Node, int]
    unsupported: dict[ir.Node, str]

    def color(self, index: int) -> str:
        """Colour of partition ``index``: a blue/green for NPU, an orange/red for CPU ones."""
        kind = self.partitions[index].kind
        ordinal = int(self.labels[index][3:])
        palette = _NPU_COLORS if kind == "npu" else _CPU_COLORS
        return palette[ordinal % len(palette)]


def _report(source: Any, supported: Supported | None) -> tuple[PartitionReport, list[str] | None]:
    if isinstance(source, PartitionReport):
        return source, None
    if hasattr(source, "report") and hasattr(source, "model"):  # CompiledModel (duck-typed)
        return source.report, list(source.labels)
    model = source if isinstance(source, ir.Model) else graph.load(source)
    if supported is None:
        from npudispatch.rewrites.support import npu_support

        query: Supported = npu_support
    else:
        query = supported
    return graph.report(model, query), None


def partition_view(source: Any, *, supported: Supported | None = None) -> PartitionView:
    """Partition ``source`` (see the module docstring) and lay it out by topological generation."""
    rep, labels = _report(source, supported)
    parts = rep.partitions
    if not parts or not any(p.nodes for p in parts):
        raise ModelError("nothing to draw: the partition report has no nodes (empty graph)")
    labels = labels or graph.partition_names(parts)
    owner = {node: i for i, part in enumerate(parts) for node in part.nodes}
    first = next(n for p in parts for n in p.nodes)
    digraph = graph.to_networkx(first.graph)
    digraph.remove_nodes_from([n for n in list(digraph) if n not in owner])
    position: dict[ir.Node, tuple[float, float]] = {}
    for column, generation in enumerate(nx.topological_generations(digraph)):
        # Keep a partition's nodes together within a column, then file order.
        members = sorted(generation, key=lambda n: (owner[n], digraph.nodes[n]["index"]))
        for row, node in enumerate(members):
            position[node] = (float(column), row - (len(members) - 1) / 2)
    reasons = {u.node: u.reason for u in rep.unsupported}
    return PartitionView(parts, labels, digraph, position, owner, reasons)


def plot_partitions(
    source: Any,
    *,
    supported: Supported | None = None,
    ax: Any = None,
    labels: bool = True,
    title: str | None = None,
    wrap: int = 40,
) -> Any:
    """Draw the partition view with matplotlib; returns the ``Axes``.

    One rounded box per node (its op type as label when ``labels``), grey arrows for the data
    edges, a legend entry per partition (``npu0 (19 nodes)``). A graph deeper than ``wrap``
    topological generations is folded into bands of ``wrap`` columns, stacked top to bottom, so
    a 300-node detector stays readable. Raises ImportError with the install hint when matplotlib
    is missing.
    """
    try:
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError(
            "plot_partitions needs matplotlib, an optional dependency: "
            "pip install 'npudispatch[viz]'"
        ) from exc
    if wrap < 1:
        raise ValueError(f"wrap must be at least 1 column, got {wrap}")
    view = partition_view(source, supported=supported)
    pos = view.position
    columns = max(x for x, _ in pos.values()) + 1
    rows = max(Counter(x for x, _ in pos.values()).values())
    if columns > wrap:  # fold into bands: generation g goes to column g % wrap of band g // wrap
        band_height = rows + 1.5
        pos = {n: (x % wrap, y - (x // wrap) * band_height) for n, (x, y) in view.position.items()}
        rows = int(band_height * (-(-columns // wrap)))
        columns = wrap
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(min(3 + 1.3 * columns, 30), min(2 + 0.8 * rows, 12)))
    for u, v in view.digraph.edges:
        ax.annotate(
            "",
            xy=pos[v],
            xytext=pos[u],
            arrowprops={
                "arrowstyle": "-|>",
                "color": "#999999",
                "lw": 0.8,
                "shrinkA": 12,
                "shrinkB": 12,
            },
            zorder=1,
        )
    fontsize = 8 if rows < 8 else 6
    for node, (x, y) in pos.items():
        index = view.owner[node]
        ax.text(
            x,
            y,
            short_op(node.op_type) if labels else "",
            ha="center",
            va="center",
            fontsize=fontsize,
            zorder=3,
            bbox={
                "boxstyle": "round,pad=0.3",
                "facecolor": view.color(index),
                "edgecolor": "black" if node in view.unsupported else "none",
                "alpha": 0.9,
            },
        )
        if not labels:
            ax.plot([x], [y], "o", color=view.color(index), markersize=8, zorder=3)
    handles = [
        Patch(color=view.color(i), label=f"{label} ({len(part.nodes)} nodes)")
        for i, (label, part) in enumerate(zip(view.labels, view.partitions))
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_xlim(-0.7, columns - 0.3)
    ys = [y for _, y in pos.values()]
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.set_xlabel(
        "topological generation"
        + (f" (bands of {wrap}, top to bottom)" if pos is not view.position else "")
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    npu = sum(len(p.nodes) for p in view.partitions if p.kind == "npu")
    total = sum(len(p.nodes) for p in view.partitions)
    n = len(view.partitions)
    outline = " (black outline: no NPU operator)" if view.unsupported else ""
    ax.set_title(title or f"{n} partition{'s' * (n != 1)}, {npu}/{total} nodes on the NPU{outline}")
    return ax


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(source: Any, *, supported: Supported | None = None) -> str:
    """The partition view as Graphviz DOT: one cluster per partition, nodes in run order."""
    view = partition_view(source, supported=supported)
    ids = {node: f"n{k}" for k, node in enumerate(view.position)}
    lines = ["digraph partitions {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled"];']
    for i, (label, part) in enumerate(zip(view.labels, view.partitions)):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={_dot_id(f'{label} ({part.kind}, {len(part.nodes)} nodes)')};")
        for node in part.nodes:
            tooltip = node.name or ""
            if node in view.unsupported:
                tooltip += f" (CPU: {view.unsupported[node]})"
            lines.append(
                f"    {ids[node]} [label={_dot_id(node.op_type)}, "
                f'fillcolor="{view.color(i)}", tooltip={_dot_id(tooltip)}];'
            )
        lines.append("  }")
    for u, v in view.digraph.edges:
        tensors = ", ".join(val.name or "?" for val in view.digraph.edges[u, v]["values"])
        lines.append(f"  {ids[u]} -> {ids[v]} [tooltip={_dot_id(tensors)}];")
    lines.append("}")
    return "\n".join(lines)


def to_graphviz(source: Any, *, supported: Supported | None = None) -> Any:
    """A ``graphviz.Source`` of :func:`to_dot` (displays as SVG in notebooks).

    Needs the ``graphviz`` Python package (and the ``dot`` program to render); raises
    ImportError with the install hint otherwise — use :func:`plot_partitions` instead.
    """
    try:
        import graphviz
    except ImportError as exc:
        raise ImportError(
            "to_graphviz needs the 'graphviz' package (pip install graphviz, plus the dot "
            "program); plot_partitions() draws the same view with matplotlib"
        ) from exc
    return graphviz.Source(to_dot(source, supported=supported))


def partition_html(source: Any, *, supported: Supported | None = None) -> str:
    """HTML tables: one row per partition, then the nodes kept off the NPU and why."""
    rep, labels = _report(source, supported)
    labels = labels or graph.partition_names(rep.partitions)
    rows = []
    for label, part in zip(labels, rep.partitions):
        ops = Counter(n.op_type for n in part.nodes)
        rows.append(
            (
                label,
                part.kind,
                len(part.nodes),
                ", ".join(f"{op}×{n}" if n > 1 else op for op, n in ops.items()),
                ", ".join(v.name or "?" for v in part.inputs),
                ", ".join(v.name or "?" for v in part.outputs),
            )
        )
    out = html_table(("partition", "kind", "nodes", "ops", "inputs", "outputs"), rows)
    if rep.unsupported:
        out += "<div><b>not on the NPU</b></div>" + html_table(
            ("node", "op", "reason"),
            [(u.name, f"{u.domain}.{u.op_type}", u.reason) for u in rep.unsupported],
        )
    return f'<div class="npudispatch-partitions">{out}</div>'


# ---- rich views of the core types (registered with npudispatch.display) ---------------------


def plan_html(plan: BufferPlan) -> str:
    """Notebook view of a :class:`BufferPlan`: the summary as an HTML table."""
    esc = html.escape
    head = "".join(f"<div>{esc(line)}</div>" for line in plan.headline())
    cols = ("tensor", "buffer", "offset", "bytes", "life", "shape", "dtype", "alias")
    th = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in plan.table_rows()
    )
    return f"<div>{head}<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>"


def plot_plan(plan: BufferPlan, ax: Any = None) -> Any:
    """Draw a plan's scratch buffer: x = op index (lifetime), y = byte offset, one labelled
    rectangle per intermediate, the shared op pad as a hatched band, and a dashed horizontal
    line at the lower bound. Returns the matplotlib ``Axes``.

    matplotlib is optional; raises ImportError with the install hint when it is missing.
    """
    try:
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise ImportError(
            "plot_plan() needs matplotlib, an optional dependency: pip install matplotlib"
        ) from exc
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(9, 5))
    scratch = [
        (name, pl)
        for name, pl in plan.placements.items()
        if pl.buffer == BufferKind.SCRATCH and pl.alias_of is None
    ]
    lo = min((pl.first for _, pl in scratch), default=0)
    hi = max((pl.last for _, pl in scratch), default=0) + 1
    for i, (name, pl) in enumerate(sorted(scratch, key=lambda kv: (kv[1].first, kv[1].offset))):
        color = f"C{i % 10}"
        ax.add_patch(
            Rectangle(
                (pl.first, pl.offset),
                pl.last - pl.first + 1,
                pl.nbytes,
                facecolor=color,
                edgecolor="black",
                alpha=0.6,
                label=name,
            )
        )
    if plan.op_scratch_bytes:
        ax.add_patch(
            Rectangle(
                (lo, plan.op_scratch_offset),
                hi - lo,
                plan.op_scratch_bytes,
                facecolor="none",
                edgecolor="grey",
                hatch="//",
                label=PAD_NAME,
            )
        )
    bound = ax.axhline(
        plan.scratch_lower_bound_bytes, color="red", linestyle="--", label="lower bound"
    )
    extras = [bound, *(p for p in ax.patches if p.get_label() == PAD_NAME)]
    ax.legend(handles=extras, loc="upper right", fontsize=8)
    ax.set_xlim(lo, hi)
    # Headroom so the lower-bound line stays visible when the plan reaches it.
    ax.set_ylim(0, 1.05 * max(plan.scratch_bytes, plan.scratch_lower_bound_bytes, 1))
    _label_boxes(ax, scratch)
    ax.set_xlabel("op index (tensor lifetime)")
    ax.set_ylabel("scratch offset (bytes)")
    ax.set_title(
        f"scratch {plan.scratch_bytes:,} B ({plan.strategy}); "
        f"intermediates {plan.scratch_intermediate_bytes:,} B, lower bound "
        f"{plan.scratch_lower_bound_bytes:,} B"
    )
    return ax


def _short_label(name: str) -> str:
    """Readable tensor label: exporter names like ``/model/layers.0/mlp/Mul_output_0`` -> ``mlp/Mul``."""
    parts = [p for p in name.replace("_output_0", "").split("/") if p]
    return "/".join(parts[-2:]) if len(parts) > 1 else (parts[0] if parts else name)


def _label_boxes(ax: Any, scratch: list[tuple[str, Placement]]) -> None:
    """Label each tensor's rectangle with a short name, only where the text fits inside it."""
    fig = ax.figure
    fig.canvas.draw_idle()
    to_px = ax.transData.transform
    char_px = 8 * fig.dpi / 72 * 0.6  # fontsize 8, average glyph ~0.6 em
    line_px = 8 * fig.dpi / 72 * 1.3
    for name, pl in scratch:
        (x0, y0), (x1, y1) = (
            to_px((pl.first, pl.offset)),
            to_px((pl.last + 1, pl.offset + pl.nbytes)),
        )
        label = _short_label(name)
        if abs(x1 - x0) < char_px * len(label) + 4 or abs(y1 - y0) < line_px:
            continue
        ax.text(
            pl.first + (pl.last - pl.first + 1) / 2,
            pl.offset + pl.nbytes / 2,
            label,
            ha="center",
            va="center",
            fontsize=8,
            clip_on=True,
        )


def program_html(program: FusedProgram) -> str:
    """Notebook view of a :class:`FusedProgram`: the op list, the IO bindings and its plan."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{i}</td><td>{esc(op.name)}</td><td>{esc(op.op_type)}</td>"
        f"<td>{op.kernel_id}</td><td>{esc(', '.join(op.in_args + op.const_args))}</td>"
        f"<td>{esc(', '.join(op.out_args))}</td><td>{op.txn_ops}</td></tr>"
        for i, op in enumerate(program.ops)
    )
    io = "".join(
        f"<tr><td>{kind}</td><td>{esc(b.name)}</td><td>{esc(b.dtype)}</td>"
        f"<td>{list(b.shape)}</td><td>{list(b.padded_shape)}</td><td>{b.offset}</td></tr>"
        for kind, bs in (("in", program.inputs), ("out", program.outputs))
        for b in bs
    )
    return (
        f"<div><b>FusedProgram {esc(program.name)}</b>: {len(program.ops)} ops, fused txn "
        f"{program.txn.nbytes:,} B ({program.txn.num_ops} txn ops), one kernel call"
        "<table><tr><th>#</th><th>op</th><th>type</th><th>kernel</th><th>inputs</th>"
        f"<th>outputs</th><th>txn ops</th></tr>{rows}</table>"
        "<table><tr><th></th><th>tensor</th><th>dtype</th><th>shape</th><th>padded</th>"
        f"<th>offset</th></tr>{io}</table>{plan_html(program.plan)}</div>"
    )


def compiled_html(compiled: Any) -> str:
    """Notebook view of a ``CompiledModel``: its partitions (and why nodes stay on the CPU), then
    each NPU program."""
    return partition_html(compiled) + "".join(program_html(p) for p in compiled.programs.values())


register_html("npudispatch.dispatch.plan.BufferPlan", plan_html)
register_html("npudispatch.dispatch.emit.FusedProgram", program_html)
register_html("npudispatch.dispatch.compile.CompiledModel", compiled_html)
register_html("npudispatch.txn.transaction.Transaction", transaction_html)
