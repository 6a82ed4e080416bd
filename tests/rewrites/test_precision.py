"""Precision pass: bf16 inside NPU partitions, casts only at borders, tolerance policy."""

from __future__ import annotations

import math
import zlib

import numpy as np
import onnx_ir as ir
import pytest
import test_padding
from rw_helpers import run_ort
from test_padding import const, floats, prepared, run_nodes

from npudispatch import graph
from npudispatch.rewrites import PassManager
from npudispatch.rewrites.padding import pad_model
from npudispatch.rewrites.precision import (
    BF16_UNIT_ROUNDOFF,
    BOUNDARY_KEY,
    PrecisionPass,
    Tolerance,
    convert_to_bf16,
    npu_support,
    tolerance_for,
    tolerance_for_model,
)

F32, BF16 = ir.DataType.FLOAT, ir.DataType.BFLOAT16


@pytest.fixture(autouse=True)
def _data_independent_of_test_order(request):
    """Seed test_padding's generator (behind ``floats``) per test: data never depends on order."""
    test_padding.RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


def mlp_text(k: int = 32, n: int = 48) -> str:
    """Two NPU partitions around a CPU Atan; the graph input feeds both a CPU and an NPU node."""
    w1, w2 = floats(k, n) / math.sqrt(k), floats(n, k) / math.sqrt(n)
    return f"""
    g (float[4,{k}] x) => (float[4,{k}] y, float[4,{k}] c) <{const("w1", w1)}, {const("w2", w2)}, {
        const("b", floats(n))
    }, {const("g", floats(k))}> {{
      h = MatMul(x, w1)
      hb = Add(h, b)
      s = Sigmoid(hb)
      m = Mul(hb, s)
      o = MatMul(m, w2)
      c = Atan(o)
      r = Add(c, x)
      y = SimplifiedLayerNormalization<axis=-1, epsilon=0.00001>(r, g)
    }}
    """


def npu_partitions(m: ir.Model) -> list[graph.Partition]:
    return [p for p in graph.partition(m, npu_support) if p.kind == "npu"]


def test_casts_only_at_borders_and_intermediates_bf16():
    text = mlp_text()
    original, m = prepared(text), prepared(text)
    before = graph.partition(original, npu_support)
    report = convert_to_bf16(m)
    after = graph.partition(m, npu_support)
    assert [p.kind for p in after] == [p.kind for p in before]  # partition count unchanged
    assert not report.kept_float32
    for part in npu_partitions(m):
        inside = set(part.nodes)
        for node in part.nodes:
            if node.op_type == "Cast":
                assert node.metadata_props[BOUNDARY_KEY] == "boundary"
                src, dst = node.inputs[0], node.outputs[0]
                # to bf16: reads a partition input; to float32: writes a partition output.
                assert src in part.inputs or dst in part.outputs
                assert (src.producer() not in inside) or dst in part.outputs
                continue
            for v in (*node.inputs, *node.outputs):
                if v is not None and v.dtype in (F32, BF16):
                    assert v.dtype == BF16, f"{v.name} of {node.op_type} is {v.dtype}"
    # Public interface unchanged: names and float32 types of graph inputs/outputs.
    assert [(v.name, v.dtype) for v in m.graph.inputs] == [("x", F32)]
    assert [(v.name, v.dtype) for v in m.graph.outputs] == [("y", F32), ("c", F32)]
    # CPU node untouched: Atan still reads and writes float32 under the original names.
    cpu_op = next(n for n in m.graph if n.op_type == "Atan")
    assert (cpu_op.inputs[0].name, cpu_op.inputs[0].dtype, cpu_op.outputs[0].dtype) == (
        "o",
        F32,
        F32,
    )
    # Weights converted once, as constants (no Cast node for them): half the bytes.
    w1 = m.graph.initializers["w1__bf16"]
    assert w1.dtype == BF16 and w1.const_value.nbytes == 32 * 48 * 2
    assert "w1" not in m.graph.initializers
    assert sum(n.op_type == "Cast" for n in m.graph) == 5  # x->bf16 twice, o, y->f32, c in
    assert len(report.casts) == 5


