"""Weight formatting: constant matrices → the tiled images matmul kernels read (vectorized numpy).

Every format shares one grid. The logical weight ``W[K, N]`` (``Y = A @ W``) is zero-padded to
``Kp x Np`` (multiples of :data:`KSUBV` x :data:`NSUBV`) and cut into subvolumes of
``KSUBV = 128`` rows (K) by ``NSUBV = 64`` columns (N):

* **grid order** — N-block major, K-block minor: ``image[nb][kb]``. One N-block's column of
  subvolumes (its whole K extent) is contiguous, ``column_bytes`` long, so a DMA can stream
  "every C-th N-block" with a single d0/d1/d2 pattern (the mladf striping idea, docs/txn_format.md §9).
* **inside a subvolume** — column by column (N-major, K contiguous): the dot-product order of a
  vector core, and the native order of ``W^T`` (Gemm ``transB=1``, MatMulNBits ``B``), so
  formatting is one blocked transpose.

Formats (byte layout of one subvolume):

* ``bf16``: ``[NSUBV][KSUBV]`` bfloat16 (16,384 B); ``fp32``: the same grid in float32
  (32,768 B), the image of float32 compute (``bf16=False``).
* ``int8``: ``[NSUBV][KSUBV]`` int8 or uint8 (8,192 B), for quantized MatMul.
* ``q4`` (MatMulNBits, 4-bit, group size ``G`` in {16, 32, 64, 128}, ``g = KSUBV / G``):
  ``[NSUBV][KSUBV/2]`` bytes of codes, byte ``j`` of a column holding rows ``2j`` (low nibble) and
  ``2j+1`` (high nibble) — the same pairing as onnxruntime's ``B``, so codes move as whole bytes;
  then scales ``[NSUBV][g]`` bfloat16; then zero points ``[g][NSUBV/2]`` bytes, packed along N
  (low nibble = even column); zero padding up to a multiple of 64 bytes. For ``G = 128`` this is
  4,096 + 128 + 32 → 4,288 B. Padded rows/columns carry code 8, zero point 8 and scale 0, so they
  dequantize to exactly 0. In float32 compute the scales are float32 (``fp32_scales``: twice the
  scale bytes) and dequantized weights are not rounded to bf16.

Decoders (``decode_*``) read the bytes back; kernels use them, so a wrong image gives a wrong
result. :func:`stripe_order` gives the N-block order of a weight stream striped over channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

KSUBV = 128
NSUBV = 64
SUBV_ALIGN = 64
Q4_BLOCK_SIZES = (16, 32, 64, 128)
Q4_DEFAULT_ZERO_POINT = 8

BF16 = np.dtype(ml_dtypes.bfloat16)


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True, slots=True)
class TileLayout:
    """Geometry of one tiled weight image (see the module docstring)."""

    k: int
    n: int
    subv_bytes: int
    ksubv: int = KSUBV
    nsubv: int = NSUBV

    @property
    def kp(self) -> int:
        """K padded to the tile grid."""
        return _ceil_to(self.k, self.ksubv)

    @property
    def np_(self) -> int:
        """N padded to the tile grid."""
        return _ceil_to(self.n, self.nsubv)

    @property
    def k_blocks(self) -> int:
        """Subvolumes along K."""
        return self.kp // self.ksubv

    @property
    def n_blocks(self) -> int:
        """Subvolumes along N."""
        return self.np_ // self.nsubv

    @property
    def column_bytes(self) -> int:
        """Bytes of one N-block (its column of ``k_blocks`` subvolumes)."""
        return self.k_blocks * self.subv_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the whole image."""
        return self.n_blocks * self.column_bytes

    def subvolume(self, nb: int, kb: int) -> slice:
        """Byte range of subvolume (``nb``, ``kb``) in the (unstriped) image."""
        start = nb * self.column_bytes + kb * self.subv_bytes
        return slice(start, start + self.subv_bytes)


