"""ReduceMean/Sum/Max/Min over the last axis vs reference and onnxruntime; axes as attribute or
input; declines; padded rows through the padding pass and a Session."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import BF16, assert_close, one_node_model, random, reference, run_emu, run_ort

import npudispatch
from npudispatch.operators import registry
from npudispatch.operators.base import REAL_SHAPE_KEY, Decline, OpConfig
from npudispatch.operators.reduce import reduced_shape

OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"]
AXES_INPUT_SINCE = {"ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18}


def reduce_model(
    op: str, shape, axes, keepdims: int, dtype, *, opset: int = 18, **attrs
) -> onnx.ModelProto:
    """One reduction with ``axes`` as an input (opset >= AXES_INPUT_SINCE) or an attribute."""
    norm = (
        tuple(sorted(a % len(shape) for a in axes))
        if axes is not None
        else tuple(range(len(shape)))
    )
    out = reduced_shape(tuple(shape), norm, bool(keepdims))
    if axes is not None and opset >= AXES_INPUT_SINCE[op]:
        return one_node_model(
            op,
            [("x", dtype, shape), ("axes", np.int64, (len(axes),))],
            [("y", dtype, out)],
            initializers={"axes": np.array(axes, np.int64)},
            opset=opset,
            keepdims=keepdims,
            **attrs,
        )
    if axes is not None:
        attrs["axes"] = list(axes)
    return one_node_model(
        op, [("x", dtype, shape)], [("y", dtype, out)], opset=opset, keepdims=keepdims, **attrs
    )


def _check(model, x):
    res = run_emu(model, {"x": x})
    ref = reference(res, {"x": x, "axes": None})[0]
    assert res["y"].shape == ref.shape and res["y"].dtype == x.dtype
    assert_close(res["y"], ref)
    assert_close(res["y"], run_ort(model, {"x": x})[0])
    return res


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("shape", [(1, 4096), (3, 5, 37), (11,), (2, 3, 4, 9)])
def test_last_axis_matches_reference_and_ort(op, keepdims, shape, float_dtype):
    x = random(shape, float_dtype, len(shape) + keepdims)
    _check(reduce_model(op, shape, [-1], keepdims, float_dtype), x)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_axes_attribute_or_input_by_opset(op, opset):
    x = random((4, 21), np.float32, 7)
    res = _check(reduce_model(op, (4, 21), [1], 1, np.float32, opset=opset), x)
    # the axes input (when any) is folded into the record, never streamed
    assert [a.kind.name for a in res.prepared.args] == ["INPUT", "OUTPUT", "PARAMS"]


@pytest.mark.parametrize("keepdims", [0, 1])
def test_default_axes_reduce_everything_when_other_axes_are_size_one(keepdims):
    x = random((1, 1, 40), np.float32, 8)
    _check(reduce_model("ReduceMean", (1, 1, 40), None, keepdims, np.float32), x)
    _check(reduce_model("ReduceSum", (1, 1, 40), [0, 2], keepdims, np.float32), x)


def test_the_kernel_really_reduces_differently_per_op():
    x = np.arange(1, 17, dtype=np.float32).reshape(2, 8)
    got = {op: run_emu(reduce_model(op, (2, 8), [-1], 0, np.float32), {"x": x})["y"] for op in OPS}
    np.testing.assert_array_equal(got["ReduceSum"], [36, 100])
    np.testing.assert_array_equal(got["ReduceMean"], [4.5, 12.5])
    np.testing.assert_array_equal(got["ReduceMax"], [8, 16])
    np.testing.assert_array_equal(got["ReduceMin"], [1, 9])


def _decline(model: onnx.ModelProto) -> str:
    (node,) = list(ir.from_proto(model).graph)
    got = registry.match(node)
    assert isinstance(got, Decline), got
    return got.reason


def test_declines_with_reasons():
    f32 = np.float32
    assert "not the last axis" in _decline(reduce_model("ReduceMean", (4, 8), [0], 1, f32))
    assert "also reduces axis 0 (size 4)" in _decline(
        reduce_model("ReduceMax", (4, 8), [0, 1], 0, f32)
    )
    assert "identity" in _decline(
        reduce_model("ReduceSum", (4, 8), None, 1, f32, noop_with_empty_axes=1)
    )
    assert "out of range" in _decline(reduce_model("ReduceMin", (4, 8), [5], 1, f32, opset=11))
    runtime = one_node_model(
        "ReduceSum",
        [("x", f32, (4, 8)), ("axes", f32, (1,))],  # a graph input: not known at compile time
        [("y", f32, (4, 1))],
    )
    runtime.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    assert "axes input 'axes' is not a constant" in _decline(runtime)


def test_granularity_ties_kept_axes_only():
    cfg = registry.match(
        next(iter(ir.from_proto(reduce_model("ReduceSum", (3, 5, 7), [-1], 0, np.float32)).graph))
    )
    assert isinstance(cfg, OpConfig)
    g = cfg.operator.granularity(cfg)
    assert g.inputs[0] == (1, 1, 8) and g.outputs == ((1, 1),)
    assert g.tied == ((("in", 0, 0), ("out", 0, 0)), (("in", 0, 1), ("out", 0, 1)))


def _graph(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, f, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(k, f, s) for k, s in outputs.items()],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_padded_lanes_never_count(keepdims):
    """Last dim 11 is padded to 16 with zeros: all-negative rows would get max 0 and the mean
    would be divided by 16 if the kernel looked at the padded lanes."""
    red = [3, 1] if keepdims else [3]
    inits = {"shift": np.full((1, 11), -5.0, np.float32), "axes": np.array([-1], np.int64)}
    nodes = [helper.make_node("Add", ["x", "shift"], ["h"])] + [
        helper.make_node(op, ["h", "axes"], [op], keepdims=keepdims) for op in OPS
    ]
    model = _graph(nodes, {"x": [3, 11]}, {op: red for op in OPS}, inits)
    session = npudispatch.Session(model, fallback=None)
    assert [p.kind for p in session.compiled.partitions] == ["npu"]
    h = next(n for n in session.compiled.model.graph if n.op_type == "Add").outputs[0]
    assert h.metadata_props.get(REAL_SHAPE_KEY) == "3,11" and list(h.shape) == [3, 16]
    x = np.random.default_rng(5).uniform(-1, 1, (3, 11)).astype(np.float32)
    got = session.run(None, {"x": x})
    want = run_ort(model, {"x": x})
    for op, g, w in zip(OPS, got, want):
        assert g.shape == w.shape, op
        assert_close(g, w)
    assert np.all(got[OPS.index("ReduceMax")] < -3.0)


def test_bf16_sum_accumulates_in_float32():
    """A long bf16 row: the sum of 4096 values must not drift like a bf16 accumulator would."""
    x = np.full((1, 4096), 0.01, BF16)
    got = run_emu(reduce_model("ReduceSum", (1, 4096), [-1], 1, BF16), {"x": x})["y"]
    assert abs(float(got[0, 0]) - 4096 * float(x[0, 0])) < 0.5
