"""RMSNorm and skip-RMSNorm fusions: forms, opset 17/18 axes, residual sum kept, negative cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass
from rw_helpers import model, ops, run_ort

from npudispatch.rewrites import rms_norm_rules_set, skip_rms_norm_rules_set

RNG = np.random.default_rng(0)
X = RNG.standard_normal((1, 4, 16)).astype(np.float32)
R = RNG.standard_normal((1, 4, 16)).astype(np.float32)

SQUARE = {"pow": "x2 = Pow(x, two)", "mul": "x2 = Mul(x, x)"}
RECIP = {
    "div": "s = Sqrt(d)\n n = Div(x, s)",
    "reciprocal": "s = Sqrt(d)\n r = Reciprocal(s)\n n = Mul(x, r)",
    "one_div": "s = Sqrt(d)\n r = Div(onec, s)\n n = Mul(r, x)",
    "pow": "r = Pow(d, mhalf)\n n = Mul(x, r)",
}


def rms_text(
    square="pow",
    recip="reciprocal",
    opset_version=18,
    axes="-1",
    keepdims=1,
    extra_out="",
    w_shape="16",
    eps="0.000001",
):
    reduce = (
        f"ms = ReduceMean <keepdims = {keepdims}> (x2, axes)"
        if opset_version >= 18
        else f"ms = ReduceMean <axes = [{axes}], keepdims = {keepdims}> (x2)"
    )
    return f"""agraph (float[1,4,16] x) => (float[1,4,16] y{extra_out})
      <float[{w_shape}] w = {{{", ".join(["1.5"] * math.prod(int(d) for d in w_shape.split(",")))}}},
       float two = {{2.0}}, float eps = {{{eps}}}, int64[1] axes = {{{axes}}},
       float onec = {{1.0}}, float mhalf = {{-0.5}}> {{
      {SQUARE[square]}
      {reduce}
      d = Add(ms, eps)
      {RECIP[recip]}
      y = Mul(w, n)
    }}"""


def fuse(m, rules) -> int:
    n = rules.apply_to_model(m)
    RemoveUnusedNodesPass()(m)
    return n


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("recip", ["div", "reciprocal", "one_div", "pow"])
@pytest.mark.parametrize("opset_version", [17, 18])
def test_rms_norm_forms(square, recip, opset_version):
    text = rms_text(square, recip, opset_version)
    before, after = model(text, opset_version), model(text, opset_version)
    assert fuse(after, rms_norm_rules_set()) == 1
    assert ops(after) == ["SimplifiedLayerNormalization"]
    node = next(iter(after.graph))
    assert node.attributes.get_float("epsilon") == pytest.approx(1e-6)
    # ORT computes the decomposed and the fused form in float32: 1e-5 covers the rounding.
    np.testing.assert_allclose(
        run_ort(after, {"x": X})[0], run_ort(before, {"x": X})[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"axes": "1"}, "reduces a middle axis"),
        ({"axes": "2", "opset_version": 17}, "positive last axis is fine"),
        ({"keepdims": 0}, "keepdims=0"),
        ({"w_shape": "4,16"}, "weight is not [D]"),
        ({"eps": "2.0"}, "epsilon out of range"),
        ({"extra_out": ", float[1,4,1] ms"}, "mean is a graph output"),
    ],
)
def test_rms_norm_negative(kwargs, why):
    opset_version = kwargs.get("opset_version", 18)
    m = model(rms_text(**kwargs), opset_version)
    expected = 1 if why == "positive last axis is fine" else 0
    assert fuse(m, rms_norm_rules_set()) == expected, why


def test_rms_norm_not_fused_when_intermediate_has_other_consumer():
    text = (
        rms_text()
        .replace("y = Mul(w, n)", "y = Mul(w, n)\n z = Neg(s)")
        .replace("=> (float[1,4,16] y)", "=> (float[1,4,16] y, float[1,4,1] z)")
    )
    m = model(text)
    assert fuse(m, rms_norm_rules_set()) == 0


SKIP = """agraph (float[1,4,16] a, float[1,4,16] b) => (float[1,4,16] y{outs}) <float[16] w = {{{w}}}> {{
  s = Add(a, b)
  y = SimplifiedLayerNormalization <axis = -1, epsilon = 0.00001> (s, w)
  {extra}
}}"""
W = ", ".join(["0.5"] * 16)


def test_skip_rms_norm_single_use_sum():
    text = SKIP.format(outs="", w=W, extra="")
    before, after = model(text), model(text)
    assert fuse(after, skip_rms_norm_rules_set()) == 1
    assert ops(after) == ["com.microsoft.SkipSimplifiedLayerNormalization"]
    assert len(next(iter(after.graph)).outputs) == 1
    feeds = {"a": X, "b": R}
    np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(before, feeds)[0], atol=1e-5)


def test_skip_rms_norm_keeps_residual_sum_as_output_3():
    text = SKIP.format(outs=", float[1,4,16] z", w=W, extra="z = Mul(s, b)")
    before, after = model(text), model(text)
    assert fuse(after, skip_rms_norm_rules_set()) == 1
    assert ops(after) == ["com.microsoft.SkipSimplifiedLayerNormalization", "Mul"]
    skip, mul = list(after.graph)
    assert mul.inputs[0] is skip.outputs[3]
    feeds = {"a": X, "b": R}
    for got, ref in zip(run_ort(after, feeds), run_ort(before, feeds), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_skip_rms_norm_not_fused_when_add_broadcasts():
    text = SKIP.format(outs="", w=W, extra="").replace("float[1,4,16] b", "float[16] b")
    m = model(text)
    assert fuse(m, skip_rms_norm_rules_set()) == 0
