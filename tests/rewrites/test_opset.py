"""The npudispatch domain: OpRun references, ONNX function bodies under onnxruntime, errors."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator
from rw_helpers import run_ort, run_reference

from npudispatch import opset
from npudispatch.errors import ModelError

RNG = np.random.default_rng(0)
X = (RNG.standard_normal((3, 8)) * 3).astype(np.float32)


def single_op(
    op_type: str, inputs: dict[str, ir.Value], out_shape, out_dtype=ir.DataType.FLOAT, **attrs
):
    graph_inputs = [v for v in inputs.values() if v.const_value is None]
    inits = [v for v in inputs.values() if v.const_value is not None]
    node = ir.node(
        op_type, list(inputs.values()), attributes=attrs or None, domain=opset.DOMAIN, name="op"
    )
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", out_dtype, ir.Shape(out_shape)
    g = ir.Graph(
        graph_inputs,
        [y],
        nodes=[node],
        initializers=inits,
        name="g",
        opset_imports={"": 21, opset.DOMAIN: opset.VERSION},
    )
    return ir.Model(g, ir_version=10)


def const(name: str, arr: np.ndarray) -> ir.Value:
    return ir.val(name, const_value=ir.tensor(arr, name=name))


def x_input(dtype=ir.DataType.FLOAT, shape=(3, 8)) -> ir.Value:
    return ir.val("x", dtype, list(shape))


def test_silu_reference_and_function_agree():
    m = single_op("Silu", {"x": x_input()}, [3, 8])
    expected = X / (1 + np.exp(-X))
    np.testing.assert_allclose(run_reference(m, {"x": X})[0], expected, rtol=1e-6)
    np.testing.assert_allclose(run_ort(m, {"x": X})[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_standard_gelu_20(approximate):
    m = single_op("Gelu", {"x": x_input()}, [3, 8], approximate=approximate)
    std = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)],
            "g",
            [helper.make_tensor_value_info("x", 1, [3, 8])],
            [helper.make_tensor_value_info("y", 1, [3, 8])],
        ),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    expected = ReferenceEvaluator(std).run(None, {"x": X})[0]
    # Pitfall 15 does not bite: npudispatch.Gelu has exactly the attributes of standard Gelu.
    np.testing.assert_allclose(run_reference(m, {"x": X})[0], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run_ort(m, {"x": X})[0], expected, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_gets_its_overload():
    m = single_op("Gelu", {"x": x_input()}, [3, 8], approximate="tanh")
    added = opset.attach_functions(m)
    assert added == [(opset.DOMAIN, "Gelu", opset.GELU_TANH_OVERLOAD)]
    assert next(iter(m.graph)).overload == opset.GELU_TANH_OVERLOAD
    assert opset.attach_functions(m) == []  # idempotent


def test_matmul_bias():
    b = RNG.standard_normal((8, 5)).astype(np.float32)
    bias = RNG.standard_normal(5).astype(np.float32)
    m = single_op(
        "MatMulBias", {"x": x_input(), "b": const("b", b), "bias": const("bias", bias)}, [3, 5]
    )
    expected = X @ b + bias
    np.testing.assert_allclose(run_reference(m, {"x": X})[0], expected, rtol=1e-5)
    np.testing.assert_allclose(run_ort(m, {"x": X})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_qmatmul(per_channel):
    a = RNG.integers(0, 256, (3, 8)).astype(np.uint8)
    b = RNG.integers(-128, 128, (8, 4)).astype(np.int8)
    b_scale = np.array([0.01, 0.02, 0.03, 0.04] if per_channel else 0.02, np.float32)
    b_zp = np.zeros(b_scale.shape, np.int8)
    ins = {
        "x": x_input(ir.DataType.UINT8),
        "a_scale": const("a_scale", np.array(0.05, np.float32)),
        "a_zp": const("a_zp", np.array(128, np.uint8)),
        "b": const("b", b),
        "b_scale": const("b_scale", b_scale),
        "b_zp": const("b_zp", b_zp),
        "y_scale": const("y_scale", np.array(0.2, np.float32)),
        "y_zp": const("y_zp", np.array(100, np.uint8)),
    }
    m = single_op("QMatMul", ins, [3, 4], ir.DataType.UINT8)
    af = (a.astype(np.float32) - 128) * np.float32(0.05)
    y = af @ (b.astype(np.float32) * b_scale)
    expected = np.clip(np.rint(y / np.float32(0.2)) + 100, 0, 255).astype(np.uint8)
    got_ref = run_reference(m, {"x": a})[0]
    got_ort = run_ort(m, {"x": a})[0]
    assert got_ref.dtype == np.uint8
    assert np.abs(got_ref.astype(int) - expected).max() <= 1
    assert np.abs(got_ort.astype(int) - got_ref.astype(int)).max() <= 1


def test_unknown_op_and_bad_attribute_are_errors():
    with pytest.raises(ModelError, match="Frobnicate"):
        opset.attach_functions(single_op("Frobnicate", {"x": x_input()}, [3, 8]))
    with pytest.raises(ModelError, match="approximate"):
        opset.attach_functions(single_op("Gelu", {"x": x_input()}, [3, 8], approximate="fast"))
    with pytest.raises(ModelError):
        opset.function_for("Silu", overload="nope")


def test_numpy_gelu_known_values():
    assert opset.gelu(np.array([1.0]), "none")[0] == pytest.approx(
        0.5 * (1 + math.erf(1 / math.sqrt(2)))
    )
    assert opset.gelu(np.array([0.0]), "tanh")[0] == 0.0
