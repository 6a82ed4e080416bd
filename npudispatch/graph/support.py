"""What may run on the NPU: the default op-type set and the support-query protocol.

A support query is a callable ``node -> None | str``: ``None`` means supported, a string is the
reason the node must run on the CPU (it ends up in the partition report). The operator library
will provide such a callable; until then :func:`default_support` is used.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import onnx_ir as ir

from npudispatch.domains import domain_label

__all__ = [
    "DEFAULT_NPU_DTYPES",
    "DEFAULT_NPU_OP_TYPES",
    "STANDARD_DOMAINS",
    "SupportQuery",
    "Supported",
    "as_support_query",
    "default_support",
]

SupportQuery = Callable[[ir.Node], str | None]
#: Either op types (plain names match the standard domains, pairs match exactly) or a query.
Supported = Collection[str | tuple[str, str]] | SupportQuery

#: Domains a plain op-type name matches: ONNX and the onnxruntime contrib domain.
#: Domains whose op types the default query accepts; "npudispatch" holds the fused ops the
#: rewriter emits (Silu, Gelu, MatMulBias, QMatMul).
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft", "npudispatch"})

#: Op types that the NPU operator library is expected to cover (the single place to change).
DEFAULT_NPU_OP_TYPES = frozenset(
    {
        "MatMul",
        "Gemm",
        "MatMulNBits",
        "MatMulBias",
        "QMatMul",
        "QLinearMatMul",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Sigmoid",
        "Silu",
        "Gelu",
        "Softmax",
        "Max",
        "Min",
        "Where",
        "Relu",
        "Neg",
        "Abs",
        "Exp",
        "Log",
        "Tanh",
        "Erf",
        "Sqrt",
        "Reciprocal",
        "Sin",
        "Cos",
        "Softplus",
        "Pow",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "Transpose",
        "Split",
        "Concat",
        "Slice",
        "Cast",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Identity",
    }
)

#: Tensor element types the NPU datapath handles; int64/bool/string arithmetic (shape
#: computations exporters emit) stays on the CPU.
DEFAULT_NPU_DTYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.UINT8,
        ir.DataType.INT8,
        ir.DataType.UINT16,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.UINT4,
        ir.DataType.INT4,
    }
)


def _op_type_reason(node: ir.Node, supported: Collection[str | tuple[str, str]]) -> str | None:
    if (node.domain, node.op_type) in supported or (
        domain_label(node.domain),
        node.op_type,
    ) in supported:
        return None
    if node.op_type in supported and node.domain in STANDARD_DOMAINS:
        return None
    return f"op type {node.op_type!r} (domain {domain_label(node.domain)!r}) is not in the supported set"


def default_support(node: ir.Node) -> str | None:
    """Default NPU support query: op type in ``DEFAULT_NPU_OP_TYPES``, NPU dtypes, no subgraphs."""
    reason = _op_type_reason(node, DEFAULT_NPU_OP_TYPES)
    if reason is not None:
        return reason
    for value in node.outputs:
        if value.dtype is not None and value.dtype not in DEFAULT_NPU_DTYPES:
            return f"output {value.name!r} has dtype {value.dtype.name}, which the NPU does not compute"
    for value in node.outputs:
        if value.shape is not None and not value.shape.is_static():
            return f"output {value.name!r} has a non-static shape {value.shape}"
    return None


def as_support_query(supported: Supported) -> SupportQuery:
    """Turn a set of op types / ``(domain, op_type)`` pairs into a query; pass callables through."""
    if callable(supported):
        return supported
    if isinstance(supported, str):
        raise TypeError("supported must be a collection of op types, not a single string")
    names = frozenset(supported)
    return lambda node: _op_type_reason(node, names)
