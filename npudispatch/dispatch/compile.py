"""Model -> :class:`CompiledModel`: load, rewrite, partition, and per NPU partition plan + emit.

For every NPU partition (docs/architecture.md §1-3):

* its operators in topological order (each node matched once with the operator registry);
* zero-copy views (``rewrites.is_view``) get no transaction: each chain of views and the tensor
  it views form an *alias group* sharing one placement. The group's root is its host-visible
  tensor (partition input or output) if it has one, else the tensor a real op produces. A group
  that would join two host-visible tensors (``X -> Identity -> Y`` with both crossing the
  partition boundary) or a constant cannot be zero-copy; its views are sent to the CPU and the
  graph is re-partitioned, so the partition report says why;
* per tensor the maximum byte request of any operator ``ArgSpec`` touching it (padding included);
  lifetimes over the partition's op order; per-op scratch, const and params sizes;
* :func:`~npudispatch.dispatch.plan.build_plan`, then :func:`~npudispatch.dispatch.emit.emit`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch import graph
from npudispatch.dispatch import limits
from npudispatch.dispatch.emit import (
    CONST_TENSOR_PREFIX,
    FusedProgram,
    Launch,
    emit,
    value_nbytes,
)
from npudispatch.dispatch.plan import BufferPlan, TensorRequest, build_plan
from npudispatch.display import rich_html
from npudispatch.errors import ModelError, PlanError, UnsupportedOpError
from npudispatch.graph import Partition, PartitionReport
from npudispatch.graph.support import Supported
from npudispatch.operators import registry
from npudispatch.operators.base import (
    ArgKind,
    Decline,
    OpConfig,
    TensorSpec,
    round_up,
    tensor_spec,
)
from npudispatch.operators.inplace import inplace_pairs
from npudispatch.progress import progress
from npudispatch.rewrites import MarkViewsPass, default_pipeline, is_view
from npudispatch.rewrites.support import support_query

__all__ = ["CompiledModel", "compile_model", "plan_partition"]

#: Widest partition of an AIE2P (Strix) array (partitions are 1-8 columns wide).
MAX_PARTITION_COLS = 8

ALIGN = 64


@dataclass
class CompiledModel:
    """A model compiled for the NPU.

    ``model`` is the rewritten ``onnx_ir.Model``; ``partitions`` run in order; ``programs`` maps
    the index of each NPU partition in ``partitions`` to its :class:`FusedProgram`; ``report``
    is the partition report (unsupported nodes with reasons); ``timings`` are seconds per stage.
    """

    model: ir.Model
    report: PartitionReport
    programs: dict[int, FusedProgram]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def partitions(self) -> list[Partition]:
        return self.report.partitions

    def __repr__(self) -> str:
        """One screen: node share on the NPU, partitions, kernel calls, a line per program."""
        total = sum(len(p.nodes) for p in self.partitions)
        npu = sum(len(p.nodes) for p in self.partitions if p.kind == "npu")
        labels = " ".join(self.labels)
        if len(labels) > 60:
            labels = labels[:57] + "..."
        lines = [
            f"CompiledModel({self.model.graph.name or 'model'!r}: {npu}/{total} nodes on the NPU "
            f"({self.npu_node_fraction:.0%}), {len(self.partitions)} partitions [{labels}], "
            f"{self.kernel_calls_per_run} kernel calls per run, "
            f"{len(self.report.unsupported)} nodes kept on the CPU"
        ]
        shown = list(self.programs.items())[:8]
        for i, program in shown:
            lines.append(
                f"  {self.labels[i]}: {len(program.ops)} ops, txn {program.txn.nbytes:,} B, "
                f"scratch {program.plan.scratch_bytes:,} B"
            )
        if len(self.programs) > len(shown):
            lines.append(f"  ... {len(self.programs) - len(shown)} more NPU programs")
        return "\n".join(lines) + ")"

    @property
    def labels(self) -> list[str]:
        """``npu0``, ``cpu0``, ``npu1``... per partition."""
        return graph.partition_names(self.partitions)

    @property
    def kernel_calls_per_run(self) -> int:
        """One kernel call per NPU partition."""
        return len(self.programs)

    @property
    def npu_node_fraction(self) -> float:
        """Share of the graph's nodes that run on the NPU (views included)."""
        total = sum(len(p.nodes) for p in self.partitions)
        npu = sum(len(p.nodes) for p in self.partitions if p.kind == "npu")
        return npu / total if total else 0.0

    # Notebook view (partitions, why nodes stay on the CPU, each program): npudispatch.viz.
    _repr_html_ = rich_html

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the whole compiled model (NPU programs, CPU segments with their weights,
        ``report.json``) as ``npudispatch compile -o`` does; ``Session(directory)`` and
        ``npudispatch run directory`` run it without the model file."""
        from npudispatch.dispatch.artifact import CompiledArtifact

        return CompiledArtifact.from_compiled(self).save(directory)

    def to_report(self) -> dict[str, Any]:
        """The ``report.json`` document of ``npudispatch compile`` (see the CLI docs)."""
        parts = []
        for i, (label, part) in enumerate(zip(self.labels, self.partitions)):
            entry: dict[str, Any] = {"name": label, **_partition_dict(part)}
            if i in self.programs:
                entry.update(self.programs[i].summary())
            parts.append(entry)
        return {
            "partitions": parts,
            "npu_node_fraction": self.npu_node_fraction,
            "kernel_calls_per_run": self.kernel_calls_per_run,
            "unsupported": [u.to_dict() for u in self.report.unsupported],
            "timings": dict(self.timings),
        }


def _partition_dict(part: Partition) -> dict[str, Any]:
    io = partition_io(part)
    return {
        "kind": part.kind,
        "nodes": [n.name for n in part.nodes],
        "inputs": [v.name for v in io.inputs],
        "outputs": [v.name for v in io.outputs],
    }


def compile_model(
    model_or_path: graph.ModelLike,
    *,
    dims: Mapping[str, int] | None = None,
    rewrite: bool = True,
    supported: Supported | None = None,
    num_cols: int = 4,
    pad: bool = True,
    bf16: bool = True,
) -> CompiledModel:
    """Compile a model: one :class:`FusedProgram` per NPU partition.

    ``dims`` binds symbolic dimensions; ``rewrite=False`` skips the rewrite pipeline (views are
    still marked so they stay zero-copy); ``supported`` narrows what may run on the NPU;
    ``num_cols`` is the number of AIE columns the transactions use. ``pad`` pads NPU tensors to
    the operators' granularity (copy-in zero-pads, copy-out crops: graph inputs and outputs keep
    the user's shapes, see :mod:`npudispatch.rewrites.padding`); ``bf16`` stores float32
    intermediates in bf16 with casts at NPU-partition borders (:mod:`~npudispatch.rewrites.precision`);
    both are rewrite passes, so ``rewrite=False`` turns them off too. An ``ir.Model`` argument is
    rewritten in place. Raises :class:`ModelError` / :class:`PlanError` naming the culprit.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = graph.load(model_or_path, dims=dims)
    limits.check_model_sizes(model)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if rewrite:
        # graph.load already bound ``dims`` everywhere. Padding and precision must see the same
        # NPU set as the partitioning below, or CPU segments would get padded / bf16 tensors.
        narrowed = support_query(supported) if supported is not None else None
        default_pipeline(pad=pad, bf16=bf16, support=narrowed)(model)
    else:
        MarkViewsPass()(model)
    limits.check_model_sizes(model, stage="rewritten")  # padding grows tensors
    timings["rewrite"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    query = support_query(supported)
    demoted: dict[ir.Node, str] = {}
    while True:  # converges: the set of demoted views only grows
        rep = graph.report(model, lambda n: demoted.get(n) or query(n))
        new = {n: r for part in rep.npu_partitions for n, r in _unplaceable_views(part).items()}
        if not new:
            break
        demoted.update(new)
    timings["partition"] = time.perf_counter() - t0

    programs: dict[int, FusedProgram] = {}
    labels = graph.partition_names(rep.partitions)
    t_plan = t_emit = 0.0
    npu_parts = [(i, p) for i, p in enumerate(rep.partitions) if p.kind == "npu"]
    if not 1 <= num_cols <= MAX_PARTITION_COLS:
        raise PlanError(
            f"num_cols={num_cols}: an AIE2P partition is 1 to {MAX_PARTITION_COLS} columns wide"
        )
    for i, part in progress(npu_parts, desc="compile NPU partitions"):
        t0 = time.perf_counter()
        launches, plan, io = plan_partition(part, num_cols=num_cols)
        limits.check_program_size(labels[i], plan.buffer_sizes)  # before images are allocated
        t1 = time.perf_counter()
        programs[i] = emit(labels[i], launches, plan, io, num_cols=num_cols)
        t_plan += t1 - t0
        t_emit += time.perf_counter() - t1
    timings["plan"] = t_plan
    timings["emit"] = t_emit
    return CompiledModel(model, rep, programs, timings)


# --- alias groups ---------------------------------------------------------------------------


class _Groups:
    """Union-find over values joined by view nodes: ``view output ~ view input``."""

    def __init__(self) -> None:
        self.parent: dict[ir.Value, ir.Value] = {}

    def find(self, v: ir.Value) -> ir.Value:
        self.parent.setdefault(v, v)
        while self.parent[v] is not v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: ir.Value, b: ir.Value) -> None:
        self.parent[self.find(a)] = self.find(b)

    def members(self) -> dict[ir.Value, list[ir.Value]]:
        out: dict[ir.Value, list[ir.Value]] = {}
        for v in list(self.parent):
            out.setdefault(self.find(v), []).append(v)
        return out


