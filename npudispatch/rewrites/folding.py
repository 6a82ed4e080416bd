"""Shape folding: bind symbolic dims, then fold the exporter's shape arithmetic into constants.

torch.onnx computes Reshape/Expand targets at run time (Shape -> Gather -> Unsqueeze -> Concat ->
Reshape). Once the symbolic dims are bound (:class:`BindDimsPass`) every such chain is computable
from static shapes, and :class:`FoldShapesPass` turns it into a constant via onnxscript's constant
folder (``onnxscript.optimizer.fold_constants``, with per-node ONNX shape inference). Only the
shape-arithmetic ops below are folded, and only when every input and the output stay small, so
weights are never duplicated or precomputed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from npudispatch.domains import is_onnx_domain
from npudispatch.errors import RewriteError
from npudispatch.graph import shapes

# The shape-arithmetic ops and size limit live with graph.load's shape resolution.
SHAPE_OPS = shapes.SHAPE_OPS
DEFAULT_SIZE_LIMIT = shapes.SHAPE_TENSOR_LIMIT


class BindDimsPass(ir.passes.InPlacePass):
    """Replace named symbolic dims of the graph inputs by integers (e.g. ``{"batch": 1, "seq": 8}``).

    Intermediate shapes are left to shape inference (:class:`FoldShapesPass` runs it per node).
    Raises :class:`RewriteError` when a name occurs in no graph input (likely a typo).
    """

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        self.dims = dict(dims)
        self._bound: set[str] = set()  # names bound by earlier runs (fixpoint rounds)
        for k, v in self.dims.items():
            if not isinstance(v, int) or v < 1:
                raise RewriteError(f"dim {k!r} must be bound to a positive int, got {v!r}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        seen: set[str] = set()
        modified = False
        for v in model.graph.inputs:
            if v.shape is None:
                continue
            dims = []
            for d in v.shape:
                if isinstance(d, ir.SymbolicDim) and d.value in self.dims:
                    seen.add(d.value)
                    dims.append(self.dims[d.value])
                    modified = True
                else:
                    dims.append(d)
            v.shape = ir.Shape(dims)
        self._bound |= seen
        missing = set(self.dims) - self._bound
        if missing:
            available = sorted(
                {
                    d.value
                    for v in model.graph.inputs
                    if v.shape is not None
                    for d in v.shape
                    if isinstance(d, ir.SymbolicDim) and d.value is not None
                }
            )
            raise RewriteError(
                f"BindDimsPass: dims {sorted(missing)} occur in no graph input; "
                f"symbolic dims still unbound: {available}"
            )
        return ir.passes.PassResult(model, modified)


class FoldShapesPass(ir.passes.InPlacePass):
    """Fold shape arithmetic (Shape, Gather, Concat, …, ConstantOfShape, Range) into constants.

    Arithmetic ops (Add/Sub/Mul/Div/Cast/…) are folded only when their output is an integer shape
    tensor; Reshape/Expand/Identity only when their data input is itself a small constant. Tensors
    above ``size_limit`` elements are never folded. The rules are
    :func:`npudispatch.graph.shapes.fold_shape_arithmetic`'s, which ``graph.load`` also uses.
    """

    def __init__(self, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, shapes.fold_shape_arithmetic(model, self.size_limit))


# Ops whose output is their data input's elements in the same row-major order.
RESHAPE_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


class FoldConstantFillsPass(ir.passes.InPlacePass):
    """``ConstantOfShape`` of a constant shape is a constant: it becomes an initializer.

    Tools that strip weights from a model (onnx's own "light" model zoo, size-reduced test
    models) write every weight as such a fill; left as a node, each Conv or Gemm would read its
    weight as a run-time tensor and fall to the CPU. The initializer is a read-only broadcast
    view of the one fill value: no memory until a consumer formats it. It runs after
    :func:`npudispatch.dispatch.limits.check_model_sizes` has seen the fill as a node, so an
    oversized one is refused naming its producer.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        changed = False
        for node in list(graph):
            if node.op_type != "ConstantOfShape" or not is_onnx_domain(node.domain):
                continue
            shape = node.inputs[0].const_value if node.inputs and node.inputs[0] else None
            output = node.outputs[0]
            if shape is None or output.is_graph_output():
                continue
            dims = [int(d) for d in np.asarray(shape.numpy()).reshape(-1)]
            if any(d < 0 for d in dims):
                continue  # invalid: shape inference reports it with the node's name
            attr = node.attributes.get("value")
            fill = attr.as_tensor().numpy().reshape(-1)[:1] if attr else np.zeros(1, np.float32)
            if fill.size != 1:
                continue  # an empty ``value``: malformed, left for inference to report
            tensor = ir.Tensor(np.broadcast_to(fill.reshape(()), dims), name=output.name)
            constant = ir.Value(
                name=output.name,
                shape=ir.Shape(dims),
                type=ir.TensorType(tensor.dtype),
                const_value=tensor,
            )
            ir.convenience.replace_all_uses_with(output, constant)
            graph.remove(node, safe=True)
            graph.register_initializer(constant)  # the shape constant is dropped as unused
            changed = True
        return ir.passes.PassResult(model, changed)


class FoldConstantViewsPass(ir.passes.InPlacePass):
    """A reshape of a constant that nothing else reads becomes the constant, reshaped.

    Older exporters reshape weights in the graph (Inception's classifier weight goes through a
    ``Reshape``, DenseNet's batch-norm parameters through ``Unsqueeze``); operators that need a
    constant weight would otherwise see a run-time tensor and fall to the CPU. Only a constant
    with this one reader is folded, so no weight is ever duplicated; the data is not copied
    (``numpy.reshape`` of the same elements), and the output shape is the inferred one.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        changed = False
        for node in list(graph):
            folded = _reshaped_constant(node)
            if folded is None or node.outputs[0].is_graph_output():
                continue
            old = node.outputs[0]
            constant = ir.Value(name=old.name, shape=old.shape, type=old.type, const_value=folded)
            ir.convenience.replace_all_uses_with(old, constant)
            graph.remove(node, safe=True)
            graph.register_initializer(constant)  # the source is dropped as unused later
            changed = True
        return ir.passes.PassResult(model, changed)


def _reshaped_constant(node: ir.Node) -> ir.Tensor | None:
    if node.op_type not in RESHAPE_OPS or not is_onnx_domain(node.domain) or not node.inputs:
        return None
    data = node.inputs[0]
    if data is None or data.const_value is None or len(data.uses()) != 1:
        return None
    if data.is_graph_input() or not all(
        v is None or v.const_value is not None for v in node.inputs
    ):
        return None
    shape = node.outputs[0].shape
    if shape is None or not shape.is_static():
        return None
    array = data.const_value.numpy()
    dims = tuple(int(d) for d in shape)
    if int(np.prod(dims)) != array.size:
        return None
    return ir.Tensor(array.reshape(dims), name=node.outputs[0].name)


def unbound_dims(model: ir.Model) -> list[str]:
    """Symbolic dim names still present on the graph inputs (to bind before folding)."""
    return sorted(
        {
            str(d.value)
            for v in model.graph.inputs
            if v.shape is not None
            for d in v.shape
            if isinstance(d, ir.SymbolicDim)
        }
    )
