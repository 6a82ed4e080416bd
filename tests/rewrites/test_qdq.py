"""QDQ rewrites (npudispatch.rewrites.qdq): one positive and one negative case per step.

Positive cases also run end to end (Session on the emulator vs onnxruntime on the original
model): a rewrite that changed the math would show up as more than one quantization step.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from rw_helpers import model, ops

import npudispatch
from npudispatch import graph
from npudispatch.rewrites import default_pipeline
from npudispatch.rewrites.qdq import run_qdq_rewrites

P = "npudispatch."

# Activation x: uint8 scale 0.05 zp 128; a second parameter set q2 for requantization.
PARAMS = """<float xs = {0.05}, uint8 xz = {128}, float ys = {0.1}, uint8 yz = {120},
    float q2s = {0.07}, uint8 q2z = {100}, float one = {1.0}, float half = {0.5}"""


def qdq_model(body: str, inputs: str = "float[2,4,8] x", outputs: str = "float[2,4,8] out",
              extra: str = "", opset_version: int = 21) -> ir.Model:  # fmt: skip
    inits = PARAMS + (", " + extra if extra else "") + ">"
    return model(f"g ({inputs}) => ({outputs}) {inits} {{\n{body}\n}}", opset_version)


def ort_plain(m: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.to_proto(m).SerializeToString()
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def run_both(m: ir.Model, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(NPU result, onnxruntime result, kernel calls) for the model's first output."""
    want = ort_plain(m, feeds)[0]
    proto = ir.to_proto(m)
    sess = npudispatch.Session(proto)
    got = sess.run(None, feeds)[0]
    return got, want, sess.last_run_stats.kernel_calls


def x_feed(shape=(2, 4, 8), seed=0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).uniform(-6, 6, shape).astype(np.float32)}


def rewritten(m: ir.Model):
    """A shape-inferred copy of ``m`` after the QDQ rewrites, and their report."""
    clone = graph.load(ir.to_proto(m))
    report = run_qdq_rewrites(clone)
    return clone, report


# ---- 1. Q of constants ------------------------------------------------------------------------


def test_quantize_of_constant_folds_to_onnxruntime_value():
    m = qdq_model(
        """
        c = Constant <value = float[3] {0.275, -7.0, 100.0}> ()
        q = QuantizeLinear (c, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        out = Add (x, d)""",
        inputs="float[3] x", outputs="float[3] out",
    )  # fmt: skip
    want = ort_plain(m, {"x": np.zeros(3, np.float32)})[0]
    default_pipeline(bf16=False, pad=False)(m)  # Constant lifted, then Q and DQ folded
    assert ops(m) == ["Add"]
    np.testing.assert_array_equal(m.graph.node(0).inputs[1].const_value.numpy(), want)


def test_quantize_of_activation_is_not_folded():
    m = qdq_model("out = QuantizeLinear (x, xs, xz)", outputs="uint8[2,4,8] out")
    m2, report = rewritten(m)
    assert report.counts["fold_quantize"] == 0 and ops(m2) == ["QuantizeLinear"]


# ---- 2/6/7. DQ -> op -> Q with a shared DQ ------------------------------------------------------


SHARED_DQ = """
    q = QuantizeLinear (x, xs, xz)
    d = DequantizeLinear (q, xs, xz)
    s = Sigmoid (d)
    a = Add (d, s)
    qa = QuantizeLinear (a, ys, yz)
    qs = QuantizeLinear (s, ys, yz)
    da = DequantizeLinear (qa, ys, yz)
    out = Identity (da)"""


def test_shared_dq_each_reader_fuses():
    """d feeds Sigmoid and Add: each gets its own copy, Sigmoid -> Q and Add -> Q fuse... except
    that Sigmoid's output s is read by Add *and* a Q, so Sigmoid must stay float (negative) while
    the DQ copy for it is merged back."""
    m = qdq_model(SHARED_DQ)
    m2, report = rewritten(m)
    assert report.counts["unique_dq"] == 1
    assert P + "QDQSigmoid" not in ops(m2), "Sigmoid's output has a float reader: no fusion"
    assert "Sigmoid" in ops(m2)


