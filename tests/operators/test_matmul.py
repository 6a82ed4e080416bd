"""MatMul / Gemm / npudispatch.MatMulBias on the emulator vs numpy reference and onnxruntime.

Tolerances: the bf16 rule of ``conftest.py`` (rtol 1e-2, atol 1e-2 x max|reference|): inputs and
weights are rounded to bf16 (relative step 2^-8), products accumulate in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from opkit import BF16, assert_close, one_node_model, random, reference, run_emu, run_ort

from npudispatch.errors import PlanError
from npudispatch.operators import registry
from npudispatch.operators.base import REAL_SHAPE_KEY, ArgKind, Decline
from npudispatch.operators.matmul import (
    MAX_WEIGHT_STRIPES,
    STEP_MAX,
    WRAP_MAX,
    Gemm,
    MatMul,
    MatMulBias,
    weight_streams,
    weight_stripes,
)
from npudispatch.operators.weights import (
    TileLayout,
    bf16_layout,
    decode_bf16,
    format_bf16,
    stripe_order,
)
from npudispatch.testing import harness
from npudispatch.txn import ops as txops
from npudispatch.txn.registers import SHIM_BD_BASE, SHIM_BD_STRIDE, SHIM_NUM_BDS, split_addr
from npudispatch.txn.shim import ShimBd

for _cls in (MatMul, Gemm, MatMulBias):
    registry.register(_cls)  # idempotent; operators/__init__.py registers them too

F32 = np.dtype(np.float32)


def matmul_model(a_shape, b_shape, y_shape, dtype, b_const=None):
    inits = {} if b_const is None else {"B": b_const}
    return one_node_model(
        "MatMul",
        [("A", dtype, a_shape), ("B", dtype, b_shape)],
        [("Y", dtype, y_shape)],
        initializers=inits,
    )


def check(model, feeds, num_cols=4, rtol=1e-2):
    """Emulator vs reference and vs onnxruntime; returns the run result."""
    res = run_emu(model, feeds, num_cols)
    (y,) = res.outputs.values()
    ref = reference(res, feeds)[0]
    ort_y = run_ort(model, feeds)[0]
    assert_close(y, ref, rtol=rtol)
    assert_close(y, ort_y, rtol=rtol)
    if ref.dtype == F32:  # the reference is float32 ONNX semantics (bf16 output: one rounding)
        assert_close(ref, ort_y, rtol=1e-4, scale=1e-4)
    return res


def shim_bds(txn) -> list[ShimBd]:
    """Every shim BD the transaction writes (decoded from its BLOCKWRITEs)."""
    out = []
    for op in txn.ops:
        if isinstance(op, txops.BlockWrite):
            _, row, off = split_addr(op.reg_off)
            rel = off - SHIM_BD_BASE
            if row == 0 and 0 <= rel < SHIM_BD_STRIDE * SHIM_NUM_BDS:
                words = np.asarray(op.values)
                out += [ShimBd.decode(words[i : i + 8]) for i in range(0, len(words), 8)]
    return out


# ---- const-weight MatMul ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_shape", "n"),
    [((1, 40), 24), ((3, 300), 130), ((2, 3, 5, 200), 72), ((1, 1, 1000), 650), ((7,), 9)],
    ids=["tiny", "k-not-tile", "batch-dims", "m1-many-blocks", "vector-a"],
)
def test_matmul_const_b(a_shape, n, float_dtype):
    k = a_shape[-1]
    b = random((k, n), float_dtype, seed=1, scale=0.5)
    y_shape = (*a_shape[:-1], n)
    model = matmul_model(a_shape, (k, n), y_shape, float_dtype, b)
    a = random(a_shape, float_dtype)
    res = check(model, {"A": a})
    assert res.outputs["Y"].dtype == float_dtype


@pytest.mark.parametrize("num_cols", [1, 2, 4])
def test_matmul_any_column_count(num_cols):
    """Fewer columns than streams: surplus stripes chain on the last channel, same result."""
    b = random((256, 600), F32, seed=3)
    model = matmul_model((2, 256), (256, 600), (2, 600), F32, b)
    res = check(model, {"A": random((2, 256), F32)}, num_cols=num_cols)
    assert res.prepared.cfg.operator.stripes(res.prepared.cfg) == MAX_WEIGHT_STRIPES


def test_weight_stream_is_striped_with_nd_bds():
    """The weight image goes out as S n-d gathers (d0/d1 one column, d2 = S columns)."""
    k, n = 300, 700
    model = matmul_model((1, k), (k, n), (1, n), F32, random((k, n), F32))
    res = check(model, {"A": random((1, k), F32)})
    layout = bf16_layout(k, n)
    stripes = weight_stripes(layout)
    col_words = layout.column_bytes // 4
    nd = [bd for bd in shim_bds(res.prepared.transaction) if bd.d1_wrap]
    assert stripes == MAX_WEIGHT_STRIPES and len(nd) == stripes  # 11 N-blocks: 2-3 per stripe
    for bd in nd:
        assert bd.d0_wrap * bd.d1_wrap == col_words and bd.d0_step == 1
        assert bd.d1_step == bd.d0_wrap and bd.d2_step == stripes * col_words
        assert bd.length_words % col_words == 0
    assert sum(bd.length_words for bd in nd) == layout.nbytes // 4


def test_bd_field_limits_respected_or_linear():
    """Geometry whose column does not fit a d0 x d1 pattern, or whose d2 step would overflow."""
    huge_k = TileLayout(k=128 * 300, n=64 * 6, subv_bytes=16384)  # column 1.2M words > step max
    assert huge_k.column_bytes // 4 > STEP_MAX // 2
    assert weight_stripes(huge_k) == 1
    (only,) = weight_streams(3, 0, huge_k, 1)
    assert only.pattern is None and only.nbytes == huge_k.nbytes
    prime = TileLayout(k=128, n=64 * 4, subv_bytes=4 * 1031)  # 1031 words: prime > 1023
    assert weight_stripes(prime) == 1
    ok = bf16_layout(1024, 64 * 7)
    s = weight_stripes(ok)
    for st in weight_streams(3, 0, ok, s):
        if st.pattern is not None:
            assert st.pattern.d0_wrap <= WRAP_MAX and st.pattern.d1_wrap <= WRAP_MAX
            assert st.pattern.d2_step <= STEP_MAX
    with pytest.raises(PlanError):
        weight_streams(3, 0, prime, 2)


def test_padded_activation_and_output():
    """A padded along K (real 40 of 48) and Y padded along N (real 24 of 32), zero lanes."""
    k, n = 40, 24
    b = random((k, n), F32, seed=2)
    model = ir.from_proto(matmul_model((2, k), (k, n), (2, n), F32, b))
    node = next(iter(model.graph))
    node.inputs[0].shape = ir.Shape([2, 48])
    node.inputs[0].metadata_props[REAL_SHAPE_KEY] = "2,40"
    node.outputs[0].shape = ir.Shape([2, 32])
    node.outputs[0].metadata_props[REAL_SHAPE_KEY] = "2,24"
    a = random((2, k), F32)
    prepared = harness.prepare(node, {"A": np.pad(a, ((0, 0), (0, 8)))})
    res = harness.execute(prepared)
    assert res.outputs["Y"].shape == (2, n)
    assert_close(res.outputs["Y"], a @ b)
    cfg = prepared.cfg
    assert cfg.operator.granularity(cfg).outputs[0] == (1, 8)
    # the kernel itself zeroes the padded output lanes (the harness crops them away)
    op = cfg.operator
    record = op.params_record(cfg)
    x = np.pad(a, ((0, 0), (0, 8))).astype(np.float32)
    (raw,) = op.kernel(record, [x.tobytes(), *op._parts(cfg)])
    y = raw.view(np.float32).reshape(2, 32)
    assert not y[:, n:].any()
    assert_close(y[:, :n], a @ b)


# ---- corrupted weights must change the result --------------------------------------------------


def _const_slice(prepared) -> slice:
    k = next(i for i, a in enumerate(prepared.args) if a.kind == ArgKind.CONST)
    start = prepared.placement[k] + prepared.args[k].offset
    return slice(start, start + prepared.args[k].nbytes)


def test_corrupt_or_swapped_weights_change_result():
    k, n = 256, 192  # 2 x 3 subvolumes
    b = random((k, n), F32, seed=5)
    model = matmul_model((1, k), (k, n), (1, n), F32, b)
    a = random((1, k), F32)
    good = run_emu(model, {"A": a}).outputs["Y"]
    layout = bf16_layout(k, n)

    p = harness.prepare(ir.from_proto(model), {"A": a})
    const = p.buffers[ArgKind.CONST]
    base = _const_slice(p).start
    const[base + layout.subvolume(1, 1).start + 2 * 64 * 5 + 1] ^= 0x40  # one bf16 high byte
    bad = harness.execute(p).outputs["Y"]
    assert not np.allclose(bad, good)

    p = harness.prepare(ir.from_proto(model), {"A": a})
    const = p.buffers[ArgKind.CONST]
    s0, s1 = layout.subvolume(0, 0), layout.subvolume(2, 1)
    a0 = bytes(const[base + s0.start : base + s0.stop])
    const[base + s0.start : base + s0.stop] = const[base + s1.start : base + s1.stop]
    const[base + s1.start : base + s1.stop] = a0
    swapped = harness.execute(p).outputs["Y"]
    assert not np.allclose(swapped, good)


# ---- two activations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "y_shape"),
    [
        ((2, 4, 8, 16), (2, 4, 16, 8), (2, 4, 8, 16 // 2)),
        ((1, 4, 5, 32), (3, 1, 32, 6), (3, 4, 5, 6)),  # broadcast batch dims
        ((3, 1, 24), (24, 10), (3, 1, 10)),  # B an activation of rank 2
    ],
    ids=["attention", "broadcast", "rank2-b"],
)
def test_matmul_two_activations(a_shape, b_shape, y_shape, float_dtype):
    model = matmul_model(a_shape, b_shape, y_shape, float_dtype)
    feeds = {"A": random(a_shape, float_dtype), "B": random(b_shape, float_dtype, seed=4)}
    res = check(model, feeds)
    assert not res.prepared.cfg.consts


# ---- Gemm ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "c_shape"),
    [
        (0, 0, 1.0, 1.0, None),
        (0, 1, 0.5, 2.0, (70,)),
        (1, 0, 1.5, 1.0, (5, 70)),
        (1, 1, 1.0, -1.0, (5, 1)),
        (0, 0, 1.0, 0.5, ()),
    ],
)
def test_gemm(trans_a, trans_b, alpha, beta, c_shape, float_dtype):
    m, k, n = 5, 150, 70
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    inits = {"B": random(b_shape, float_dtype, seed=7, scale=0.3)}
    inputs = [("A", float_dtype, a_shape), ("B", float_dtype, b_shape)]
    if c_shape is not None:
        inits["C"] = random(c_shape, float_dtype, seed=8)
        inputs.append(("C", float_dtype, c_shape))
    model = one_node_model(
        "Gemm", inputs, [("Y", float_dtype, (m, n))], initializers=inits,
        alpha=alpha, beta=beta, transA=trans_a, transB=trans_b,
    )  # fmt: skip
    check(model, {"A": random(a_shape, float_dtype)})


# ---- MatMulBias (npudispatch domain) ------------------------------------------------------------


def test_matmul_bias_matches_matmul_add(float_dtype):
    m, k, n = 3, 200, 100
    b = random((k, n), float_dtype, seed=9, scale=0.3)
    bias = random((n,), float_dtype, seed=10)
    model = one_node_model(
        "MatMulBias",
        [("A", float_dtype, (m, k)), ("B", float_dtype, (k, n)), ("bias", float_dtype, (n,))],
        [("Y", float_dtype, (m, n))],
        domain="npudispatch",
        initializers={"B": b, "bias": bias},
    )
    a = random((m, k), float_dtype)
    res = run_emu(model, {"A": a})
    ref = reference(res, {"A": a})[0]
    # onnxruntime on the equivalent standard subgraph MatMul + Add
    std = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["A", "B"], ["t"]),
                helper.make_node("Add", ["t", "bias"], ["Y"]),
            ],
            "g",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
            initializer=[
                onnx.numpy_helper.from_array(b.astype(np.float32), "B"),
                onnx.numpy_helper.from_array(bias.astype(np.float32), "bias"),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 20)],
        ir_version=10,
    )
    ort_y = run_ort(std, {"A": a})[0]
    assert_close(res.outputs["Y"], ref)
    assert_close(res.outputs["Y"], ort_y)


# ---- weight format --------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(1, 1), (128, 64), (300, 130), (129, 65)])
@pytest.mark.parametrize("stripes", [1, 2, 5])
def test_bf16_format_round_trip(k, n, stripes):
    w = random((k, n), F32)
    layout = bf16_layout(k, n)
    image = format_bf16(w)
    assert image.size == layout.nbytes
    cols = image.reshape(layout.n_blocks, layout.column_bytes)
    stream = cols[stripe_order(layout.n_blocks, stripes)].reshape(-1)
    back = decode_bf16(stream, k, n, stripes)
    np.testing.assert_array_equal(back[:k, :n], w.astype(BF16).astype(F32))
    assert not back[k:].any() and not back[:, n:].any()
    np.testing.assert_array_equal(format_bf16(w.T, n_major=True), image)


def test_bf16_subvolume_layout_is_column_major():
    """Subvolume (nb, kb) holds W[kb*128:(kb+1)*128, nb*64:(nb+1)*64] column by column."""
    k, n = 256, 128
    w = np.arange(k * n, dtype=F32).reshape(k, n) % 251
    layout = bf16_layout(k, n)
    image = format_bf16(w)
    sv = image[layout.subvolume(1, 0)].view(BF16).astype(F32).reshape(64, 128)
    np.testing.assert_array_equal(sv, w[0:128, 64:128].T)


# ---- declines -------------------------------------------------------------------------------


def _node(model) -> ir.Node:
    return next(iter(ir.from_proto(model).graph))


def test_declines():
    f = F32
    int_model = one_node_model(
        "MatMul", [("A", f, (2, 3)), ("B", f, (3, 4))], [("Y", f, (2, 4))],
        initializers={"B": np.ones((3, 4), f)},
    )  # fmt: skip
    node = _node(int_model)
    node.inputs[0].dtype = ir.DataType.INT32
    assert "float32 or bfloat16" in MatMul().match(node).reason

    gemm_act_b = one_node_model("Gemm", [("A", f, (2, 3)), ("B", f, (3, 4))], [("Y", f, (2, 4))])
    r = Gemm().match(_node(gemm_act_b))
    assert isinstance(r, Decline) and "not a constant initializer" in r.reason

    gemm_act_c = one_node_model(
        "Gemm", [("A", f, (2, 3)), ("B", f, (3, 4)), ("C", f, (4,))], [("Y", f, (2, 4))],
        initializers={"B": np.ones((3, 4), f)},
    )  # fmt: skip
    assert "input C must be a constant" in Gemm().match(_node(gemm_act_c)).reason

    b3 = one_node_model(
        "MatMul", [("A", f, (2, 3)), ("B", f, (2, 3, 4))], [("Y", f, (2, 2, 4))],
        initializers={"B": np.ones((2, 3, 4), f)},
    )  # fmt: skip
    assert "only 2-d constant weights" in MatMul().match(_node(b3)).reason

    a_const = one_node_model(
        "MatMul", [("A", f, (2, 3)), ("B", f, (3, 4))], [("Y", f, (2, 4))],
        initializers={"A": np.ones((2, 3), f), "B": np.ones((3, 4), f)},
    )  # fmt: skip
    assert "constant" in MatMul().match(_node(a_const)).reason

    bias_act = one_node_model(
        "MatMulBias", [("A", f, (2, 3)), ("B", f, (3, 4)), ("bias", f, (4,))],
        [("Y", f, (2, 4))], domain="npudispatch", initializers={"B": np.ones((3, 4), f)},
    )  # fmt: skip
    assert "bias" in MatMulBias().match(_node(bias_act)).reason
    assert registry.support(_node(bias_act)) is not None
