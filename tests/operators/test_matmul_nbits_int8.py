"""MatMulNBits with ``accuracy_level=4``: activations quantized to int8 per K block, against
onnxruntime's own CPU kernel (MLAS CompInt8), which does the same.

Float32 compute must agree with onnxruntime to float32 accumulation noise and be far from the
exact-dequantization product (so the int8 path really ran); the tie-breaking of the quantizer is
read off onnxruntime's output on a crafted input; bf16 compute stays within the bf16 policy.
"""

from __future__ import annotations

import numpy as np
import pytest
from opkit import assert_close, run_ort
from test_matmul_quant import model_of, nbits_model

from npudispatch import Session
from npudispatch.operators.matmul_nbits import dequantize_nbits

F32 = np.dtype(np.float32)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.sqrt(np.mean(np.square(want))))


CASES = [  # (A shape, K, N, block, zero points, bias)
    ((1, 1), 192, 320, 32, False, False),  # the Qwen2 decode step
    ((1, 7), 448, 192, 32, False, False),  # a Qwen2 prefill, K = 14 blocks
    ((5,), 100, 37, 16, True, False),  # K not a multiple of the block, odd N
    ((3, 2), 300, 65, 64, False, True),  # bias, partial last block
    ((4,), 129, 33, 128, True, True),  # one lane in the last block
    ((2, 9), 257, 70, 32, True, False),  # odd k_blocks with packed zero points
]


@pytest.mark.parametrize(("m_shape", "k", "n", "block", "zp", "bias"), CASES)
def test_fp32_compute_matches_onnxruntime_int8_path(m_shape, k, n, block, zp, bias):
    model, inits = nbits_model(m_shape, k, n, block, zp=zp, bias=bias, seed=k + n, accuracy_level=4)
    a = np.random.default_rng(k).standard_normal((*m_shape, k)).astype(F32)
    a[..., : min(k, 16)] *= 8  # uneven block magnitudes: per-block scales matter
    want = run_ort(model, {"A": a})[0]
    (got,) = Session(model, bf16=False, cache=False).run(None, {"A": a})
    assert _rel(got, want) < 1e-5  # float32 accumulation order only (measured <= 1.7e-6)
    exact = a @ dequantize_nbits(inits["B"], inits["scales"], inits.get("zp"), k, n, block)
    if bias:
        exact = exact + inits["bias"]
    assert _rel(exact, want) > 1e-3  # onnxruntime really quantized A, and so did we


def test_quantizer_rounds_ties_to_even_like_onnxruntime():
    """A block whose amax is 127 (scale 1): lanes at ±0.5, 1.5, 2.5... are exact ties. Column j
    of B selects lane j (code 9 there, 8 = zero elsewhere, scale 1), so Y[j] is the quantized
    A[j] itself, read from onnxruntime and from our kernel."""
    k = n = 32
    a = np.zeros((1, k), F32)
    a[0, 0] = 127
    a[0, 1:12] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 100.5, -126.5, 0.49999997, 7.25]
    codes = np.full((n, k), 8, np.uint8)
    codes[np.arange(n), np.arange(k)] = 9
    b = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, 1, k // 2)
    from onnx import helper

    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=32, accuracy_level=4,
    )  # fmt: skip
    model = model_of(
        [node], [("A", F32, (1, k))], [("Y", F32, (1, n))],
        {"B": b, "scales": np.ones(n, F32)}, ("", "com.microsoft"),
    )  # fmt: skip
    want = run_ort(model, {"A": a})[0]
    np.testing.assert_array_equal(want[0, :12], [127, 0, 2, 2, 0, -2, -2, 4, 100, -126, 0, 7])
    (got,) = Session(model, bf16=False, cache=False).run(None, {"A": a})
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("m_shape", "k", "n", "block", "zp", "bias"), CASES[:4])
def test_bf16_compute_within_policy_of_onnxruntime_int8_path(m_shape, k, n, block, zp, bias):
    model, _ = nbits_model(m_shape, k, n, block, zp=zp, bias=bias, seed=k, accuracy_level=4)
    a = np.random.default_rng(k + 1).standard_normal((*m_shape, k)).astype(F32)
    want = run_ort(model, {"A": a})[0]
    (got,) = Session(model, cache=False).run(None, {"A": a})
    assert_close(got, want)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_run_check_reference_models_the_int8_path(bf16):
    """``run --check``'s rounding-aware reference keeps onnxruntime's int8-activation node (bf16
    scales in bf16 compute) and accepts our result in both compute modes."""
    from npudispatch.dispatch.check import RoundingReference, check_outputs

    model, _ = nbits_model((3, 5), 200, 72, 32, zp=True, bias=True, seed=9, accuracy_level=4)
    feeds = {"A": np.random.default_rng(3).standard_normal((3, 5, 200)).astype(F32)}
    (got,) = Session(model, bf16=bf16, cache=False).run(None, feeds)
    reference = RoundingReference(model, bf16=bf16)
    for name, verdict in check_outputs(reference, feeds, {"Y": got}).items():
        assert verdict.ok, f"{name}: {verdict.describe()}"
    if not bf16:  # in float32 compute the reference is onnxruntime's int8 kernel itself
        assert _rel(got, reference.run(feeds)["Y"]) < 2e-6