def test_dq_read_twice_by_one_node_fuses_once():
    m = qdq_model(
        """
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        p = Mul (d, d)
        qp = QuantizeLinear (p, ys, yz)
        out = DequantizeLinear (qp, ys, yz)"""
    )
    m2, _ = rewritten(m)
    assert ops(m2) == ["QuantizeLinear", P + "QDQMul", "DequantizeLinear"]
    got, want, calls = run_both(m, x_feed())
    assert np.abs(got - want).max() <= 0.1 + 1e-6  # one step of ys
    assert calls == 1


FUSIONS = {
    "Add": ("s = Add (d, d2)", P + "QDQAdd"),
    "Mul-const": ("s = Mul (d, half)", P + "QDQMul"),
    "Div-const": ("s = Div (d, half)", P + "QDQDiv"),
    "Softmax": ("s = Softmax <axis = -1> (d)", P + "QDQSoftmax"),
    "Erf": ("s = Erf (d)", P + "QDQErf"),
    "Transpose": ("s = Transpose <perm = [0, 2, 1]> (d)", P + "QDQTranspose"),
    "ReduceMean": ("s = ReduceMean <keepdims = 1> (d, ax)", P + "QDQReduceMean"),
    "MatMul-acts": ("s = MatMul (d, dt)", P + "QDQMatMul"),
}
OUT_SHAPES = {"Transpose": "[2,8,4]", "ReduceMean": "[2,4,1]", "MatMul-acts": "[2,4,4]"}


@pytest.mark.parametrize("case", list(FUSIONS))
def test_dq_op_q_becomes_fused_op_within_one_step(case):
    op_line, fused = FUSIONS[case]
    shape = OUT_SHAPES.get(case, "[2,4,8]")
    m = qdq_model(
        f"""
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        q2 = QuantizeLinear (x, q2s, q2z)
        d2 = DequantizeLinear (q2, q2s, q2z)
        qt = QuantizeLinear (y, xs, xz)
        dt = DequantizeLinear (qt, xs, xz)
        {op_line}
        qs = QuantizeLinear (s, ys, yz)
        out = DequantizeLinear (qs, ys, yz)""",
        inputs="float[2,4,8] x, float[2,8,4] y",
        outputs=f"float{shape} out",
        extra="int64[1] ax = {-1}",
    )
    m2, _ = rewritten(m)
    assert fused in ops(m2), ops(m2)
    assert case.split("-")[0] not in ops(m2)
    feeds = x_feed() | {"y": np.random.default_rng(1).uniform(-6, 6, (2, 8, 4)).astype(np.float32)}
    got, want, calls = run_both(m, feeds)
    assert np.abs(got - want).max() <= 0.1 + 1e-6, "more than one step (0.1) off"
    assert calls == 1


def test_per_channel_output_quantization_is_not_fused():
    m = qdq_model(
        """
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        s = Sigmoid (d)
        qs = QuantizeLinear <axis = 2> (s, cs, cz)
        out = DequantizeLinear <axis = 2> (qs, cs, cz)""",
        extra="float[8] cs = {0.1,0.1,0.1,0.1,0.2,0.2,0.2,0.2}, uint8[8] cz = {0,0,0,0,9,9,9,9}",
    )
    m2, report = rewritten(m)
    assert "Sigmoid" in ops(m2) and not report.fused_ops
    got, want, calls = run_both(m, x_feed())
    assert np.abs(got - want).max() <= 0.2 + 1e-6 and calls == 1  # Q/DQ run as NPU ops


# ---- 3. QDQ around views ---------------------------------------------------------------------


VIEW = """
    q = QuantizeLinear (x, xs, xz)
    d = DequantizeLinear (q, xs, xz)
    r = Reshape (d, shp)
    qr = QuantizeLinear (r, {ps}, {pz})
    out = DequantizeLinear (qr, {ps}, {pz})"""


def test_qdq_around_reshape_becomes_a_quantized_view():
    m = qdq_model(
        VIEW.format(ps="xs", pz="xz"), outputs="float[8,8] out", extra="int64[2] shp = {8, 8}"
    )
    m2, report = rewritten(m)
    assert report.counts["views"] == 1
    assert ops(m2) == ["QuantizeLinear", "Reshape", "DequantizeLinear"]
    reshape = next(n for n in m2.graph if n.op_type == "Reshape")
    assert reshape.outputs[0].dtype == ir.DataType.UINT8
    got, want, calls = run_both(m, x_feed())
    np.testing.assert_array_equal(got, want)  # exact: the view moves no bits
    assert calls == 1


