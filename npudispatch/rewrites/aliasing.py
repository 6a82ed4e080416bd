"""Aliasing: mark layout-only nodes as zero-copy views so the planner gives them no memory/txn.

A Reshape, Squeeze, Unsqueeze, Flatten or Identity whose input and output shapes are static only
reinterprets the bytes of its input (row-major layout is unchanged). Such nodes get
``metadata_props["npudispatch.alias"] = "view"`` (serialized with the model, unlike ``node.meta``);
:func:`is_view` is the query other stages use.
"""

from __future__ import annotations

import onnx_ir as ir

from npudispatch.domains import is_onnx_domain

ALIAS_KEY = "npudispatch.alias"
VIEW = "view"
VIEW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def is_view(node: ir.Node) -> bool:
    """Whether ``node`` was marked as a zero-copy view of its first input."""
    return node.metadata_props.get(ALIAS_KEY) == VIEW


def can_be_view(node: ir.Node) -> bool:
    """Whether ``node`` is a layout-only op with static input and output shapes."""
    if not is_onnx_domain(node.domain) or node.op_type not in VIEW_OPS:
        return False
    src, out = node.inputs[0] if node.inputs else None, node.outputs[0]
    return (
        src is not None
        and src.shape is not None
        and src.shape.is_static()
        and out.shape is not None
        and out.shape.is_static()
    )


class MarkViewsPass(ir.passes.InPlacePass):
    """Mark (or unmark, when shapes became dynamic) view nodes of the main graph; honest ``modified``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            want = can_be_view(node)
            if want and not is_view(node):
                node.metadata_props[ALIAS_KEY] = VIEW
                modified = True
            elif not want and ALIAS_KEY in node.metadata_props:
                del node.metadata_props[ALIAS_KEY]
                modified = True
        return ir.passes.PassResult(model, modified)
