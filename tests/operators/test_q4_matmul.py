"""The MatMulNBits kernel's product (q4_kernel.q4_matmul) equals, bit for bit, the straightforward
computation it replaces: dequantize the whole q4 image, then one ``a @ W`` product.

The reference decodes with :func:`weights.decode_q4` and dequantizes with plain numpy and
ml_dtypes' bf16 rounding (round to nearest even), and multiplies with the weights in the same
memory order as the kernel (``W^T`` rows contiguous along K), so BLAS computes every output as one
dot product over K in both. Kernels run on the virtual NPU with one BLAS thread
(``emulator.blas``); so do these comparisons.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from npudispatch.emulator.blas import limited_blas_threads
from npudispatch.operators import q4_kernel, weights


def _stream(rng, k, n, block, stripes, fp32, scale=0.05, *, positive=False, zero_points=True):
    """A q4 image of random constants, striped the way the DMA delivers it to the kernel
    (scales of both signs unless ``positive``; without ``zero_points`` the default 8)."""
    k_blocks = -(-k // block)
    b = rng.integers(0, 256, (n, k_blocks, block // 2), dtype=np.uint8)
    scales = (rng.standard_normal(n * k_blocks) * scale).astype(np.float32)
    if positive:
        scales = np.abs(scales)
    zp = rng.integers(0, 256, n * (-(-k_blocks // 2)), dtype=np.uint8) if zero_points else None
    image = weights.format_q4(b, scales, zp, k, n, block, fp32_scales=fp32)
    layout = weights.q4_layout(k, n, block, fp32_scales=fp32)
    order = weights.stripe_order(layout.n_blocks, stripes)
    return image.reshape(layout.n_blocks, -1)[order].reshape(-1)


def _reference(a, stream, k, n, block, stripes, fp32):
    q4 = weights.decode_q4(stream, k, n, block, stripes, fp32_scales=fp32)
    group = np.arange(q4.codes.shape[0]) // block
    w = (q4.codes.astype(np.float32) - q4.zero_points[group]) * q4.scales[group]
    if not fp32:
        w = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    w_t = np.ascontiguousarray(w.T)  # [Np, Kp]: the kernel's memory order
    return a @ w_t.T[:k, :n]


def _activations(rng, shape, fp32):
    a = rng.standard_normal(shape).astype(np.float32)
    return a if fp32 else a.astype(ml_dtypes.bfloat16).astype(np.float32)  # kernel entry


@pytest.mark.parametrize("fp32", [False, True], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("k", "n", "block", "stripes", "lead"),
    [
        (256, 200, 128, 1, (1,)),
        (300, 130, 32, 2, (1, 1)),
        (128, 64, 16, 1, ()),
        (97, 333, 64, 3, (1,)),
        (1000, 1001, 128, 2, (1,)),  # N not a multiple of 4: a ragged last slice
        (8200, 70, 32, 1, (1,)),  # Kp > 4096: slices of fewer than 64 rows
        (300, 130, 32, 2, (3,)),  # several rows: the whole-matrix product
        (256, 200, 64, 1, (2, 5)),
    ],
)
@pytest.mark.parametrize(
    ("positive", "zero_points"),
    [(False, True), (True, True), (True, False)],
    ids=["mixed-signs", "positive", "positive-no-zp"],
)
def test_q4_matmul_bit_identical_to_dequantize_then_matmul(
    k, n, block, stripes, lead, fp32, positive, zero_points
):
    rng = np.random.default_rng(k * 7 + n)
    stream = _stream(rng, k, n, block, stripes, fp32, positive=positive, zero_points=zero_points)
    a = _activations(rng, (*lead, k), fp32)
    q4 = q4_kernel._Q4Columns(stream, k, n, block, stripes, fp32_scales=fp32)
    assert q4.rounding == ("none" if fp32 else "scaled" if positive else "split")
    assert (q4.zero_point is None) == zero_points  # without them one zero point, 8, everywhere
    with limited_blas_threads(1):
        got = q4_kernel.q4_matmul(a, stream, k, n, block, stripes, fp32_scales=fp32)
        want = _reference(a, stream, k, n, block, stripes, fp32)
    assert got.shape == want.shape == (*lead, n)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(
    ("k", "n", "block", "stripes", "columns"),
    [
        (1000, 1001, 128, 2, 3),  # N mod 64 = 41, N mod 4 = 1: the ragged block mid-chunk
        (256, 963, 32, 3, 2),  # N mod 4 = 3, the last block the stream's 5th column of 16
        (300, 130, 16, 1, 7),  # one chunk holds every column
        (200, 64 * 9 + 2, 64, 4, 4),  # a last block of 2 rows
    ],
)
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-signs", "positive"])
def test_chunks_of_several_columns_are_bit_identical(
    monkeypatch, k, n, block, stripes, columns, positive
):
    """Chunks of several stream columns (striped: their N-blocks are not adjacent) are one
    matrix-vector product each; the ragged last N-block is multiplied on its own, as in the
    whole product, wherever it falls in its chunk."""
    kp = weights.q4_layout(k, n, block).kp
    monkeypatch.setattr(q4_kernel, "CHUNK_WEIGHTS", columns * weights.NSUBV * kp)
    monkeypatch.setattr(q4_kernel, "MIN_CHUNKS", 1)
    n_blocks = -(-n // weights.NSUBV)
    assert max(c.c1 - c.c0 for c in q4_kernel._chunks(n_blocks, kp)) == min(columns, n_blocks)
    rng = np.random.default_rng(n)
    stream = _stream(rng, k, n, block, stripes, False, positive=positive)
    a = _activations(rng, (1, k), False)
    with limited_blas_threads(1):
        got = q4_kernel.q4_matmul(a, stream, k, n, block, stripes)
        want = _reference(a, stream, k, n, block, stripes, False)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("chunk_weights", [1 << 18, 4 * 128], ids=["columns", "4-rows"])
def test_every_ragged_n_is_bit_identical(monkeypatch, chunk_weights):
    """The last N mod 4 outputs come from BLAS's remainder kernels in the whole product (and
    N = 1 from a dot product): recomputed so, whether they share a chunk, an N-block or a
    stream column with the outputs before them or not."""
    monkeypatch.setattr(q4_kernel, "CHUNK_WEIGHTS", chunk_weights)
    monkeypatch.setattr(q4_kernel, "MIN_CHUNKS", 1)
    k, block, stripes = 300, 32, 2  # (a dot product and the remainder kernel differ at N=129)
    for n in [1, 2, 3, 4, 5, 6, 7, 9, 63, 65, 66, 67, 69, 70, 71, 129, 130, 131, 133, 197]:
        rng = np.random.default_rng(n)
        stream = _stream(rng, k, n, block, stripes, False, positive=n % 2 == 0)
        a = _activations(rng, (1, k), False)
        with limited_blas_threads(1):
            got = q4_kernel.q4_matmul(a, stream, k, n, block, stripes)
            want = _reference(a, stream, k, n, block, stripes, False)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{n}")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("chunk_weights", [1 << 18, 4 * 1024])  # columns of 1000 / 8-row chunks
def test_threaded_q4_matmul_is_bit_identical(monkeypatch, threads, chunk_weights):
    """Large products share their chunks among threads; every output is still the same dot
    product, whatever the thread count, and equals the reference."""
    k, n, block, stripes = 1000, 1001, 128, 2
    rng = np.random.default_rng(5)
    stream = _stream(rng, k, n, block, stripes, False, positive=True)
    a = _activations(rng, (1, k), False)
    monkeypatch.setattr(q4_kernel, "CHUNK_WEIGHTS", chunk_weights)
    monkeypatch.setattr(q4_kernel, "MIN_CHUNKS", 1)
    with limited_blas_threads(1):
        single = q4_kernel.q4_matmul(a, stream, k, n, block, stripes)
        monkeypatch.setattr(q4_kernel, "_PARALLEL_WEIGHTS", 0)
        monkeypatch.setattr(q4_kernel, "Q4_MATMUL_THREADS", threads)
        threaded = q4_kernel.q4_matmul(a, stream, k, n, block, stripes)
        want = _reference(a, stream, k, n, block, stripes, False)
    np.testing.assert_array_equal(threaded.view(np.uint32), single.view(np.uint32))
    np.testing.assert_array_equal(threaded.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(
    ("change", "rounding"),
    [
        (None, "scaled"),
        ("negative", "split"),  # x = 0 · (-s) is -0: the scaled rounding would give +0
        ("zero", "split"),
        ("tiny", "integer"),
    ],
)
def test_rounding_follows_the_real_scales(change, rounding):
    """Each image takes the cheapest exact bf16 rounding its real scales allow; the padding
    (rows past N, K groups past K: zero scales) feeds no output and does not count."""
    rng = np.random.default_rng(11)
    k, n, block = 200, 100, 32  # 7 real K groups of 8, 100 real rows of 128
    k_blocks = -(-k // block)
    b = rng.integers(0, 256, (n, k_blocks, block // 2), dtype=np.uint8)
    scales = np.abs(rng.standard_normal(n * k_blocks) * 0.05).astype(np.float32) + 1e-3
    if change is not None:
        scales[37] = {"negative": -0.5, "zero": 0.0, "tiny": 1e-35}[change]
    stream = weights.format_q4(b, scales, None, k, n, block)
    assert q4_kernel._Q4Columns(stream, k, n, block, 1, fp32_scales=False).rounding == rounding
    a = _activations(rng, (1, k), False)
    with limited_blas_threads(1):
        got = q4_kernel.q4_matmul(a, stream, k, n, block)
        want = _reference(a, stream, k, n, block, 1, False)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("scale", [1e-34, 3e31], ids=["tiny", "huge"])
def test_scales_outside_the_split_range_round_like_ml_dtypes(scale):
    """Scales whose products could be subnormal or overflow take the integer rounding."""
    rng = np.random.default_rng(5)
    k, n, block = 256, 128, 32
    stream = _stream(rng, k, n, block, 1, False, scale=scale)
    a = _activations(rng, (1, k), False)
    with limited_blas_threads(1):
        got = q4_kernel.q4_matmul(a, stream, k, n, block)
        want = _reference(a, stream, k, n, block, 1, False)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    streamed = q4_kernel.dequantize_q4(stream, k, n, block)
    np.testing.assert_array_equal(streamed, weights.decode_q4(stream, k, n, block).dequantize())


def test_split_rounding_equals_bit_rounding_exhaustively():
    """hi = c - (c - v), c = v * 65537, is round-to-nearest-even to bf16 for every product of a
    4-bit difference d and a bf16 scale s = m · 2^(E-7) in the kernel's scale range: v is the
    integer d·m (|d·m| < 2^12; all integers |p| <= 2^13 are tried) times 2^(E-7), signed zeros
    included."""
    p = np.append(np.arange(-(1 << 13), (1 << 13) + 1, dtype=np.float64), -0.0)
    low, high = (int(np.log2(x)) for x in q4_kernel._SPLIT_SCALE_RANGE)
    for e in range(low - 7, high + 1 - 7):
        v = (p * 2.0**e).astype(np.float32)
        c = v * q4_kernel._SPLIT
        hi = c - (c - v)
        want = v.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(hi.view(np.uint32), want.view(np.uint32), err_msg=f"2^{e}")


def test_scaled_rounding_equals_bit_rounding_exhaustively():
    """With x = v · 2^16 (the scales are stored times 2^16) and c = x · (1 + 2^-16), c - x is
    round-to-nearest-even to bf16 of v = d·s for every 4-bit difference d and positive bf16
    scale s = m · 2^(E-7) in the scale range: v is the integer d·m (|d·m| < 2^12; all integers
    |p| <= 2^13 are tried) times 2^(E-7). (A zero v gives +0: only used for positive scales.)"""
    p = np.arange(-(1 << 13), (1 << 13) + 1, dtype=np.float64)
    low, high = (int(np.log2(x)) for x in q4_kernel._SPLIT_SCALE_RANGE)
    for e in range(low - 7, high + 1 - 7):
        v = (p * 2.0**e).astype(np.float32)
        x = (p * 2.0 ** (e + 16)).astype(np.float32)
        np.testing.assert_array_equal(x, v * q4_kernel._SCALED)  # exact
        c = x * q4_kernel._SCALED_SPLIT
        got = c - x
        want = v.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"2^{e}")


def test_a_changed_weight_byte_changes_the_product():
    """The product is computed from the bytes received: flip one code byte, one output moves."""
    rng = np.random.default_rng(9)
    k, n, block = 256, 128, 32
    stream = _stream(rng, k, n, block, 1, False)
    a = _activations(rng, (1, k), False)
    before = q4_kernel.q4_matmul(a, stream, k, n, block)
    changed = stream.copy()
    changed[100] ^= 0x0F  # a low-nibble code of N-block 0
    after = q4_kernel.q4_matmul(a, changed, k, n, block)
    moved = np.nonzero(before != after)[-1]
    assert moved.size == 1 and moved[0] < weights.NSUBV


def test_a_forked_child_gets_its_own_pool(monkeypatch):
    """After a fork the cached pool has no thread: the child must not wait for it forever."""
    import os
    import signal

    monkeypatch.setattr(q4_kernel, "_PARALLEL_WEIGHTS", 0)
    monkeypatch.setattr(q4_kernel, "Q4_MATMUL_THREADS", 2)
    k, n, block, stripes = 1000, 1001, 128, 2
    rng = np.random.default_rng(5)
    stream = _stream(rng, k, n, block, stripes, False, positive=True)
    a = _activations(rng, (1, k), False)
    y = q4_kernel.q4_matmul(a, stream, k, n, block, stripes)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        signal.alarm(20)
        same = np.array_equal(q4_kernel.q4_matmul(a, stream, k, n, block, stripes), y)
        os._exit(0 if same else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