def test_reshape_between_different_parameters_is_kept():
    m = qdq_model(
        VIEW.format(ps="ys", pz="yz"), outputs="float[8,8] out", extra="int64[2] shp = {8, 8}"
    )
    m2, report = rewritten(m)
    assert report.counts["views"] == 0
    assert "Reshape" in ops(m2) and P + "QDQRequantize" not in ops(m2)
    got, want, calls = run_both(m, x_feed())
    assert np.abs(got - want).max() <= 0.1 + 1e-6 and calls == 1


# ---- 4. DQ -> Q chains -----------------------------------------------------------------------


CHAIN = """
    q = QuantizeLinear (x, xs, xz)
    d = DequantizeLinear (q, xs, xz)
    q2 = QuantizeLinear (d, {ps}, {pz})
    d2 = DequantizeLinear (q2, {ps}, {pz})
    out = Relu (d2)"""


def test_redundant_dq_q_pair_is_removed():
    m = qdq_model(CHAIN.format(ps="xs", pz="xz"))
    m2, report = rewritten(m)
    assert report.counts["dq_q_identity"] == 1
    assert ops(m2) == ["QuantizeLinear", "DequantizeLinear", "Relu"]
    got, want, _ = run_both(m, x_feed())
    np.testing.assert_allclose(got, want, rtol=2**-8)  # Relu in bf16, no quantization change


def test_dq_q_with_new_parameters_becomes_requantize():
    m = qdq_model(CHAIN.format(ps="q2s", pz="q2z"))
    m2, report = rewritten(m)
    assert report.counts["dq_q_requantize"] == 1
    assert P + "QDQRequantize" in ops(m2)
    got, want, calls = run_both(m, x_feed())
    assert np.abs(got - want).max() <= 0.07 * (1 + 2**-7) and calls == 1


def test_dq_q_per_channel_chain_is_kept():
    m = qdq_model(
        """
        q = QuantizeLinear <axis = 2> (x, cs, cz)
        d = DequantizeLinear <axis = 2> (q, cs, cz)
        q2 = QuantizeLinear (d, q2s, q2z)
        out = DequantizeLinear (q2, q2s, q2z)""",
        extra="float[8] cs = {0.1,0.1,0.1,0.1,0.2,0.2,0.2,0.2}, uint8[8] cz = {0,0,0,0,9,9,9,9}",
    )
    m2, report = rewritten(m)
    assert not report.fused_ops and ops(m2).count("QuantizeLinear") == 2


# ---- 8. DQ of constants ------------------------------------------------------------------------


def test_dq_of_weight_without_quantized_reader_folds_to_float():
    w = np.arange(-16, 16, dtype=np.int8).reshape(8, 4)
    m = qdq_model(
        """
        dw = DequantizeLinear <axis = 1> (w, ws, wz)
        out = MatMul (x, dw)""",
        outputs="float[2,4,4] out",
        extra=f"int8[8,4] w = {{{', '.join(map(str, w.reshape(-1)))}}}, "
        "float[4] ws = {0.5, 0.25, 0.125, 1.0}, int8[4] wz = {0, 1, -1, 3}",
    )
    m2, report = rewritten(m)
    assert report.counts["fold_dequantize"] == 1 and ops(m2) == ["MatMul"]
    folded = m2.graph.node(0).inputs[1].const_value.numpy()
    ws, wz = np.array([0.5, 0.25, 0.125, 1.0], np.float32), np.array([0, 1, -1, 3])
    np.testing.assert_array_equal(folded, (w.astype(np.int64) - wz).astype(np.float32) * ws)


def test_dq_of_activation_is_not_folded():
    m = qdq_model(
        "out = DequantizeLinear (x, xs, xz)", inputs="uint8[2,4,8] x", outputs="float[2,4,8] out"
    )
    _, report = rewritten(m)
    assert report.counts["fold_dequantize"] == 0


# ---- refused parameters run on the CPU, exactly -------------------------------------------------


