"""Canonical forms and constant folding that older exporters' models need (rewrites/canonical.py,
rewrites/folding.py): inference Dropout, n-ary Sum, ConstantOfShape weights, reshaped weights.
Every rewritten graph must compute what onnxruntime computes on the original."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from rw_helpers import model, ops, run_ort

from npudispatch import Session, graph
from npudispatch.rewrites.canonical import CanonicalFormsPass
from npudispatch.rewrites.folding import FoldConstantFillsPass, FoldConstantViewsPass

RNG = np.random.default_rng(0)


def _x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_inference_dropout_becomes_identity():
    m = model(
        "agraph (float[2,3] x) => (float[2,3] y) {"
        " d, mask = Dropout <ratio = 0.5> (x)  y = Relu(d) }",
        opset_version=9,
    )
    x = _x(2, 3)
    (want,) = run_ort(m, {"x": x})
    assert CanonicalFormsPass()(m).modified
    assert ops(m) == ["Identity", "Relu"]
    np.testing.assert_array_equal(run_ort(m, {"x": x})[0], want)


@pytest.mark.parametrize(
    "text",
    [
        # training mode: the mask and the scaling are real
        "agraph (float[2,3] x) => (float[2,3] y) { t = Constant <value = bool {1}> ()"
        " r = Constant <value = float {0.5}> () y = Dropout (x, r, t) }",
        # training mode chosen at run time
        "agraph (float[2,3] x, bool t) => (float[2,3] y) { r = Constant <value = float {0.5}> ()"
        " y = Dropout (x, r, t) }",
        # the mask is read
        "agraph (float[2,3] x) => (float[2,3] y, bool[2,3] m) { y, m = Dropout (x) }",
    ],
)
def test_dropout_that_is_not_the_identity_stays(text):
    m = model(text)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(m)  # as the pipeline
    assert not CanonicalFormsPass()(m).modified
    assert "Dropout" in ops(m)


def test_dropout_with_a_constant_false_training_mode_is_the_identity():
    m = model(
        "agraph (float[2,3] x) => (float[2,3] y) { t = Constant <value = bool {0}> ()"
        " r = Constant <value = float {0.5}> () y = Dropout (x, r, t) }"
    )
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(m)
    x = _x(2, 3)
    assert CanonicalFormsPass()(m).modified and ops(m) == ["Identity"]
    np.testing.assert_array_equal(run_ort(m, {"x": x})[0], x)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_sum_becomes_a_chain_of_broadcasting_adds(count):
    names = [f"x{i}" for i in range(count)]
    shapes = ["float[2,3,4]", "float[3,1]", "float[4]", "float[1,3,4]"][:count]
    signature = ", ".join(f"{s} {n}" for s, n in zip(shapes, names))
    m = model(f"agraph ({signature}) => (float[2,3,4] y) {{ y = Sum ({', '.join(names)}) }}")
    feeds = {
        n: _x(*[int(d) for d in s[6:-1].split(",")]) for n, s in zip(names, shapes, strict=True)
    }
    if count == 1:
        feeds = {"x0": _x(2, 3, 4)}
    (want,) = run_ort(m, feeds)
    assert CanonicalFormsPass()(m).modified
    assert ops(m) == (["Identity"] if count == 1 else ["Add"] * (count - 1))
    np.testing.assert_allclose(run_ort(m, feeds)[0], want, rtol=1e-6)


def test_constant_of_shape_weight_becomes_an_initializer():
    m = model(
        "agraph (float[1,4] x) => (float[1,3] y) {"
        " s = Constant <value = int64[2] {4, 3}> ()"
        " w = ConstantOfShape <value = float[1] {0.25}> (s)  y = MatMul(x, w) }"
    )
    x = _x(1, 4)
    (want,) = run_ort(m, {"x": x})
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(m)
    assert FoldConstantFillsPass()(m).modified
    assert ops(m) == ["MatMul"]
    w = m.graph.initializers["w"].const_value.numpy()
    assert w.shape == (4, 3) and w.dtype == np.float32 and (w == 0.25).all()
    np.testing.assert_allclose(run_ort(m, {"x": x})[0], want, rtol=1e-6)


WEIGHT = "{" + ",".join(str(i) for i in range(36)) + "}"


def _reshaped_weight(second_reader: bool) -> str:
    extra, outs = (" z = Identity(w)", ", float[36] z") if second_reader else ("", "")
    return (
        f"agraph (float[2,12] x) => (float[2,3] y{outs})"
        f" <float[36] w = {WEIGHT}, int64[2] s = {{12, 3}}> {{"
        f" w2 = Reshape(w, s)  y = MatMul(x, w2){extra} }}"
    )


def test_a_weight_reshaped_in_the_graph_is_folded_when_nothing_else_reads_it():
    m = graph.load(model(_reshaped_weight(second_reader=False)))  # shapes inferred
    x = _x(2, 12)
    (want,) = run_ort(m, {"x": x})
    assert FoldConstantViewsPass()(m).modified
    assert ops(m) == ["MatMul"]
    np.testing.assert_array_equal(run_ort(m, {"x": x})[0], want)


def test_a_constant_read_twice_is_not_duplicated():
    m = graph.load(model(_reshaped_weight(second_reader=True)))
    assert not FoldConstantViewsPass()(m).modified
    assert sorted(ops(m)) == ["Identity", "MatMul", "Reshape"]


def test_dropout_and_sum_no_longer_split_the_npu_partition(tmp_path):
    m = model(
        "agraph (float[1,8] x) => (float[1,8] y) {"
        " a = Relu(x)  d, mask = Dropout <ratio = 0.5> (a)  b = Sigmoid(x)"
        " s = Sum(d, b, x)  y = Relu(s) }",
        opset_version=9,
    )
    path = tmp_path / "m.onnx"
    ir.save(m, path)
    sess = Session(path)
    x = _x(1, 8)
    (y,) = sess.run(None, {"x": x})
    assert sess.compiled.report.unsupported == []
    assert sess.last_run_stats.kernel_calls == 1
    np.testing.assert_allclose(y, run_ort(ir.load(path), {"x": x})[0], rtol=2e-2, atol=2e-2)


def test_opset_6_dropout_without_is_test_is_training_and_stays():
    m = model("agraph (float[2,3] x) => (float[2,3] y) { y = Dropout <ratio = 0.5> (x) }", 6)
    assert not CanonicalFormsPass()(m).modified
    tested = model(
        "agraph (float[2,3] x) => (float[2,3] y) { y = Dropout <ratio = 0.5, is_test = 1> (x) }",
        6,
    )
    assert CanonicalFormsPass()(tested).modified and ops(tested) == ["Identity"]
