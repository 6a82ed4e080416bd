"""Banded q4 dequantization equals bf16(code - zero point) * scale, in either memory order."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from npudispatch.operators import q4_kernel, weights
from npudispatch.operators.weights import Q4Weights, unpack_nibbles


def _expected(codes, zp, scales, block):
    groups = np.repeat(np.arange(codes.shape[0] // block), block)
    exact = (codes.astype(np.float32) - zp[groups]) * scales[groups]
    return exact.astype(ml_dtypes.bfloat16).astype(np.float32)  # ml_dtypes rounds RNE


@pytest.mark.parametrize("n_major", [True, False])
@pytest.mark.parametrize("band", [1 << 18, 300])  # 300: bands of a few rows, ragged last band
def test_dequantize_matches_bf16_reference(n_major, band, monkeypatch) -> None:
    monkeypatch.setattr(weights, "DEQUANT_BAND", band)
    rng = np.random.default_rng(3)
    kp, np_, block = 256, 72, 32
    codes = rng.integers(0, 16, (kp, np_), dtype=np.uint8)
    if n_major:
        codes = np.ascontiguousarray(codes.T).T  # the layout decode_q4 returns
    zp = rng.integers(0, 16, (kp // block, np_), dtype=np.uint8)
    scales = (rng.standard_normal((kp // block, np_)) * 0.03).astype(ml_dtypes.bfloat16)
    scales = scales.astype(np.float32)
    got = Q4Weights(codes, zp, scales, block).dequantize()
    np.testing.assert_array_equal(got, _expected(codes, zp, scales, block))


def test_unpack_nibbles_low_nibble_first() -> None:
    packed = np.array([[0x21, 0xF0, 0x0A]], dtype=np.uint8)
    np.testing.assert_array_equal(unpack_nibbles(packed, 5), [[1, 2, 0, 15, 10]])


@pytest.mark.parametrize(
    ("k", "n", "block", "stripes", "fp32"),
    [
        (256, 200, 128, 1, False),
        (300, 130, 32, 2, False),
        (128, 64, 16, 1, True),
        (97, 333, 64, 3, False),
    ],
)
def test_streamed_dequantize_equals_decode_then_dequantize(k, n, block, stripes, fp32) -> None:
    rng = np.random.default_rng(k + n)
    k_blocks = -(-k // block)
    b = rng.integers(0, 256, (n, k_blocks, block // 2), dtype=np.uint8)
    scales = (rng.standard_normal(n * k_blocks) * 0.05).astype(np.float32)
    zp = rng.integers(0, 256, n * (-(-k_blocks // 2)), dtype=np.uint8)
    image = weights.format_q4(b, scales, zp, k, n, block, fp32_scales=fp32)
    layout = weights.q4_layout(k, n, block, fp32_scales=fp32)
    order = weights.stripe_order(layout.n_blocks, stripes)
    # the stream a striped DMA delivers: N-block order[c] at stream column c
    stream = image.reshape(layout.n_blocks, -1)[order].reshape(-1)
    want = weights.decode_q4(stream, k, n, block, stripes, fp32_scales=fp32).dequantize()
    got = q4_kernel.dequantize_q4(stream, k, n, block, stripes, fp32_scales=fp32)
    np.testing.assert_array_equal(got, want)