def test_float8_qdq_runs_on_cpu_with_reason_and_exact_result():
    m = qdq_model(
        """
        q = QuantizeLinear (x, xs, f8z)
        out = DequantizeLinear (q, xs, f8z)""",
        extra="float8e4m3fn f8z = {0}",
    )
    compiled = npudispatch.compile_model(ir.from_proto(ir.to_proto(m)))
    reasons = {u.op_type: u.reason for u in compiled.report.unsupported}
    assert "FLOAT8E4M3FN" in reasons["QuantizeLinear"]
    assert "FLOAT8E4M3FN" in reasons["DequantizeLinear"]
    got, want, calls = run_both(m, x_feed())
    np.testing.assert_array_equal(got, want)
    assert calls == 0


def test_int32_dequantize_with_nonzero_zero_point_is_refused():
    m = qdq_model(
        """
        d = DequantizeLinear (x, xs, iz)
        out = Relu (d)""",
        inputs="int32[2,4,8] x", extra="int32 iz = {7}",
    )  # fmt: skip
    compiled = npudispatch.compile_model(ir.from_proto(ir.to_proto(m)))
    reasons = [u.reason for u in compiled.report.unsupported if u.op_type == "DequantizeLinear"]
    assert reasons and "zero point of 0" in reasons[0]


# ---- inspect: quantization at a glance ----------------------------------------------------------


def test_inspect_shows_dtypes_and_conversions_per_partition():
    from npudispatch.cli.inspect_cmd import inspect_model, render

    m = qdq_model(
        """
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        s = Sigmoid (d)
        qs = QuantizeLinear (s, ys, yz)
        out = DequantizeLinear (qs, ys, yz)"""
    )
    loaded = graph.load(ir.to_proto(m))
    before = inspect_model(loaded)["partitions"][0]["quantization"]
    assert before == {
        "activation_dtypes": ["float", "uint8"],
        "weight_dtypes": [],
        "conversions": [n.name for n in loaded.graph if n.op_type != "Sigmoid"],
    }
    assert len(before["conversions"]) == 4
    default_pipeline()(loaded)
    doc = inspect_model(loaded)
    after = doc["partitions"][0]["quantization"]
    assert len(after["conversions"]) == 2  # the input Q and the output DQ; Sigmoid is quantized
    text = render(loaded, doc, "m.onnx")
    assert "quantization (conversions" in text and "float,uint8" in text


# ---- chains: float intermediates the quantizer left unquantized ---------------------------------

CHAINS = {
    "rmsnorm-square-mean": (
        "p = Pow (d, two)\n        s = ReduceMean <keepdims = 1> (p, ax)",
        "[2,4,1]",
        "Pow.ReduceMean",
    ),
    "rsqrt": ("p = Sqrt (d)\n        s = Reciprocal (p)", "[2,4,8]", "Sqrt.Reciprocal"),
    "gelu-erf": ("p = Div (d, sqrt2)\n        s = Erf (p)", "[2,4,8]", "Div.Erf"),
}


@pytest.mark.parametrize("case", list(CHAINS))
def test_chain_of_float_ops_between_dq_and_q_is_one_quantized_op(case):
    lines, shape, stages = CHAINS[case]
    m = qdq_model(
        f"""
        a = Abs (x)
        qa = QuantizeLinear (a, xs, xz0)
        d = DequantizeLinear (qa, xs, xz0)
        {lines}
        qs = QuantizeLinear (s, ys, yz)
        out = DequantizeLinear (qs, ys, yz)""",
        outputs=f"float{shape} out",
        extra="int64[1] ax = {-1}, float two = {2.0}, float sqrt2 = {1.4142135}, uint8 xz0 = {0}",
    )
    m2, _ = rewritten(m)
    chain = [n for n in m2.graph if n.op_type == "QDQChain"]
    assert len(chain) == 1 and chain[0].attributes.get_string("stages") == stages
    assert chain[0].overload == stages  # onnxruntime runs the generated function body
    got, want, calls = run_both(m, x_feed())
    assert np.abs(got - want).max() <= 0.1 + 1e-6 and calls == 1


