"""SiLU and GELU fusions: positive forms (exporter variants, operand orders) and negative cases."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass
from rw_helpers import model, ops, run_reference

from npudispatch.rewrites import activation_rules
from npudispatch.rewrites.canonical import constants_last

X = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32) * 3


def fuse(m) -> int:
    constants_last(m.graph)
    count = activation_rules().apply_to_model(m)
    RemoveUnusedNodesPass()(m)
    return count


def assert_same(text: str, fused_op: str, opset_version: int = 18) -> None:
    """The model fuses into exactly one ``fused_op`` and computes the same as before."""
    before = model(text, opset_version)
    after = model(text, opset_version)
    assert fuse(after) == 1
    assert ops(after) == [fused_op]
    ref = run_reference(before, {"x": X})[0]
    got = run_reference(after, {"x": X})[0]
    # Exporters round √2 / √(2/π) (1.4142, 0.7071): the fused op uses the exact constants, which
    # moves outputs by up to ~1e-4·|x| on |x| <= 10; 2e-4 absolute is the documented tolerance.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-4)


SILU = "agraph (float[2,16] x) => (float[2,16] y) {{ s = Sigmoid(x)\n y = Mul({a}, {b}) }}"


@pytest.mark.parametrize(("a", "b"), [("x", "s"), ("s", "x")])
def test_silu_both_orders(a, b):
    assert_same(SILU.format(a=a, b=b), "npudispatch.Silu")


def test_silu_not_fused_when_sigmoid_has_other_consumer():
    m = model(
        "agraph (float[2,16] x) => (float[2,16] y, float[2,16] z) "
        "{ s = Sigmoid(x)\n y = Mul(x, s)\n z = Neg(s) }"
    )
    assert fuse(m) == 0
    assert "Sigmoid" in ops(m)


def test_silu_not_fused_when_sigmoid_is_graph_output():
    m = model(
        "agraph (float[2,16] x) => (float[2,16] y, float[2,16] s) { s = Sigmoid(x)\n y = Mul(x, s) }"
    )
    assert fuse(m) == 0


def test_silu_not_fused_for_different_operands():
    m = model(
        "agraph (float[2,16] x, float[2,16] w) => (float[2,16] y) { s = Sigmoid(x)\n y = Mul(w, s) }"
    )
    assert fuse(m) == 0


def test_silu_not_fused_for_integer_dtype():
    m = model(
        "agraph (int32[2,16] x, int32[2,16] w) => (int32[2,16] y) { s = Abs(x)\n y = Mul(x, s) }"
    )
    m2 = model("agraph (double[2,16] x) => (double[2,16] y) { s = Sigmoid(x)\n y = Mul(x, s) }")
    assert fuse(m) == 0
    assert fuse(m2) == 1  # double is a float type


ERF_TORCH = """agraph (float[2,16] x) => (float[2,16] y) {{
  c = Constant <value = float[{shape}] {{{sqrt}}}> ()
  d = {inner}(x, c)
  e = Erf(d)
  one = Constant <value = float {{1.0}}> ()
  e1 = Add(e, one)
  m = Mul(x, e1)
  half = Constant <value = float {{0.5}}> ()
  y = Mul(m, half)
}}"""


@pytest.mark.parametrize(
    ("inner", "sqrt", "shape"),
    [
        ("Div", "1.4142135381698608", ""),
        ("Div", "1.4142", ""),
        ("Mul", "0.7071", ""),
        ("Mul", "0.7071067811865476", "1"),
    ],
)
def test_erf_gelu_torch_exporter_variants(inner, sqrt, shape):
    text = ERF_TORCH.format(inner=inner, sqrt=sqrt, shape=shape).replace("float[]", "float")
    assert_same(text, "npudispatch.Gelu")


def test_erf_gelu_hf_form_constants_first():
    # HF: 0.5 * x * (1.0 + erf(x / sqrt(2))) -> Mul(Mul(0.5, x), Add(1.0, Erf(...)))
    text = """agraph (float[2,16] x) => (float[2,16] y) {
      c = Constant <value = float {1.4142135}> ()
      half = Constant <value = float {0.5}> ()
      one = Constant <value = float {1.0}> ()
      hx = Mul(half, x)
      d = Div(x, c)
      e = Erf(d)
      e1 = Add(one, e)
      y = Mul(hx, e1)
    }"""
    assert_same(text, "npudispatch.Gelu")


def test_erf_gelu_rejects_wrong_constant():
    m = model(ERF_TORCH.format(inner="Div", sqrt="2.0", shape="").replace("float[]", "float"))
    assert fuse(m) == 0
    assert "Erf" in ops(m)


def test_erf_gelu_rejects_other_consumer_of_erf():
    text = ERF_TORCH.format(inner="Div", sqrt="1.4142", shape="").replace("float[]", "float")
    text = text.replace("=> (float[2,16] y)", "=> (float[2,16] y, float[2,16] e)")
    m = model(text)
    assert fuse(m) == 0


TANH = """agraph (float[2,16] x) => (float[2,16] y) {{
  three = Constant <value = float {{3.0}}> ()
  kappa = Constant <value = float {{{kappa}}}> ()
  beta = Constant <value = float {{0.7978845608028654}}> ()
  one = Constant <value = float {{1.0}}> ()
  half = Constant <value = float {{0.5}}> ()
  x{cube_lhs} = {cube}
  kx3 = Mul(kappa, x3)
  inner = Add(x, kx3)
  arg = Mul(beta, inner)
  t = Tanh(arg)
  t1 = Add(one, t)
  hx = Mul(half, x)
  y = Mul(hx, t1)
}}"""


@pytest.mark.parametrize(
    "cube", ["Pow(x, three)", "Mul(x, x)\n  x3 = Mul(x2, x)", "Mul(x, x)\n  x3 = Mul(x, x2)"]
)
def test_tanh_gelu(cube):
    m = model(TANH.format(kappa="0.044715", cube=cube, cube_lhs="3" if "Pow" in cube else "2"))
    assert fuse(m) == 1
    node = next(iter(m.graph))
    assert node.op_type == "Gelu" and node.attributes.get_string("approximate") == "tanh"
    assert_same(
        TANH.format(kappa="0.044715", cube=cube, cube_lhs="3" if "Pow" in cube else "2"),
        "npudispatch.Gelu",
    )


def test_tanh_gelu_rejects_wrong_kappa():
    m = model(TANH.format(kappa="0.05", cube="Pow(x, three)", cube_lhs="3"))
    assert fuse(m) == 0
    assert "Tanh" in ops(m)
