"""com.microsoft MatMulNBits (4-bit, group-quantized weights) with bf16 compute.

onnxruntime layout (contrib op spec): ``A [..., K]`` float; ``B`` uint8 ``[N, k_blocks,
block_size/2]`` (two codes per byte along K, low nibble first); ``scales`` ``[N * k_blocks]``;
optional ``zero_points`` uint8 ``[N * ceil(k_blocks / 2)]`` packed along K blocks (default 8);
optional ``g_idx`` (input 4, not supported); optional ``bias [N]`` (input 5). Attributes ``K``,
``N``, ``bits``, ``block_size``, ``accuracy_level``. ``W[k, n] = (code - zp) · scale``.

The constants are formatted once into the q4 tile image of :mod:`weights` (codes, bf16 scales and
packed zero points inside each 128 x 64 subvolume) followed by the float32 bias part. The kernel
decodes that image from the bytes it receives, dequantizes to bf16 and runs the bf16 matmul, so a
wrong byte in the image changes the result. DMA and record: :mod:`matmul` (``dims`` gets the block
size appended).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import Decline, OpConfig, TensorSpec, const_array, node_config
from npudispatch.operators.dtypes import F32, fp32_compute, to_compute
from npudispatch.operators.matmul import (
    TiledMatMul,
    TiledOperands,
    attr_value,
    bias_part,
    match_activation,
    output_spec,
    real_dim,
)
from npudispatch.operators.weights import (
    Q4_BLOCK_SIZES,
    Q4_DEFAULT_ZERO_POINT,
    TileLayout,
    dequantize_q4,
    format_q4,
    q4_layout,
    unpack_nibbles,
)


def dequantize_nbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, block: int
) -> np.ndarray:
    """onnxruntime-layout 4-bit constants → float32 ``W[K, N]`` (reference semantics)."""
    k_blocks = -(-k // block)
    codes = unpack_nibbles(np.asarray(b, np.uint8).reshape(n, -1), k_blocks * block)
    if zero_points is None:
        zp = np.full((n, k_blocks), Q4_DEFAULT_ZERO_POINT, np.float32)
    else:
        zp = unpack_nibbles(np.asarray(zero_points, np.uint8).reshape(n, -1), k_blocks)
    sc = np.asarray(scales, F32).reshape(n, k_blocks)
    w_t = (codes.astype(F32) - np.repeat(zp.astype(F32), block, axis=1)) * np.repeat(
        sc, block, axis=1
    )
    return w_t[:, :k].T


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
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block}
        extra = {"K": k, "N": n, "block_size": block, "bias_rows": int(5 in weights)}
        return node_config(self, node, specs, [out], consts=consts, attrs=attrs, extra=extra)

    def layout(self, cfg: OpConfig) -> TileLayout:
        """q4 tiles."""
        k, n, block = cfg.extra["K"], cfg.extra["N"], cfg.extra["block_size"]
        return q4_layout(k, n, block, fp32_scales=cfg.fp32_compute)

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
            fp32_scales=cfg.fp32_compute,
        )
        parts = [image]
        if 5 in cfg.consts:
            parts.append(bias_part(cfg.consts[5], n))
        return parts

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """``[0, K, N, stripes, bias_rows, block_size]``."""
        return [*super().op_dims(cfg), cfg.extra["block_size"]]

    def compute_tiled(self, t: TiledOperands) -> list[np.ndarray]:
        """Decode the q4 image, dequantize (bf16), bf16 matmul, add the bias part."""
        k, n, block = t.k, t.n, t.dims[5]
        w = dequantize_q4(t.parts[0], k, n, block, t.stripes, fp32_scales=fp32_compute())[:k, :n]
        acc = to_compute(t.acts[0][..., :k]) @ w
        if t.bias_rows:
            acc = acc + t.parts[1][: 4 * n].view("<f4")
        return t.store_output(acc)

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """``A @ dequantize(B) (+ bias)`` in float32 (onnxruntime semantics)."""
        k, n, block = cfg.extra["K"], cfg.extra["N"], cfg.extra["block_size"]
        ins = list(inputs) + [None] * (6 - len(inputs))
        w = dequantize_nbits(ins[1], ins[2], ins[3], k, n, block)
        y = np.asarray(ins[0], F32) @ w
        if ins[5] is not None:
            y = y + np.asarray(ins[5], F32)
        return [y.astype(cfg.outputs[0].dtype)]


__all__ = ["MatMulNBits", "dequantize_nbits"]


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
