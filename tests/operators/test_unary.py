"""Unary float ops (Relu ... Softplus, Pow with a constant exponent) vs reference and onnxruntime,
the vectorized erf, and a RoPE + decomposed-RMSNorm block compiled into one NPU partition."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import BF16, assert_close, one_node_model, random, reference, run_emu, run_ort

import npudispatch
from npudispatch.operators import registry
from npudispatch.operators.base import REAL_SHAPE_KEY, Decline, OpConfig
from npudispatch.operators.unary import erf

SHAPES = [(1, 64), (3, 5, 7), (13,)]


def _exact(shape, dtype, seed, scale=2.0):
    """bf16-representable inputs: the kernel's input rounding is then exact, so a float32 run is
    compared on what it computes (sin(3.01) vs sin(3.0) would otherwise dominate the error)."""
    return random(shape, BF16, seed, scale).astype(dtype)


def _positive(shape, dtype, seed):
    return (np.abs(_exact(shape, np.float32, seed)) + 0.25).astype(BF16).astype(dtype)


# op type -> input generator: (shape, dtype, seed) -> array inside the op's domain
DOMAINS = {
    "Relu": _exact,
    "Neg": _exact,
    "Abs": _exact,
    "Exp": lambda s, d, k: _exact(s, d, k, scale=1.5),
    "Log": _positive,
    "Tanh": _exact,
    "Erf": _exact,
    "Sqrt": _positive,
    "Reciprocal": _positive,
    "Sin": lambda s, d, k: _exact(s, d, k, scale=3.0),
    "Cos": lambda s, d, k: _exact(s, d, k, scale=3.0),
    "Softplus": lambda s, d, k: _exact(s, d, k, scale=4.0),
}


def test_erf_matches_math_erf_on_a_dense_grid():
    x = np.linspace(-6.0, 6.0, 200_001)
    want = np.array([math.erf(v) for v in x])
    got = erf(x)
    assert got.dtype == np.float64 and got.shape == x.shape
    assert np.max(np.abs(got - want)) < 2e-7  # far below bf16 resolution (~4e-3 relative)
    np.testing.assert_array_equal(erf(-x), -got)  # exactly odd
    assert np.all(np.abs(got) <= 1.0)


@pytest.mark.parametrize("op", sorted(DOMAINS))
@pytest.mark.parametrize("shape", SHAPES)
def test_unary_matches_reference_and_ort(op, shape, float_dtype):
    model = one_node_model(op, [("x", float_dtype, shape)], [("y", float_dtype, shape)])
    feeds = {"x": DOMAINS[op](shape, float_dtype, len(op))}
    res = run_emu(model, feeds)
    assert res["y"].dtype == float_dtype and res["y"].shape == shape
    assert_close(res["y"], reference(res, feeds)[0])
    assert_close(res["y"], run_ort(model, feeds)[0])


def test_ops_are_not_identity():
    """Each kernel really computes its own function (not a copy or another op's)."""
    x = np.linspace(0.3, 2.0, 16, dtype=np.float32).reshape(1, 16)
    outs = {
        op: run_emu(
            one_node_model(op, [("x", np.float32, x.shape)], [("y", np.float32, x.shape)]), {"x": x}
        )["y"]
        for op in ("Exp", "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Tanh", "Erf", "Softplus")
    }
    flat = [o.tobytes() for o in outs.values()]
    assert len(set(flat)) == len(flat)
    assert not any(np.array_equal(o, x) for o in outs.values())


def test_ieee_edge_values_match_ort():
    x = np.array([[0.0, -1.0, 1e-30, 80.0, -100.0, 2.0, 0.5, 4.0]], np.float32)
    for op in ("Log", "Sqrt", "Reciprocal", "Exp", "Softplus"):
        model = one_node_model(op, [("x", np.float32, x.shape)], [("y", np.float32, x.shape)])
        got = run_emu(model, {"x": x})["y"]
        want = run_ort(model, {"x": x})[0]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=op)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=op)
        ok = np.isfinite(want)
        assert_close(got[ok], want[ok])


