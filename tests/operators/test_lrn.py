"""LRN (local response normalization across channels) on the emulator against onnxruntime.

onnxruntime's CPU LRN runs only 4-D inputs with an odd ``size``. Other ranks are compared with
onnxruntime's LRN on the same data viewed as ``N x C x prod(D) x 1`` (each position ``d`` is
normalized on its own, so the view changes nothing); even sizes with onnxruntime running the
spec's formula as ONNX ops (squares, a channel-window Conv of ones with the spec's asymmetric
pads, Pow, Div), which is first shown to equal onnxruntime's own LRN wherever that runs.

The NPU rounds ``X`` to bf16 on entry and the result on exit, with float32 arithmetic between, so
it is compared with onnxruntime fed the same bf16-rounded ``X``: at most one bf16 ulp apart.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import one_node_model, random, reference, run_emu

from npudispatch import Session
from npudispatch.operators import registry
from npudispatch.operators.base import Decline
from npudispatch.operators.lrn import lrn_window

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
DEFAULTS = {"alpha": 1e-4, "beta": 0.75, "bias": 1.0}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


def _graph_model(nodes, x_shape, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "lrn_reference",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))],
        list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def ort_lrn_4d(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """onnxruntime's own LRN kernel on ``x`` (any rank >= 2, viewed as 4-D; odd ``size``)."""
    n, c = x.shape[:2]
    x4 = x.reshape(n, c, -1, 1)
    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)
    (y,) = _session(_graph_model([node], x4.shape)).run(None, {"x": x4})
    return y.reshape(x.shape)


