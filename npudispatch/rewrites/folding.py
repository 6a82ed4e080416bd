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

import onnx_ir as ir

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