def _view_groups(part: Partition) -> _Groups:
    groups = _Groups()
    for node in part.nodes:
        for v in node.inputs:
            if v is not None:
                groups.find(v)
        for v in node.outputs:
            groups.find(v)
        if is_view(node):
            groups.union(node.outputs[0], node.inputs[0])
        for out_idx, in_idx in inplace_pairs(node):  # e.g. present KV written over past KV
            groups.union(node.outputs[out_idx], node.inputs[in_idx])
    return groups


def _unplaceable_views(part: Partition) -> dict[ir.Node, str]:
    """Views of ``part`` that cannot be zero-copy, with the reason (they go to the CPU)."""
    views = [n for n in part.nodes if is_view(n)]
    if not views:
        return {}
    if len(views) == len(part.nodes):
        return {
            n: "an NPU partition made only of views has no kernel to run; the view runs on the CPU"
            for n in views
        }
    groups = _view_groups(part)
    host = set(part.inputs) | set(part.outputs)
    bad: dict[ir.Node, str] = {}
    for members in groups.members().values():
        visible = [v.name for v in members if v in host]
        consts = [v.name for v in members if v.is_initializer()]
        if len(visible) <= 1 and not consts:
            continue
        reason = (
            f"zero-copy view would make host-visible tensors {visible} share memory"
            if len(visible) > 1
            else f"view of constant {consts[0]!r} (fold it with FoldShapesPass to keep it off the CPU)"
        )
        member_set = set(members)
        for n in views:
            if n.outputs[0] in member_set:
                bad[n] = reason + "; the view runs on the CPU"
    return bad