def ort_lrn_formula(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """The spec's formula as ONNX ops on onnxruntime, any ``size``: the window sum of squares is
    a Conv of ones over channels, padded ``floor((size-1)/2)`` before, ``ceil((size-1)/2)`` after."""
    n, c = x.shape[:2]
    x4 = x.reshape(n, 1, c, -1)  # channels as the Conv's height
    before = math.floor((size - 1) / 2)
    after = math.ceil((size - 1) / 2)
    inits = [
        numpy_helper.from_array(np.ones((1, 1, size, 1), np.float32), "ones"),
        numpy_helper.from_array(np.float32(alpha / size), "a"),
        numpy_helper.from_array(np.float32(bias), "k"),
        numpy_helper.from_array(np.float32(beta), "b"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Conv", ["sq", "ones"], ["sums"], pads=[before, 0, after, 0]),
        helper.make_node("Mul", ["sums", "a"], ["scaled"]),
        helper.make_node("Add", ["scaled", "k"], ["base"]),
        helper.make_node("Pow", ["base", "b"], ["den"]),
        helper.make_node("Div", ["x", "den"], ["y"]),
    ]
    (y,) = _session(_graph_model(nodes, x4.shape, inits)).run(None, {"x": x4})
    return y.reshape(x.shape)


def onnxruntime_lrn(x: np.ndarray, size: int, **attrs: float) -> np.ndarray:
    """onnxruntime's answer for ``x`` in float32: its LRN kernel where it runs, else the formula."""
    a = DEFAULTS | attrs
    fn = ort_lrn_4d if size % 2 else ort_lrn_formula
    return fn(np.asarray(x, np.float32), size, a["alpha"], a["beta"], a["bias"])


def assert_within_one_bf16_ulp(actual: np.ndarray, expected: np.ndarray) -> None:
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape
    magnitude = np.maximum(np.abs(a), np.abs(e))
    ulp = np.exp2(np.floor(np.log2(np.maximum(magnitude, 1e-30))) - 7)
    worst = float(np.max(np.abs(a - e) / ulp))
    assert worst <= 1.0, f"{worst:.2f} bf16 ulp apart (at most 1 allowed)"


def _bf16_rounded(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(BF16).astype(np.float32)


# name: (shape, size, non-default attributes)
CASES = {
    "4d-size5-defaults": ((1, 8, 5, 7), 5, {}),
    "4d-size3-attrs": ((2, 6, 4, 9), 3, {"alpha": 2.0, "beta": 0.6, "bias": 0.5}),
    "4d-size1": ((1, 4, 3, 8), 1, {"alpha": 3.0, "beta": 1.0, "bias": 1.0}),
    "4d-C-smaller-than-size": ((1, 3, 4, 5), 7, {"alpha": 1.5, "beta": 0.75, "bias": 2.0}),
    "4d-size4-even": ((1, 7, 3, 5), 4, {"alpha": 1.0, "beta": 0.5, "bias": 1.0}),
    "4d-size2-even": ((2, 5, 2, 8), 2, {"alpha": 0.8, "beta": 0.9, "bias": 1.5}),
    "4d-even-C-smaller": ((1, 3, 2, 8), 6, {"alpha": 1.2, "beta": 0.75, "bias": 1.0}),
    "3d-size3": ((2, 6, 10), 3, {"alpha": 1.0, "beta": 0.75, "bias": 1.0}),
    "3d-size4-even": ((2, 9, 11), 4, {"alpha": 0.7, "beta": 0.75, "bias": 2.0}),
    "5d-size5": ((1, 6, 2, 3, 4), 5, {"alpha": 2.5, "beta": 0.4, "bias": 1.0}),
}  # fmt: skip


def test_formula_reference_equals_onnxruntime_lrn() -> None:
    """The formula graph used for even sizes is onnxruntime's LRN wherever that runs."""
    x = random((2, 7, 4, 6), F32, 1)
    for size, attrs in ((1, {}), (3, {"alpha": 2.0, "beta": 0.6}), (5, {"bias": 3.0}), (9, {})):
        a = DEFAULTS | attrs
        want = ort_lrn_4d(x, size, a["alpha"], a["beta"], a["bias"])
        got = ort_lrn_formula(x, size, a["alpha"], a["beta"], a["bias"])
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_window_is_the_spec_window() -> None:
    for size in range(1, 9):
        before, after = lrn_window(size)
        assert (before, after) == (math.floor((size - 1) / 2), math.ceil((size - 1) / 2))
        assert before + after + 1 == size


@pytest.mark.parametrize("case", sorted(CASES))
def test_lrn_matches_onnxruntime(case: str, float_dtype: np.dtype) -> None:
    shape, size, attrs = CASES[case]
    model = one_node_model(
        "LRN", [("X", float_dtype, shape)], [("Y", float_dtype, shape)], size=size, **attrs
    )
    x = random(shape, float_dtype, seed=3, scale=2.0)
    res = run_emu(model, {"X": x})
    assert res["Y"].shape == shape and res["Y"].dtype == float_dtype
    want = onnxruntime_lrn(_bf16_rounded(x), size, **attrs)
    assert_within_one_bf16_ulp(res["Y"], want)
    # The operator's numpy reference (ONNX semantics, float64, stored in the output dtype)
    # agrees with onnxruntime in float32.
    exact = onnxruntime_lrn(np.asarray(x, np.float32), size, **attrs)
    got = np.asarray(reference(res, {"X": x})[0], np.float64)
    rtol = 1e-5 if float_dtype == F32 else 2.0**-8
    np.testing.assert_allclose(got, exact, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("opset", [1, 13])
def test_opset_1_and_13_defaults(opset: int) -> None:
    """Only ``size`` given: alpha 1e-4, beta 0.75, bias 1.0 in both opset versions."""
    shape = (1, 6, 4, 8)
    model = one_node_model("LRN", [("X", F32, shape)], [("Y", F32, shape)], opset=opset, size=3)
    x = random(shape, F32, seed=4, scale=30.0)  # large enough for alpha 1e-4 to matter
    res = run_emu(model, {"X": x})
    want = onnxruntime_lrn(_bf16_rounded(x), 3)
    assert_within_one_bf16_ulp(res["Y"], want)
    assert not np.allclose(want, _bf16_rounded(x), rtol=1e-3)  # the normalization is visible


@pytest.mark.parametrize(("shape", "size"), [((1, 13, 5, 3), 5), ((3, 13), 5), ((2, 9, 7), 4)])
def test_session_with_padding_and_both_precisions(shape: tuple[int, ...], size: int) -> None:
    """Through Session: terminal padding (the last axis rounded up to 8 lanes; for 2-D input
    that is the channel axis, whose padded channels must stay out of every window), bf16
    storage, and float32 compute (--fp32) against onnxruntime to float32 accuracy."""
    attrs = {"alpha": 1.5, "beta": 0.75, "bias": 1.0}
    model = one_node_model("LRN", [("X", F32, shape)], [("Y", F32, shape)], size=size, **attrs)
    x = random(shape, F32, seed=5)
    (bf16_y,) = Session(model, cache=False).run(None, {"X": x})
    assert_within_one_bf16_ulp(bf16_y, onnxruntime_lrn(_bf16_rounded(x), size, **attrs))
    session = Session(model, cache=False, bf16=False)
    (fp32_y,) = session.run(None, {"X": x})
    assert session.last_run_stats.kernel_calls == 1
    want = onnxruntime_lrn(x, size, **attrs)
    np.testing.assert_allclose(fp32_y, want, rtol=1e-5, atol=1e-6)


def test_nan_and_inf_stay_inside_their_windows() -> None:
    """A NaN or inf reaches exactly the channels whose window holds it (the spec; the formula
    graph on onnxruntime agrees). onnxruntime's LRN kernel slides one running sum along the
    channels, so there a NaN also reaches every later channel: a kernel artefact, not LRN."""
    shape = (1, 5, 2, 8)
    x = random(shape, F32, seed=6)
    x[0, 2, 0, 0] = np.nan
    x[0, 0, 1, 3] = np.inf
    model = one_node_model("LRN", [("X", F32, shape)], [("Y", F32, shape)], size=3)
    got = run_emu(model, {"X": x})["Y"]
    want = ort_lrn_formula(_bf16_rounded(x), 3, **DEFAULTS)
    # channels 1-3 at the NaN; the inf's own channel (inf / inf), while channel 1 there is 0
    assert np.isnan(want).sum() == 4 and want[0, 1, 1, 3] == 0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    kernel = ort_lrn_4d(_bf16_rounded(x), 3, **DEFAULTS)
    assert (np.isnan(kernel) >= np.isnan(got)).all() and np.isnan(kernel)[0, 4, 0, 0]
    finite = np.isfinite(want)
    assert_within_one_bf16_ulp(got[finite], want[finite])


def _lrn_node(dtype: int, shape: list[int], **attrs) -> ir.Node:
    graph = helper.make_graph(
        [helper.make_node("LRN", ["x"], ["y"], name="norm1", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ir.from_proto(model).graph[0]


@pytest.mark.parametrize(
    ("dtype", "shape", "attrs", "reason"),
    [
        (
            TensorProto.FLOAT16,
            [1, 4, 3, 3],
            {"size": 3},
            "LRN node 'norm1': dtype float16 not supported (float32 or bfloat16 only)",
        ),
        (
            TensorProto.DOUBLE,
            [1, 4, 3, 3],
            {"size": 3},
            "LRN node 'norm1': dtype float64 not supported (float32 or bfloat16 only)",
        ),
        (
            TensorProto.FLOAT,
            [1, 4, 3, 3],
            {},
            "LRN node 'norm1': the required attribute 'size' is missing",
        ),
        (
            TensorProto.FLOAT,
            [1, 4, 3, 3],
            {"size": 0},
            "LRN node 'norm1': size 0 is not a positive channel count",
        ),
        (
            TensorProto.FLOAT,
            [8],
            {"size": 3},
            "LRN node 'norm1': X has rank 1; LRN normalizes across axis 1 of N x C x ...",
        ),
    ],
    ids=["float16", "double", "no-size", "size-0", "rank-1"],
)
def test_declines_with_a_precise_reason(dtype, shape, attrs, reason) -> None:
    got = registry.match(_lrn_node(dtype, shape, **attrs))
    assert isinstance(got, Decline)
    assert got.reason == reason
