"""com.microsoft MatMulNBits and npudispatch.QMatMul / QLinearMatMul on the emulator.

MatMulNBits: bf16 tolerance (opkit rule); the kernel dequantizes with bf16 scales, so it is also
within that rule of onnxruntime's float32 result. QMatMul: integer accumulate + float32 requant,
allowed to differ from onnxruntime by at most 1 quantization step (a product landing exactly on a
rounding boundary may round differently after float32 vs integer accumulation).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from opkit import assert_close, reference

from npudispatch.operators import registry
from npudispatch.operators.base import ArgKind, Decline
from npudispatch.operators.matmul_nbits import MatMulNBits, dequantize_nbits
from npudispatch.operators.qmatmul import QLinearMatMul, QMatMul
from npudispatch.operators.weights import (
    decode_int8,
    decode_q4,
    format_int8,
    format_q4,
    pack_nibbles,
    q4_layout,
    q4_parts,
    stripe_order,
)
from npudispatch.testing import harness

for _cls in (MatMulNBits, QMatMul, QLinearMatMul):
    registry.register(_cls)  # idempotent; operators/__init__.py registers them too

F32 = np.dtype(np.float32)
T = helper.np_dtype_to_tensor_dtype


def model_of(nodes, inputs, outputs, inits, domains=("",)):
    """Model from node protos; ``inputs``/``outputs``: (name, dtype, shape)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, T(np.dtype(d)), list(s)) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, T(np.dtype(d)), list(s)) for n, d, s in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid(d, 21 if d == "" else 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def ort_run(model, feeds):
    """onnxruntime executing the QDQ graph literally (float DQ -> MatMul -> Q).

    Graph optimizations are off on purpose: with them on, onnxruntime fuses DQ -> MatMul -> Q into
    its own integer kernels whose requantization rounding changes between releases (1.32 differs
    from 1.2x by up to 2 steps on a16w8). The unfused graph is ONNX's definition, stable across
    versions, so one quantization step (float accumulation order) is a tolerance that holds.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)[0]


# ---- MatMulNBits ------------------------------------------------------------------------------


def nbits_model(
    m_shape, k, n, block, *, zp=True, bias=False, seed=0, bits=4, b_const=True, accuracy_level=0
):
    rng = np.random.default_rng(seed)
    kb = -(-k // block)
    inits = {
        "B": rng.integers(0, 256, (n, kb, block // 2)).astype(np.uint8),
        "scales": (rng.random(n * kb) * 0.1 + 0.01).astype(np.float32),
    }
    names = ["A", "B", "scales"]
    if zp:
        inits["zp"] = rng.integers(0, 256, n * (-(-kb // 2))).astype(np.uint8)
        names.append("zp")
    if bias:
        names += [""] * (5 - len(names)) + ["bias"]
        inits["bias"] = rng.standard_normal(n).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain="com.microsoft", name="mmnb",
        K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level,
    )  # fmt: skip
    inputs = [("A", F32, (*m_shape, k))]
    if not b_const:
        inputs.append(("B", np.uint8, inits.pop("B").shape))
    return model_of(
        [node], inputs, [("Y", F32, (*m_shape, n))], inits, ("", "com.microsoft")
    ), inits


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize(("zp", "bias"), [(True, False), (False, True), (True, True)])
def test_matmul_nbits(block, zp, bias):
    k, n = 200, 70  # K not a multiple of the block or tile, odd k_blocks for 32/64
    model, _ = nbits_model((2, 3), k, n, block, zp=zp, bias=bias, seed=block)
    a = np.random.default_rng(1).standard_normal((2, 3, k)).astype(F32)
    res = harness.run_single(ir.from_proto(model), {"A": a})
    y = res.outputs["Y"]
    expected = ort_run(model, {"A": a})
    assert_close(reference(res, {"A": a})[0], expected, rtol=1e-5, scale=1e-5)
    assert_close(y, expected)


@pytest.mark.parametrize(("k", "n"), [(4096, 11008), (11008, 4096)], ids=["gate-up", "down"])
def test_matmul_nbits_llama2_mlp(k, n):
    """llama2-MLP shapes at M = 1, block 128 (about 1-2 s each)."""
    model, _ = nbits_model((1, 1), k, n, 128, seed=3)
    a = np.random.default_rng(2).standard_normal((1, 1, k)).astype(F32)
    res = harness.run_single(ir.from_proto(model), {"A": a})
    assert_close(res.outputs["Y"], ort_run(model, {"A": a}))
    cfg = res.prepared.cfg
    const = next(x for x in res.prepared.args if x.kind == ArgKind.CONST)
    assert const.nbytes == q4_layout(k, n, 128).nbytes  # no bias part
    assert cfg.operator.stripes(cfg) == 5


def test_nbits_corrupt_scale_or_code_changes_result():
    k, n, block = 256, 128, 64
    model, _ = nbits_model((1,), k, n, block, seed=4)
    a = np.random.default_rng(5).standard_normal((1, k)).astype(F32)
    good = harness.run_single(ir.from_proto(model), {"A": a}).outputs["Y"]
    layout = q4_layout(k, n, block)
    codes_b, scale_b, _, _ = q4_parts(block)
    for where in (
        layout.subvolume(1, 0).start + 100,  # a code byte
        layout.subvolume(0, 1).start + codes_b + 1,  # a bf16 scale's high byte
        layout.subvolume(1, 1).start + codes_b + scale_b,  # a zero-point byte
    ):
        p = harness.prepare(ir.from_proto(model), {"A": a})
        k_const = next(i for i, x in enumerate(p.args) if x.kind == ArgKind.CONST)
        p.buffers[ArgKind.CONST][p.placement[k_const] + where] ^= 0x5A
        bad = harness.execute(p).outputs["Y"]
        assert not np.allclose(bad, good), where


@pytest.mark.parametrize(("k", "n", "block"), [(200, 70, 32), (128, 64, 128), (40, 3, 16)])
@pytest.mark.parametrize("stripes", [1, 3])
def test_q4_format_round_trip(k, n, block, stripes):
    _, inits = nbits_model((1,), k, n, block, seed=6)
    image = format_q4(inits["B"], inits["scales"], inits["zp"], k, n, block)
    layout = q4_layout(k, n, block)
    assert image.size == layout.nbytes and layout.subv_bytes % 64 == 0
    stream = image.reshape(layout.n_blocks, -1)[stripe_order(layout.n_blocks, stripes)]
    w = decode_q4(stream.reshape(-1), k, n, block, stripes).dequantize()
    ref = dequantize_nbits(inits["B"], inits["scales"], inits["zp"], k, n, block)
    np.testing.assert_allclose(w[:k, :n], ref, rtol=2**-7, atol=1e-6)
    kq = -(-k // block) * block  # rows k..kq are onnxruntime's own block padding (kept)
    assert not w[kq:].any() and not w[:, n:].any()  # our padding dequantizes to exactly 0


def test_q4_subvolume_codes_pair_along_k():
    """Byte j of a subvolume column holds rows 2j (low nibble) and 2j+1 (high nibble)."""
    k, n, block = 128, 64, 128
    codes = (np.arange(n * k).reshape(n, k) % 16).astype(np.uint8)
    b = pack_nibbles(codes).reshape(n, 1, block // 2)
    image = format_q4(b, np.ones(n, np.float32), None, k, n, block)
    col5 = image[5 * 64 : 6 * 64]
    np.testing.assert_array_equal(col5 & 0x0F, codes[5, 0::2])
    np.testing.assert_array_equal(col5 >> 4, codes[5, 1::2])
    zp = image[4096 + 128 : 4096 + 160]
    assert (zp == 0x88).all()  # default zero point 8, packed along N


def test_nbits_declines():
    model, _ = nbits_model((1,), 64, 8, 32, bits=8)
    r = MatMulNBits().match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(r, Decline) and "only 4-bit" in r.reason

    model, _ = nbits_model((1,), 64, 8, 32, b_const=False)
    r = MatMulNBits().match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(r, Decline) and "B is not a constant" in r.reason

    model, _ = nbits_model((1,), 512, 8, 256)
    r = MatMulNBits().match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(r, Decline) and "block_size=256" in r.reason

    model, _ = nbits_model((1,), 64, 8, 32)
    node = next(iter(ir.from_proto(model).graph))
    node.inputs[0].dtype = ir.DataType.FLOAT16
    r = registry.match(node)
    assert isinstance(r, Decline) and "float32 or bfloat16" in r.reason


# ---- QMatMul / QLinearMatMul --------------------------------------------------------------------

CASES = {
    "a8w8-tensor": (np.uint8, np.int8, False),
    "a8w8-channel": (np.uint8, np.int8, True),
    "a16w8-tensor": (np.uint16, np.uint8, False),
    "a16w8-channel": (np.uint16, np.int8, True),
    "s8w8-channel": (np.int8, np.int8, True),  # symmetric recipes: signed activations
    "s16w8-channel": (np.int16, np.int8, True),
}


def q_inits(adt, bdt, per_channel, k, n, seed=0):
    rng = np.random.default_rng(seed)
    ai, bi = np.iinfo(adt), np.iinfo(bdt)
    b = rng.integers(bi.min, bi.max, (k, n), endpoint=True).astype(bdt)
    return {
        "a_s": np.float32(0.02),
        "a_zp": np.array(ai.max // 3, adt),
        "b": b,
        "b_s": (rng.random(n) * 0.01 + 0.001).astype(F32) if per_channel else np.float32(0.004),
        "b_zp": rng.integers(0, 8, n).astype(bdt) if per_channel else np.array(2, bdt),
        "y_s": np.float32(0.06 * np.sqrt(k) * (40 if ai.bits == 16 else 1)),
        "y_zp": np.array(ai.max // 2, adt),
    }


NAMES = ["a", "a_s", "a_zp", "b", "b_s", "b_zp", "y_s", "y_zp"]


def qdq_reference_model(adt, shape_a, shape_y, inits):
    """The standard QDQ subgraph QMatMul stands for (run on onnxruntime)."""
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "a_s", "a_zp"], ["da"]),
        helper.make_node("DequantizeLinear", ["b", "b_s", "b_zp"], ["db"], axis=1),
        helper.make_node("MatMul", ["da", "db"], ["m"]),
        helper.make_node("QuantizeLinear", ["m", "y_s", "y_zp"], ["y"]),
    ]
    return model_of(nodes, [("a", adt, shape_a)], [("y", adt, shape_y)], inits)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    ("m_shape", "k", "n"), [((1,), 64, 8), ((4,), 200, 70), ((2, 3), 300, 130)]
)
def test_qmatmul(case, m_shape, k, n):
    adt, bdt, per_channel = CASES[case]
    inits = q_inits(adt, bdt, per_channel, k, n, seed=k)
    a_shape, y_shape = (*m_shape, k), (*m_shape, n)
    model = model_of(
        [helper.make_node("QMatMul", NAMES, ["y"], domain="npudispatch", name="qmm")],
        [("a", adt, a_shape)], [("y", adt, y_shape)], inits, ("", "npudispatch"),
    )  # fmt: skip
    info = np.iinfo(adt)
    a = np.random.default_rng(7).integers(info.min, info.max, a_shape).astype(adt)
    res = harness.run_single(ir.from_proto(model), {"a": a})
    y = res.outputs["y"]
    assert y.dtype == adt
    expected = ort_run(qdq_reference_model(adt, a_shape, y_shape, inits), {"a": a})
    ref = reference(res, {"a": a})[0]
    assert np.abs(y.astype(np.int64) - expected).max() <= 1
    assert np.abs(ref.astype(np.int64) - expected).max() <= 1
    spread = np.ptp(expected.astype(np.int64))
    assert spread > 10, "test data must exercise the requantization range"


def test_qlinear_matmul_matches_onnxruntime():
    k, n = 150, 40
    inits = q_inits(np.uint8, np.int8, False, k, n, seed=11)
    inputs = [("a", np.uint8, (5, k))]
    outputs = [("y", np.uint8, (5, n))]
    model = model_of(
        [helper.make_node("QLinearMatMul", NAMES, ["y"], name="ql")], inputs, outputs, inits
    )
    a = np.random.default_rng(8).integers(0, 255, (5, k)).astype(np.uint8)
    y = harness.run_single(ir.from_proto(model), {"a": a}).outputs["y"]
    assert np.abs(y.astype(np.int64) - ort_run(model, {"a": a})).max() <= 1


def test_qmatmul_swapped_subvolumes_change_result():
    k, n = 256, 128
    inits = q_inits(np.uint8, np.int8, True, k, n, seed=12)
    model = model_of(
        [helper.make_node("QMatMul", NAMES, ["y"], domain="npudispatch")],
        [("a", np.uint8, (2, k))], [("y", np.uint8, (2, n))], inits, ("", "npudispatch"),
    )  # fmt: skip
    a = np.random.default_rng(9).integers(0, 255, (2, k)).astype(np.uint8)
    good = harness.run_single(ir.from_proto(model), {"a": a}).outputs["y"]
    p = harness.prepare(ir.from_proto(model), {"a": a})
    kc = next(i for i, x in enumerate(p.args) if x.kind == ArgKind.CONST)
    buf, base, sv = p.buffers[ArgKind.CONST], p.placement[kc], 128 * 64
    first = bytes(buf[base : base + sv])
    buf[base : base + sv] = buf[base + sv : base + 2 * sv]  # subvolume (0,0) <-> (0,1)
    buf[base + sv : base + 2 * sv] = first
    assert not np.array_equal(harness.execute(p).outputs["y"], good)


def test_int8_format_round_trip():
    w = np.random.default_rng(0).integers(-128, 127, (300, 70)).astype(np.int8)
    back = decode_int8(format_int8(w), 300, 70, np.dtype(np.int8))
    np.testing.assert_array_equal(back[:300, :70], w)


def test_qmatmul_declines():
    inits = q_inits(np.uint8, np.int8, False, 16, 8)
    inits_b_act = {k: v for k, v in inits.items() if k != "b"}
    model = model_of(
        [helper.make_node("QMatMul", NAMES, ["y"], domain="npudispatch")],
        [("a", np.uint8, (2, 16)), ("b", np.int8, (16, 8))], [("y", np.uint8, (2, 8))],
        inits_b_act, ("", "npudispatch"),
    )  # fmt: skip
    r = QMatMul().match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(r, Decline) and "weight b is not a constant" in r.reason

    model = model_of(
        [helper.make_node("QMatMul", NAMES, ["y"], domain="npudispatch")],
        [("a", np.int32, (2, 16))], [("y", np.uint8, (2, 8))],
        {**inits, "a_zp": np.array(0, np.int32)}, ("", "npudispatch"),
    )  # fmt: skip
    r = QMatMul().match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(r, Decline) and "activation dtype int32" in r.reason

    bad_scale = {**inits, "a_s": np.full(2, 0.1, np.float32)}
    model = model_of(
        [helper.make_node("QMatMul", NAMES, ["y"], domain="npudispatch")],
        [("a", np.uint8, (2, 16))], [("y", np.uint8, (2, 8))], bad_scale, ("", "npudispatch"),
    )  # fmt: skip
    r = QMatMul().match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(r, Decline) and "per-tensor" in r.reason


def test_onnx_checker_accepts_qdq_reference():
    """Guard: the QDQ model used as ground truth is a valid ONNX model."""
    inits = q_inits(np.uint16, np.int8, True, 32, 8)
    onnx.checker.check_model(qdq_reference_model(np.uint16, (2, 32), (2, 8), inits))


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 300),
    n=st.integers(1, 200),
    block=st.sampled_from([16, 32, 64, 128]),
    stripes=st.integers(1, 5),
    with_zp=st.booleans(),
)
def test_q4_round_trip_property(k, n, block, stripes, with_zp):
    """Any geometry: decoding the (striped) image gives back codes, zero points and scales."""
    rng = np.random.default_rng(k * 1000 + n)
    kb = -(-k // block)
    codes = rng.integers(0, 16, (n, kb * block), dtype=np.uint8)
    zps = rng.integers(0, 16, (n, kb), dtype=np.uint8)
    scales = rng.random((n, kb), dtype=np.float32) + 0.5
    b = pack_nibbles(codes).reshape(n, kb, block // 2)
    zp_packed = pack_nibbles(zps).reshape(-1) if with_zp else None
    layout = q4_layout(k, n, block)
    stripes = min(stripes, layout.n_blocks)
    image = format_q4(b, scales, zp_packed, k, n, block)
    stream = image.reshape(layout.n_blocks, -1)[stripe_order(layout.n_blocks, stripes)]
    q = decode_q4(stream.reshape(-1), k, n, block, stripes)
    np.testing.assert_array_equal(q.codes[: kb * block, :n], codes.T)
    np.testing.assert_array_equal(q.zero_points[:kb, :n], zps.T if with_zp else 8)
    np.testing.assert_allclose(q.scales[:kb, :n], scales.T, rtol=2**-8)
