"""Keep onnx's data propagation from materializing huge constant tensors.

With ``data_prop=True``, onnx shape inference evaluates any node whose inputs are all known
constants when a consumer asks for its *values* (a ``Cast``, ``Add``, ``Gather``... downstream),
and stores every element as a ``TensorShapeProto`` dimension, about 140 bytes each. A 200-byte
model with ``Range(0, 10**9, 1) -> Cast`` then makes onnx allocate well over 100 GB before anything
of ours can refuse the tensor; ``ConstantOfShape``, ``Expand`` and ``Tile`` do the same.

:func:`oversized_propagations` finds, before onnx is called, the nodes whose output values data
propagation could materialize (every input derives from initializers, ``Constant`` or ``Shape`` /
``Size`` outputs) and whose element count is either above :data:`DATA_PROP_MAX_ELEMENTS` or
cannot be known without evaluating the graph. Whole-graph inference then runs without data
propagation for that round: shapes are still inferred (onnx computes a ``Range`` or
``ConstantOfShape`` output shape from constant inputs without building the values), folding of
the small shape arithmetic makes the unknown counts known for the next round, and a tensor that
really is too large is refused by :func:`npudispatch.dispatch.limits.check_model_sizes` with the
node's name instead of an out-of-memory crash. If/Loop/Scan bodies are scanned as well, and
shape-arithmetic folding (:func:`npudispatch.graph.shapes.should_fold_shape_node`) uses
:func:`generated_elements` to leave a known-large generator unevaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from npudispatch.domains import is_onnx_domain

__all__ = [
    "DATA_PROP_MAX_ELEMENTS",
    "GENERATOR_OPS",
    "Propagation",
    "generated_elements",
    "oversized_propagations",
]

#: Largest output (elements) data propagation may materialize: ~140 MB of onnx dimension
#: records. Shape values hold a handful of integers; anything near this size is model data.
DATA_PROP_MAX_ELEMENTS = 1 << 20

# Ops whose output can be much larger than all their inputs together: the element count has to
# be computed from the inputs' values (or is unknown).
GENERATOR_OPS = frozenset(
    {"ConstantOfShape", "Range", "Expand", "Tile", "Pad", "Resize", "Upsample", "OneHot", "EyeLike"}
)
# Ops whose values onnx derives from the input's *type* (no data needed): their outputs count as
# known constants to data propagation.
_FROM_TYPE = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Propagation:
    """A node data propagation could materialize: ``elements`` is None when unknown."""

    node: ir.Node
    elements: int | None

    def describe(self) -> str:
        size = "an unknown number of" if self.elements is None else f"{self.elements:,}"
        return f"{self.node.op_type} node {self.node.name!r} ({size} elements)"


def _ints(value: ir.Value | None) -> list[int] | None:
    """The integer values of a small constant input (Python ints: no overflow), or of the
    ``Shape`` of a static tensor (the mask pattern ``ConstantOfShape(Shape(x))``), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        return _shape_values(value.producer())
    if tensor.size > 64 or not tensor.dtype.is_integer():
        return None
    return [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _shape_values(node: ir.Node | None) -> list[int] | None:
    if node is None or node.op_type != "Shape" or not is_onnx_domain(node.domain):
        return None
    data = node.inputs[0] if node.inputs else None
    if data is None or data.shape is None or not data.shape.is_static():
        return None
    dims = [int(d) for d in data.shape]
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    return dims[start:end]


def _static_elements(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return math.prod(shape)


def _range_elements(node: ir.Node) -> int | None:
    tensors = [v.const_value if v is not None else None for v in node.inputs[:3]]
    if len(tensors) != 3 or any(t is None or t.size != 1 for t in tensors):
        return None
    start, limit, delta = (np.asarray(t.numpy()).reshape(-1)[0].item() for t in tensors)  # type: ignore[union-attr]
    if delta == 0:
        return None  # onnx reports it
    return max(math.ceil((limit - start) / delta), 0)


def generated_elements(node: ir.Node) -> int | None:
    """Element count of a generator's output from its constant inputs, or None if unknown."""
    op, inputs = node.op_type, node.inputs
    if op == "Range":
        return _range_elements(node)
    if op == "ConstantOfShape":
        dims = _ints(inputs[0]) if inputs else None
        return None if dims is None else math.prod(max(d, 0) for d in dims)
    if op in ("Expand", "Tile") and len(inputs) >= 2 and inputs[0] is not None:
        data = inputs[0].shape
        other = _ints(inputs[1])
        if other is None or data is None or not data.is_static():
            return None
        dims = [int(d) for d in data]
        if op == "Tile":
            return math.prod(dims) * math.prod(max(r, 0) for r in other)
        rank = max(len(dims), len(other))
        dims = [1] * (rank - len(dims)) + dims
        other = [1] * (rank - len(other)) + other
        return math.prod(max(a, b, 0) for a, b in zip(dims, other))
    return None


def oversized_propagations(
    graph: ir.Graph, outer_constants: frozenset[ir.Value] = frozenset()
) -> list[Propagation]:
    """Nodes whose values data propagation could materialize beyond the limit (or unknown size).

    If/Loop/Scan bodies are scanned too (onnx propagates data inside them as well), with the
    constants of the enclosing scopes visible to them.
    """
    constant: set[ir.Value] = set(outer_constants) | set(graph.initializers.values())
    found: list[Propagation] = []
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found += oversized_propagations(attr.as_graph(), frozenset(constant))
            elif attr.type == ir.AttributeType.GRAPHS:
                for body in attr.as_graphs():
                    found += oversized_propagations(body, frozenset(constant))
        inputs = [v for v in node.inputs if v is not None]
        from_type = is_onnx_domain(node.domain) and node.op_type in _FROM_TYPE
        if not from_type and not all(v in constant or v.const_value is not None for v in inputs):
            continue
        constant.update(node.outputs)
        if from_type or not is_onnx_domain(node.domain):
            continue
        # A large constant input counts too: onnx treats a 1-d integer tensor as a possible shape
        # and builds a dimension record per element even when its output size is not yet known
        # (``Cast`` of a 1e8-element int64 fill).
        counts = [_static_elements(v) for v in (*node.outputs, *inputs)]
        if node.op_type in GENERATOR_OPS and any(c is None for c in counts):
            counts = [generated_elements(node)]
        known = [c for c in counts if c is not None]
        if len(known) < len(counts) and node.op_type in GENERATOR_OPS:
            found.append(Propagation(node, None))
        elif any(c > DATA_PROP_MAX_ELEMENTS for c in known):
            found.append(Propagation(node, max(known)))
    return found
