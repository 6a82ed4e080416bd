"""Softmax, LayerNormalization, SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from opkit import ONNX_TYPE, assert_close, one_node_model, random, reference, run_emu, run_ort


@pytest.mark.parametrize(
    ("shape", "axis"), [((1, 11008), -1), ((2, 3, 37), 1), ((4, 5), 0), ((7,), 0)]
)
def test_softmax(shape, axis, float_dtype):
    model = one_node_model(
        "Softmax", [("x", float_dtype, shape)], [("y", float_dtype, shape)], axis=axis
    )
    feeds = {"x": random(shape, float_dtype, 7, scale=3.0)}
    res = run_emu(model, feeds)
    assert_close(res["y"], reference(res, feeds)[0], scale=2e-3)
    assert_close(res["y"], run_ort(model, feeds)[0], scale=2e-3)


@pytest.mark.parametrize(("shape", "axis"), [((1, 4096), -1), ((3, 2, 37), -1), ((2, 3, 8), 1)])
def test_layer_norm(shape, axis, float_dtype):
    row = shape[axis % len(shape) :]
    scale, bias = random(row, float_dtype, 8), random(row, float_dtype, 9)
    model = one_node_model(
        "LayerNormalization",
        [("x", float_dtype, shape), ("scale", float_dtype, row), ("bias", float_dtype, row)],
        [("y", float_dtype, shape)],
        initializers={"scale": scale, "bias": bias},
        axis=axis,
        epsilon=1e-5,
    )
    feeds = {"x": random(shape, float_dtype, 10)}
    res = run_emu(model, feeds)
    ort_y = run_ort(model, feeds)[0]
    assert_close(res["y"], reference(res, feeds)[0], scale=3e-2)
    assert_close(res["y"], ort_y, scale=3e-2)


def test_layer_norm_mean_and_inv_std_outputs():
    shape = (3, 16)
    model = one_node_model(
        "LayerNormalization",
        [("x", np.float32, shape), ("scale", np.float32, (16,))],
        [("y", np.float32, shape), ("mean", np.float32, (3, 1)), ("istd", np.float32, (3, 1))],
        initializers={"scale": np.ones(16, np.float32)},
    )
    feeds = {"x": random(shape, np.float32, 11) + 3.0}
    res = run_emu(model, feeds)
    for got, want in zip([res["y"], res["mean"], res["istd"]], run_ort(model, feeds)):
        assert_close(got, want, scale=2e-2)


@pytest.mark.parametrize("shape", [(1, 4096), (2, 5, 24), (1, 1, 37)])
def test_simplified_layer_norm(shape, float_dtype):
    scale = random(shape[-1:], float_dtype, 12)
    model = one_node_model(
        "SimplifiedLayerNormalization",
        [("x", float_dtype, shape), ("scale", float_dtype, shape[-1:])],
        [("y", float_dtype, shape)],
        initializers={"scale": scale},
        epsilon=1e-6,
    )
    feeds = {"x": random(shape, float_dtype, 13)}
    res = run_emu(model, feeds)
    assert_close(res["y"], reference(res, feeds)[0], scale=3e-2)
    assert_close(res["y"], run_ort(model, feeds)[0], scale=3e-2)


@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 3, 40)])
def test_skip_simplified_layer_norm(shape, float_dtype):
    """ORT-fused form: outputs (output, '', '', input_skip_bias_sum)."""
    hidden = shape[-1]
    gamma = random((hidden,), float_dtype, 14)
    model = one_node_model(
        "SkipSimplifiedLayerNormalization",
        [
            ("x", float_dtype, shape),
            ("skip", float_dtype, shape),
            ("gamma", float_dtype, (hidden,)),
        ],
        [("y", float_dtype, shape)],
        domain="com.microsoft",
        initializers={"gamma": gamma},
        epsilon=1e-6,
    )
    # add the optional outputs the way ORT's fusion writes them
    node = model.graph.node[0]
    node.output.extend(["", "", "sum"])
    model.graph.output.append(
        helper.make_tensor_value_info("sum", ONNX_TYPE[float_dtype], list(shape))
    )
    feeds = {"x": random(shape, float_dtype, 15), "skip": random(shape, float_dtype, 16)}
    res = run_emu(model, feeds)
    ort_y, ort_sum = run_ort(model, feeds)
    assert_close(res["y"], ort_y, scale=3e-2)
    assert_close(res["sum"], ort_sum)
    ref = reference(res, feeds)
    assert_close(res["y"], ref[0], scale=3e-2)
