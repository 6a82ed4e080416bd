"""The MatMulNBits kernel's side of the q4 image: dequantization and the single-row product.

Both read the (striped) q4 image a DMA delivered (format in :mod:`.weights`) and dequantize it
a chunk of rows of ``W^T`` at a time, with scales and zero points decoded once per image:
:func:`dequantize_q4` builds the float32 matrix (several activation rows), :func:`q4_matmul`
multiplies one activation row without building it (decode). Results are bit-identical to the
plain decode-then-dequantize-then-matmul computation (``tests/operators/test_q4_matmul.py``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from npudispatch.operators.weights import (
    KSUBV,
    NSUBV,
    q4_layout,
    q4_parts,
    round_bf16_inplace,
    stripe_order,
    unpack_nibbles,
)

__all__ = ["Q4_MATMUL_THREADS", "dequantize_q4", "q4_matmul", "scratch_bytes"]

#: Threads a large single-row q4 product uses (the calling thread and pool workers take chunks
#: of stream columns from one queue; outputs are disjoint and each is computed the same way, so
#: the result does not depend on the count). BLAS stays single-threaded.
Q4_MATMUL_THREADS = min(2, os.cpu_count() or 1)
_PARALLEL_WEIGHTS = 1 << 22  # below ~4 M weights one thread is as fast
#: Most weights dequantized per chunk (one numpy pass each, ~8 bytes of scratch per weight and
#: thread): the two threads hand the GIL to each other once per pass, so large chunks let them
#: overlap (22 ms vs 28 ms per llama2 projection on 2 cores against 256 K weights), while a
#: product keeps at least :data:`MIN_CHUNKS` of them so both threads finish together.
CHUNK_WEIGHTS = 1 << 20
MIN_CHUNKS = 32


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One worker pool per size for the whole process (not a new pool per product per run)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="npudispatch-q4")


# A forked child inherits the cached pool without its threads (and with a semaphore saying a
# worker is idle), so a product would wait forever for a helper that never runs: forget it.
os.register_at_fork(after_in_child=_pool.cache_clear)


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
    q4 = _Q4Columns(stream, k, n, block_size, stripes, fp32_scales=fp32_scales)
    wt = np.empty((q4.layout.np_, q4.layout.kp), dtype=np.float32)  # [Np, Kp]
    work = _Workspace(NSUBV, q4.layout.kp)
    for column, block in enumerate(q4.order.tolist()):
        q4.dequantize(_Chunk(column, column + 1, 0, NSUBV), work, wt[block * NSUBV :])
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
    are dequantized a chunk of rows of ``W^T`` at a time (whole stream columns, or a few rows of
    one when K is large) into one buffer and each chunk of outputs is one BLAS matrix-vector
    product over it. A matrix-vector product computes every output as its own dot product over
    the same K lanes, in groups of 4 outputs and the last ``N mod 4`` separately, whatever the
    number of outputs; chunks start on multiples of 4 outputs and the last ``N mod 4`` are
    recomputed the way the whole product computes them, so the chunks equal the columns of the
    whole product (``tests/operators/test_q4_matmul.py`` compares them bit for bit). Several
    rows (prefill) take the whole-matrix product, where BLAS may block differently.
    """
    a = np.asarray(a, dtype=np.float32)
    if a.size != a.shape[-1] or a.shape[-1] != k:
        return a @ dequantize_q4(stream, k, n, block_size, stripes, fp32_scales=fp32_scales)[:k, :n]
    q4 = _Q4Columns(stream, k, n, block_size, stripes, fp32_scales=fp32_scales)
    layout, order = q4.layout, q4.order
    chunks = _chunks(layout.n_blocks, layout.kp)
    y_blocks = np.empty((layout.n_blocks, NSUBV), dtype=np.float32)  # outputs by N-block
    a_row = a.reshape(1, k)
    rows = max(c.rows for c in chunks)

    def run(queue: Iterator[_Chunk]) -> None:
        work = _Workspace(rows, layout.kp, output=True)
        for chunk in queue:
            w_t = q4.dequantize(chunk, work, work.output)
            products = a_row @ w_t.T[:k]
            y_blocks[order[chunk.c0 : chunk.c1], chunk.r0 : chunk.r1] = products.reshape(
                chunk.c1 - chunk.c0, chunk.r1 - chunk.r0
            )

    workers = min(Q4_MATMUL_THREADS, len(chunks)) if k * n >= _PARALLEL_WEIGHTS else 1
    if workers <= 1:
        run(iter(chunks))
    else:  # disjoint outputs; numpy and BLAS release the GIL for each chunk's passes
        queue = _SharedQueue(chunks)
        helpers = [_pool(workers - 1).submit(run, queue) for _ in range(workers - 1)]
        try:
            run(queue)  # the calling thread takes chunks too
        finally:
            for helper in helpers:
                helper.result()
    y = y_blocks.reshape(-1)[:n]
    if n % 4:
        _ragged_outputs(q4, a_row, y)
    return y.reshape(*a.shape[:-1], n)


