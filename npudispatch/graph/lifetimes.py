"""Tensor lifetimes over a topological order (the input of the buffer planner)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from npudispatch.errors import ModelError
from npudispatch.graph.order import (
    GraphLike,
    captured_inputs,
    graph_of,
    node_inputs,
    topological_order,
)

__all__ = ["Lifetime", "lifetimes"]


@dataclass(frozen=True)
class Lifetime:
    """Closed interval ``[first, last]`` of op indices during which a tensor must be live.

    Convention: index ``i`` is the ``i``-th node of the order. A value produced by node ``i`` has
    ``first == i``; graph inputs and constants exist before the first op, so ``first == 0``.
    ``last`` is the index of the last consumer; graph outputs live to the end
    (``last == len(order) - 1``); a value nobody reads has ``last == first``.
    """

    first: int
    last: int
    is_input: bool = False
    is_output: bool = False
    is_constant: bool = False

    def overlaps(self, other: Lifetime) -> bool:
        """True when both tensors are live during at least one common op."""
        return self.first <= other.last and other.first <= self.last


def lifetimes(model: GraphLike, order: Sequence[ir.Node] | None = None) -> dict[ir.Value, Lifetime]:
    """Lifetime of every graph input, initializer and node output of the top-level graph.

    ``order`` defaults to :func:`~npudispatch.graph.topological_order`; a given order must hold
    every node exactly once with producers before consumers, else ``ModelError``.
    """
    graph = graph_of(model)
    order = list(topological_order(graph) if order is None else order)
    position = {node: i for i, node in enumerate(order)}
    if (
        len(position) != len(order)
        or len(order) != len(graph)
        or any(n not in position for n in graph)
    ):
        raise ModelError(
            f"order must list each of the {len(graph)} nodes of graph {graph.name!r} exactly "
            f"once (got {len(order)} entries, {len(position)} distinct); use topological_order()"
        )
    end = max(len(order) - 1, 0)
    first: dict[ir.Value, int] = {}
    for value in graph.inputs:
        first[value] = 0
    for value in graph.initializers.values():
        first[value] = 0
    for i, node in enumerate(order):
        for value in node.outputs:
            first[value] = i
    last = dict(first)
    captures = captured_inputs(graph)
    for i, node in enumerate(order):
        for value in node_inputs(node, captures):
            if value not in first:
                continue  # outer-scope value of a subgraph: not ours to plan
            if first[value] > i:
                raise ModelError(
                    f"order places node {node.name!r} (index {i}) before the producer of its "
                    f"input {value.name!r} (index {first[value]}); use topological_order()"
                )
            last[value] = max(last[value], i)
    outputs = set(graph.outputs)
    for value in outputs:
        if value in last:
            last[value] = end
    return {
        value: Lifetime(
            first=start,
            last=last[value],
            is_input=value.is_graph_input(),
            is_output=value in outputs,
            is_constant=value.is_initializer(),
        )
        for value, start in first.items()
    }
