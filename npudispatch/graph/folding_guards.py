"""Guards around onnxscript's constant folder (``fold_constants_ir``) for what it gets wrong.

:func:`npudispatch.graph.shapes.fold_shape_arithmetic` calls these before folding: each fixes or
hides one construct the folder (onnxscript 0.7) would rewrite into something invalid or with other
results, so folding never changes what a model computes.
"""

from __future__ import annotations

import onnx_ir as ir

from npudispatch.domains import is_onnx_domain

__all__ = ["castlike_to_cast", "hide_split_shapes", "shield_sequence_ops"]


# onnxscript 0.7 rewrites these sequence ops into Split / Squeeze / Unsqueeze in their opset-18
# forms (axes and split as inputs, ``num_outputs``) whatever the model's opset.
_SEQUENCE_REWRITES = frozenset({"SplitToSequence", "ConcatFromSequence"})
_SEQUENCE_REWRITE_MIN_OPSET = 18
_SHIELD_DOMAIN = "npudispatch.shielded"


def shield_sequence_ops(model: ir.Model) -> list[ir.Node]:
    """Below opset 18, move the sequence ops onnxscript would rewrite into its newer op forms out
    of its sight (a private domain, restored after the fold); returns the nodes to restore. The
    opset-12 rewrite it makes is not a valid model (onnx's ``test_sequence_model5`` / ``8``)."""
    if model.graph.opset_imports.get("", 1) >= _SEQUENCE_REWRITE_MIN_OPSET:
        return []
    shielded = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in _SEQUENCE_REWRITES and node.domain in ("", "ai.onnx"):
            node.domain = _SHIELD_DOMAIN
            shielded.append(node)
    return shielded


def hide_split_shapes(model: ir.Model) -> list[tuple[ir.Value, ir.Shape]]:
    """Clear, for the folding, the shape of a SplitToSequence's run-time ``split`` that is not
    1-D; returns what to restore. onnxscript 0.7's SplitToSequence evaluator reads the value of
    such a split (``None.ndim``) and crashes the whole fold."""
    hidden = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "SplitToSequence" or not is_onnx_domain(node.domain):
            continue
        split = node.inputs[1] if len(node.inputs) > 1 else None
        if split is None or split.const_value is not None or split.shape is None:
            continue
        if len(split.shape) != 1:
            hidden.append((split, split.shape))
            split.shape = None
    return hidden


def castlike_to_cast(model: ir.Model) -> bool:
    """Turn a CastLike that carries attributes into the equivalent ``Cast(to=T, ...)`` first.

    onnxscript's folder rewrites every CastLike whose target type is known into a Cast *without*
    its attributes, which changes results (``saturate=0`` for float8; ``round_mode``). Cast and
    CastLike take the same attributes in every opset, so they are all carried over; a Cast that
    already has them is left alone. True when a node was rewritten.
    """
    changed = False
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "CastLike" or not is_onnx_domain(node.domain) or not node.attributes:
            continue
        like = node.inputs[1] if len(node.inputs) > 1 else None
        if like is None or like.dtype is None or node.graph is None:
            continue
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        cast = ir.node(
            "Cast", [node.inputs[0]], attributes={**attributes, "to": like.dtype}, name=node.name
        )
        ir.convenience.replace_nodes_and_values(
            node.graph, node, [node], [cast], node.outputs, cast.outputs
        )
        cast.outputs[0].name = node.outputs[0].name
        changed = True
    return changed
