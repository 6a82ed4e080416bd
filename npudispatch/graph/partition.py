"""Split a graph into NPU and CPU partitions, report why nodes stay on the CPU, extract subgraphs.

Algorithm (linear-ish, no O(n^2) node pairs):

1. Each node gets a *stage*: ``max(stage(p) + (kind(p) != kind(v)))`` over its producers ``p``.
   Grouping nodes by ``(stage, kind)`` can never close a cycle: an edge between groups changes
   kind, hence goes to a strictly higher stage.
2. Groups of one kind are then merged pairwise while the contraction stays acyclic (group ``B``
   may join ``A`` unless a path ``A -> X -> ... -> B`` passes through another group ``X``), with
   reachability held in integer bitsets. At the end no two partitions of one kind can be merged,
   which is the maximality the planner wants: one NPU partition = one kernel call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import onnx_ir as ir

from npudispatch.domains import domain_label
from npudispatch.errors import ModelError
from npudispatch.graph.order import (
    GraphLike,
    captured_inputs,
    graph_of,
    node_inputs,
    to_networkx,
    topological_order,
)
from npudispatch.graph.support import Supported, as_support_query
from npudispatch.graph.value_types import copy_map_types

__all__ = [
    "EXTRACT_IR_VERSION",
    "Partition",
    "PartitionReport",
    "UnsupportedNode",
    "extract",
    "partition",
    "partition_names",
    "report",
]

Kind = Literal["npu", "cpu"]
#: IR version stamped on extracted models (onnxruntime 1.31 accepts at most 13).
EXTRACT_IR_VERSION = 10


@dataclass
class Partition:
    """A group of nodes run together: one fused NPU program, or one CPU segment.

    ``nodes`` are in topological order. ``inputs`` are non-constant values read from outside
    (graph inputs or values produced by other partitions), ``constants`` the initializers read,
    ``outputs`` the values produced here and read by another partition or returned by the graph.
    """

    kind: Kind
    nodes: list[ir.Node]
    inputs: list[ir.Value] = field(default_factory=list)
    outputs: list[ir.Value] = field(default_factory=list)
    constants: list[ir.Value] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (names only)."""
        return {
            "kind": self.kind,
            "nodes": [n.name for n in self.nodes],
            "inputs": [v.name for v in self.inputs],
            "outputs": [v.name for v in self.outputs],
            "constants": [v.name for v in self.constants],
        }


@dataclass(frozen=True)
class UnsupportedNode:
    """A node the support query declined, with its reason."""

    node: ir.Node
    op_type: str
    domain: str
    reason: str

    @property
    def name(self) -> str:
        return self.node.name or ""

    def to_dict(self) -> dict[str, str]:
        return {
            "node": self.name,
            "op_type": self.op_type,
            "domain": self.domain,
            "reason": self.reason,
        }


@dataclass
class PartitionReport:
    """The partitions of a graph and every node that stays on the CPU, with its reason."""

    partitions: list[Partition]
    unsupported: list[UnsupportedNode]

    @property
    def npu_partitions(self) -> list[Partition]:
        return [p for p in self.partitions if p.kind == "npu"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "partitions": [p.to_dict() for p in self.partitions],
            "unsupported": [u.to_dict() for u in self.unsupported],
        }


def partition(model: GraphLike, supported: Supported) -> list[Partition]:
    """Partitions of ``model`` in topological order (see the module docstring).

    ``supported``: op types (plain names match ONNX / com.microsoft, ``(domain, op_type)`` pairs
    match exactly) or a callable ``node -> None | reason``.
    """
    return report(model, supported).partitions


def report(model: GraphLike, supported: Supported) -> PartitionReport:
    """Partition ``model`` and list every unsupported node with the query's reason."""
    graph = graph_of(model)
    query = as_support_query(supported)
    digraph = to_networkx(graph)
    order = topological_order(graph, digraph)
    reasons: dict[ir.Node, str] = {}
    for node in order:
        reason = query(node)
        if reason is not None:
            reasons[node] = str(reason)
    kinds: dict[ir.Node, Kind] = {n: ("cpu" if n in reasons else "npu") for n in order}
    groups = _maximal_groups(digraph, order, kinds)
    captures = captured_inputs(graph)
    partitions = [
        _make_partition(graph, kinds[members[0]], members, captures) for members in groups
    ]
    unsupported = [
        UnsupportedNode(node, node.op_type, domain_label(node.domain), reason)
        for node, reason in reasons.items()
    ]
    return PartitionReport(partitions, unsupported)