def _ragged_outputs(q4: _Q4Columns, a_row: np.ndarray, y: np.ndarray) -> None:
    """Recompute the last ``N mod 4`` outputs as BLAS does in the whole product: there they
    come after the groups of 4 outputs, from their own kernels (a chunk computed them in a group
    of 4 with padding rows). One product over them and the 4 outputs before them (recomputed
    equal) takes those kernels; a single output alone would take the dot product instead."""
    n, k = y.size, a_row.shape[-1]
    lo = max(0, n - n % 4 - 4)
    w_t = np.empty((n - lo, q4.layout.kp), dtype=np.float32)
    work = _Workspace(n - lo, q4.layout.kp)
    column_of = np.argsort(q4.order)  # stream column of each N-block
    for block in range(lo // NSUBV, -(-n // NSUBV)):
        r0, r1 = max(lo - block * NSUBV, 0), min(n - block * NSUBV, NSUBV)
        column = int(column_of[block])
        q4.dequantize(_Chunk(column, column + 1, r0, r1), work, w_t[block * NSUBV + r0 - lo :])
    y[lo:] = (a_row @ w_t.T[:k]).reshape(-1)


def scratch_bytes(k: int, n: int, block_size: int) -> int:
    """Bytes of temporaries each thread of a single-row :func:`q4_matmul` allocates (its chunk's
    code bytes and two float32 buffers): fixed by :data:`CHUNK_WEIGHTS`, never the weights."""
    layout = q4_layout(k, n, block_size)
    chunk = max(_chunks(layout.n_blocks, layout.kp), key=lambda c: c.rows)
    return _Workspace(chunk.rows, layout.kp, output=True).nbytes


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Rows ``r0:r1`` of stream columns ``c0:c1`` (several columns only with all their rows)."""

    c0: int
    c1: int
    r0: int
    r1: int

    @property
    def rows(self) -> int:
        return (self.c1 - self.c0) * (self.r1 - self.r0)


def _chunks(n_blocks: int, kp: int) -> list[_Chunk]:
    """Chunks of at most :data:`CHUNK_WEIGHTS` weights and 1 / :data:`MIN_CHUNKS` of the
    product: whole stream columns when they are that small, else a power-of-two number of rows
    (at least 4) of one column."""
    size = max(1, min(CHUNK_WEIGHTS, n_blocks * NSUBV * kp // MIN_CHUNKS))
    columns = max(1, size // (NSUBV * kp))
    if columns > 1:
        return [
            _Chunk(c, min(c + columns, n_blocks), 0, NSUBV) for c in range(0, n_blocks, columns)
        ]
    rows = NSUBV
    while rows > 4 and rows * kp > size:
        rows //= 2
    return [_Chunk(c, c + 1, r, r + rows) for c in range(n_blocks) for r in range(0, NSUBV, rows)]


class _SharedQueue:
    """An iterator several threads take chunks from, each chunk once."""

    def __init__(self, chunks: list[_Chunk]) -> None:
        self._chunks = iter(chunks)
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[_Chunk]:
        return self

    def __next__(self) -> _Chunk:
        with self._lock:
            return next(self._chunks)


class _Workspace:
    """One thread's temporaries for chunks of up to ``rows`` rows of ``W^T`` (``kp`` wide): the
    code bytes of the chunk's columns, a float32 scratch buffer and (for products) the float32
    output buffer; the integer passes run in the bytes of the two float buffers."""

    def __init__(self, rows: int, kp: int, *, output: bool = False) -> None:
        columns = -(-rows // NSUBV)
        self.codes = np.empty((columns, kp // KSUBV, KSUBV * NSUBV // 2), dtype=np.uint8)
        self.loaded: tuple[int, int] | None = None  # stream columns held in ``codes``
        self.scratch = np.empty((rows, kp), dtype=np.float32)
        self.output = np.empty((rows, kp) if output else 0, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scratch.nbytes + self.output.nbytes


# bf16 rounding of v = (code - zero point) · scale without integer passes: with x = v · 2^16
# (exact), c = x · (1 + 2^-16) rounds v · 65537 once, and c - x (exact: c and x are within a
# factor 2) is v rounded to 8 significant bits, ties to even: the bits below c's last place
# are v's bits below its 8th. It needs v · 65537 not to overflow and v far from the subnormals
# (scales in _SPLIT_SCALE_RANGE), and gives +0 where v is -0, so it is used when every scale is
# positive; otherwise Veltkamp's split hi = c - (c - v), c = v · 65537 (signed zeros kept), or
# the integer rounding outside the range. All three are checked exhaustively in the tests.
_SPLIT = np.float32(65537)
_SPLIT_SCALE_RANGE = (2.0**-100, 2.0**100)  # |scale| in [low, high), or scale = ±0
_SCALED = np.float32(65536)
_SCALED_SPLIT = np.float32(1 + 2.0**-16)


def _in_split_range(bf16_bits: np.ndarray, *, positive: bool = False) -> bool:
    """Whether every bf16 scale (raw bits) is ±0 or has a magnitude in _SPLIT_SCALE_RANGE
    (NaN and infinity are not), read from the exponent field; with ``positive``, whether every
    one is in the range and positive."""
    low, high = (int(np.log2(x)) + 127 for x in _SPLIT_SCALE_RANGE)  # biased exponents
    exponent = (bf16_bits >> 7) & 0xFF
    ok = (exponent >= low) & (exponent < high)
    if positive:
        ok &= bf16_bits < 0x8000
    else:
        ok |= (bf16_bits & 0x7FFF) == 0
    return bool(ok.all())


class _Q4Columns:
    """A q4 weight stream's N-block columns (stream order) with scales and zero points decoded
    once; :meth:`dequantize` turns rows of stream columns into float32 ``W^T`` rows."""

    def __init__(
        self,
        stream: np.ndarray,
        k: int,
        n: int,
        block_size: int,
        stripes: int,
        *,
        fp32_scales: bool,
    ) -> None:
        layout = q4_layout(k, n, block_size, fp32_scales=fp32_scales)
        codes_b, scale_b, zp_b, subv = q4_parts(block_size, fp32_scales=fp32_scales)
        if stream.size != layout.nbytes:
            raise ValueError(f"weight stream has {stream.size} bytes, layout needs {layout.nbytes}")
        g = KSUBV // block_size
        nb, kb = layout.n_blocks, layout.k_blocks
        groups = layout.kp // block_size
        cols = np.frombuffer(stream, dtype=np.uint8).reshape(nb, kb, subv)  # in stream order
        self.order = stripe_order(nb, stripes)  # N-block of each stream column
        raw = cols[:, :, codes_b : codes_b + scale_b].copy()
        self.rounding = "none"
        if fp32_scales:
            sc = raw.view("<f4").reshape(nb, kb, NSUBV, g).transpose(0, 2, 1, 3)
            scales = np.ascontiguousarray(sc, dtype=np.float32).reshape(nb, NSUBV, groups)
        else:  # a bf16 is the upper half of the float32 with the same value
            bits = raw.view("<u2").reshape(nb, kb, NSUBV, g).transpose(0, 2, 1, 3)
            wide = bits.astype("<u4").reshape(nb, NSUBV, groups)
            self.rounding = self._bf16_rounding(wide, k, n, block_size)
            wide <<= 16
            scales = wide.view(np.float32)
            if self.rounding == "scaled":
                scales *= _SCALED  # exact in the range
        zpb = cols[:, :, codes_b + scale_b : codes_b + scale_b + zp_b]
        zp = unpack_nibbles(zpb.reshape(nb, kb, g, NSUBV // 2), NSUBV)
        zp = zp.transpose(0, 3, 1, 2).reshape(nb, NSUBV, groups)
        self.layout = layout
        self.block_size = block_size
        self._kb, self._groups = kb, groups
        self._columns = cols
        self._codes_bytes = codes_b
        self.scales = scales[..., None]  # float32 [column, NSUBV, groups, 1]
        self.zero_points = np.ascontiguousarray(zp).view(np.int8)[..., None]
        # one zero point everywhere (no zero_points input: 8): a plain subtraction, not a broadcast
        first = self.zero_points.flat[0]
        self.zero_point = first if bool((self.zero_points == first).all()) else None

    def _bf16_rounding(self, bits: np.ndarray, k: int, n: int, block_size: int) -> str:
        """How bf16 scales ``bits`` (``[column, NSUBV, groups]``, stream order) round:
        ``scaled`` when every scale of a real row and K group is positive and in range (the
        padding feeds no output), ``split`` when all are in range or ±0, else ``integer``."""
        real = self.order[:, None] * NSUBV + np.arange(NSUBV) < n  # [column, row]: row < N
        if _in_split_range(bits[real, : -(-k // block_size)], positive=True):
            return "scaled"
        if _in_split_range(bits):
            return "split"
        return "integer"

    def _codes(self, chunk: _Chunk, work: _Workspace) -> np.ndarray:
        """Code bytes of ``chunk`` as ``[columns, rows, kb, KSUBV/2]`` (rows of ``W^T``). The
        columns are first copied as they lie in the stream (runs of whole subvolumes) into the
        workspace, where the transposing reads then hit the cache instead of striding through
        the stream; the rows of one column taken in several chunks reuse that copy."""
        c0, c1 = chunk.c0, chunk.c1
        copy = work.codes[: c1 - c0]
        if work.loaded != (c0, c1):
            np.copyto(copy, self._columns[c0:c1, :, : self._codes_bytes])
            work.loaded = (c0, c1)
        codes = copy.reshape(c1 - c0, self._kb, NSUBV, KSUBV // 2)[:, :, chunk.r0 : chunk.r1]
        return codes.transpose(0, 2, 1, 3)

    def dequantize(self, chunk: _Chunk, work: _Workspace, out: np.ndarray) -> np.ndarray:
        """Rows of ``chunk`` as float32 ``(code - zp) · scale`` (bf16-rounded unless the
        scales are float32) in ``out[: chunk.rows]`` (rows of ``W^T``, returned)."""
        c0, c1, r0, r1 = chunk.c0, chunk.c1, chunk.r0, chunk.r1
        rows, kb = chunk.rows, self._kb
        shape = (rows, self._groups, self.block_size)
        band = out[:rows].reshape(shape)
        scratch = work.scratch[:rows].reshape(shape)
        # the integer passes in the first quarter of the scratch buffer, their temporary in out
        d = scratch.reshape(-1).view(np.int8)[: rows * self.layout.kp].reshape(shape)
        # each code byte widened to a little-endian u16 whose bytes are its low and high nibble:
        # d's bytes become the unpacked codes in K order, then code - zero point in int8
        pairs = d.view("<u2").reshape(c1 - c0, r1 - r0, kb, KSUBV // 2)
        np.copyto(pairs, self._codes(chunk, work), casting="unsafe")
        shifted = band.reshape(-1).view("<u2")[: pairs.size].reshape(pairs.shape)
        np.left_shift(pairs, 4, out=shifted)
        pairs |= shifted
        pairs &= 0x0F0F
        if self.zero_point is not None:
            np.subtract(d, self.zero_point, out=d)
        else:
            np.subtract(d, self.zero_points[c0:c1, r0:r1].reshape(rows, self._groups, 1), out=d)
        scales = self.scales[c0:c1, r0:r1].reshape(rows, self._groups, 1)
        band[...] = d  # exact small integers
        band *= scales  # with bf16 scales exact (at most 12 significant bits; scaled: x = v · 2^16)
        if self.rounding == "scaled":
            np.multiply(band, _SCALED_SPLIT, out=scratch)  # c
            np.subtract(scratch, band, out=band)
        elif self.rounding == "split":
            np.multiply(band, _SPLIT, out=scratch)  # c
            np.subtract(scratch, band, out=band)
            np.subtract(scratch, band, out=band)
        elif self.rounding == "integer":
            round_bf16_inplace(band)
        return out[:rows]