def test_chain_with_a_float_operand_is_not_fused():
    """Mul by a non-scalar float tensor that was never quantized: no exact DQ form, no fusion."""
    m = qdq_model(
        """
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        p = Mul (d, w)
        s = Erf (p)
        qs = QuantizeLinear (s, ys, yz)
        out = DequantizeLinear (qs, ys, yz)""",
        extra="float[8] w = {1, 2, 3, 4, 5, 6, 7, 8}",
    )
    m2, _ = rewritten(m)
    assert "QDQChain" not in [n.op_type for n in m2.graph]
    assert "Mul" in ops(m2)  # the Erf alone is fused only if its input were a DQ: it is not


# ---- block-quantized 4-bit weights --------------------------------------------------------------


@pytest.mark.parametrize(("qtype", "with_zp"), [("int4", True), ("uint4", False), ("int4", False)])
def test_block_quantized_4bit_weight_becomes_matmul_nbits(qtype, with_zp):
    """DQ(int4/uint4 W [K, N], block 32 along K) -> MatMul: the weight stays 4-bit
    (MatMulNBits, formatted at compile time); results within the bf16 policy of onnxruntime."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    from npudispatch.rewrites.precision import tolerance_for

    k, n, block = 80, 24, 32  # K not a multiple of the block: a partial last block
    rng = np.random.default_rng(3)
    dtype = ml_dtypes.int4 if qtype == "int4" else ml_dtypes.uint4
    lo, hi = (-8, 7) if qtype == "int4" else (0, 15)
    w = rng.integers(lo, hi, (k, n), endpoint=True).astype(dtype)
    scale = (rng.random((-(-k // block), n)) * 0.1 + 0.02).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s")]
    names = ["w", "s"]
    if with_zp:
        zp = rng.integers(lo, hi, scale.shape, endpoint=True).astype(dtype)
        inits.append(numpy_helper.from_array(zp, "z"))
        names.append("z")
    nodes = [
        helper.make_node("DequantizeLinear", names, ["dw"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "dw"], ["y"]),
    ]
    graph_proto = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        initializer=inits,
    )  # fmt: skip
    proto = helper.make_model(
        graph_proto, opset_imports=[helper.make_opsetid("", 21)], ir_version=10
    )
    m = ir.from_proto(proto)
    m2, report = rewritten(m)
    assert report.counts["nbits"] == 1
    assert ops(m2) == ["com.microsoft.MatMulNBits"]
    assert not any(
        v.dtype == ir.DataType.FLOAT and v.shape == (k, n) for v in m2.graph.initializers.values()
    )
    x = rng.standard_normal((3, k)).astype(np.float32)
    got, want, calls = run_both(m, {"x": x})
    tol = tolerance_for(["MatMulNBits"]).scaled(float(np.sqrt(np.mean(want**2))))
    tol.assert_close(got, want, "MatMulNBits from a blocked int4 DQ")
    assert calls == 1


def test_fused_op_producing_a_graph_output():
    m = qdq_model(
        """
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        s = Sigmoid (d)
        out = QuantizeLinear (s, ys, yz)""",
        outputs="uint8[2,4,8] out",
    )
    m2, _ = rewritten(m)
    assert ops(m2) == ["QuantizeLinear", P + "QDQSigmoid"]
    assert m2.graph.outputs[0].name == "out"
    got, want, calls = run_both(m, x_feed())
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1 and calls == 1


# ---- quantized Conv ---------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2])
def test_dq_conv_q_with_per_channel_weights_becomes_qdq_conv(group):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(group)
    c, m_out = 4, 6
    w = rng.integers(-127, 127, (m_out, c // group, 3, 3), endpoint=True).astype(np.int8)
    ws = (rng.random(m_out) * 0.01 + 0.002).astype(np.float32)
    inits = {
        "xs": np.float32(0.05), "xz": np.uint8(128), "w": w, "ws": ws,
        "wz": np.zeros(m_out, np.int8), "ys": np.float32(0.08), "yz": np.uint8(120),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["d"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["dw"], axis=0),
        helper.make_node(
            "Conv", ["d", "dw"], ["c"], group=group, strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["qc"]),
        helper.make_node("DequantizeLinear", ["qc", "ys", "yz"], ["out"]),
    ]
    graph_proto = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 9, 9])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, m_out, 5, 5])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    proto = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    m = ir.from_proto(proto)
    m2, _ = rewritten(m)
    assert ops(m2) == ["QuantizeLinear", P + "QDQConv", "DequantizeLinear"]
    feeds = {"x": rng.uniform(-6, 6, (1, c, 9, 9)).astype(np.float32)}
    got, want, calls = run_both(m, feeds)
    assert np.abs(got - want).max() <= 0.08 * (1 + 1e-3) and calls == 1
    assert np.ptp(want) > 1.0, "the test data must exercise the output range"


def test_dq_gemm_q_with_per_channel_weight_and_int32_bias_becomes_qdq_gemm():
    """quantize_static's Gemm: B [N, K] (transB=1) per output channel, C int32 per channel."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    k, n = 48, 20
    ws = (rng.random(n) * 0.01 + 0.002).astype(np.float32)
    inits = {
        "xs": np.float32(0.05), "xz": np.uint8(128),
        "w": rng.integers(-127, 127, (n, k), endpoint=True).astype(np.int8), "ws": ws,
        "wz": np.zeros(n, np.int8),
        "b": rng.integers(-3000, 3000, n).astype(np.int32), "bs": (ws * 0.05).astype(np.float32),
        "bz": np.zeros(n, np.int32), "ys": np.float32(0.1), "yz": np.uint8(128),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["d"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["dw"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["db"], axis=0),
        helper.make_node("Gemm", ["d", "dw", "db"], ["g"], transB=1, alpha=0.5),
        helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["qg"]),
        helper.make_node("DequantizeLinear", ["qg", "ys", "yz"], ["out"]),
    ]
    graph_proto = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, n])],
        initializer=[numpy_helper.from_array(np.asarray(v), key) for key, v in inits.items()],
    )  # fmt: skip
    proto = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    m = ir.from_proto(proto)
    m2, _ = rewritten(m)
    assert ops(m2) == ["QuantizeLinear", P + "QDQGemm", "DequantizeLinear"]
    got, want, calls = run_both(m, {"x": rng.uniform(-6, 6, (3, k)).astype(np.float32)})
    assert np.abs(got - want).max() <= 0.1 * (1 + 1e-3) and calls == 1
    assert np.ptp(want) > 2.0


