"""com.microsoft MatMulNBits (4-bit, group-quantized weights) with bf16 compute.

onnxruntime layout (contrib op spec): ``A [..., K]`` float; ``B`` uint8 ``[N, k_blocks,
block_size/2]`` (two codes per byte along K, low nibble first); ``scales`` ``[N * k_blocks]``;
optional ``zero_points`` uint8 ``[N * ceil(k_blocks / 2)]`` packed along K blocks (default 8);
optional ``g_idx`` (input 4, not supported); optional ``bias [N]`` (input 5). Attributes ``K``,
``N``, ``bits``, ``block_size``, ``accuracy_level``. ``W[k, n] = (code - zp) · scale``.

The constants are formatted once into the q4 tile image of :mod:`weights` (codes, bf16 scales -
float32 in mixed and float32 compute - and packed zero points inside each 128 x 64 subvolume)
followed by the float32 bias part. The kernel decodes that image from the bytes it receives,
so a wrong byte in the image changes the result.
DMA and record: :mod:`matmul` (``dims`` gets ``block_size`` and the int8-activation flag appended).

Two kinds of arithmetic, chosen by ``accuracy_level`` (the model's request, honoured in both
compute modes; docs/numerics.md §1.3):

* ``accuracy_level`` 0..3: the weights are dequantized (to bf16 in bf16 compute; exactly with
  float32 scales in mixed and float32 compute, where the exact ``code - zp`` meets a bf16 A and
  the scale multiplies the accumulator) and multiplied with the activations;
* ``accuracy_level = 4`` ("A may be quantized to int8 with the same block size"): each row of A is
  quantized per K block of ``block_size`` lanes to int8 (:func:`quantize_blocks`: symmetric,
  scale ``amax / 127``, round half to even), the int8 × int4 dot products are exact integers (the
  NPU's native int8 MACs), and each block's integer sum is scaled by ``scale_A · scale_B`` in
  float32 and accumulated in float32 (:func:`int8_block_matmul`). This is the computation of
  onnxruntime's CPU kernel (MLAS SQNBitGemm, CompInt8), so the results agree to float32
  accumulation order; in bf16 compute the operand A is rounded to bf16 before it is quantized
  and the result is rounded to bf16 on exit, as for every kernel (mixed compute quantizes the
  float32 A and stores a float32 result).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import Decline, OpConfig, TensorSpec, const_array, node_config
from npudispatch.operators.dtypes import (
    F32,
    current_precision,
    mac_operand,
    to_compute,
)
from npudispatch.operators.matmul import (
    TiledMatMul,
    TiledOperands,
    attr_value,
    bias_part,
    match_activation,
    output_spec,
    real_dim,
)
from npudispatch.operators.q4_kernel import q4_matmul
from npudispatch.operators.weights import (
    Q4_BLOCK_SIZES,
    Q4_DEFAULT_ZERO_POINT,
    Q4Weights,
    TileLayout,
    decode_q4,
    format_q4,
    q4_layout,
    unpack_nibbles,
)
from npudispatch.precision import Precision


def nbits_weights(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, block: int
) -> Q4Weights:
    """onnxruntime-layout 4-bit constants → :class:`Q4Weights` (``[K_blocks·block, N]`` codes,
    ``[K_blocks, N]`` zero points and float32 scales; no tile padding)."""
    k_blocks = -(-k // block)
    codes = unpack_nibbles(np.asarray(b, np.uint8).reshape(n, -1), k_blocks * block)
    if zero_points is None:
        zp = np.full((n, k_blocks), Q4_DEFAULT_ZERO_POINT, np.uint8)
    else:
        zp = unpack_nibbles(np.asarray(zero_points, np.uint8).reshape(n, -1), k_blocks)
    sc = np.asarray(scales, F32).reshape(n, k_blocks)
    return Q4Weights(codes.T, zp.T, sc.T, block, fp32=True)


def dequantize_nbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, block: int
) -> np.ndarray:
    """onnxruntime-layout 4-bit constants → float32 ``W[K, N]`` (reference semantics)."""
    q4 = nbits_weights(b, scales, zero_points, k, n, block)
    w = (q4.codes.astype(F32) - np.repeat(q4.zero_points.astype(F32), block, axis=0)) * np.repeat(
        q4.scales, block, axis=0
    )
    return w[:k]


ACCURACY_INT8 = 4
"""``accuracy_level`` at which A is quantized to int8 per K block (contrib op spec)."""

_INT8_MAX = np.float32(127)
_INT8_BAND_ELEMENTS = 1 << 22  # widened codes per band of output columns (16 MiB of float32)


def quantize_blocks(a: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of the rows of ``a`` (float32 ``[M, K]``) per K block.

    Per block of ``block`` lanes (the last one zero-padded): ``scale = amax / 127`` and
    ``q = round_half_even(a · (127 / amax))`` (0 for an all-zero block), both in float32, the
    reciprocal taken from ``amax`` directly: onnxruntime's MLAS CompInt8 quantizer, so the same
    float32 A gives the same codes. Returns ``q`` as exact small integers in float32
    ``[M, k_blocks, block]`` and the scales float32 ``[M, k_blocks]``.
    """
    m, k = a.shape
    k_blocks = -(-k // block)
    padded = np.zeros((m, k_blocks * block), F32)
    padded[:, :k] = a
    blocks = padded.reshape(m, k_blocks, block)
    amax = np.abs(blocks).max(axis=-1)
    scale = amax / _INT8_MAX
    inverse = np.zeros_like(amax)
    np.divide(_INT8_MAX, amax, out=inverse, where=amax != 0)
    q = np.rint(blocks * inverse[..., None])  # ties to even, like _MM_ROUND_NEAREST
    return q, scale


def int8_block_matmul(a: np.ndarray, weights: Q4Weights, k: int, n: int) -> np.ndarray:
    """``accuracy_level = 4`` product of float32 ``a [..., K]`` and 4-bit ``weights``: float32
    ``[..., N]`` (see the module docstring; no bias).

    ``C = Σ_blocks scale_A·scale_B · Σ q_A·code  −  Σ_blocks (scale_A · Σ q_A) · (scale_B · zp)``:
    each block's integer sum is exact (|partial sums| < 2^24 in float32) and is scaled and
    accumulated block after block in float32; the zero point enters through the block sum of
    the quantized A, as in MLAS. Output columns go in bands of widened codes
    (:data:`_INT8_BAND_ELEMENTS` floats), so a llama2 projection never widens its 45 M codes at
    once.
    """
    block = weights.block_size
    lead = a.shape[:-1]
    q, scale_a = quantize_blocks(np.asarray(a, F32).reshape(-1, k), block)
    m, k_blocks = scale_a.shape
    kq = k_blocks * block
    codes_nk = weights.codes.T  # [Np, Kp]: contiguous rows for an N-major decoded image
    scale_b = weights.scales[:k_blocks, :n]
    zero_term = -scale_b * weights.zero_points[:k_blocks, :n].astype(F32)
    acc = np.zeros((m, n), F32)
    band = max(8, _INT8_BAND_ELEMENTS // kq)
    for n0 in range(0, n, band):
        n1 = min(n0 + band, n)
        codes = codes_nk[n0:n1, :kq].astype(F32)  # [band, K]
        out = acc[:, n0:n1]
        for j in range(k_blocks):
            lanes = slice(j * block, (j + 1) * block)
            dots = q[:, j, :] @ codes[:, lanes].T  # exact integers [M, band]
            dots *= scale_a[:, j, None] * scale_b[j, n0:n1]
            out += dots
    acc += (scale_a * q.sum(axis=-1)) @ zero_term
    return acc.reshape(*lead, n)


def float32_scales(precision: Precision) -> bool:
    """Whether the q4 image holds float32 scales: in float32 and mixed compute. A block scale
    multiplies the float32 accumulator (the MAC's operands are A and the exact ``code - zp``), so
    only the bf16 policy, which stores every float constant in bf16, rounds it."""
    return precision != "bf16"


class MatMulNBits(TiledMatMul):
    """com.microsoft MatMulNBits, bits = 4, block_size 16..128, constant B/scales/zero points."""

    domain = "com.microsoft"
    op_type = "MatMulNBits"
    kernel_id = 110

    def match(self, node: ir.Node) -> OpConfig | Decline:
        """Constant 4-bit weights in onnxruntime layout; float A; optional packed zp and bias."""
        k, n, block = _geometry(node)
        a = match_activation(node, 0, "input A")
        if real_dim(a, -1) != k:
            return Decline(f"A's last axis is {real_dim(a, -1)} but attribute K={k}")
        weights = _constant_inputs(node, n, k_blocks=-(-k // block), block=block)
        out = output_spec(node, a.dtype)
        specs: list[TensorSpec | None] = [a]
        consts: dict[int, np.ndarray] = {}
        for i in range(1, 6):
            arr = weights.get(i)
            specs.append(None if arr is None else TensorSpec(tuple(arr.shape), arr.dtype))
            if arr is not None:
                consts[i] = arr
        while specs and specs[-1] is None:
            specs.pop()
        level = int(attr_value(node, "accuracy_level", 0))
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": level}
        extra = {
            "K": k,
            "N": n,
            "block_size": block,
            "bias_rows": int(5 in weights),
            "int8_activations": int(level == ACCURACY_INT8),
        }
        return node_config(self, node, specs, [out], consts=consts, attrs=attrs, extra=extra)

    def layout(self, cfg: OpConfig) -> TileLayout:
        """q4 tiles."""
        k, n, block = cfg.extra["K"], cfg.extra["N"], cfg.extra["block_size"]
        return q4_layout(k, n, block, fp32_scales=float32_scales(cfg.precision))

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """q4 image, then the float32 bias part when a bias is given."""
        k, n, block = cfg.extra["K"], cfg.extra["N"], cfg.extra["block_size"]
        image = format_q4(
            cfg.consts[1],
            cfg.consts[2],
            cfg.consts.get(3),
            k,
            n,
            block,
            fp32_scales=float32_scales(cfg.precision),
        )
        parts = [image]
        if 5 in cfg.consts:
            parts.append(bias_part(cfg.consts[5], n))
        return parts

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """``[0, K, N, stripes, bias_rows, block_size, int8_activations]``."""
        return [*super().op_dims(cfg), cfg.extra["block_size"], cfg.extra["int8_activations"]]

    def compute_tiled(self, t: TiledOperands) -> list[np.ndarray]:
        """Decode the q4 image; int8 block products (``accuracy_level=4``) or dequantize and
        multiply in the launch's precision; add the bias part."""
        k, n, block, int8_activations = t.k, t.n, t.dims[5], t.dims[6]
        # int8 blocks are quantized from the stored A (its bf16 rounding is the bf16 policy's
        # storage, not the MAC's); the dequantizing path's A is a bf16 MAC operand
        a = (to_compute if int8_activations else mac_operand)(t.acts[0][..., :k])
        f32_scales = float32_scales(current_precision())
        if int8_activations:
            q4 = decode_q4(t.parts[0], k, n, block, t.stripes, fp32_scales=f32_scales)
            acc = int8_block_matmul(a, q4, k, n)
        else:
            # a @ the dequantized weights, without building them for one row (decode)
            acc = q4_matmul(a, t.parts[0], k, n, block, t.stripes, fp32_scales=f32_scales)
        if t.bias_rows:
            acc = acc + t.parts[1][: 4 * n].view("<f4")
        return t.store_output(acc)

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """``A @ dequantize(B) (+ bias)`` in float32, or the int8 block product at
        ``accuracy_level=4`` (onnxruntime semantics)."""
        k, n, block = cfg.extra["K"], cfg.extra["N"], cfg.extra["block_size"]
        ins = list(inputs) + [None] * (6 - len(inputs))
        if cfg.extra["int8_activations"]:
            q4 = nbits_weights(ins[1], ins[2], ins[3], k, n, block)
            y = int8_block_matmul(np.asarray(ins[0], F32), q4, k, n)
        else:
            y = np.asarray(ins[0], F32) @ dequantize_nbits(ins[1], ins[2], ins[3], k, n, block)
        if ins[5] is not None:
            y = y + np.asarray(ins[5], F32)
        return [y.astype(cfg.outputs[0].dtype)]


__all__ = [
    "ACCURACY_INT8",
    "MatMulNBits",
    "dequantize_nbits",
    "int8_block_matmul",
    "nbits_weights",
    "quantize_blocks",
]


def _geometry(node: ir.Node) -> tuple[int, int, int]:
    """``(K, N, block_size)`` from the attributes; raises a Decline for what the kernel lacks."""
    bits = int(attr_value(node, "bits", 4))
    if bits != 4:
        raise Decline(f"MatMulNBits bits={bits}: only 4-bit weights are supported")
    block = int(attr_value(node, "block_size", 0))
    if block not in Q4_BLOCK_SIZES:
        raise Decline(f"MatMulNBits block_size={block}: supported sizes are {Q4_BLOCK_SIZES}")
    k, n = int(attr_value(node, "K", 0)), int(attr_value(node, "N", 0))
    if k <= 0 or n <= 0:
        raise Decline(f"MatMulNBits needs positive K and N attributes, got K={k}, N={n}")
    return k, n, block


def _constant_inputs(node: ir.Node, n: int, *, k_blocks: int, block: int) -> dict[int, np.ndarray]:
    """B (1), scales (2), zero points (3) and bias (5) by input index, each checked against the
    onnxruntime layout; raises a Decline naming the first input that does not fit."""
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    if ins[4] is not None:
        raise Decline("MatMulNBits with g_idx (act-order) is not supported")
    b = const_array(ins[1])
    if b is None:
        raise Decline("B is not a constant initializer: 4-bit weights must be constant")
    if b.dtype != np.uint8 or b.size != n * k_blocks * block // 2:
        raise Decline(f"B must be uint8 [N={n}, {k_blocks}, {block // 2}], got {b.dtype} {b.shape}")
    scales = const_array(ins[2])
    if scales is None or scales.size != n * k_blocks:
        raise Decline(f"scales must be a constant of N*k_blocks={n * k_blocks} elements")
    found = {1: b, 2: scales}
    if ins[3] is not None:
        zp = const_array(ins[3])
        if zp is None:
            raise Decline("zero_points is not a constant initializer")
        if zp.dtype != np.uint8:
            raise Decline(f"zero_points of dtype {zp.dtype}: only packed uint8 is supported")
        if zp.size != n * (-(-k_blocks // 2)):
            raise Decline(f"zero_points has {zp.size} bytes, expected {n * (-(-k_blocks // 2))}")
        found[3] = zp
    if ins[5] is not None:
        bias = const_array(ins[5])
        if bias is None or bias.size != n:
            raise Decline(f"bias must be a constant of N={n} elements")
        found[5] = bias
    return found
