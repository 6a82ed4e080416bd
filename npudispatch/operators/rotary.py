"""Rotary position embedding: com.microsoft RotaryEmbedding and ONNX RotaryEmbedding (opset 23).

Both rotate ``x`` (3-D ``[B, S, N·H]`` or 4-D ``[B, N, S, H]``) by the cos/sin rows picked by
``position_ids`` (com.microsoft: ``[B, S]`` ids or a one-element start offset; ONNX: optional
``[B, S]`` ids, else the caches are already ``[B, S, R/2]``), pairing halves or interleaved
lanes. Position ids are int64 operands; the caches are constants.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators import attention_math as am
from npudispatch.operators.attention import (
    MS_DOMAIN,
    _Attention,
    match_specs,
    unknown_attributes,
)
from npudispatch.operators.base import Decline, OpConfig, op_label
from npudispatch.operators.matmul import attr_value


class _Rotary(_Attention):
    """Shared matching and math; subclasses give the input order."""

    mac = False  # lane-wise: float32 operands in mixed compute
    x_in: ClassVar[int] = 0
    pos_in: ClassVar[int]
    cos_in: ClassVar[int]
    sin_in: ClassVar[int]

    def match(self, node: ir.Node) -> OpConfig | Decline:
        known = {"interleaved", "num_heads", "rotary_embedding_dim", "is_packed_batching", "scale"}
        if (bad := unknown_attributes(node, known)) is not None:
            return bad
        cfg = match_specs(self, node, (3, 4))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        ins = list(cfg.inputs) + [None] * (4 - len(cfg.inputs))
        x, cos, sin, pos = ins[self.x_in], ins[self.cos_in], ins[self.sin_in], ins[self.pos_in]
        assert x is not None
        if cos is None or sin is None or cos.shape != sin.shape:
            return Decline(f"{label}: cos_cache and sin_cache must have the same shape")
        if float(attr_value(node, "scale", 1.0)) != 1.0:
            return Decline(f"{label}: scale != 1 is not supported")
        if int(attr_value(node, "is_packed_batching", 0)):
            return Decline(f"{label}: packed batching is not supported")
        rank = len(x.shape)
        heads = int(attr_value(node, "num_heads", 0))
        if rank == 4:
            heads, head = x.shape[1], x.shape[3]
        elif rank == 3:
            half = cos.shape[-1]
            rdim = int(attr_value(node, "rotary_embedding_dim", 0)) or 2 * half
            if heads <= 0:
                if rdim != 2 * half:
                    return Decline(f"{label}: 3-D input with rotary_embedding_dim needs num_heads")
                heads = x.shape[2] // (2 * half)
            if heads <= 0 or x.shape[2] % heads:
                return Decline(
                    f"{label}: hidden size {x.shape[2]} not divisible by num_heads {heads}"
                )
            head = x.shape[2] // heads
        else:
            return Decline(f"{label}: input must be 3-D or 4-D, got rank {rank}")
        rdim = int(attr_value(node, "rotary_embedding_dim", 0)) or 2 * cos.shape[-1]
        if rdim != 2 * cos.shape[-1] or rdim > head or rdim % 2:
            return Decline(
                f"{label}: rotary dim {rdim} does not fit caches {cos.shape} / head {head}"
            )
        if pos is not None and pos.dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
            return Decline(f"{label}: position_ids dtype {pos.dtype} (int64 expected)")
        if pos is None and len(cos.shape) != 3:
            return Decline(f"{label}: without position_ids the caches must be [B, S, R/2]")
        if pos is not None and len(cos.shape) != 2:
            return Decline(f"{label}: with position_ids the caches must be [max_pos, R/2]")
        cfg.extra.update(heads=heads, rdim=rdim)
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [cfg.extra["heads"], cfg.extra["rdim"], int(cfg.attrs.get("interleaved", 0))]

    def attend(self, inputs, outputs, dims, floats, *, bf16):
        heads, rdim, interleaved = dims
        ins = list(inputs) + [None] * (4 - len(inputs))
        x = am.as_compute(ins[self.x_in], bf16)
        cos, sin = am.as_compute(ins[self.cos_in], bf16), am.as_compute(ins[self.sin_in], bf16)
        four_d = x.ndim == 4
        b = x.shape[0]
        xs = x if four_d else np.swapaxes(x.reshape(b, x.shape[1], heads, -1), 1, 2)  # BNSH
        s = xs.shape[2]
        pos = ins[self.pos_in]
        if pos is not None:
            ids = np.asarray(pos, np.int64)
            if ids.size == 1 and (b, s) != (1, 1):  # a start offset (com.microsoft)
                ids = int(ids.reshape(-1)[0]) + np.broadcast_to(np.arange(s), (b, s))
            ids = np.broadcast_to(ids.reshape(-1, s), (b, s))
            if ids.min(initial=0) < 0 or ids.max(initial=0) >= cos.shape[0]:
                raise ValueError(f"position ids outside the {cos.shape[0]}-row cos/sin caches")
            cos, sin = cos[ids], sin[ids]
        cb, sb = cos[:, None], sin[:, None]  # [B, 1, S, R/2]
        y = am.rotate(xs, cb, sb, interleaved=bool(interleaved), rotary_dim=rdim)
        return [y if four_d else np.swapaxes(y, 1, 2).reshape(x.shape)]


class MsRotaryEmbedding(_Rotary):
    """com.microsoft RotaryEmbedding: ``input, position_ids, cos_cache, sin_cache``."""

    domain = MS_DOMAIN
    op_type = "RotaryEmbedding"
    kernel_id = 903
    pos_in, cos_in, sin_in = 1, 2, 3

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if len(node.inputs) != 4 or node.inputs[1] is None:
            return Decline(f"{op_label(node)}: needs input, position_ids, cos_cache, sin_cache")
        return super().match(node)


class OnnxRotaryEmbedding(_Rotary):
    """ONNX RotaryEmbedding-23: ``X, cos_cache, sin_cache[, position_ids]``."""

    op_type = "RotaryEmbedding"
    kernel_id = 904
    cos_in, sin_in, pos_in = 1, 2, 3


__all__ = ["MsRotaryEmbedding", "OnnxRotaryEmbedding"]