@pytest.mark.parametrize("opset_version", [11, 21])
def test_batch_norm_per_channel_statistics_fuse_at_every_opset(opset_version):
    """Mean, variance, scale and bias are never quantized: exact per-channel DQs make
    BatchNormalization fusable. Below opset 13 DequantizeLinear has no axis, so the fused op's body dequantizes its
    per-channel operands in arithmetic (Cast, Sub, Mul on the reversed axes): the model still
    fuses (the PP-OCR classifier is opset 11) and matches onnxruntime's unfused run exactly."""
    m = qdq_model(
        """
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        s = BatchNormalization <epsilon = 0.001> (d, g, b, mu, var)
        qs = QuantizeLinear (s, ys, yz)
        out = DequantizeLinear (qs, ys, yz)""",
        extra="float[4] g = {1.5, -0.5, 0.0, 2.0}, float[4] b = {0.1, 0.2, -0.3, 0.0}, "
        "float[4] mu = {0.5, -1.0, 0.0, 2.0}, float[4] var = {1.0, 4.0, 0.25, 2.0}",
        opset_version=opset_version,
    )
    m2, _ = rewritten(m)
    assert ops(m2) == ["QuantizeLinear", P + "QDQBatchNormalization", "DequantizeLinear"]
    got, want, calls = run_both(m, x_feed(seed=3))
    assert np.array_equal(got, want) and calls == 1


