"""In-place outputs: an op output that overwrites the bytes of one of its inputs.

A node whose ``metadata_props[INPLACE_KEY]`` is ``"1:3,2:4"`` asks the compiler to place output 1
over input 3 and output 2 over input 4 (GroupQueryAttention's present KV over its past KV, which
keeps a KV cache resident in one device buffer across runs). The request holds only where it is
safe, checked by :func:`inplace_pairs`: same shape and dtype, the node is the input's only reader
and nobody reads the output (it is neither consumed nor a graph output) — the kernel reads its
operands before it writes its outputs, so the overwrite cannot corrupt its own inputs.
"""

from __future__ import annotations

import onnx_ir as ir

INPLACE_KEY = "npudispatch.inplace"

__all__ = ["INPLACE_KEY", "inplace_pairs", "mark_inplace"]


def mark_inplace(node: ir.Node, pairs: dict[int, int]) -> None:
    """Ask for ``output index -> input index`` in-place placement on ``node``."""
    node.metadata_props[INPLACE_KEY] = ",".join(f"{o}:{i}" for o, i in sorted(pairs.items()))


def inplace_pairs(node: ir.Node) -> list[tuple[int, int]]:
    """The ``(output, input)`` pairs of ``node`` that may share memory (see module docstring)."""
    spec = node.metadata_props.get(INPLACE_KEY)
    if not spec:
        return []
    pairs = []
    for item in spec.split(","):
        out_idx, in_idx = (int(x) for x in item.split(":"))
        if out_idx >= len(node.outputs) or in_idx >= len(node.inputs):
            continue
        out, src = node.outputs[out_idx], node.inputs[in_idx]
        if src is None or src.is_initializer() or out.is_graph_output() or out.uses():
            continue
        if {u.node for u in src.uses()} != {node}:
            continue
        if out.dtype != src.dtype or out.shape is None or src.shape is None:
            continue
        if list(out.shape) != list(src.shape):
            continue
        pairs.append((out_idx, in_idx))
    return pairs
