"""Add/Sub/Mul/Div/Max/Min/Where on the emulator vs the numpy reference and onnxruntime (bf16 tolerances: opkit)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import (
    BF16,
    ONNX_TYPE,
    assert_close,
    one_node_model,
    random,
    reference,
    run_emu,
    run_ort,
    to_float32_model,
)

from npudispatch import Session
from npudispatch.operators import registry
from npudispatch.operators.base import Decline

SHAPES = [
    ((1, 11008), (1, 11008)),  # llama2 MLP Mul
    ((3, 1, 37), (1, 1, 37)),  # broadcast [1,1,N] with [M,1,N], N not a tile multiple
    ((1, 1, 37), (3, 1, 37)),
    ((5, 7), ()),  # scalar
    ((1,), (4, 3, 1)),  # rank change, size-1 axes
    ((2, 3, 4, 5), (3, 1, 5)),
]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize(("sa", "sb"), SHAPES)
def test_binary_matches_reference_and_ort(op, sa, sb, float_dtype):
    out = np.broadcast_shapes(sa, sb)
    model = one_node_model(
        op, [("a", float_dtype, sa), ("b", float_dtype, sb)], [("y", float_dtype, out)]
    )
    feeds = {"a": random(sa, float_dtype, 1), "b": random(sb, float_dtype, 2)}
    if op == "Div":  # keep the divisor away from 0 so the relative tolerance is meaningful
        feeds["b"] = (np.abs(feeds["b"].astype(np.float32)) + 0.5).astype(float_dtype)
    res = run_emu(model, feeds)
    y = res["y"]
    assert y.dtype == float_dtype and y.shape == out
    assert_close(y, reference(res, feeds)[0])
    assert_close(y, run_ort(model, feeds)[0])


def test_constant_operand_goes_to_const_region(float_dtype):
    bias = random((1, 1, 24), float_dtype, 5)
    model = one_node_model(
        "Add",
        [("a", float_dtype, (4, 1, 24)), ("bias", float_dtype, (1, 1, 24))],
        [("y", float_dtype, (4, 1, 24))],
        initializers={"bias": bias},
    )
    feeds = {"a": random((4, 1, 24), float_dtype, 6)}
    res = run_emu(model, feeds)
    kinds = [a.kind.name for a in res.prepared.args]
    assert kinds == ["INPUT", "CONST", "OUTPUT", "PARAMS"]
    assert_close(res["y"], run_ort(model, feeds)[0])


def test_llama2_mul_stripes_over_all_output_channels():
    model = one_node_model(
        "Mul", [("a", BF16, (1, 11008)), ("b", BF16, (1, 11008))], [("y", BF16, (1, 11008))]
    )
    feeds = {"a": random((1, 11008), BF16, 1), "b": random((1, 11008), BF16, 2)}
    res = run_emu(model, feeds)
    s2mm = {str(c): n for c, n in res.stats.bytes_by_channel.items() if "S2MM" in str(c)}
    assert sorted(s2mm.values()) == [2752] * 8  # 22,016 B over 8 channels, like AMD's silu/elwmul
    assert_close(res["y"], run_ort(model, feeds)[0])


# ---- Max, Min, Where -----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize(("sa", "sb"), SHAPES)
def test_max_min_match_reference_and_ort(op, sa, sb, float_dtype):
    out = np.broadcast_shapes(sa, sb)
    model = one_node_model(
        op, [("a", float_dtype, sa), ("b", float_dtype, sb)], [("y", float_dtype, out)]
    )
    feeds = {"a": random(sa, float_dtype, 3), "b": random(sb, float_dtype, 4)}
    res = run_emu(model, feeds)
    assert res["y"].dtype == float_dtype and res["y"].shape == out
    assert_close(res["y"], reference(res, feeds)[0])
    assert_close(res["y"], run_ort(model, feeds)[0])


def test_max_min_pick_operands_exactly():
    a = np.array([[1.0, -2.0, 3.0, np.nan]], np.float32)
    b = np.array([[0.5, -1.0, 3.0, 1.0]], np.float32)
    for op, want in (("Max", [1.0, -1.0, 3.0, np.nan]), ("Min", [0.5, -2.0, 3.0, np.nan])):
        m = one_node_model(
            op, [("a", np.float32, (1, 4)), ("b", np.float32, (1, 4))], [("y", np.float32, (1, 4))]
        )
        np.testing.assert_array_equal(run_emu(m, {"a": a, "b": b})["y"], [want])


def test_max_with_three_inputs_declines():
    m = one_node_model(
        "Max",
        [("a", np.float32, (4,)), ("b", np.float32, (4,)), ("c", np.float32, (4,))],
        [("y", np.float32, (4,))],
    )
    (node,) = list(ir.from_proto(m).graph)
    got = registry.match(node)
    assert isinstance(got, Decline) and "expects 2..2 inputs, got 3" in got.reason


def where_model(sc, sx, sy, dtype, inits=None) -> onnx.ModelProto:
    """Where(c: bool, x, y) with optional initializers."""
    inits = inits or {}
    t = ONNX_TYPE[np.dtype(dtype)]
    out = np.broadcast_shapes(sc, sx, sy)
    types = {"c": (TensorProto.BOOL, sc), "x": (t, sx), "y": (t, sy)}
    g = helper.make_graph(
        [helper.make_node("Where", ["c", "x", "y"], ["z"], name="where_0")],
        "g",
        [helper.make_tensor_value_info(k, *v) for k, v in types.items() if k not in inits],
        [helper.make_tensor_value_info("z", t, out)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _ort_where(model, feeds):
    m = to_float32_model(model)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    cast = {k: v if v.dtype == bool else np.asarray(v).astype(np.float32) for k, v in feeds.items()}
    return sess.run(None, cast)[0]


WHERE_SHAPES = [
    ((2, 9), (2, 9), (2, 9)),
    ((1, 1, 13), (3, 1, 13), ()),  # causal-mask style: scalar fill value
    ((4, 1), (1, 6), (4, 6)),
    ((5,), (3, 1), (1,)),
]


@pytest.mark.parametrize(("sc", "sx", "sy"), WHERE_SHAPES)
def test_where_matches_reference_and_ort(sc, sx, sy, float_dtype):
    rng = np.random.default_rng(7)
    feeds = {
        "c": rng.random(sc) < 0.5,
        "x": random(sx, float_dtype, 8),
        "y": random(sy, float_dtype, 9),
    }
    model = where_model(sc, sx, sy, float_dtype)
    res = run_emu(model, feeds)
    assert res["z"].dtype == float_dtype
    assert_close(res["z"], reference(res, feeds)[0])
    assert_close(res["z"], _ort_where(model, feeds))
    # inputs are bf16-exact only for bf16; the selection itself is exact either way
    picked = np.where(feeds["c"], feeds["x"], feeds["y"]).astype(BF16).astype(float_dtype)
    np.testing.assert_array_equal(res["z"], picked)


def test_where_constant_mask_and_fill_go_to_the_const_region():
    mask = np.tril(np.ones((6, 6), bool))
    fill = np.array(-1e4, np.float32)
    model = where_model((6, 6), (2, 6, 6), (), np.float32, {"c": mask, "y": fill})
    x = random((2, 6, 6), np.float32, 3)
    res = run_emu(model, {"x": x})
    assert [a.kind.name for a in res.prepared.args] == ["INPUT", "CONST", "OUTPUT", "PARAMS"]
    want = np.where(mask, x, fill).astype(BF16).astype(np.float32)  # -1e4 -> bf16 -9984
    np.testing.assert_array_equal(res["z"], want)


def test_where_declines_with_reasons():
    def reason(model):
        (node,) = list(ir.from_proto(model).graph)
        got = registry.match(node)
        assert isinstance(got, Decline)
        return got.reason

    both = where_model(
        (2,),
        (2,),
        (2,),
        np.float32,
        {"c": np.ones(2, bool), "x": np.ones(2, np.float32), "y": np.zeros(2, np.float32)},
    )
    assert "every input is constant" in reason(both)
    mixed = where_model((2,), (2,), (2,), np.float32)
    mixed.graph.input[2].type.tensor_type.elem_type = TensorProto.BFLOAT16
    assert "X/Y/output dtypes" in reason(mixed)
    notbool = where_model((2,), (2,), (2,), np.float32)
    notbool.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    assert "condition dtype float32 is not bool" in reason(notbool)


def test_where_with_a_bool_graph_input_through_a_session():
    """A bool tensor crosses the copy-in, the condition is padded with False along x's last axis."""
    model = where_model((3, 11), (3, 11), (), np.float32, {"y": np.array(0.0, np.float32)})
    session = Session(model, fallback=None)
    assert [p.kind for p in session.compiled.partitions] == ["npu"]
    rng = np.random.default_rng(2)
    feeds = {"c": rng.random((3, 11)) < 0.5, "x": random((3, 11), np.float32, 1)}
    (z,) = session.run(None, feeds)
    assert_close(z, _ort_where(model, feeds))