def test_per_channel_bodies_below_opset_13_dequantize_in_arithmetic():
    """The opset-11 body has no DequantizeLinear axis and computes exactly what the opset-13
    per-channel DequantizeLinear computes (onnxruntime runs both bodies)."""
    from npudispatch import opset

    body13 = ir.to_proto(opset.function_for("QDQConv", "", 13))
    body11 = ir.to_proto(opset.function_for("QDQConv", "", 11))
    axes = [[a.name for a in n.attribute] for n in body13.node if n.op_type == "DequantizeLinear"]
    assert axes == [[], ["axis"], ["axis"]]
    assert all(not n.attribute for n in body11.node if n.op_type == "DequantizeLinear")
    assert (
        sum(n.op_type == "Transpose" for n in body11.node) == 4
    )  # weight and bias, there and back
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ws = (rng.random(6) * 0.1 + 0.01).astype(np.float32)
    inits = {
        "xs": np.float32(0.05), "xz": np.uint8(128),
        "w": rng.integers(-128, 127, (6, 2, 3, 3), endpoint=True).astype(np.int8), "ws": ws,
        "wz": rng.integers(-5, 5, 6).astype(np.int8), "b": np.arange(6, dtype=np.int32) * 40,
        "bs": ws * np.float32(0.05), "bz": np.zeros(6, np.int32), "ys": np.float32(0.04),
        "yz": np.uint8(100),
    }  # fmt: skip
    conv = helper.make_node(
        "QDQConv", ["q", "xs", "xz", "w", "ws", "wz", "b", "bs", "bz", "ys", "yz"], ["out"],
        domain="npudispatch", kernel_shape=[3, 3], pads=[0, 0, 0, 0], strides=[1, 1],
        dilations=[1, 1], group=1,
    )  # fmt: skip
    graph_proto = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]), conv], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, [1, 6, 3, 3])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    feeds = {"x": rng.uniform(-4, 4, (1, 2, 5, 5)).astype(np.float32)}
    outs = []
    for version in (11, 13):
        proto = helper.make_model(
            graph_proto,
            opset_imports=[helper.make_opsetid("", version), helper.make_opsetid("npudispatch", 1)],
        )
        proto.ir_version = 10
        m = ir.from_proto(proto)
        opset.attach_functions(m)
        outs.append(ort_plain(m, feeds)[0])
    assert np.array_equal(outs[0], outs[1]) and np.ptp(outs[0].astype(int)) > 20


def test_softmax_below_opset_13_on_the_last_axis_fuses():
    """Softmax-11 coerces its input to 2-D at the axis: the one-axis fused form equals it on the
    last axis only."""
    body = """
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        s = Softmax <axis = {axis}> (d)
        qs = QuantizeLinear (s, ys, yz)
        out = DequantizeLinear (qs, ys, yz)"""
    m = qdq_model(body.format(axis=2), opset_version=11)
    assert P + "QDQSoftmax" in ops(rewritten(m)[0])
    got, want, calls = run_both(m, x_feed())
    assert np.array_equal(got, want) and calls == 1
    assert P + "QDQSoftmax" not in ops(
        rewritten(qdq_model(body.format(axis=1), opset_version=11))[0]
    )


POOLS = {
    "MaxPool": "MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]>",
    "AveragePool": "AveragePool <kernel_shape = [2, 3], strides = [1, 2], ceil_mode = 1>",
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_dq_pool_q_becomes_fused_pool(pool):
    m = qdq_model(
        f"""
        q = QuantizeLinear (x, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        s = {POOLS[pool]} (d)
        qs = QuantizeLinear (s, ys, yz)
        out = DequantizeLinear (qs, ys, yz)""",
        inputs="float[1,3,7,9] x",
        outputs="float[1,3,4,5] out" if pool == "MaxPool" else "float[1,3,6,4] out",
    )
    m2, _ = rewritten(m)
    assert ops(m2) == ["QuantizeLinear", P + f"QDQ{pool}", "DequantizeLinear"]
    got, want, calls = run_both(m, x_feed((1, 3, 7, 9)))
    assert np.abs(got - want).max() <= 0.1 * (1 + 1e-3) and calls == 1


def test_quantize_of_a_reshaped_constant_folds():
    m = qdq_model(
        """
        r = Reshape (c, shp)
        q = QuantizeLinear (r, xs, xz)
        d = DequantizeLinear (q, xs, xz)
        out = Mul (x, d)""",
        inputs="float[2,4] x", outputs="float[2,4] out",
        extra="float[8] c = {0.1, -0.2, 0.3, 1.0, 2.0, -3.0, 0.025, 0.075}, int64[2] shp = {2, 4}",
    )  # fmt: skip
    want = ort_plain(m, {"x": np.ones((2, 4), np.float32)})[0]
    m2, report = rewritten(m)
    assert report.counts["fold_quantize"] == 1 and "QuantizeLinear" not in ops(m2)
    mul = next(n for n in m2.graph if n.op_type == "Mul")
    np.testing.assert_array_equal(mul.inputs[1].const_value.numpy(), want)
