"""A networkx view of a model's main graph, kept in sync lazily for passes that need graph algorithms.

The view itself comes from :mod:`npudispatch.graph` (``to_networkx``, ``topological_order``,
``lifetimes``). onnx_ir has no mutation counter, so the cache is keyed by a structural fingerprint
of the graph (node identities, their input/output value identities, graph outputs): every query
recomputes the fingerprint (linear, much cheaper than a rebuild) and rebuilds only when it moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import onnx_ir as ir

from npudispatch import graph as graph_layer


def fingerprint(graph: ir.Graph) -> int:
    """A hash of the graph's structure: which nodes exist, in which order, wired to which values."""
    return hash(
        (
            tuple(
                (id(n), tuple(map(id, n.inputs)), tuple(map(id, n.outputs)), n.op_type)
                for n in graph
            ),
            tuple(map(id, graph.outputs)),
        )
    )


@dataclass
class GraphAnalysis:
    """Lazily rebuilt analyses of ``model.graph``: DiGraph, topological order, reachability, lifetimes.

    ``rebuilds`` counts how often the DiGraph was rebuilt (tests use it to check the caching).
    """

    model: ir.Model
    rebuilds: int = 0
    _key: int | None = field(default=None, repr=False)
    _digraph: nx.DiGraph | None = field(default=None, repr=False)
    _order: list[ir.Node] | None = field(default=None, repr=False)
    _lifetimes: dict | None = field(default=None, repr=False)

    def _refresh(self) -> None:
        key = fingerprint(self.model.graph)
        if key != self._key or self._digraph is None:
            self._digraph = graph_layer.to_networkx(self.model)
            self._order = self._lifetimes = None
            self._key = key
            self.rebuilds += 1

    @property
    def digraph(self) -> nx.DiGraph:
        """The networkx DiGraph of the current graph (``npudispatch.graph.to_networkx``)."""
        self._refresh()
        assert self._digraph is not None
        return self._digraph

    def is_acyclic(self) -> bool:
        """Whether the dataflow graph has no cycle."""
        return nx.is_directed_acyclic_graph(self.digraph)

    def find_cycle(self) -> list[ir.Node]:
        """The nodes of one cycle (empty when acyclic)."""
        try:
            return [u for u, _ in nx.find_cycle(self.digraph)]
        except nx.NetworkXNoCycle:
            return []

    def topological_order(self) -> list[ir.Node]:
        """The deterministic order of ``npudispatch.graph.topological_order`` (ModelError on a cycle)."""
        g = self.digraph
        if self._order is None:
            self._order = graph_layer.topological_order(self.model, g)
        return self._order

    def reachable(self, src: ir.Node, dst: ir.Node) -> bool:
        """Whether ``dst`` depends (transitively) on ``src``."""
        return src is not dst and nx.has_path(self.digraph, src, dst)

    def descendants(self, node: ir.Node) -> set[ir.Node]:
        """Every node that depends on ``node``."""
        return nx.descendants(self.digraph, node)

    def lifetimes(self) -> dict[ir.Value, graph_layer.Lifetime]:
        """``npudispatch.graph.lifetimes`` over :meth:`topological_order`."""
        order = self.topological_order()
        if self._lifetimes is None:
            self._lifetimes = graph_layer.lifetimes(self.model, order)
        return self._lifetimes