def bf16_layout(k: int, n: int, *, fp32: bool = False) -> TileLayout:
    """Layout of a bf16 weight image (``fp32``: of a float32 image, same grid, 4-byte elements)."""
    return TileLayout(k, n, KSUBV * NSUBV * (4 if fp32 else 2))


def int8_layout(k: int, n: int) -> TileLayout:
    """Layout of an 8-bit weight image."""
    return TileLayout(k, n, KSUBV * NSUBV)


def q4_parts(block_size: int, *, fp32_scales: bool = False) -> tuple[int, int, int, int]:
    """(code bytes, scale bytes, zero-point bytes, padded subvolume bytes) of a q4 subvolume."""
    if block_size not in Q4_BLOCK_SIZES:
        raise ValueError(f"q4 block size must be one of {Q4_BLOCK_SIZES}, got {block_size}")
    groups = KSUBV // block_size
    scale_bytes = 4 if fp32_scales else 2
    codes, scales, zps = NSUBV * KSUBV // 2, NSUBV * groups * scale_bytes, groups * NSUBV // 2
    return codes, scales, zps, _ceil_to(codes + scales + zps, SUBV_ALIGN)


def q4_layout(k: int, n: int, block_size: int, *, fp32_scales: bool = False) -> TileLayout:
    """Layout of a 4-bit group-quantized weight image."""
    return TileLayout(k, n, q4_parts(block_size, fp32_scales=fp32_scales)[3])


def stripe_order(n_blocks: int, stripes: int) -> np.ndarray:
    """N-block order of a stream striped over ``stripes`` channels.

    Channel ``c`` carries blocks ``c, c + stripes, c + 2·stripes, ...``; the operand stream is the
    channels' streams concatenated, so block ``order[i]`` is the ``i``-th column in the stream.
    """
    return np.concatenate([np.arange(c, n_blocks, stripes) for c in range(stripes)])


def _tile_columns(
    wt: np.ndarray, layout: TileLayout, fill: int | float = 0, out: np.ndarray | None = None
) -> np.ndarray:
    """``W^T [N, Kx]`` (Kx = K, or K/2 for packed nibbles) → ``[nb, kb, NSUBV, Kx_subv]`` tiles.

    One blocked transpose copy (into ``out`` when given); a padded copy first only when the
    matrix does not already fill the grid.
    """
    n, kx = wt.shape
    kx_p = kx * layout.kp // layout.k if layout.k else 0
    if (n, kx) != (layout.np_, kx_p):
        padded = np.full((layout.np_, kx_p), fill, dtype=wt.dtype)
        padded[:n, :kx] = wt
        wt = padded
    kx_subv = kx_p // layout.k_blocks
    tiles = wt.reshape(layout.n_blocks, layout.nsubv, layout.k_blocks, kx_subv).transpose(
        0, 2, 1, 3
    )
    if out is None:
        return np.ascontiguousarray(tiles)
    out[...] = tiles
    return out


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Finite float32 → bf16 bit patterns (uint16), round to nearest even, via integer ops.

    Same result as ``x.astype(ml_dtypes.bfloat16)`` for finite values, several times faster on
    large weights.
    """
    u = np.asarray(x, dtype=np.float32).view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


def _untile_columns(tiles: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_tile_columns` (without the crop): ``[nb, kb, NSUBV, x] → [Np, Kx_p]``."""
    nb, kb, nsubv, x = tiles.shape
    return tiles.transpose(0, 2, 1, 3).reshape(nb * nsubv, kb * x)


def _unstripe(stream: np.ndarray, layout: TileLayout, stripes: int) -> np.ndarray:
    """Stream bytes → ``[nb, column_bytes]`` columns back in N order."""
    if stream.size != layout.nbytes:
        raise ValueError(f"weight stream has {stream.size} bytes, layout needs {layout.nbytes}")
    cols = np.frombuffer(stream, dtype=np.uint8).reshape(layout.n_blocks, layout.column_bytes)
    out = np.empty_like(cols)
    out[stripe_order(layout.n_blocks, stripes)] = cols
    return out