def test_outputs_match_float32_within_policy():
    text = mlp_text()
    original, m = prepared(text), prepared(text)
    convert_to_bf16(m)
    x = floats(4, 32)
    got = run_nodes(m, {"x": x})
    ref = run_ort(original, {"x": x})
    tol = tolerance_for([n.op_type for n in original.graph], k=48)
    for g, r, name in zip(got, ref, ("y", "c")):
        assert g.dtype == np.float32
        tol.assert_close(g, r, name)
    assert tolerance_for_model(m).rtol >= tol.rtol * 0.5


def test_idempotent_in_pass_manager():
    m = prepared(mlp_text())
    pm = PassManager([PrecisionPass()], fixpoint=True)
    assert pm(m).modified
    assert [r.modified for r in pm.records] == [True, False]


def test_node_declining_bf16_keeps_float32():
    # An identity Cast(to=FLOAT) cannot produce bf16: it stays float32, bridged by casts.
    text = """
    g (float[2,16] x) => (float[2,16] y) {
      a = Sigmoid(x)
      b = Cast<to=1>(a)
      y = Sigmoid(b)
    }
    """
    original, m = prepared(text), prepared(text)
    report = convert_to_bf16(m)
    assert list(report.kept_float32.values()) == [report.kept_float32["<unnamed Cast>"]]
    assert "to=" in report.kept_float32["<unnamed Cast>"]
    cast = next(n for n in m.graph if n.op_type == "Cast" and BOUNDARY_KEY not in n.metadata_props)
    assert cast.inputs[0].dtype == F32 and cast.outputs[0].dtype == F32
    x = floats(2, 16)
    tolerance_for(["Sigmoid"] * 2 + ["Cast"] * 4).assert_close(
        run_nodes(m, {"x": x})[0], run_ort(original, {"x": x})[0]
    )


def test_padding_then_precision():
    # Order matters: padding first (Cast's granularity does not tie its input to its output,
    # so casts inserted first would pin the borders); the casts copy the padded shapes.
    text = f"""
    g (float[3,11] x) => (float[3,11] y) <{const("b", floats(11))}> {{
      a = Add(x, b)
      y = Softmax<axis=-1>(a)
    }}
    """
    original, m = prepared(text), prepared(text)
    report = pad_model(m)
    convert_to_bf16(m)
    assert report.modified
    b = next(v for v in m.graph.initializers.values())
    assert b.dtype == BF16 and tuple(b.shape) == (16,)
    assert tuple(m.graph.outputs[0].shape) == (3, 16)  # the float32 cast output is padded too
    x = floats(3, 11)
    (y,) = run_nodes(m, {"x": x})
    tolerance_for(["Cast", "Add", "Softmax", "Cast"]).assert_close(
        y, run_ort(original, {"x": x})[0]
    )


def test_non_float_and_bf16_models_untouched():
    text = """
    g (int64[2,3] x) => (int64[2,3] y) {
      y = Add(x, x)
    }
    """
    m = prepared(text)
    assert not convert_to_bf16(m).modified


# ---- tolerance policy -----------------------------------------------------------------------


def test_tolerance_values_and_k_scaling():
    u = BF16_UNIT_ROUNDOFF
    assert tolerance_for(["Add"]) == Tolerance(3 * u, 3 * u)
    assert tolerance_for(["Add", "Softmax"]).rtol == pytest.approx(5 * u)  # quadrature
    assert tolerance_for(["Transpose"]).rtol == u  # budget 0, yet never below one bf16 rounding
    mm = tolerance_for(["MatMul"], k=1024)
    assert mm.rtol == 4 * u and mm.atol == pytest.approx(4 * u * 32)
    assert tolerance_for(["Add"], k=1024).atol == 3 * u  # no matmul: K irrelevant
    rtol, atol = tolerance_for(["MatMul"]).scaled(2.0)
    assert atol == 8 * u and rtol == 4 * u


