"""The QDQ rewrites' shared vocabulary: quantization parameters of a Q/DQ node, the report,
naming of new initializers, and the per-partition quantization summary ``inspect`` shows.

The rewrite steps themselves are in :mod:`npudispatch.rewrites.qdq`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from npudispatch.domains import is_onnx_domain
from npudispatch.operators.quantize import QUANT_DTYPES
from npudispatch.rewrites._checks import const_array
from npudispatch.rewrites.aliasing import VIEW_OPS

SHAPE_VIEWS = VIEW_OPS - {"Identity"}
_ZP_DTYPES = {*QUANT_DTYPES.values(), np.dtype(np.int32)}


@dataclass
class QdqReport:
    """What one :class:`QdqPass` run did: counts per step and fused op types."""

    counts: Counter = field(default_factory=Counter)
    fused_ops: Counter = field(default_factory=Counter)

    @property
    def modified(self) -> bool:
        return any(v for k, v in self.counts.items() if k not in ("unique_dq", "merge_dq"))


def is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and is_onnx_domain(node.domain)


def input_at(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


class Namer:
    def __init__(self, graph: ir.Graph) -> None:
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        self.used |= {v.name for n in graph for v in n.outputs} | {n.name for n in graph}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def new_initializer(graph: ir.Graph, namer: Namer, base: str, arr: np.ndarray) -> ir.Value:
    name = namer(base)
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
        shape=ir.Shape(arr.shape),
        const_value=ir.tensor(arr, name=name),
    )
    graph.register_initializer(value)
    return value


@dataclass(frozen=True)
class QParams:
    """Constant parameters of one Q or DQ node (``zp`` in the quantized numpy dtype)."""

    scale: np.ndarray
    zp: np.ndarray
    axis: int
    block: int

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1 and not self.block

    def same(self, other: QParams) -> bool:
        return (
            self.per_tensor
            and other.per_tensor
            and self.zp.dtype == other.zp.dtype
            and np.array_equal(self.scale.reshape(()), other.scale.reshape(()))
            and np.array_equal(self.zp.reshape(()), other.zp.reshape(()))
        )


def qparams_of(node: ir.Node, qtype: ir.DataType | None) -> QParams | None:
    """Constant float32 scale and integer zero point of a Q/DQ node, else None."""
    scale = const_array(input_at(node, 1))
    zp_val = input_at(node, 2)
    if scale is None or scale.dtype != np.float32:
        return None
    if zp_val is not None:
        zp = const_array(zp_val)
        if zp is None:
            return None
    else:
        if qtype is None or qtype.is_floating_point():
            return None
        zp = np.zeros(scale.shape, qtype.numpy())
    if zp.dtype not in _ZP_DTYPES:
        return None
    return QParams(
        scale,
        zp,
        node.attributes.get_int("axis", 1),
        node.attributes.get_int("block_size", 0),
    )


def single_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


_INT_TYPES = {ir.DataType.from_numpy(d) for d in _ZP_DTYPES}


def _converts(node: ir.Node) -> bool:
    """Whether ``node`` turns float data into integers or back (Q, DQ, float<->int Cast)."""
    if is_op(node, "QuantizeLinear") or is_op(node, "DequantizeLinear"):
        return True
    if is_op(node, "Cast") and node.inputs and node.inputs[0] is not None:
        src, dst = node.inputs[0].dtype, node.outputs[0].dtype
        return src is not None and dst is not None and (src in _INT_TYPES) != (dst in _INT_TYPES)
    return False


def quantization_summary(nodes: Iterable[ir.Node]) -> dict[str, list[str]]:
    """Quantization at a glance for a group of nodes (an NPU or CPU partition).

    ``activation_dtypes``: dtypes of the non-constant tensors the nodes read or write (shape
    arithmetic in int64 left out); ``weight_dtypes``: dtypes of the constant tensors with more
    than one element they read (weights, not scales); ``conversions``: names of the nodes that
    turn float data into integers or back (QuantizeLinear, DequantizeLinear, float<->int Cast).
    """
    acts: set[str] = set()
    weights: set[str] = set()
    conversions: list[str] = []
    for node in nodes:
        for v in (*node.inputs, *node.outputs):
            if v is None or v.dtype is None or v.dtype in (ir.DataType.INT64, ir.DataType.BOOL):
                continue
            if v.const_value is None:
                acts.add(v.dtype.name.lower())
            elif v.const_value.size > 1:
                weights.add(v.dtype.name.lower())
        if _converts(node):
            conversions.append(node.name or f"<unnamed {node.op_type}>")
    return {
        "activation_dtypes": sorted(acts),
        "weight_dtypes": sorted(weights),
        "conversions": conversions,
    }