# --- planning ------------------------------------------------------------------------------


@dataclass
class PartitionIO:
    """The host-visible tensors of one NPU partition, in packing order."""

    inputs: list[ir.Value]
    outputs: list[ir.Value]


def _in_graph_order(values: list[ir.Value], graph_values: Sequence[ir.Value]) -> list[ir.Value]:
    """``values`` with the graph's own inputs/outputs among them put in the graph's order.

    Partitions list boundary values in node order, which boundary casts and fusions shuffle;
    the host-visible bindings of a program follow the model's declared order instead (other
    boundary values keep their slots).
    """
    rank = {v: i for i, v in enumerate(graph_values)}
    slots = [i for i, v in enumerate(values) if v in rank]
    ordered = list(values)
    for i, v in zip(slots, sorted((values[i] for i in slots), key=rank.__getitem__)):
        ordered[i] = v
    return ordered


def partition_io(part: Partition) -> PartitionIO:
    """The partition's boundary values, the model's inputs/outputs among them in graph order."""
    owner = part.nodes[0].graph if part.nodes else None
    if owner is None:
        return PartitionIO(list(part.inputs), list(part.outputs))
    return PartitionIO(
        _in_graph_order(part.inputs, owner.inputs), _in_graph_order(part.outputs, owner.outputs)
    )


def _match(node: ir.Node) -> OpConfig:
    cfg = registry.match(node)
    if isinstance(cfg, Decline):
        raise UnsupportedOpError(
            f"node {node.name!r} ({node.op_type}) is in an NPU partition but no operator takes it: "
            f"{cfg.reason}"
        )
    return cfg