def _pow_model(shape, dtype, exponent):
    return one_node_model(
        "Pow",
        [("x", dtype, shape), ("c", dtype, np.shape(exponent))],
        [("y", dtype, shape)],
        initializers={"c": exponent},
    )


@pytest.mark.parametrize(
    "exponent",
    [
        np.float32(2.0),
        np.float32(0.5),
        np.float32(3.0),
        np.float32(-1.0),
        np.float32(-0.5),
        np.float32(1.7),
        np.array([2.0], np.float32),
        np.int64(3),
    ],
    ids=lambda e: f"{np.asarray(e).dtype}{np.asarray(e).shape}={float(np.asarray(e).ravel()[0])}",
)
def test_pow_constant_exponent(exponent, float_dtype):
    shape = (3, 13)
    c = float(np.asarray(exponent).ravel()[0])
    x = _exact(shape, float_dtype, 9) if c == int(c) and c > 0 else _positive(shape, float_dtype, 9)
    model = _pow_model(shape, float_dtype, np.asarray(exponent))
    res = run_emu(model, {"x": x})
    cfg = res.prepared.cfg
    assert cfg.operator.op_floats(cfg) == [c]
    assert [a.kind.name for a in res.prepared.args] == ["INPUT", "OUTPUT", "PARAMS"]
    assert_close(res["y"], reference(res, {"x": x, "c": np.asarray(exponent)})[0])
    assert_close(res["y"], run_ort(model, {"x": x})[0])


def test_pow_negative_base_fractional_exponent_is_nan_like_ort():
    x = np.array([[-2.0, 4.0, -0.0, 9.0]], np.float32)
    model = _pow_model(x.shape, np.float32, np.float32(0.5))
    got, want = run_emu(model, {"x": x})["y"], run_ort(model, {"x": x})[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert_close(got[~np.isnan(want)], want[~np.isnan(want)])


def _match(model: onnx.ModelProto) -> OpConfig | Decline:
    (node,) = list(ir.from_proto(model).graph)
    return registry.match(node)


def test_pow_declines_runtime_and_vector_exponents():
    runtime = one_node_model(
        "Pow",
        [("x", np.float32, (2, 8)), ("c", np.float32, ())],
        [("y", np.float32, (2, 8))],
    )
    got = _match(runtime)
    assert isinstance(got, Decline) and "exponent 'c' is not a constant" in got.reason
    vector = _pow_model((2, 8), np.float32, np.full((8,), 2.0, np.float32))
    got = _match(vector)
    assert isinstance(got, Decline) and "only a scalar exponent" in got.reason


def test_unary_declines_shape_change_and_int_dtype():
    bad = one_node_model("Exp", [("x", np.float32, (2, 8))], [("y", np.float32, (2, 4))])
    got = _match(bad)
    assert isinstance(got, Decline) and "differs from input" in got.reason
    g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"], name="neg_i")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT32, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4])],
    )
    got = _match(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]))
    assert isinstance(got, Decline) and "float32 or bfloat16 only" in got.reason


def test_unary_ties_every_axis_and_pads_the_last():
    model = one_node_model("Exp", [("x", np.float32, (3, 5, 7))], [("y", np.float32, (3, 5, 7))])
    cfg = _match(model)
    assert isinstance(cfg, OpConfig)
    g = cfg.operator.granularity(cfg)
    assert g.inputs == ((1, 1, 8),) and g.outputs == ((1, 1, 8),)
    assert set(g.tied) == {(("in", 0, a), ("out", 0, a)) for a in range(3)}


