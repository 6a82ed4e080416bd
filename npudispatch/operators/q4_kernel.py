"""The MatMulNBits kernel's side of the q4 image: dequantization and the single-row product.

Both read the (striped) q4 image a DMA delivered (format in :mod:`.weights`) and dequantize it
one N-block column at a time, in cache, with scales and zero points decoded once per image:
:func:`dequantize_q4` builds the float32 matrix (several activation rows), :func:`q4_matmul`
multiplies one activation row without building it (decode). Results are bit-identical to the
plain decode-then-dequantize-then-matmul computation (``tests/operators/test_q4_matmul.py``).
"""

from __future__ import annotations

import copy
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from npudispatch.operators.weights import (
    DEQUANT_BAND,
    KSUBV,
    NSUBV,
    q4_layout,
    q4_parts,
    round_bf16_inplace,
    stripe_order,
    unpack_nibbles,
)

__all__ = ["Q4_MATMUL_THREADS", "dequantize_q4", "q4_matmul"]

#: Threads a large single-row q4 product uses (each takes every other stream column; outputs are
#: disjoint and each is computed the same way, so the result does not depend on the count). The
#: work per slice (~0.2 ms) is coarse enough that two cores scale; BLAS stays single-threaded.
Q4_MATMUL_THREADS = min(2, os.cpu_count() or 1)
_PARALLEL_WEIGHTS = 1 << 22  # below ~4 M weights one thread is as fast


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One worker pool per size for the whole process (not a new pool per product per run)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="npudispatch-q4")


def dequantize_q4(
    stream: np.ndarray,
    k: int,
    n: int,
    block_size: int,
    stripes: int = 1,
    *,
    fp32_scales: bool = False,
) -> np.ndarray:
    """``decode_q4(...).dequantize()`` computed one N-block at a time straight from the image.

    Same float32 ``[Kp, Np]`` result (a transposed view of ``[Np, Kp]``), but each N-block's codes
    are unpacked, offset, scaled and rounded while they are in cache, and the whole code matrix
    is never materialised: the kernel's per-run cost on a llama2 projection is about halved.
    """
    q4 = _Q4Columns(stream, k, n, block_size, fp32_scales=fp32_scales)
    wt = np.empty((q4.layout.np_, q4.layout.kp), dtype=np.float32)  # [Np, Kp]
    for column, block in enumerate(stripe_order(q4.layout.n_blocks, stripes).tolist()):
        q4.dequantize_rows(column, 0, NSUBV, wt[block * NSUBV : (block + 1) * NSUBV])
    return wt.T


def q4_matmul(
    a: np.ndarray,
    stream: np.ndarray,
    k: int,
    n: int,
    block_size: int,
    stripes: int = 1,
    *,
    fp32_scales: bool = False,
) -> np.ndarray:
    """``a @ dequantize_q4(stream, ...)[:k, :n]`` for float32 ``a [..., k]``, bit for bit.

    A single activation row (decode, M = 1) never builds the dequantized matrix: the weights
    are dequantized a few rows of ``W^T`` at a time into one cache-sized buffer and each
    slice of outputs is one BLAS matrix-vector product over it. A matrix-vector product
    computes every output as its own dot product over the same K lanes with the same
    leading dimension, whatever the number of columns, so the slices equal the columns of
    the whole product (``tests/operators/test_q4_matmul.py`` compares them bit for bit).
    Several rows (prefill) take the whole-matrix product, where BLAS may block differently.
    """
    a = np.asarray(a, dtype=np.float32)
    if a.size != a.shape[-1] or a.shape[-1] != k:
        return a @ dequantize_q4(stream, k, n, block_size, stripes, fp32_scales=fp32_scales)[:k, :n]
    kp = q4_layout(k, n, block_size).kp
    # rows per slice: a power of two dividing NSUBV with at most DEQUANT_BAND weights (unless
    # that is under 4 rows); slices start on the 4-column boundaries of the whole product, where
    # BLAS matrix-vector kernels start their groups of 4 columns
    rows = NSUBV
    while rows > 4 and rows * kp > DEQUANT_BAND:
        rows //= 2
    q4 = _Q4Columns(stream, k, n, block_size, fp32_scales=fp32_scales, rows=rows)
    y = np.empty((*a.shape[:-1], n), dtype=np.float32)
    y_flat = y.reshape(n)

    def run(columns: list[tuple[int, int]], q: _Q4Columns) -> None:
        buffer = np.empty((rows, kp), dtype=np.float32)
        for column, block in columns:
            for r0 in range(0, NSUBV, rows):
                n0 = block * NSUBV + r0
                if n0 >= n:
                    break
                q.dequantize_rows(column, r0, r0 + rows, buffer)
                n1 = min(n0 + rows, n)
                y_flat[n0:n1] = (a @ buffer[: n1 - n0].T[:k]).reshape(-1)

    columns = list(enumerate(stripe_order(q4.layout.n_blocks, stripes).tolist()))
    workers = min(Q4_MATMUL_THREADS, len(columns)) if k * n >= _PARALLEL_WEIGHTS else 1
    if workers <= 1:
        run(columns, q4)
    else:  # disjoint output slices; numpy and BLAS release the GIL for each slice's work
        shares = [columns[i::workers] for i in range(workers)]
        list(_pool(workers).map(run, shares, [q4, *(q4.fork() for _ in range(workers - 1))]))
    return y


