"""The NPU support query: the one answer to "does this node run on the NPU, and if not, why".

A node runs on the NPU when an operator of the registry takes it (:func:`registry.support
<npudispatch.operators.registry.support>`, the operators' part of the answer), or when it is a
zero-copy view (Reshape, Squeeze, Unsqueeze, Flatten, Identity; marked, or markable once the
pipeline marks views) of NPU data. Views of int64/bool tensors are shape arithmetic and stay on
the CPU with the shape computations around them.

Every consumer asks this module: the padding and precision passes, the compiler's partitioning,
``npudispatch inspect`` and the partition pictures. A caller that wants fewer NPU nodes narrows
the query with :func:`support_query` (it can never widen it: only registry operators can be
emitted).
"""

from __future__ import annotations

import onnx_ir as ir

from npudispatch.graph.support import DEFAULT_NPU_DTYPES, Supported, SupportQuery, as_support_query
from npudispatch.graph.value_types import is_non_tensor, value_type_text
from npudispatch.operators import registry
from npudispatch.rewrites.aliasing import can_be_view, is_view

__all__ = ["npu_support", "support_query"]


def npu_support(node: ir.Node) -> str | None:
    """``None`` when ``node`` runs on the NPU, else the reason it does not (for reports)."""
    for value in (*node.inputs, *node.outputs):
        if is_non_tensor(value):
            assert value is not None
            return (
                f"{value.name!r} has type {value_type_text(value)}, not a tensor: the NPU "
                "computes on tensors only"
            )
    if is_view(node) or can_be_view(node):
        data = node.inputs[0] if node.inputs else None
        if data is not None and data.dtype is not None and data.dtype not in DEFAULT_NPU_DTYPES:
            return (
                f"{node.op_type} of {data.dtype.name} data {data.name!r} is shape arithmetic, "
                "not NPU data"
            )
        return None
    return registry.support(node)


def support_query(supported: Supported | None = None) -> SupportQuery:
    """:func:`npu_support`, narrowed by ``supported`` when given.

    ``supported`` is a collection of op types / ``(domain, op_type)`` pairs or a query (as in
    :func:`npudispatch.graph.partition`); a node must pass both it and :func:`npu_support`.
    """
    if supported is None:
        return npu_support
    user = as_support_query(supported)

    def query(node: ir.Node) -> str | None:
        if (reason := user(node)) is not None:
            return str(reason)
        return npu_support(node)

    return query
