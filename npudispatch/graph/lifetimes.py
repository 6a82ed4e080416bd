"""Tensor lifetimes over an op order: the one definition the buffer planner and the graph tools use.

:func:`live_ranges` is the rule itself (first producing/using op to last using op, widened to the
whole order for live-in and live-out values, optionally per alias group); :func:`lifetimes` applies
it to a whole graph in topological order and checks the order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
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

__all__ = ["Lifetime", "lifetimes", "live_ranges"]


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


def live_ranges(
    order: Sequence[ir.Node],
    *,
    live_in: Collection[ir.Value] = (),
    live_out: Collection[ir.Value] = (),
    group: Callable[[ir.Value], ir.Value] | None = None,
    captures: dict[ir.Node, list[ir.Value]] | None = None,
) -> dict[ir.Value, tuple[int, int]]:
    """``{value: (first, last)}`` op indices into ``order`` during which each value must be live.

    Every non-constant value a node of ``order`` reads or writes gets the interval from its first
    to its last appearance; a value in ``live_in`` starts at 0 and one in ``live_out`` ends at the
    last op (it crosses the order's boundary). ``group`` maps a value to the value whose interval
    it shares (an alias group's root, e.g. a zero-copy view's base); the intervals, ``live_in`` and
    ``live_out`` are then keyed by root. Initializers are skipped: they live in the const image.
    """
    key = group or (lambda v: v)
    end = max(len(order) - 1, 0)
    seen: dict[ir.Value, list[int]] = {}
    for i, node in enumerate(order):
        for value in (*node_inputs(node, captures), *node.outputs):
            if value is not None and not value.is_initializer():
                span = seen.setdefault(key(value), [i, i])
                span[0], span[1] = min(span[0], i), max(span[1], i)
    starts = {key(v) for v in live_in}
    ends = {key(v) for v in live_out}
    return {
        root: (0 if root in starts else first, end if root in ends else last)
        for root, (first, last) in seen.items()
    }


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
    captures = captured_inputs(graph)
    produced_at = {value: i for i, node in enumerate(order) for value in node.outputs}
    for i, node in enumerate(order):
        for value in node_inputs(node, captures):
            if produced_at.get(value, -1) > i:
                raise ModelError(
                    f"order places node {node.name!r} (index {i}) before the producer of its "
                    f"input {value.name!r} (index {produced_at[value]}); use topological_order()"
                )
    own = {*graph.inputs, *produced_at}  # outer-scope values a subgraph reads are not ours
    ranges = {
        value: span
        for value, span in live_ranges(
            order, live_in=graph.inputs, live_out=graph.outputs, captures=captures
        ).items()
        if value in own
    }
    end = max(len(order) - 1, 0)
    outputs = set(graph.outputs)
    for value in graph.inputs:  # a graph input nobody reads still exists from the start
        ranges.setdefault(value, (0, end if value in outputs else 0))
    const_last = dict.fromkeys(graph.initializers.values(), 0)
    for i, node in enumerate(order):
        for value in node_inputs(node, captures):
            if value in const_last:
                const_last[value] = i
    for value, last in const_last.items():
        ranges[value] = (0, end if value in outputs else last)
    return {
        value: Lifetime(
            first=first,
            last=last,
            is_input=value.is_graph_input(),
            is_output=value in outputs,
            is_constant=value.is_initializer(),
        )
        for value, (first, last) in ranges.items()
    }
