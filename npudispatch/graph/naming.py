"""Stable, unique node names that do not depend on the position of a node in the file.

DD keys its ops by node name and merges every unnamed node into one key ``""``. Here every node
gets a unique name derived only from the graph's structure, so reversing the node list of a file
yields the very same names:

* a node whose name is non-empty and unique keeps it;
* an unnamed node becomes ``<op_type>_<first output name>``;
* nodes sharing a name become ``<name>_<first output name>``;
* a derived name that still clashes gets ``_1``, ``_2``, ... in the order of a structural sort key
  (op type, domain, output names, input names).

Output names identify a node in valid ONNX (single static assignment), so the fallback is rare.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import onnx_ir as ir

__all__ = ["assign_unique_names"]


def _identity(node: ir.Node) -> str:
    """The name of the node's first named output (SSA-unique), else its input names."""
    for value in node.outputs:
        if value.name:
            return value.name
    return "_".join(v.name or "" for v in node.inputs if v is not None) or "noio"


def _sort_key(node: ir.Node) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    return (
        node.op_type,
        node.domain,
        tuple(v.name or "" for v in node.outputs),
        tuple(v.name if v is not None else "" for v in node.inputs),
    )


def assign_unique_names(graph: ir.Graph) -> dict[ir.Node, str]:
    """Give every node of ``graph`` (top level) a unique name; return the nodes that were renamed.

    The result depends only on node names, op types and value names, never on node order.
    """
    nodes = list(graph)
    counts = Counter(n.name for n in nodes if n.name)
    reserved = {name for name, count in counts.items() if count == 1}
    wanted: dict[ir.Node, str] = {}
    for node in nodes:
        if node.name and counts[node.name] == 1:
            continue
        stem = node.name or node.op_type
        wanted[node] = f"{stem}_{_identity(node)}"

    by_name: defaultdict[str, list[ir.Node]] = defaultdict(list)
    for node, name in wanted.items():
        by_name[name].append(node)
    renamed: dict[ir.Node, str] = {}
    taken = set(reserved)
    # Unique derived names first, so suffixed ones never steal them.
    for name, members in by_name.items():
        if len(members) == 1 and name not in reserved:
            renamed[members[0]] = name
            taken.add(name)
    for name in sorted(by_name):
        members = by_name[name]
        if len(members) == 1 and members[0] in renamed:
            continue
        suffix = 1
        for node in sorted(members, key=_sort_key):
            while f"{name}_{suffix}" in taken or f"{name}_{suffix}" in by_name:
                suffix += 1
            renamed[node] = f"{name}_{suffix}"
            taken.add(renamed[node])
    for node, name in renamed.items():
        node.name = name
    return renamed
