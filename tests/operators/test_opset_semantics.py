"""Opset-version-dependent semantics: operators read the model's opset and compute or decline."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import helper

from npudispatch.operators.base import opset_version


def _node_in_model(domain_key: str, version: int) -> ir.Node:
    node = helper.make_node("Softmax", ["x"], ["y"], axis=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", 1, [2, 3])],
        [helper.make_tensor_value_info("y", 1, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain_key, version)])
    return next(iter(ir.from_proto(model).graph))


@pytest.mark.parametrize("domain_key", ["", "ai.onnx"])
def test_opset_version_reads_the_graph_imports(domain_key):
    assert opset_version(_node_in_model(domain_key, 11)) == 11


def test_opset_version_prefers_the_node_version_and_is_none_when_unknown():
    node = _node_in_model("", 11)
    node.version = 13
    assert opset_version(node) == 13
    assert opset_version(ir.Node("", "Softmax", [])) is None
