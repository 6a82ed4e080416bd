"""NaN / Inf / out-of-range behaviour against onnxruntime (and the ONNX reference evaluator where
onnxruntime's answer is not defined). Documented differences: README, "NaN and infinity"."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator
from opkit import one_node_model, run_emu, run_ort

F32 = np.dtype(np.float32)


def _reduce(op: str):
    return one_node_model(op, [("x", F32, (3, 8))], [("y", F32, (3, 1))], opset=11, axes=[-1])


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
def test_nan_in_a_sum_propagates_like_onnxruntime(op):
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    x[0, 3] = np.nan
    np.testing.assert_array_equal(
        run_emu(_reduce(op), {"x": x})["y"], run_ort(_reduce(op), {"x": x})[0]
    )


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_nan_in_max_min_propagates_like_the_onnx_reference(op):
    """onnxruntime's ReduceMax/Min answer depends on where the NaN sits (x86 maxps keeps the
    second operand: a leading NaN wins, a later one is dropped), so it is not a definition; the
    NPU propagates NaN like the ONNX reference evaluator and numpy."""
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    x[0, 0] = np.nan
    x[1, 5] = np.nan
    ours = run_emu(_reduce(op), {"x": x})["y"]
    onnx_ref = ReferenceEvaluator(_reduce(op)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours, onnx_ref)
    assert np.isnan(ours[:2]).all() and ours[2, 0] == (23.0 if op == "ReduceMax" else 16.0)
    ort = run_ort(_reduce(op), {"x": x})[0]
    assert np.isnan(ort[0, 0]) and not np.isnan(ort[1, 0])  # the order dependence described above


def test_layer_norm_of_huge_values_matches_onnxruntime():
    """±1e38 overflows the float32 variance (the ONNX stash type): every output is 0 in
    onnxruntime, in the ONNX function body and on the NPU."""
    x = np.ones((2, 8), np.float32)
    x[0, 2], x[1, 5] = 1e38, -1e38
    model = one_node_model(
        "LayerNormalization",
        [("x", F32, (2, 8)), ("s", F32, (8,)), ("b", F32, (8,))],
        [("y", F32, (2, 8))],
        initializers={"s": np.ones(8, np.float32), "b": np.zeros(8, np.float32)},
        opset=17,
        axis=-1,
    )
    ours = run_emu(model, {"x": x})["y"]
    np.testing.assert_array_equal(ours, run_ort(model, {"x": x})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(ours, ReferenceEvaluator(model).run(None, {"x": x})[0])


def test_softmax_of_infinity_is_nan_like_onnxruntime():
    model = one_node_model("Softmax", [("x", F32, (1, 4))], [("y", F32, (1, 4))], opset=17)
    x = np.array([[np.inf, 1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(run_emu(model, {"x": x})["y"], run_ort(model, {"x": x})[0])


def test_values_beyond_bf16_range_become_infinity():
    """A documented difference: bf16's largest value is 3.3895e38; float32 values above it round
    to ±inf on the NPU (onnxruntime keeps them), as a value, not an exception."""
    model = one_node_model("Relu", [("x", F32, (1, 4))], [("y", F32, (1, 4))], opset=17)
    x = np.array([[3.4e38, -3.4e38, 3.0e38, 2.0]], np.float32)
    with np.errstate(all="raise"):
        ours = run_emu(model, {"x": x})["y"]
    np.testing.assert_array_equal(ours[0, :2], [np.inf, 0.0])
    assert np.isfinite(ours[0, 2:]).all()
    assert np.isfinite(run_ort(model, {"x": x})[0]).all()