# ---------------------------------------------------------------------------------------------
# bf16 and 8-bit weights


def format_bf16(w: np.ndarray, *, n_major: bool = False, fp32: bool = False) -> np.ndarray:
    """Format a float weight ``[K, N]`` (or ``[N, K]`` with ``n_major``) as a bf16 tile image
    (``fp32``: a float32 image, the weights unrounded).

    Returns the image as a 1-d uint8 array of ``bf16_layout(K, N, fp32=fp32).nbytes`` bytes.
    """
    w = np.asarray(w)
    if fp32:
        bits = w.astype(np.float32).view(np.uint32)
    else:
        bits = bf16_bits(w) if w.dtype == np.float32 else w.astype(BF16).view(np.uint16)
    if n_major:
        layout = bf16_layout(w.shape[1], w.shape[0], fp32=fp32)
        return _tile_columns(bits, layout).view(np.uint8).reshape(-1)
    layout = bf16_layout(*w.shape, fp32=fp32)
    if bits.shape != (layout.kp, layout.np_):
        padded = np.zeros((layout.kp, layout.np_), bits.dtype)
        padded[: w.shape[0], : w.shape[1]] = bits
        bits = padded
    # [kb, KSUBV, nb, NSUBV] -> [nb, kb, NSUBV, KSUBV]: the tile transpose in one copy.
    tiles = bits.reshape(layout.k_blocks, KSUBV, layout.n_blocks, NSUBV).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(tiles).view(np.uint8).reshape(-1)


def decode_bf16(
    stream: np.ndarray, k: int, n: int, stripes: int = 1, *, fp32: bool = False
) -> np.ndarray:
    """Read a (striped) bf16 (``fp32``: float32) image back: ``W[Kp, Np]`` as float32, padding
    included."""
    layout = bf16_layout(k, n, fp32=fp32)
    cols = _unstripe(stream, layout, stripes).view(np.float32 if fp32 else BF16)
    tiles = cols.reshape(layout.n_blocks, layout.k_blocks, NSUBV, KSUBV)
    return _untile_columns(tiles).T.astype(np.float32)


def format_int8(w: np.ndarray, *, n_major: bool = False) -> np.ndarray:
    """Format an int8/uint8 weight ``[K, N]`` (or ``[N, K]``) as an 8-bit tile image.

    Padding is 0; the kernel only uses the logical K x N part, so it never reaches a result.
    """
    w = np.asarray(w)
    if w.dtype not in (np.int8, np.uint8):
        raise ValueError(f"8-bit weight format needs int8 or uint8, got {w.dtype}")
    wt = w if n_major else w.T
    layout = int8_layout(wt.shape[1], wt.shape[0])
    return _tile_columns(wt, layout).view(np.uint8).reshape(-1)


def decode_int8(
    stream: np.ndarray, k: int, n: int, dtype: np.dtype, stripes: int = 1
) -> np.ndarray:
    """Read a (striped) 8-bit image back: ``W[Kp, Np]`` in ``dtype``."""
    layout = int8_layout(k, n)
    cols = _unstripe(stream, layout, stripes).view(dtype)
    tiles = cols.reshape(layout.n_blocks, layout.k_blocks, NSUBV, KSUBV)
    return _untile_columns(tiles).T


