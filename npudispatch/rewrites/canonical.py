"""Canonical forms the fusions and the operator library expect.

- Constants go last in commutative binary ops (Add, Mul): fusion patterns then need only one
  order for each (constant, value) pair instead of every commuted variant; for tanh GELU that is
  36 rules instead of ~1000, which keeps matching fast.
- :class:`CanonicalFormsPass` rewrites ops that older exporters emit into the ones the library
  runs: an inference-mode ``Dropout`` (no ``training_mode``, or a constant false one; mask unread)
  is the identity, as onnxruntime runs it (AlexNet, VGG, SqueezeNet, Inception keep theirs), and
  ``Sum`` of n inputs is a chain of n - 1 broadcasting ``Add`` nodes in input order (Caffe2
  exports write residual additions as ``Sum``: ResNet, ShuffleNet). A ``GroupQueryAttention``
  whose past key and value hold no rows (a genai decoder's first prompt run with
  ``past_sequence_length = 0``) takes no past, which the contrib op defines as the same thing.
  Left as they were, each would have no NPU operator (an empty tensor has nothing to compute)
  and cut the NPU partition in two.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import basic_constant_propagation

from npudispatch.domains import is_onnx_domain

__all__ = [
    "COMMUTATIVE_OPS",
    "CanonicalFormsPass",
    "constants_last",
    "drop_empty_past",
    "inference_dropout",
]

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


def inference_dropout(node: ir.Node, opset: int = 22) -> bool:
    """True for a ``Dropout`` that is the identity at inference and whose mask is unread
    (``opset``: the model's default-domain version; below 7, ``is_test`` defaults to training)."""
    if node.op_type != "Dropout" or not is_onnx_domain(node.domain) or not node.inputs:
        return False
    if opset < 7 and node.attributes.get_int("is_test", 0) == 0:
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = node.inputs[2].const_value
        flags = np.asarray(mode.numpy()).reshape(-1) if mode is not None else None
        if flags is None or flags.size != 1 or bool(flags[0]):
            return False  # run time, training, or malformed (onnxruntime reports that)
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    return mask is None or (not mask.uses() and not mask.is_graph_output())


def _sum_operands(node: ir.Node) -> list[ir.Value] | None:
    if node.op_type != "Sum" or not is_onnx_domain(node.domain):
        return None
    operands = list(node.inputs)
    return operands if operands and None not in operands else None


def drop_empty_past(node: ir.Node) -> bool:
    """A com.microsoft ``GroupQueryAttention`` with a past key and value of 0 rows (static
    shapes) loses both inputs; returns whether it did."""
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return False
    past = node.inputs[3:5]
    if len(past) != 2 or any(v is None or v.shape is None or len(v.shape) != 4 for v in past):
        return False
    if any(v.shape[2] != 0 for v in past):  # type: ignore[union-attr]
        return False
    node.replace_input_with(3, None)
    node.replace_input_with(4, None)
    return True


class CanonicalFormsPass(ir.passes.InPlacePass):
    """Inference-mode ``Dropout`` becomes ``Identity``; ``Sum`` becomes a chain of ``Add``; an
    empty GroupQueryAttention past is no past."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = graph.opset_imports.get("", 1)
        changed = False
        for node in list(graph):
            if drop_empty_past(node):
                changed = True
                continue
            if inference_dropout(node, opset):
                replacement = [ir.node("Identity", [node.inputs[0]], name=node.name)]
            elif (operands := _sum_operands(node)) is not None:
                replacement = _add_chain(node.name or "Sum", operands)
            else:
                continue
            old, new = node.outputs[0], replacement[-1].outputs[0]
            new.name, new.shape, new.type = old.name, old.shape, old.type
            ir.convenience.replace_nodes_and_values(graph, node, [node], replacement, [old], [new])
            changed = True
        return ir.passes.PassResult(model, changed)


def _add_chain(name: str, operands: list[ir.Value]) -> list[ir.Node]:
    if len(operands) == 1:
        return [ir.node("Identity", operands, name=name)]
    nodes: list[ir.Node] = []
    total = operands[0]
    for i, operand in enumerate(operands[1:]):
        last = i == len(operands) - 2
        node = ir.node("Add", [total, operand], name=name if last else f"{name}__add{i}")
        nodes.append(node)
        total = node.outputs[0]
    return nodes
