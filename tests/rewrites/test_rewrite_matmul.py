"""MatMulBias and QMatMul fusions: positives (numerically checked) and negatives."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass
from rw_helpers import model, ops, run_ort, run_reference

from npudispatch.rewrites import matmul_rules

RNG = np.random.default_rng(0)
A = RNG.standard_normal((2, 3, 8)).astype(np.float32)


def fuse(m) -> int:
    n = matmul_rules().apply_to_model(m)
    RemoveUnusedNodesPass()(m)
    return n


def floats(n: int) -> str:
    return ", ".join(f"{v:.3f}" for v in RNG.standard_normal(n))


BIAS = """agraph (float[2,3,8] a) => (float[2,3,4] y{outs}) <float[8,4] b = {{{b}}}, float[{bs}] bias = {{{bias}}}> {{
  p = MatMul(a, b)
  y = Add({order})
}}"""


@pytest.mark.parametrize("order", ["p, bias", "bias, p"])
def test_matmul_bias(order):
    text = BIAS.format(outs="", b=floats(32), bs="4", bias=floats(4), order=order)
    before, after = model(text), model(text)
    assert fuse(after) == 1
    assert ops(after) == ["npudispatch.MatMulBias"]
    np.testing.assert_allclose(
        run_reference(after, {"a": A})[0], run_reference(before, {"a": A})[0], rtol=1e-6
    )
    np.testing.assert_allclose(run_ort(after, {"a": A})[0], run_ort(before, {"a": A})[0], atol=1e-5)


def test_matmul_bias_negative_cases():
    # bias shaped [1, 4] (not [N])
    m = model(BIAS.format(outs="", b=floats(32), bs="1,4", bias=floats(4), order="p, bias"))
    assert fuse(m) == 0
    # the MatMul result is also a graph output
    m = model(
        BIAS.format(outs=", float[2,3,4] p", b=floats(32), bs="4", bias=floats(4), order="p, bias")
    )
    assert fuse(m) == 0
    # bias is a runtime input, not a constant
    m = model(
        "agraph (float[2,3,8] a, float[4] bias) => (float[2,3,4] y) "
        f"<float[8,4] b = {{{floats(32)}}}> {{ p = MatMul(a, b)\n y = Add(p, bias) }}"
    )
    assert fuse(m) == 0


def qmm_text(b_dtype="int8", per_channel=False, zps=True, a_dtype="uint8"):
    n = 4
    bs = (
        f"float[{n}] bs = {{{', '.join(['0.02', '0.03', '0.05', '0.04'])}}}"
        if per_channel
        else "float bs = {0.03}"
    )
    bzp_vals = ", ".join(["0"] * n if b_dtype == "int8" else ["128"] * n)
    bzp = (
        f"{b_dtype}[{n}] bzp = {{{bzp_vals}}}"
        if per_channel
        else f"{b_dtype} bzp = {{{bzp_vals.split(',')[0]}}}"
    )
    b_vals = ", ".join(
        str(int(v)) for v in RNG.integers(0 if b_dtype == "uint8" else -100, 100, 8 * n)
    )
    az = f"{a_dtype} azp = {{{128}}}, " if zps else ""
    yz = "uint8 yzp = {120}, " if zps else ""
    dq_a = "af = DequantizeLinear(a, as, azp)" if zps else "af = DequantizeLinear(a, as)"
    dq_b = (
        "bf = DequantizeLinear <axis = 1> (b, bs, bzp)"
        if zps
        else "bf = DequantizeLinear <axis = 1> (b, bs)"
    )
    q_y = "y = QuantizeLinear(p, ys, yzp)" if zps else "y = QuantizeLinear(p, ys)"
    if not zps:
        bs_line = bs + ", "
    else:
        bs_line = bs + ", " + bzp + ", "
    return f"""agraph ({a_dtype}[3,8] a) => (uint8[3,{n}] y)
      <{b_dtype}[8,{n}] b = {{{b_vals}}}, float as = {{0.05}}, {az}{bs_line}{yz}float ys = {{0.1}}> {{
      {dq_a}
      {dq_b}
      p = MatMul(af, bf)
      {q_y}
    }}"""


@pytest.mark.parametrize("b_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("zps", [True, False])
def test_qmatmul(b_dtype, per_channel, zps):
    text = qmm_text(b_dtype, per_channel, zps)
    before, after = model(text, 21), model(text, 21)
    assert fuse(after) == 1
    assert [o for o in ops(after) if o != "Constant"] == ["npudispatch.QMatMul"]
    a = RNG.integers(0, 256, (3, 8)).astype(np.uint8)
    ref = run_reference(before, {"a": a})[0]
    # Same float32 maths; rounding of exact .5 ties may differ by one quantization step.
    assert np.abs(run_reference(after, {"a": a})[0].astype(int) - ref.astype(int)).max() <= 1
    assert np.abs(run_ort(after, {"a": a})[0].astype(int) - ref.astype(int)).max() <= 1


def test_qmatmul_takes_signed_activations_and_rejects_int32():
    """int8/int16 activations (symmetric recipes) fuse; int32 is no activation type."""
    assert fuse(model(qmm_text(a_dtype="int8").replace("{128}", "{-3}"), 21)) == 1
    assert fuse(model(qmm_text(a_dtype="int16"), 21)) == 1
    assert fuse(model(qmm_text(a_dtype="int32").replace("{128}", "{0}"), 21)) == 0


def test_qmatmul_rejects_float_matmul_with_other_consumer():
    text = qmm_text().replace("=> (uint8[3,4] y)", "=> (uint8[3,4] y, float[3,4] p)")
    m = model(text, 21)
    assert fuse(m) == 0