def plan_partition(
    part: Partition, *, num_cols: int = 4
) -> tuple[list[Launch], BufferPlan, PartitionIO]:
    """Match the partition's ops, derive tensor requests and lifetimes, build the buffer plan."""
    if part.kind != "npu":
        raise ValueError(f"plan_partition needs an NPU partition, got a {part.kind} one")
    io = partition_io(part)
    launches: list[Launch] = []
    # Matching formats each op's weights once (the long step for big models).
    for node in progress(part.nodes, desc="match ops + format weights"):
        if is_view(node):
            continue
        cfg = _match(node)
        op = cfg.operator
        launches.append(Launch(node, cfg, op.buffers(cfg), op.format_consts(cfg), op.params(cfg)))
    if not launches:
        raise ModelError(
            f"NPU partition {[n.name for n in part.nodes]} has no operator to run (views only)"
        )

    groups = _view_groups(part)
    host_in, host_out = set(part.inputs), set(part.outputs)
    members = groups.members()
    root_of: dict[ir.Value, ir.Value] = {}
    view_outputs = {n.outputs[0] for n in part.nodes if is_view(n)}
    for vals in members.values():
        visible = [v for v in vals if v in host_in or v in host_out]
        producers = [v for v in vals if v not in view_outputs]
        root = visible[0] if visible else producers[0]
        for v in vals:
            root_of[v] = root

    # Requests: model size of each member, raised to the largest ArgSpec touching any member.
    need: dict[ir.Value, int] = {}
    last_op = len(launches) - 1
    life: dict[ir.Value, list[int]] = {}
    kernel_spec: dict[ir.Value, TensorSpec] = {}
    const_inputs: dict[str, tuple[ir.Value, int]] = {}
    for v, root in root_of.items():
        if v.is_initializer():
            continue
        need[root] = max(need.get(root, 0), round_up(value_nbytes(v)))
    for i, launch in enumerate(launches):
        node = launch.node
        for a in launch.args:
            if a.kind not in (ArgKind.INPUT, ArgKind.OUTPUT):
                continue
            v = (node.inputs if a.kind == ArgKind.INPUT else node.outputs)[a.index]
            if v is None:
                raise ModelError(f"node {node.name!r}: {a.kind.name} arg {a.index} has no value")
            if v.is_initializer():  # a constant streamed as an activation: own const region
                prev = const_inputs.get(v.name, (v, 0))[1]
                const_inputs[v.name] = (v, max(prev, a.offset + a.nbytes))
                continue
            root = root_of[v]
            need[root] = max(need[root], a.nbytes)
            if a.kind == ArgKind.OUTPUT and a.dtype is not None and a.padded_shape is not None:
                kernel_spec.setdefault(v, TensorSpec(tuple(a.padded_shape), np.dtype(a.dtype)))
        for v in [*node.inputs, *node.outputs]:
            if v is not None and not v.is_initializer():
                life.setdefault(root_of[v], []).append(i)

    requests: list[TensorRequest] = []
    aliases: dict[str, tuple[str, int]] = {}
    ordered = [*io.inputs, *io.outputs]
    ordered += [v for v in root_of if v not in host_in and v not in host_out]
    for v in ordered:
        if v.is_initializer():
            continue
        root = root_of[v]
        uses = life.get(root, [0])
        first = 0 if root in host_in else min(uses)
        last = last_op if root in host_out else max(uses)
        kind = "input" if v in host_in else "output" if v in host_out else "intermediate"
        spec = tensor_spec(v, f"tensor {v.name!r}")
        if isinstance(spec, Decline) and v.dtype is None and v in kernel_spec:
            # an omitted optional output the model leaves untyped: the kernel's spec sizes it
            spec = kernel_spec[v]
        if isinstance(spec, Decline):
            raise ModelError(spec.reason)
        requests.append(
            TensorRequest(
                name=v.name,
                nbytes=need[root],
                kind=kind,  # type: ignore[arg-type]
                first=first,
                last=last,
                shape=spec.logical_shape,
                dtype=np.dtype(spec.dtype).name,
                padded_shape=spec.shape if spec.real_shape is not None else None,
            )
        )
        if root is not v:
            aliases[v.name] = (root.name, 0)

    op_scratch: dict[str, int] = {}
    op_consts: dict[str, int] = {}
    op_params: dict[str, int] = {}
    for launch in launches:
        name = launch.node.name
        kinds = {k: [a for a in launch.args if a.kind == k] for k in ArgKind}
        op_scratch[name] = sum(round_up(a.nbytes, ALIGN) for a in kinds[ArgKind.SCRATCH])
        op_consts[name] = max(
            len(launch.consts), sum(round_up(a.nbytes) for a in kinds[ArgKind.CONST])
        )
        op_params[name] = max(
            len(launch.params), sum(round_up(a.nbytes) for a in kinds[ArgKind.PARAMS])
        )
    for tname, (_, size) in const_inputs.items():
        op_consts[CONST_TENSOR_PREFIX + tname] = size
    plan = build_plan(requests, aliases, op_scratch, op_consts, op_params, alignment=ALIGN)
    return launches, plan, io
