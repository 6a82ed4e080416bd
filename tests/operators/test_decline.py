"""Decline works both ways: returned from ``match`` or raised from a helper below it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from opkit import one_node_model

from npudispatch.operators import registry
from npudispatch.operators.base import Decline, OpConfig, Operator
from npudispatch.operators.matmul import MatMul


def _node(model):
    return ir.from_proto(model).graph[0]


def test_check_returns_values_and_raises_declines():
    assert Decline.check(3) == 3
    with pytest.raises(Decline) as info:
        Decline.check(Decline("input A is missing"))
    assert str(info.value) == "input A is missing" and not info.value
    assert Decline("x") == Decline("x") and Decline("x") != Decline("y")


def test_a_raised_decline_is_returned_to_every_caller():
    class Raising(Operator):
        op_type = "Atan"
        kernel_id = 9_999

        def match(self, node):
            raise Decline(f"{node.op_type} declined deep inside a helper")

        def reference(self, cfg, inputs):
            return inputs

    node = _node(one_node_model("Atan", [("x", np.float32, (2,))], [("y", np.float32, (2,))]))
    got = Raising().match(node)  # direct call: the subclass's match is wrapped
    assert isinstance(got, Decline) and got.reason == "Atan declined deep inside a helper"


def _matmul(dtype: int):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
        "g",
        [
            helper.make_tensor_value_info("a", dtype, [2, 4]),
            helper.make_tensor_value_info("b", dtype, [4, 3]),
        ],
        [helper.make_tensor_value_info("y", dtype, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_raising_helpers_give_the_same_reasons_through_the_registry():
    # match_activation raises for an int8 A; MatMul.match no longer checks it by hand.
    direct = MatMul().match(_node(_matmul(TensorProto.INT8)))
    via_registry = registry.match(_node(_matmul(TensorProto.INT8)))
    assert isinstance(direct, Decline) and "float32 or bfloat16" in direct.reason
    assert isinstance(via_registry, Decline) and direct.reason in via_registry.reason
    assert isinstance(registry.match(_node(_matmul(TensorProto.FLOAT))), OpConfig)
