"""The NPU support query shared by the rewrite passes and the compiler.

A node runs on the NPU when an operator of the registry takes it, or when it is a zero-copy view
(Reshape, Squeeze, Unsqueeze, Flatten, Identity; marked, or markable once the pipeline marks views)
of NPU data. Views of int64/bool tensors are shape arithmetic and stay on the CPU with the shape
computations around them.
"""

from __future__ import annotations

import onnx_ir as ir

from npudispatch.graph.support import DEFAULT_NPU_DTYPES
from npudispatch.operators import registry
from npudispatch.rewrites.aliasing import can_be_view, is_view

__all__ = ["npu_support"]


def npu_support(node: ir.Node) -> str | None:
    """``None`` when ``node`` runs on the NPU, else the reason it does not (for reports)."""
    if is_view(node) or can_be_view(node):
        data = node.inputs[0] if node.inputs else None
        if data is not None and data.dtype is not None and data.dtype not in DEFAULT_NPU_DTYPES:
            return (
                f"{node.op_type} of {data.dtype.name} data {data.name!r} is shape arithmetic, "
                "not NPU data"
            )
        return None
    return registry.support(node)