# ---------------------------------------------------------------------------------------------
# 4-bit group-quantized weights (com.microsoft MatMulNBits)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Split bytes along the last axis into 4-bit values (low nibble first), keep ``count``."""
    packed = np.asarray(packed, dtype=np.uint8)
    # Each byte widened to a little-endian u16 whose low byte is the low nibble and high byte the
    # high nibble: the u16 array viewed as bytes is the unpacked sequence (no stacked temporaries).
    pairs = packed.astype("<u2")
    pairs |= pairs << 4
    pairs &= 0x0F0F
    return pairs.view(np.uint8)[..., :count]


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values pairwise along the last axis (even index → low nibble)."""
    v = np.asarray(values, dtype=np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def format_q4(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    n: int,
    block_size: int,
    *,
    fp32_scales: bool = False,
) -> np.ndarray:
    """Format MatMulNBits constants (onnxruntime layout) as a q4 tile image (1-d uint8).

    ``b``: uint8 ``[N, k_blocks, block_size/2]``; ``scales``: float ``[N * k_blocks]`` (or
    ``[N, k_blocks]``); ``zero_points``: packed uint8 ``[N * ceil(k_blocks/2)]`` or ``None``
    (zero point 8). ``k_blocks = ceil(K / block_size)``. ``fp32_scales`` stores float32 scales.
    """
    layout = q4_layout(k, n, block_size, fp32_scales=fp32_scales)
    codes_b, scale_b, zp_b, subv = q4_parts(block_size, fp32_scales=fp32_scales)
    k_groups = -(-k // block_size)
    groups_p = layout.kp // block_size
    b = np.asarray(b, dtype=np.uint8).reshape(n, k_groups * block_size // 2)
    # Code bytes: K-pairs already packed by onnxruntime → one blocked byte transpose.
    sc = np.zeros((layout.np_, groups_p), dtype=np.float32 if fp32_scales else BF16)
    sc[:n, :k_groups] = np.asarray(scales, dtype=np.float32).reshape(n, k_groups)
    zp = np.full((layout.np_, groups_p), Q4_DEFAULT_ZERO_POINT, dtype=np.uint8)
    if zero_points is not None:
        zp_row = -(-k_groups // 2)
        zp[:n, :k_groups] = unpack_nibbles(
            np.asarray(zero_points, np.uint8).reshape(n, zp_row), k_groups
        )
    g = KSUBV // block_size
    nb, kb = layout.n_blocks, layout.k_blocks
    image = np.empty((nb, kb, subv), dtype=np.uint8)
    image[:, :, codes_b + scale_b + zp_b :] = 0
    # Kq = k_groups·G pads to the same Kp as K (G divides KSUBV), so the code tiles fit exactly;
    # they are written straight into the image (no intermediate copy).
    code_view = image[:, :, :codes_b].reshape(nb, kb, NSUBV, KSUBV // 2)
    _tile_columns(b, TileLayout(k_groups * block_size, n, subv), 0x88, out=code_view)
    sc_tiles = np.ascontiguousarray(sc.reshape(nb, NSUBV, kb, g).transpose(0, 2, 1, 3))
    image[:, :, codes_b : codes_b + scale_b] = sc_tiles.view(np.uint8).reshape(nb, kb, scale_b)
    zp_tiles = zp.reshape(nb, NSUBV, kb, g).transpose(0, 2, 3, 1)  # [nb, kb, g, NSUBV]
    image[:, :, codes_b + scale_b : codes_b + scale_b + zp_b] = pack_nibbles(zp_tiles).reshape(
        nb, kb, zp_b
    )
    return image.reshape(-1)


DEQUANT_BAND = 1 << 18  # weights per dequantization band (1 MiB of float32: stays in L2)


@dataclass(frozen=True, slots=True)
class Q4Weights:
    """A decoded q4 image: codes, zero points and scales on the padded grid."""

    codes: np.ndarray  # uint8 [Kp, Np], 0..15
    zero_points: np.ndarray  # uint8 [Kp / G, Np]
    scales: np.ndarray  # float32 [Kp / G, Np] (bf16 values unless the image has float32 scales)
    block_size: int
    fp32: bool = False  # float32 scales: dequantize without the bf16 rounding

    def dequantize(self) -> np.ndarray:
        """``(code - zero_point) · scale`` as float32 ``[Kp, Np]``, rounded to bf16 (unless fp32).

        Computed a band of whole groups at a time in the codes' own memory order (N-major as
        :func:`decode_q4` returns them: the result is then a transposed view), so each band's
        passes (subtract, scale, round) stay in cache: ~3x faster than whole-matrix passes on the
        45 M weights of a llama2 projection.
        """
        n_major = not self.codes.flags.c_contiguous and self.codes.T.flags.c_contiguous
        # [rows, groups, G] views in memory order: rows are N (n_major) or K-groups.
        codes = self.codes.T if n_major else self.codes
        zp = self.zero_points.T if n_major else self.zero_points
        sc = self.scales.T if n_major else self.scales
        size = self.block_size
        if n_major:  # [Np, Kp]: group j of row n is codes[n, j*G:(j+1)*G]
            rows, width = codes.shape
            w = np.empty((rows, width), dtype=np.float32)
            step = max(1, DEQUANT_BAND // max(width, 1))
            diff = np.empty((step, width // size, size), dtype=np.int8)
            for r0 in range(0, rows, step):
                r1 = min(r0 + step, rows)
                band = w[r0:r1].reshape(r1 - r0, width // size, size)
                src = codes[r0:r1].reshape(r1 - r0, width // size, size)
                # code - zero point in int8 (both are 0..15), then one plain int8 -> float32 cast:
                # cheaper than a subtraction that casts both operands on the fly.
                d = diff[: r1 - r0]
                np.subtract(src.view(np.int8), zp[r0:r1, :, None].view(np.int8), out=d)
                band[...] = d
                band *= sc[r0:r1, :, None]
                if not self.fp32:
                    round_bf16_inplace(band)
            return w.T
        kp, np_ = codes.shape  # [Kp, Np]: group j is rows j*G:(j+1)*G
        w = np.empty((kp, np_), dtype=np.float32)
        step = max(1, min(size, DEQUANT_BAND // max(np_, 1)))
        for r0 in range(0, kp, step):
            j = r0 // size
            r1 = min(r0 + step, (j + 1) * size)  # a band never spans two groups
            band = w[r0:r1]
            np.subtract(codes[r0:r1], zp[j], out=band, dtype=np.float32)
            band *= sc[j]
            if not self.fp32:
                round_bf16_inplace(band)
        return w


def round_bf16_inplace(x: np.ndarray) -> np.ndarray:
    """Round finite float32 values to bf16 (nearest, ties to even) in place, float32 storage.

    Bit arithmetic on the float32 words: several times faster than a round trip through
    ``ml_dtypes.bfloat16`` on tens of millions of weights, with the same result for finite input.
    """
    u = x.view(np.uint32)
    lsb = u >> 16  # in-place steps: one temporary instead of three
    lsb &= 1
    lsb += 0x7FFF
    u += lsb
    u &= 0xFFFF0000
    return x


def decode_q4(
    stream: np.ndarray,
    k: int,
    n: int,
    block_size: int,
    stripes: int = 1,
    *,
    fp32_scales: bool = False,
) -> Q4Weights:
    """Read a (striped) q4 image back from its bytes."""
    layout = q4_layout(k, n, block_size, fp32_scales=fp32_scales)
    codes_b, scale_b, zp_b, subv = q4_parts(block_size, fp32_scales=fp32_scales)
    g = KSUBV // block_size
    nb, kb = layout.n_blocks, layout.k_blocks
    sv = _unstripe(stream, layout, stripes).reshape(nb, kb, subv)
    code_bytes = sv[:, :, :codes_b].reshape(nb, kb, NSUBV, KSUBV // 2)
    codes = unpack_nibbles(_untile_columns(code_bytes), layout.kp).T  # [Kp, Np]
    scale_dtype = np.float32 if fp32_scales else BF16
    sc = sv[:, :, codes_b : codes_b + scale_b].copy().view(scale_dtype).reshape(nb, kb, NSUBV, g)
    scales = _untile_columns(sc).T.astype(np.float32)  # [Kp/G, Np]
    zpb = sv[:, :, codes_b + scale_b : codes_b + scale_b + zp_b].reshape(nb, kb, g, NSUBV // 2)
    zp = unpack_nibbles(zpb, NSUBV)  # [nb, kb, g, NSUBV]
    zero_points = zp.transpose(1, 2, 0, 3).reshape(kb * g, nb * NSUBV)
    return Q4Weights(codes, zero_points, scales, block_size, fp32_scales)