def _maximal_groups(
    digraph: nx.DiGraph, order: list[ir.Node], kinds: dict[ir.Node, Kind]
) -> list[list[ir.Node]]:
    position = {node: i for i, node in enumerate(order)}
    # Step 1: stages.
    stage: dict[ir.Node, int] = {}
    for node in order:
        stage[node] = max(
            (stage[p] + (kinds[p] != kinds[node]) for p in digraph.predecessors(node)), default=0
        )
    group_of: dict[ir.Node, int] = {}
    ids: dict[tuple[int, str], int] = {}
    for node in order:
        group_of[node] = ids.setdefault((stage[node], kinds[node]), len(ids))
    members: dict[int, list[ir.Node]] = {g: [] for g in ids.values()}
    for node in order:
        members[group_of[node]].append(node)
    kind_of = {g: kinds[nodes[0]] for g, nodes in members.items()}
    contracted = nx.DiGraph()
    contracted.add_nodes_from(members)
    contracted.add_edges_from(
        (group_of[u], group_of[v]) for u, v in digraph.edges if group_of[u] != group_of[v]
    )
    # Step 2: pairwise merges while acyclic.
    while (pair := _mergeable_pair(contracted, kind_of)) is not None:
        keep, gone = pair
        contracted = nx.contracted_nodes(contracted, keep, gone, self_loops=False, copy=False)
        members[keep].extend(members.pop(gone))
        del kind_of[gone]
    for nodes in members.values():
        nodes.sort(key=position.__getitem__)
    first = {g: position[nodes[0]] for g, nodes in members.items()}
    ordered = nx.lexicographical_topological_sort(contracted, key=first.__getitem__)
    return [members[g] for g in ordered]


def _mergeable_pair(contracted: nx.DiGraph, kind_of: dict[int, Kind]) -> tuple[int, int] | None:
    """First pair ``(a, b)`` of same-kind groups whose merge keeps the contraction acyclic."""
    topo = list(nx.topological_sort(contracted))
    index = {g: i for i, g in enumerate(topo)}
    bit = {g: 1 << i for g, i in index.items()}
    reach: dict[int, int] = {}  # groups reachable by a path of length >= 1
    for g in reversed(topo):
        acc = 0
        for s in contracted.successors(g):
            acc |= bit[s] | reach[s]
        reach[g] = acc
    kind_mask: dict[Kind, int] = {"npu": 0, "cpu": 0}
    for g in topo:
        kind_mask[kind_of[g]] |= bit[g]
    for g in topo:
        # b is blocked when reachable through another group: a -> x -> ... -> b.
        blocked = 0
        for s in contracted.successors(g):
            blocked |= reach[s]
        later = ~((bit[g] << 1) - 1)
        candidates = kind_mask[kind_of[g]] & later & ~blocked
        if candidates:
            lowest = (candidates & -candidates).bit_length() - 1
            return g, topo[lowest]
    return None


def _make_partition(
    graph: ir.Graph,
    kind: Kind,
    nodes: list[ir.Node],
    captures: dict[ir.Node, list[ir.Value]],
) -> Partition:
    inside = set(nodes)
    outside_readers: dict[ir.Value, None] = {}
    for owner, values in captures.items():
        if owner not in inside:
            outside_readers.update(dict.fromkeys(values))
    inputs: dict[ir.Value, None] = {}
    constants: dict[ir.Value, None] = {}
    outputs: dict[ir.Value, None] = {}
    for node in nodes:
        for value in node_inputs(node, captures):
            if value.is_initializer():
                constants.setdefault(value)
            elif value.producer() not in inside:
                inputs.setdefault(value)
    for node in nodes:
        for value in node.outputs:
            read_outside = any(
                consumer not in inside and consumer.graph is graph for consumer in value.consumers()
            )
            if read_outside or value.is_graph_output() or value in outside_readers:
                outputs.setdefault(value)
    return Partition(kind, nodes, list(inputs), list(outputs), list(constants))


def extract(model: ir.Model, part: Partition, name: str | None = None) -> ir.Model:
    """A standalone model computing ``part.outputs`` from ``part.inputs`` (the ONNX subgraph).

    Nodes are cloned with the initializers they read; the model keeps the source's opset imports
    and model-local functions, and is stamped ``ir_version`` 10 so onnxruntime can load it. The
    graph holds exactly the partition's nodes; a node whose results nobody reads (dead code) has
    no path to an output and makes this raise ``ModelError`` (remove dead code first).
    """
    graph = model.graph
    try:
        sub = ir.convenience.extract(graph, inputs=part.inputs, outputs=part.outputs)
    except ValueError as exc:
        raise ModelError(f"cannot extract partition {[n.name for n in part.nodes]}: {exc}") from exc
    if len(sub) != len(part.nodes):
        kept = {n.name for n in sub}
        dead = [n.name for n in part.nodes if n.name not in kept]
        raise ModelError(
            f"partition nodes {dead} do not contribute to any partition output (dead code); "
            "remove them (onnx_ir RemoveUnusedNodesPass) before extracting"
        )
    copy_map_types(graph, sub)  # kept as text at load: onnx_ir cannot hold map types
    sub.name = name or f"{graph.name or 'main'}_{part.kind}_{part.nodes[0].name}"
    sub.opset_imports.update(graph.opset_imports)
    return ir.Model(
        sub,
        ir_version=EXTRACT_IR_VERSION,
        producer_name="npudispatch",
        functions=list(model.functions.values()),
    )


def partition_names(parts: Sequence[Partition]) -> list[str]:
    """Short labels ``npu0``, ``cpu0``, ``npu1`` ... numbering each kind separately."""
    counts = {"npu": 0, "cpu": 0}
    labels = []
    for part in parts:
        labels.append(f"{part.kind}{counts[part.kind]}")
        counts[part.kind] += 1
    return labels
