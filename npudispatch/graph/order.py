"""networkx view of a graph and its deterministic topological order."""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx
import onnx_ir as ir
import onnx_ir.analysis

from npudispatch.errors import ModelError

__all__ = [
    "GraphLike",
    "captured_inputs",
    "graph_of",
    "node_inputs",
    "to_networkx",
    "topological_order",
]

GraphLike = ir.Model | ir.Graph


def graph_of(model_or_graph: GraphLike) -> ir.Graph:
    """The top-level graph of a model (or the graph itself)."""
    return model_or_graph.graph if isinstance(model_or_graph, ir.Model) else model_or_graph


def captured_inputs(graph: ir.Graph) -> dict[ir.Node, list[ir.Value]]:
    """Values of ``graph`` read implicitly by the If/Loop/Scan bodies of each top-level node."""
    has_subgraphs = any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for node in graph
        for attr in node.attributes.values()
    )
    if not has_subgraphs:
        return {}
    usage = onnx_ir.analysis.analyze_implicit_usage(graph)
    result: dict[ir.Node, list[ir.Value]] = {}
    for node in graph:
        seen: dict[ir.Value, None] = {}
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subs = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = list(attr.as_graphs())
            else:
                continue
            for sub in subs:
                for value in sorted(usage.get(sub, ()), key=lambda v: v.name or ""):
                    if value.graph is graph or _in(graph, value):
                        seen.setdefault(value)
        if seen:
            result[node] = list(seen)
    return result


def _in(graph: ir.Graph, value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.graph is graph


def node_inputs(
    node: ir.Node, captures: dict[ir.Node, list[ir.Value]] | None = None
) -> Iterator[ir.Value]:
    """The values ``node`` reads: its explicit inputs, then the outer values its bodies capture."""
    for value in node.inputs:
        if value is not None:
            yield value
    if captures:
        yield from captures.get(node, ())


def to_networkx(model_or_graph: GraphLike) -> nx.DiGraph:
    """A DiGraph of the top-level nodes of the graph (``ir.Node`` objects as networkx nodes).

    Edge ``(producer, consumer)`` carries the attribute ``"values"``: the distinct ``ir.Value``
    objects flowing along it (values captured by If/Loop bodies count as inputs of the node that
    owns the body). Each networkx node has the attribute ``"index"``: its position in the file.
    """
    graph = graph_of(model_or_graph)
    captures = captured_inputs(graph)
    digraph = nx.DiGraph()
    digraph.add_nodes_from((node, {"index": i}) for i, node in enumerate(graph))
    for node in graph:
        for value in node_inputs(node, captures):
            producer = value.producer()
            if producer is None or producer.graph is not graph:
                continue
            if digraph.has_edge(producer, node):
                carried = digraph.edges[producer, node]["values"]
                if value not in carried:
                    carried.append(value)
            else:
                digraph.add_edge(producer, node, values=[value])
    return digraph


def _order_key(depth: dict[ir.Node, int]):
    def key(node: ir.Node) -> tuple[int, str, str, str]:
        first = node.outputs[0].name if node.outputs else ""
        return (depth[node], node.name or "", node.op_type, first or "")

    return key


def topological_order(
    model_or_graph: GraphLike, digraph: nx.DiGraph | None = None
) -> list[ir.Node]:
    """Nodes in a deterministic topological order that does not depend on file order.

    Among the nodes whose producers are all placed, the next one is the one with the smallest
    ``(depth, name)`` where depth is the longest path from a source: parallel branches advance
    level by level (llama2 MLP: gate, up, silu, elwmul, down, as DD orders it) and names break
    ties. Names are unique after :func:`npudispatch.graph.load`. Raises ``ModelError`` naming the
    nodes and tensors of a cycle.
    """
    digraph = to_networkx(model_or_graph) if digraph is None else digraph
    if not nx.is_directed_acyclic_graph(digraph):
        cycle = nx.find_cycle(digraph)
        names = " -> ".join(repr(u.name or u.op_type) for u, _ in cycle)
        tensors = sorted({v.name or "?" for u, w in cycle for v in digraph.edges[u, w]["values"]})
        raise ModelError(
            f"the graph has a cycle: {names} -> {cycle[0][0].name!r} (through tensors "
            f"{tensors}); ONNX graphs must be acyclic, remove the back edge"
        )
    depth: dict[ir.Node, int] = {}
    for node in nx.topological_sort(digraph):
        depth[node] = max((depth[p] + 1 for p in digraph.predecessors(node)), default=0)
    return list(nx.lexicographical_topological_sort(digraph, key=_order_key(depth)))
