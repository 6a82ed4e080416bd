"""Plan one NPU partition: match its ops, group zero-copy views, size and place every tensor.

For an NPU partition (docs/architecture.md §1.2):

* its operators in topological order (each node matched once with the operator registry);
* zero-copy views (``rewrites.is_view``) get no transaction: each chain of views and the tensor
  it views form an *alias group* sharing one placement. The group's root is its host-visible
  tensor (partition input or output) if it has one, else the tensor a real op produces. A group
  that would join two host-visible tensors (``X -> Identity -> Y`` with both crossing the
  partition boundary) or a constant cannot be zero-copy: :func:`unplaceable_views` names those
  views, and the compiler sends them to the CPU and re-partitions;
* per tensor the maximum byte request of any operator ``ArgSpec`` touching it (padding included);
  lifetimes over the partition's op order (:func:`npudispatch.graph.live_ranges`, per alias group); per-op scratch, const and params regions, laid out
  once (:func:`_op_regions`) for both the plan's sizes and the re-basing ranges;
* :func:`~npudispatch.dispatch.plan.build_plan`; the result is a :class:`PartitionPlan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from npudispatch.dispatch.emit import CONST_TENSOR_PREFIX, Launch, value_nbytes
from npudispatch.dispatch.plan import BufferPlan, TensorRequest, build_plan
from npudispatch.errors import ModelError, PlanError, UnsupportedOpError
from npudispatch.graph import Partition, live_ranges
from npudispatch.operators import registry
from npudispatch.operators.base import ArgKind, Decline, OpConfig, TensorSpec, tensor_spec
from npudispatch.operators.inplace import inplace_pairs
from npudispatch.overlay_abi import WORD, BufferKind, round_up
from npudispatch.precision import Precision
from npudispatch.progress import progress
from npudispatch.rewrites import is_view
from npudispatch.txn import ArgRange

__all__ = [
    "ALIGN",
    "PartitionIO",
    "PartitionPlan",
    "partition_io",
    "plan_partition",
    "unplaceable_views",
]

ALIGN = 64  # placement alignment of every tensor and op scratch part


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


def unplaceable_views(part: Partition) -> dict[ir.Node, str]:
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


@dataclass
class PartitionPlan:
    """One NPU partition matched and planned, computed once and consumed by :func:`emit`.

    ``launches``: its ops in order (matched config, buffers, formatted consts and params);
    ``plan``: the buffer plan; ``io``: the host-visible tensors; ``ranges[i]``: where each buffer
    of launch ``i`` lands in the five fused buffers (what re-basing its transaction needs).
    """

    launches: list[Launch]
    plan: BufferPlan
    io: PartitionIO
    ranges: list[list[ArgRange]]


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
    part: Partition, *, num_cols: int = 4, precision: Precision = "bf16"
) -> PartitionPlan:
    """Match the partition's ops, derive tensor requests and lifetimes, build the buffer plan,
    and place every op buffer (the :class:`PartitionPlan` that :func:`emit` consumes).

    ``precision``: every launch's compute precision (``"fp32"``: float weights are formatted in
    float32 too; :mod:`npudispatch.operators.dtypes`, ``docs/numerics.md``)."""
    if part.kind != "npu":
        raise ValueError(f"plan_partition needs an NPU partition, got a {part.kind} one")
    io = partition_io(part)
    launches: list[Launch] = []
    groups = _view_groups(part)
    # the tensors the host writes before every run, through any zero-copy views of them
    host_written = {groups.find(v) for v in part.inputs}
    # Matching formats each op's weights once (the long step for big models).
    for node in progress(part.nodes, desc="match ops + format weights"):
        if is_view(node):
            continue
        cfg = _match(node)
        cfg.precision = precision
        op = cfg.operator
        op.bind_host_inputs(
            cfg,
            frozenset(
                i
                for i, v in enumerate(node.inputs)
                if v is not None and not v.is_initializer() and groups.find(v) in host_written
            ),
        )
        launches.append(Launch(node, cfg, op.buffers(cfg), op.format_consts(cfg), op.params(cfg)))
    if not launches:
        raise ModelError(
            f"NPU partition {[n.name for n in part.nodes]} has no operator to run (views only)"
        )

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
    kernel_spec: dict[ir.Value, TensorSpec] = {}
    const_inputs: dict[str, tuple[ir.Value, int]] = {}
    for v, root in root_of.items():
        if v.is_initializer():
            continue
        need[root] = max(need.get(root, 0), round_up(value_nbytes(v)))
    for launch in launches:
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

    life = live_ranges(
        [ln.node for ln in launches], live_in=host_in, live_out=host_out, group=root_of.__getitem__
    )
    requests: list[TensorRequest] = []
    aliases: dict[str, tuple[str, int]] = {}
    ordered = [*io.inputs, *io.outputs]
    ordered += [v for v in root_of if v not in host_in and v not in host_out]
    for v in ordered:
        if v.is_initializer():
            continue
        root = root_of[v]
        first, last = life.get(root, (0, 0))
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

    layouts = [_op_regions(launch) for launch in launches]
    op_scratch = {ln.node.name: lay.scratch for ln, lay in zip(launches, layouts)}
    op_consts = {ln.node.name: lay.const for ln, lay in zip(launches, layouts)}
    op_params = {ln.node.name: lay.params for ln, lay in zip(launches, layouts)}
    for tname, (_, size) in const_inputs.items():
        op_consts[CONST_TENSOR_PREFIX + tname] = size
    plan = build_plan(requests, aliases, op_scratch, op_consts, op_params, alignment=ALIGN)
    ranges = [_arg_ranges(ln, lay, plan) for ln, lay in zip(launches, layouts)]
    return PartitionPlan(launches, plan, io, ranges)


# --- op regions and re-basing ranges ---------------------------------------------------------


@dataclass(frozen=True)
class _OpRegions:
    """The op-owned buffers of one launch laid out once: each SCRATCH/CONST/PARAMS arg's offset
    inside its region (by position in ``launch.args``), and each region's size."""

    offsets: dict[int, int]
    scratch: int
    const: int
    params: int


