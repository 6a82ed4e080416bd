"""Sigmoid, npudispatch.Silu / Gelu and ONNX Gelu-20 vs reference and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from opkit import (
    ONNX_TYPE,
    assert_close,
    one_node_model,
    random,
    reference,
    run_emu,
    run_ort,
)

SHAPES = [(1, 11008), (1, 1), (3, 5, 7), (13,)]


def _standard_model(body: list[onnx.NodeProto], dtype, shape) -> onnx.ModelProto:
    t = ONNX_TYPE[np.dtype(dtype)]
    g = helper.make_graph(
        body,
        "g",
        [helper.make_tensor_value_info("x", t, list(shape))],
        [helper.make_tensor_value_info("y", t, list(shape))],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


@pytest.mark.parametrize("shape", SHAPES)
def test_sigmoid(shape, float_dtype):
    model = one_node_model("Sigmoid", [("x", float_dtype, shape)], [("y", float_dtype, shape)])
    feeds = {"x": random(shape, float_dtype, 3, scale=4.0)}
    res = run_emu(model, feeds)
    assert_close(res["y"], reference(res, feeds)[0])
    assert_close(res["y"], run_ort(model, feeds)[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_silu_vs_x_times_sigmoid(shape, float_dtype):
    model = one_node_model(
        "Silu", [("x", float_dtype, shape)], [("y", float_dtype, shape)], domain="npudispatch"
    )
    feeds = {"x": random(shape, float_dtype, 4, scale=4.0)}
    res = run_emu(model, feeds)
    std = _standard_model(
        [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
        float_dtype,
        shape,
    )
    assert_close(res["y"], reference(res, feeds)[0])
    assert_close(res["y"], run_ort(std, feeds)[0])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("domain", ["", "npudispatch"])
@pytest.mark.parametrize("shape", [(1, 3072), (2, 3, 5)])
def test_gelu(approximate, domain, shape, float_dtype):
    model = one_node_model(
        "Gelu",
        [("x", float_dtype, shape)],
        [("y", float_dtype, shape)],
        domain=domain,
        approximate=approximate,
    )
    feeds = {"x": random(shape, float_dtype, 5, scale=3.0)}
    res = run_emu(model, feeds)
    std = _standard_model(
        [helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)], float_dtype, shape
    )
    assert_close(res["y"], reference(res, feeds)[0])
    assert_close(res["y"], run_ort(std, feeds)[0])


def test_gelu_tanh_and_erf_differ_in_the_kernel():
    """The record's approximate flag reaches the kernel (the two results are not identical)."""
    shape = (1, 64)
    feeds = {"x": np.linspace(-3, 3, 64, dtype=np.float32).reshape(shape)}
    outs = [
        run_emu(
            one_node_model(
                "Gelu",
                [("x", np.float32, shape)],
                [("y", np.float32, shape)],
                approximate=a,
            ),
            feeds,
        )["y"]
        for a in ("none", "tanh")
    ]
    assert not np.array_equal(outs[0], outs[1])