def test_padded_lanes_are_zeroed_through_a_session():
    """Exp(0) = 1 and Log(0) = -inf in padded lanes never reach the user or the next op."""
    model = _graph(
        [
            helper.make_node("Exp", ["x"], ["e"]),
            helper.make_node("Log", ["e"], ["l"]),
            helper.make_node("Cos", ["l"], ["y"]),
        ],
        {"x": [2, 11]},
        {"y": [2, 11]},
        {},
    )
    session = npudispatch.Session(model, fallback=None)
    x = random((2, 11), np.float32, 2)
    (y,) = session.run(None, {"x": x})
    assert_close(y, run_ort(model, {"x": x})[0])
    e = next(n for n in session.compiled.model.graph if n.op_type == "Exp").outputs[0]
    assert e.metadata_props.get(REAL_SHAPE_KEY) == "2,11" and list(e.shape) == [2, 16]


# ---- RoPE + decomposed RMSNorm end to end ------------------------------------------------------


def _graph(nodes, inputs, outputs, inits, opset=18) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, f, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(k, f, s) for k, s in outputs.items()],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def rope_rmsnorm_block(seq: int = 6, dim: int = 24) -> onnx.ModelProto:
    """HF-style rotate_half RoPE with sin/cos computed from positions, then an RMSNorm whose
    normalised tensor is also an output (so the rewriter must leave it decomposed)."""
    half = dim // 2
    i64 = np.int64
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    inits = {
        "freqs": np.outer(np.arange(seq), np.concatenate([inv_freq, inv_freq]))
        .astype(np.float32)
        .reshape(1, seq, dim),
        "zero": np.array([0], i64),
        "mid": np.array([half], i64),
        "end": np.array([dim], i64),
        "last": np.array([-1], i64),
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-6, np.float32),
        "w": np.linspace(0.5, 1.5, dim, dtype=np.float32),
    }
    n = helper.make_node
    nodes = [
        n("Mul", ["t", "freqs"], ["angles"]),  # t: a per-position time scale (run-time input)
        n("Cos", ["angles"], ["cos"]),
        n("Sin", ["angles"], ["sin"]),
        n("Slice", ["x", "zero", "mid", "last"], ["x1"]),
        n("Slice", ["x", "mid", "end", "last"], ["x2"]),
        n("Neg", ["x2"], ["nx2"]),
        n("Concat", ["nx2", "x1"], ["rot"], axis=-1),
        n("Mul", ["x", "cos"], ["xc"]),
        n("Mul", ["rot", "sin"], ["rs"]),
        n("Add", ["xc", "rs"], ["q"]),
        n("Pow", ["q", "two"], ["q2"]),
        n("ReduceMean", ["q2", "last"], ["ms"], keepdims=1),
        n("Add", ["ms", "eps"], ["d"]),
        n("Sqrt", ["d"], ["s"]),
        n("Reciprocal", ["s"], ["r"]),
        n("Mul", ["q", "r"], ["normed"]),
        n("Mul", ["normed", "w"], ["y"]),
    ]
    return _graph(
        nodes,
        {"x": [1, seq, dim], "t": [1, seq, 1]},
        {"y": [1, seq, dim], "normed": [1, seq, dim]},
        inits,
    )


def test_rope_and_unfused_rmsnorm_run_as_one_npu_partition():
    model = rope_rmsnorm_block()
    compiled = npudispatch.compile_model(model)
    assert [p.kind for p in compiled.partitions] == ["npu"], compiled.report.unsupported
    ops = {node.op_type for node in compiled.model.graph}
    assert {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Neg", "Sin", "Cos"} <= ops
    session = npudispatch.Session(compiled, fallback=None)
    rng = np.random.default_rng(3)
    feeds = {
        "x": rng.standard_normal((1, 6, 24)).astype(np.float32),
        "t": rng.uniform(0.5, 1.5, (1, 6, 1)).astype(np.float32),
    }
    got = session.run(None, feeds)
    assert session.last_run_stats.kernel_calls == 1
    for g, w in zip(got, run_ort(model, feeds)):
        assert_close(g, w, rtol=3e-2, scale=3e-2)
