"""Opset-version-dependent semantics: operators read the model's opset and compute or decline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper
from opkit import assert_close, one_node_model, random, reference, run_emu, run_ort

import npudispatch
from npudispatch.operators.base import Decline, opset_version
from npudispatch.operators.softmax import Softmax


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


# ---- Softmax: opset <= 12 coerces to 2-D at `axis` (default 1), opset >= 13 one axis (-1) ----


@pytest.mark.parametrize(
    ("opset", "shape", "axis"),
    [
        (11, (2, 3, 4), 1),  # flattened tail [3*4]: differs from per-axis normalisation
        (11, (2, 3, 4), None),  # default axis is 1 before opset 13
        (11, (2, 3, 4), 0),  # the whole tensor is one row
        (12, (3, 37), -1),  # last axis: both meanings agree
        (13, (2, 3, 4), 1),
        (13, (2, 3, 4), None),  # default axis is -1 from opset 13
    ],
)
def test_softmax_matches_onnxruntime_in_its_opset(opset, shape, axis, float_dtype):
    attrs = {} if axis is None else {"axis": axis}
    model = one_node_model(
        "Softmax", [("x", float_dtype, shape)], [("y", float_dtype, shape)], opset=opset, **attrs
    )
    feeds = {"x": random(shape, float_dtype, 3, scale=3.0)}
    res = run_emu(model, feeds)
    expected = run_ort(model, feeds)[0]
    assert_close(res["y"], expected, scale=2e-3)
    assert_close(res["y"], reference(res, feeds)[0], scale=2e-3)


def test_softmax_opset11_through_session_with_padding():
    """Whole pipeline (terminal padding of the 37-lane axis, bf16): flattened rows stay right."""
    shape = (2, 3, 37)
    model = one_node_model(
        "Softmax", [("x", np.float32, shape)], [("y", np.float32, shape)], opset=11, axis=1
    )
    x = random(shape, np.float32, 5, scale=3.0)
    sess = npudispatch.Session(model)
    (y,) = sess.run(None, {"x": x})
    expected = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(y.reshape(2, -1).sum(axis=1), 1.0, atol=2e-2)
    assert_close(y, expected, scale=2e-3)


def test_softmax_without_a_declared_opset_is_declined():
    node = ir.Node(
        "",
        "Softmax",
        [ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))],
    )
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape([2, 3])
    result = Softmax().match(node)
    assert isinstance(result, Decline) and "opset" in result.reason


def _decline_reason(model) -> str:
    from npudispatch.operators import registry

    result = registry.match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(result, Decline), "expected the NPU to decline"
    return result.reason


# ---- Add/Sub/Mul/Div before opset 7: `broadcast`/`axis` attributes, not numpy broadcasting ----


def test_legacy_broadcast_at_an_inner_axis_is_declined():
    """Add-6 broadcast=1 axis=1 adds B along axis 1; numpy would add it along the last axis."""
    model = one_node_model(
        "Add",
        [("a", np.float32, (2, 3, 3)), ("b", np.float32, (3,))],
        [("y", np.float32, (2, 3, 3))],
        opset=6,
        broadcast=1,
        axis=1,
    )
    assert "axis 1 is not numpy broadcasting" in _decline_reason(model)


def test_legacy_broadcast_without_the_flag_is_declined():
    model = one_node_model(
        "Mul",
        [("a", np.float32, (2, 3)), ("b", np.float32, (3,))],
        [("y", np.float32, (2, 3))],
        opset=6,
    )
    assert "without broadcast=1" in _decline_reason(model)


def test_legacy_suffix_broadcast_equals_numpy_and_runs():
    """broadcast=1 without axis aligns B at the end: identical to numpy, so the NPU takes it."""
    model = one_node_model(
        "Add",
        [("a", np.float32, (2, 3, 4)), ("b", np.float32, (4,))],
        [("y", np.float32, (2, 3, 4))],
        opset=6,
        broadcast=1,
    )
    a, b = random((2, 3, 4), np.float32, 1), random((4,), np.float32, 2)
    res = run_emu(model, {"a": a, "b": b})
    assert_close(res["y"], a + b)


# ---- Cast-1 names the target type as a string ----


def test_cast_opset1_string_target_is_declined():
    model = one_node_model(
        "Cast", [("x", np.float32, (2, 8))], [("y", np.float32, (2, 8))], opset=1, to="FLOAT"
    )
    assert "not an ONNX type code" in _decline_reason(model)


# ---- Reduce*: axes attribute before opset 13 (ReduceSum) / 18 (others), an input after ----


def test_reduce_axes_attribute_in_an_opset_without_it_is_declined():
    model = one_node_model(
        "ReduceMean", [("x", np.float32, (4, 8))], [("y", np.float32, (4, 1))], opset=18, axes=[-1]
    )
    assert "not part of ReduceMean-18" in _decline_reason(model)


def test_reduce_axes_input_in_an_opset_without_it_is_declined():
    model = one_node_model(
        "ReduceSum",
        [("x", np.float32, (4, 8)), ("axes", np.int64, (1,))],
        [("y", np.float32, (4, 1))],
        initializers={"axes": np.array([-1], np.int64)},
        opset=11,
    )
    assert "has no 'axes' input" in _decline_reason(model)
