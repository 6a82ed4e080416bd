"""Transpose: strided DMA gather when the hardware pattern can express it, else in the kernel.

A swap of the last two axes of a 4-byte dtype ([..., R, C] -> [..., C, R], leading axes kept) is
done entirely by the shim DMA: the input BD reads word ``(i % R)·C + ((i // R) % C) + (i // RC)·RC``
(d0 wrap R step C, d1 wrap C step 1, d2 step R·C), so the operand arrives already transposed and
the kernel only copies it (``dims[0] = 1``). That needs R, C <= 1023 (10-bit wraps) and R·C < 2^20
(20-bit step). Everything else (bf16, where two elements share a word, or other permutations) is
streamed linearly and permuted by the kernel (``dims[0] = 0``). ``dims[1:]`` = perm.
"""

from __future__ import annotations

import numpy as np

from npudispatch.operators import dma
from npudispatch.operators.base import Decline, OpConfig, ShapeConstraints, TensorSpec
from npudispatch.operators.dma import MAX_STEP, MAX_WRAP
from npudispatch.operators.elementwise import FloatUnaryOp, same_axes


class Transpose(FloatUnaryOp):
    """ONNX Transpose for float32/bfloat16."""

    op_type = "Transpose"
    kernel_id = 40

    def match_unary(
        self, cfg: OpConfig, x: TensorSpec, y: TensorSpec, label: str
    ) -> OpConfig | Decline:
        rank = len(x.shape)
        perm = [int(p) for p in cfg.attrs.get("perm", range(rank - 1, -1, -1))]
        if sorted(perm) != list(range(rank)):
            return Decline(f"{label}: perm {perm} is not a permutation of 0..{rank - 1}")
        want = tuple(x.shape[p] for p in perm)
        if y.shape != want or y.dtype != x.dtype:
            return Decline(f"{label}: output {y.shape} is not the permuted {want}")
        cfg.extra["perm"] = perm
        cfg.extra["gather"] = self._gather_pattern(x.shape, x.dtype, perm)
        return cfg

    @staticmethod
    def _gather_pattern(
        shape: tuple[int, ...], dtype: np.dtype, perm: list[int]
    ) -> dma.Pattern | None:
        rank = len(shape)
        if np.dtype(dtype).itemsize != 4 or rank < 2:
            return None
        if perm != [*range(rank - 2), rank - 1, rank - 2]:
            return None
        r, c = shape[-2], shape[-1]
        if not (r <= MAX_WRAP and c <= MAX_WRAP and r * c < MAX_STEP) or r * c == 0:
            return None
        return dma.Pattern(d0_wrap=r, d0_step=c, d1_wrap=c, d1_step=1, d2_step=r * c)

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any size; output axis ``i`` padded like input axis ``perm[i]`` (zero lanes move with
        their axis, so the permuted tensor is zero-padded too)."""
        rank = len(cfg.outputs[0].shape)
        return ShapeConstraints(
            ((1,) * rank,), ((1,) * rank,), same_axes(rank, list(cfg.extra["perm"]))
        )

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [int(cfg.extra["gather"] is not None), *cfg.extra["perm"]]

    def operand_streams(self, cfg: OpConfig) -> list[dma.Stream]:
        streams = super().operand_streams(cfg)
        pattern = cfg.extra["gather"]
        if pattern is None:
            return streams
        (s,) = streams
        return [dma.Stream(s.argidx, s.offset, s.nbytes, pattern)]

    def compute(self, inputs, outputs, dims, floats):
        out = outputs[0]
        if dims[0]:  # the DMA already transposed it
            return [np.asarray(inputs[0]).reshape(out.shape)]
        return [np.transpose(inputs[0], dims[1:])]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.transpose(np.asarray(inputs[0]), cfg.extra["perm"]).astype(cfg.outputs[0].dtype)]