@pytest.mark.parametrize("k", [16, 256, 2048])
def test_tolerance_covers_bf16_matmul_but_not_a_real_error(k):
    a, b = floats(8, k), floats(k, 24)
    bf = np.asarray(a, "bfloat16").astype(np.float32) @ np.asarray(b, "bfloat16").astype(np.float32)
    bf = bf.astype("bfloat16").astype(np.float32)
    ref = a @ b
    tol = tolerance_for(["MatMul"], k=k)
    assert tol.close(bf, ref)
    wrong = bf.copy()
    wrong[3, 5] += 0.05 * math.sqrt(k) + 0.05 * abs(ref[3, 5])  # a real bug, not rounding
    assert not tol.close(wrong, ref)
    with pytest.raises(AssertionError, match="tolerance policy"):
        tol.assert_close(wrong, ref, "y")


def test_default_pipeline_with_padding_and_precision():
    # The default wiring: fusions, then padding, then precision, then view marks.
    from npudispatch.rewrites import LATE_PASSES_ANCHOR, default_pipeline

    text = mlp_text(k=30, n=44)
    original, m = prepared(text), prepared(text)
    pm = default_pipeline()
    names = pm.names
    assert names.index("PadTerminalsPass") < names.index("PrecisionPass")
    assert names.index("PrecisionPass") < names.index(LATE_PASSES_ANCHOR)
    off = default_pipeline(pad=False, bf16=False).names
    assert "PadTerminalsPass" not in off and "PrecisionPass" not in off
    pm(m)
    assert max(r.step for r in pm.records) == 1  # fixpoint reached in the second round
    hb = next(v for n in m.graph for v in n.outputs if v.name == "hb")
    assert (tuple(hb.shape), hb.dtype) == ((4, 48), BF16)  # N 44 padded, bf16 inside
    x = floats(4, 30)
    tol = tolerance_for([n.op_type for n in original.graph], k=44)
    for got, ref in zip(run_nodes(m, {"x": x}), run_ort(original, {"x": x})):
        tol.assert_close(got, ref)


def _cast_chain(src_dtype: ir.DataType, extra_use: bool) -> ir.Model:
    a = ir.val("a", src_dtype, [4])
    widen = ir.node("Cast", [a], {"to": ir.DataType.FLOAT}, name="widen")
    widen.outputs[0].dtype, widen.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([4])
    narrow = ir.node("Cast", [widen.outputs[0]], {"to": ir.DataType.BFLOAT16}, name="narrow")
    narrow.outputs[0].dtype, narrow.outputs[0].shape = ir.DataType.BFLOAT16, ir.Shape([4])
    sig = ir.node("Sigmoid", [narrow.outputs[0]], name="sig")
    sig.outputs[0].name, sig.outputs[0].dtype = "y", ir.DataType.BFLOAT16
    sig.outputs[0].shape = ir.Shape([4])
    nodes, outputs = [widen, narrow, sig], [sig.outputs[0]]
    if extra_use:
        neg = ir.node("Neg", [widen.outputs[0]], name="neg")
        neg.outputs[0].name, neg.outputs[0].dtype = "z", ir.DataType.FLOAT
        neg.outputs[0].shape = ir.Shape([4])
        nodes.append(neg)
        outputs.append(neg.outputs[0])
    g = ir.Graph([a], outputs, nodes=nodes, opset_imports={"": 20}, name="g")
    return ir.Model(g, ir_version=10)


def test_fold_cast_round_trips():
    from npudispatch.rewrites.precision import fold_cast_round_trips

    m = _cast_chain(ir.DataType.BFLOAT16, extra_use=False)
    assert fold_cast_round_trips(m) == ["narrow"]
    assert [n.op_type for n in m.graph] == ["Sigmoid"]
    assert m.graph.node("sig").inputs[0] is m.graph.inputs[0]

    shared = _cast_chain(ir.DataType.BFLOAT16, extra_use=True)
    assert fold_cast_round_trips(shared) == ["narrow"]
    assert [n.op_type for n in shared.graph] == ["Cast", "Sigmoid", "Neg"]  # widen still feeds Neg

    lossy = _cast_chain(ir.DataType.FLOAT, extra_use=False)  # f32 -> f32 -> bf16 rounds: keep
    assert fold_cast_round_trips(lossy) == []
    assert len(list(lossy.graph)) == 3