# bf16 rounding of v = (code - zero point) · scale by Veltkamp splitting, hi = c - (c - v) with
# c = v · (2^16 + 1): three float passes instead of five integer ones. For such v (at most 12
# significant bits) it equals round_bf16_inplace, ties to even included, as long as v · 65537
# cannot overflow and v is far from the subnormals: checked exhaustively in the tests for the
# scales in _SPLIT_SCALE_RANGE; other scales take the integer rounding.
_SPLIT = np.float32(65537)
_SPLIT_SCALE_RANGE = (2.0**-100, 2.0**100)  # |scale| in [low, high), or scale = ±0


def _in_split_range(bf16_bits: np.ndarray) -> bool:
    """Whether every bf16 scale (raw bits) is ±0 or has a magnitude in _SPLIT_SCALE_RANGE
    (NaN and infinity are not), read from the exponent field."""
    low, high = (int(np.log2(x)) + 127 for x in _SPLIT_SCALE_RANGE)  # biased exponents
    exponent = (bf16_bits >> 7) & 0xFF
    ok = (exponent >= low) & (exponent < high)
    ok |= (bf16_bits & 0x7FFF) == 0
    return bool(ok.all())


class _Q4Columns:
    """A q4 weight stream's N-block columns (stream order) with scales and zero points decoded
    once; :meth:`dequantize_rows` turns rows of one column into float32 ``W^T`` rows."""

    def __init__(
        self,
        stream: np.ndarray,
        k: int,
        n: int,
        block_size: int,
        *,
        fp32_scales: bool,
        rows: int = NSUBV,
    ) -> None:
        layout = q4_layout(k, n, block_size, fp32_scales=fp32_scales)
        codes_b, scale_b, zp_b, subv = q4_parts(block_size, fp32_scales=fp32_scales)
        if stream.size != layout.nbytes:
            raise ValueError(f"weight stream has {stream.size} bytes, layout needs {layout.nbytes}")
        g = KSUBV // block_size
        nb, kb = layout.n_blocks, layout.k_blocks
        groups = layout.kp // block_size
        cols = np.frombuffer(stream, dtype=np.uint8).reshape(nb, kb, subv)  # in stream order
        raw = cols[:, :, codes_b : codes_b + scale_b].copy()
        if fp32_scales:
            sc = raw.view("<f4").reshape(nb, kb, NSUBV, g).transpose(0, 2, 1, 3)
            scales = np.ascontiguousarray(sc, dtype=np.float32).reshape(nb, NSUBV, groups)
        else:  # a bf16 is the upper half of the float32 with the same value
            bits = raw.view("<u2").reshape(nb, kb, NSUBV, g).transpose(0, 2, 1, 3)
            wide = bits.astype("<u4").reshape(nb, NSUBV, groups)
            wide <<= 16
            scales = wide.view(np.float32)
        zpb = cols[:, :, codes_b + scale_b : codes_b + scale_b + zp_b]
        zp = unpack_nibbles(zpb.reshape(nb, kb, g, NSUBV // 2), NSUBV)
        zp = zp.transpose(0, 3, 1, 2).reshape(nb, NSUBV, groups)
        self.layout = layout
        self.block_size = block_size
        self._kb, self._groups = kb, groups
        self.fp32 = fp32_scales
        self.split_rounding = not fp32_scales and _in_split_range(raw.view("<u2"))
        self._columns = cols
        self._codes_bytes = codes_b
        # the column being dequantized, copied contiguously first: the transposing reads that
        # gather its rows then hit the cache instead of striding through the stream
        self._column = np.empty((kb, subv), dtype=np.uint8)
        self._loaded = -1
        self.scales = scales[..., None]  # float32 [column, NSUBV, groups, 1]
        self.zero_points = np.ascontiguousarray(zp).view(np.int8)[..., None]
        # temporaries for up to ``rows`` rows, reused by every dequantize_rows call
        self._diff = np.empty((rows, layout.kp), dtype=np.int8)
        self._shifted = np.empty((rows, layout.kp // 2), dtype=np.uint16)
        self._split = np.empty((rows, layout.kp) if self.split_rounding else 0, np.float32)

    def fork(self) -> _Q4Columns:
        """A view of the same decoded stream with its own temporaries (one per thread)."""
        twin = copy.copy(self)
        twin._column = np.empty_like(self._column)
        twin._loaded = -1
        twin._diff = np.empty_like(self._diff)
        twin._shifted = np.empty_like(self._shifted)
        twin._split = np.empty_like(self._split)
        return twin

    def _codes(self, column: int) -> np.ndarray:
        """Code bytes of stream column ``column`` as ``[NSUBV, kb, KSUBV/2]`` (rows of ``W^T``)."""
        if self._loaded != column:
            np.copyto(self._column, self._columns[column])
            self._loaded = column
        codes = self._column[:, : self._codes_bytes]
        return codes.reshape(-1, NSUBV, KSUBV // 2).transpose(1, 0, 2)

    def dequantize_rows(self, column: int, r0: int, r1: int, out: np.ndarray) -> None:
        """Rows ``r0:r1`` (at most ``rows``) of stream column ``column`` as float32
        ``(code - zp) · scale`` (bf16-rounded unless the scales are float32) into
        ``out[: r1 - r0]`` (rows of ``W^T``)."""
        rows = r1 - r0
        shape = (rows, self._groups, self.block_size)
        diff = self._diff[:rows]
        # each code byte widened to a little-endian u16 whose bytes are its low and high nibble:
        # diff's bytes become the unpacked codes in K order, then code - zero point in int8
        pairs = diff.view("<u2").reshape(rows, self._kb, KSUBV // 2)
        np.copyto(pairs, self._codes(column)[r0:r1], casting="unsafe")
        shifted = self._shifted[:rows].reshape(pairs.shape)
        np.left_shift(pairs, 4, out=shifted)
        pairs |= shifted
        pairs &= 0x0F0F
        codes = diff.reshape(shape)
        np.subtract(codes, self.zero_points[column, r0:r1], out=codes)
        band = out[:rows].reshape(shape)
        band[...] = codes  # exact small integers
        band *= self.scales[column, r0:r1]  # with bf16 scales exact (at most 12 significant bits)
        if self.fp32:
            return
        if not self.split_rounding:
            round_bf16_inplace(band)
            return
        c = self._split[:rows].reshape(shape)
        np.multiply(band, _SPLIT, out=c)
        np.subtract(c, band, out=band)
        np.subtract(c, band, out=band)
