"""Canonical operand order: constants go last in commutative binary ops (Add, Mul).

Fusion patterns then need only one order for each (constant, value) pair instead of every commuted
variant; for tanh GELU that is 36 rules instead of ~1000, which keeps matching fast.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer import basic_constant_propagation

from npudispatch.domains import is_onnx_domain

COMMUTATIVE_OPS = frozenset({"Add", "Mul"})


def constants_last(graph: ir.Graph) -> int:
    """Swap ``Add``/``Mul`` operands so a constant is second; returns the number of swaps."""
    basic_constant_propagation(graph)  # gives Constant-node outputs their const_value
    swaps = 0
    for node in graph:
        if not is_onnx_domain(node.domain) or node.op_type not in COMMUTATIVE_OPS:
            continue
        if len(node.inputs) != 2 or None in node.inputs:
            continue
        a, b = node.inputs
        if a.const_value is not None and b.const_value is None:
            node.replace_input_with(0, b)
            node.replace_input_with(1, a)
            swaps += 1
    return swaps