def _op_regions(launch: Launch) -> _OpRegions:
    """Scratch parts are :data:`ALIGN`-aligned (the plan aligns the shared pad so), const and
    params parts word-aligned; the formatted const region and params record set a lower bound."""
    cursor = {ArgKind.SCRATCH: 0, ArgKind.CONST: 0, ArgKind.PARAMS: 0}
    offsets: dict[int, int] = {}
    for i, a in enumerate(launch.args):
        if a.kind in cursor:
            offsets[i] = cursor[a.kind]
            cursor[a.kind] += round_up(a.nbytes, ALIGN if a.kind == ArgKind.SCRATCH else WORD)
    return _OpRegions(
        offsets,
        scratch=cursor[ArgKind.SCRATCH],
        const=max(len(launch.consts), cursor[ArgKind.CONST]),
        params=max(len(launch.params), cursor[ArgKind.PARAMS]),
    )


def _arg_ranges(launch: Launch, layout: _OpRegions, plan: BufferPlan) -> list[ArgRange]:
    """Where each of the op's buffers lands: tensors at their placement, op-owned buffers at
    their region's base plus the offset :func:`_op_regions` gave them."""
    node = launch.node
    name = node.name
    ranges: list[ArgRange] = []
    for i, a in enumerate(launch.args):
        if a.kind in (ArgKind.INPUT, ArgKind.OUTPUT):
            v = (node.inputs if a.kind == ArgKind.INPUT else node.outputs)[a.index]
            assert v is not None
            if v.is_initializer():
                buffer, offset = (
                    BufferKind.CONST,
                    plan.const_regions[CONST_TENSOR_PREFIX + v.name][0],
                )
            else:
                pl = plan.placements[v.name]
                if a.nbytes > pl.nbytes:
                    raise PlanError(
                        f"op {name!r} {a.kind.name} arg {a.index} ({v.name!r}) needs {a.nbytes} B "
                        f"but the plan gives {pl.nbytes} B; the tensor requests were computed wrong"
                    )
                buffer, offset = pl.buffer, pl.offset
            ranges.append(ArgRange(a.local_argidx, a.offset, a.nbytes, int(buffer), offset))
            continue
        if a.kind == ArgKind.SCRATCH:
            base = plan.op_scratch_offset
        else:
            regions = plan.const_regions if a.kind == ArgKind.CONST else plan.params_regions
            if name not in regions:
                raise PlanError(f"op {name!r} has a {a.kind.name} arg but no region in the plan")
            base = regions[name][0]
        ranges.append(
            ArgRange(a.local_argidx, a.offset, a.nbytes, int(a.kind), base + layout.offsets[i])
        )
    return ranges
