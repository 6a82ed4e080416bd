"""Attention on the NPU: com.microsoft GroupQueryAttention and MultiHeadAttention, ONNX Attention-23.

Every operator streams its activations (Q/K/V, past KV, lengths) as operands and reads constant
inputs (cos/sin caches, biases, a folded ``total_sequence_length``) from its const region; the
kernel runs :mod:`attention_math` with bf16 operands and float32 accumulation, the references
run the same math in float32 (plain ONNX semantics).

In-place KV cache: a GroupQueryAttention whose present output carries the
:data:`~npudispatch.operators.inplace.INPLACE_KEY` metadata (set by the generator when the past
and present buffers have the same shape) writes its present buffer over its past input; the
compiler then places both in the same bytes, so a resident cache never leaves the device.

Tensors keep their exact shapes (no terminal padding): the head layout is the tensor layout.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators import attention_math as am
from npudispatch.operators.base import (
    Decline,
    OpConfig,
    Operator,
    ShapeConstraints,
    TensorSpec,
    op_label,
    opset_version,
)
from npudispatch.operators.dtypes import FLOAT_DTYPES, bf16_operands, store
from npudispatch.operators.elementwise import match_float_node
from npudispatch.operators.matmul import attr_value

MS_DOMAIN = "com.microsoft"
INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def match_specs(op: Operator, node: ir.Node, n_inputs: tuple[int, int]) -> OpConfig | Decline:
    """:func:`~npudispatch.operators.elementwise.match_float_node` with every initializer input
    as a const, trailing omitted outputs left out (the kernel writes only the listed ones), and
    padded inputs declined: the head layout is the tensor layout."""
    try:
        cfg = match_float_node(
            op,
            node,
            n_inputs,
            const_inputs=tuple(range(len(node.inputs))),
            omit_trailing_unnamed=True,
        )
    except Decline as decline:
        return decline
    for i, spec in enumerate(cfg.inputs):
        if spec is not None and spec.real_shape is not None and spec.real_shape != spec.shape:
            return Decline(
                f"{op_label(node)}: input {i} '{node.inputs[i].name}' is padded; attention needs "
                "exact shapes"
            )
    return cfg


def unknown_attributes(node: ir.Node, known: set[str]) -> Decline | None:
    """Decline a node carrying attributes this kernel does not implement (newer op versions)."""
    extra = sorted(set(node.attributes) - known)
    if extra:
        return Decline(f"{op_label(node)}: attribute(s) {extra} are not supported")
    return None


GQA_ATTRS = {
    "num_heads", "kv_num_heads", "scale", "softcap", "local_window_size", "do_rotary",
    "rotary_interleaved", "smooth_softmax", "k_quant_type", "v_quant_type", "kv_cache_bit_width",
}  # fmt: skip
MHA_ATTRS = {"num_heads", "scale", "mask_filter_value", "unidirectional"}
MHA_MASK_FILTER_VALUE = np.float32(-10000.0)
"""MultiHeadAttention's default ``mask_filter_value``: added to a padded key's score."""
ATTENTION_ATTRS = {
    "is_causal", "kv_num_heads", "q_num_heads", "qk_matmul_output_mode", "scale", "softcap",
    "softmax_precision",
}  # fmt: skip


class _Attention(Operator):
    """Exact shapes for every tensor; the kernel runs :meth:`attend` with bf16 operands (float32
    ones in float32 compute)."""

    #: Multiply-accumulate kernel (q·k, p·v): rounds its operands in mixed compute too
    #: (``operators.dtypes``); rotary embedding is lane-wise and does not.
    mac: ClassVar[bool] = True

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        return ShapeConstraints(
            inputs=tuple(None for _ in cfg.inputs), outputs=tuple(None for _ in cfg.outputs)
        )

    @abstractmethod
    def attend(
        self,
        inputs: list[np.ndarray | None],
        outputs: list[TensorSpec],
        dims: list[int],
        floats: list[float],
        *,
        bf16: bool,
    ) -> list[np.ndarray]:
        """This operator's attention on the kernel's operands (operands rounded to bf16 when
        ``bf16``); each concrete operator defines it."""

    def compute(self, inputs, outputs, dims, floats):
        outs = self.attend(inputs, outputs, dims, floats, bf16=bf16_operands(self.mac))
        return [store(o, spec.dtype) for o, spec in zip(outs, outputs)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        ins = [None if a is None else np.asarray(a) for a in inputs]
        ins += [None] * (len(cfg.inputs) - len(ins))
        outs = self.attend(ins, cfg.outputs, self.op_dims(cfg), self.op_floats(cfg), bf16=False)
        return [np.asarray(o).astype(spec.dtype) for o, spec in zip(outs, cfg.outputs)]


def _scalar(x: np.ndarray | None, default: int = 0) -> int:
    return default if x is None else int(np.asarray(x).reshape(-1)[0])


class GroupQueryAttention(_Attention):
    """com.microsoft GroupQueryAttention (onnxruntime CPU semantics).

    Query ``[B, S, N·H]`` (or packed ``[B, S, (N+2G)·H]`` with key/value absent), past/present
    KV in BNSH, ``seqlens_k [B]`` (valid keys - 1) and ``total_sequence_length`` int32,
    ``do_rotary`` with ``cos_cache``/``sin_cache``, ``rotary_interleaved``, ``local_window_size``,
    ``softcap``, ``scale``, ``smooth_softmax``. Declines ``position_ids``, ``attention_bias`` and
    ``head_sink`` (inputs 9-11) and the quantized-cache variants.
    """

    domain = MS_DOMAIN
    op_type = "GroupQueryAttention"
    kernel_id = 900

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := unknown_attributes(node, GQA_ATTRS)) is not None:
            return bad
        cfg = match_specs(self, node, (7, 12))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        ins = list(cfg.inputs) + [None] * (12 - len(cfg.inputs))
        for i, what in ((9, "position_ids"), (10, "attention_bias"), (11, "head_sink")):
            if ins[i] is not None:
                return Decline(f"{label}: input {i} ({what}) is not supported")
        n = int(attr_value(node, "num_heads", 0))
        g = int(attr_value(node, "kv_num_heads", 0))
        if n <= 0 or g <= 0 or n % g:
            return Decline(
                f"{label}: num_heads={n} must be a positive multiple of kv_num_heads={g}"
            )
        for key in ("k_quant_type", "v_quant_type", "kv_cache_bit_width"):
            if key in node.attributes and attr_value(node, key, None) not in ("NONE", 0, None):
                return Decline(f"{label}: quantized KV cache ({key}) is not supported")
        q = ins[0]
        assert q is not None
        if len(q.shape) != 3:
            return Decline(f"{label}: query must be [B, S, hidden], got {q.shape}")
        b, s, d = q.shape
        packed = ins[1] is None
        if packed != (ins[2] is None):
            return Decline(f"{label}: key and value must both be given or both be absent")
        if packed:
            if d % (n + 2 * g):
                return Decline(f"{label}: packed QKV width {d} is not (N+2G)·H for N={n}, G={g}")
            h = d // (n + 2 * g)
        else:
            if d % n:
                return Decline(f"{label}: query width {d} is not a multiple of num_heads={n}")
            h = d // n
            for i in (1, 2):
                if ins[i].shape != (b, s, g * h):  # type: ignore[union-attr]
                    return Decline(
                        f"{label}: input {i} shape {ins[i].shape} is not {(b, s, g * h)}"
                    )
        past_len = 0
        if (ins[3] is None) != (ins[4] is None):
            return Decline(f"{label}: past_key and past_value must both be given")
        if ins[3] is not None:
            for i in (3, 4):
                shp = ins[i].shape  # type: ignore[union-attr]
                if len(shp) != 4 or shp[0] != b or shp[1] != g or shp[3] != h:
                    return Decline(
                        f"{label}: past input {i} shape {shp} is not BNSH [{b}, {g}, L, {h}]"
                    )
            past_len = ins[3].shape[2]  # type: ignore[union-attr]
        for i, what in ((5, "seqlens_k"), (6, "total_sequence_length")):
            spec = ins[i]
            if spec is None or spec.dtype != np.dtype(np.int32):
                return Decline(f"{label}: input {i} ({what}) must be int32")
        if int(np.prod(ins[5].shape)) != b:  # type: ignore[union-attr]
            return Decline(f"{label}: seqlens_k has {ins[5].shape}, expected [{b}]")  # type: ignore[union-attr]
        do_rotary = int(attr_value(node, "do_rotary", 0))
        if do_rotary:
            if ins[7] is None or ins[8] is None:
                return Decline(f"{label}: do_rotary=1 needs cos_cache and sin_cache")
            half = ins[7].shape[-1]
            if ins[8].shape != ins[7].shape or len(ins[7].shape) != 2 or 2 * half > h:
                return Decline(
                    f"{label}: cos/sin caches {ins[7].shape}/{ins[8].shape} must be "
                    f"[max_pos, R/2] with R <= head size {h}"
                )
        if len(cfg.outputs) != 3:
            return Decline(f"{label}: needs the output and both present outputs")
        present = cfg.outputs[1].shape
        if len(present) != 4 or present[:2] != (b, g) or present[3] != h or present[2] < s:
            return Decline(f"{label}: present shape {present} is not [{b}, {g}, T>={s}, {h}]")
        if present[2] < past_len:
            return Decline(
                f"{label}: present buffer ({present[2]}) is shorter than past ({past_len})"
            )
        if cfg.outputs[0].shape != (b, s, n * h):
            return Decline(f"{label}: output shape {cfg.outputs[0].shape} is not {(b, s, n * h)}")
        cfg.extra.update(heads=n, kv_heads=g, head=h, do_rotary=do_rotary, total=-1)
        if 6 in cfg.consts:
            # A folded total length is a per-program parameter, not a weight: it goes into the
            # params record so programs of different lengths can share one const image.
            cfg.extra["total"] = _scalar(cfg.consts.pop(6))
            cfg.inputs[6] = None
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        a = cfg.attrs
        return [
            cfg.extra["heads"],
            cfg.extra["kv_heads"],
            cfg.extra["head"],
            cfg.extra["do_rotary"],
            int(a.get("rotary_interleaved", 0)),
            int(a.get("local_window_size", -1)),
            int(a.get("smooth_softmax", 0)),
            cfg.extra["total"],
        ]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [float(cfg.attrs.get("scale", 0.0)), float(cfg.attrs.get("softcap", 0.0))]

    def attend(self, inputs, outputs, dims, floats, *, bf16):
        n, g, h, do_rotary, interleaved, window, smooth, total = dims
        ins = list(inputs) + [None] * (12 - len(inputs))
        q = np.asarray(ins[0])
        b, s, _ = q.shape
        if ins[1] is None:  # packed QKV
            q, k, v = np.split(q.reshape(b, s, n + 2 * g, h), [n, n + g], axis=2)
        else:
            q = q.reshape(b, s, n, h)
            k = np.asarray(ins[1]).reshape(b, s, g, h)
            v = np.asarray(ins[2]).reshape(b, s, g, h)
        shape = am.GqaShape(
            b, s, n, g, h, 0 if ins[3] is None else ins[3].shape[2], outputs[1].shape[2]
        )
        out, pk, pv = am.gqa(
            q,
            k,
            v,
            ins[3],
            ins[4],
            np.asarray(ins[5]),
            total if total >= 0 else _scalar(ins[6]),
            ins[7] if do_rotary else None,
            ins[8] if do_rotary else None,
            shape,
            scale=floats[0],
            softcap=floats[1],
            local_window=window,
            interleaved=bool(interleaved),
            smooth=bool(smooth),
            bf16=bf16,
        )
        return [out, pk, pv][: len(outputs)]


def _to_bnsh(x: np.ndarray, heads: int) -> np.ndarray:
    """``[B, S, heads·H]`` → ``[B, heads, S, H]``; 4-D inputs are already BNSH."""
    if x.ndim == 4:
        return x
    b, s, d = x.shape
    return np.swapaxes(x.reshape(b, s, heads, d // heads), 1, 2)


def _from_bnsh(x: np.ndarray) -> np.ndarray:
    b, n, s, h = x.shape
    return np.swapaxes(x, 1, 2).reshape(b, s, n * h)


class MultiHeadAttention(_Attention):
    """com.microsoft MultiHeadAttention: separate 3-D Q/K/V (BSNH), optional bias, key padding
    mask ``[B, L]`` (int32, 1 = keep), additive ``attention_bias``, BNSH past/present KV and
    ``unidirectional`` (causal, aligned to the end of the past).

    Declines packed QKV/KV, BNSH key/value (cross-attention caches) and the other mask formats.
    """

    domain = MS_DOMAIN
    op_type = "MultiHeadAttention"
    kernel_id = 901

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := unknown_attributes(node, MHA_ATTRS)) is not None:
            return bad
        cfg = match_specs(self, node, (3, 8))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        ins = list(cfg.inputs) + [None] * (8 - len(cfg.inputs))
        n = int(attr_value(node, "num_heads", 0))
        q, k, v = ins[0], ins[1], ins[2]
        if k is None or v is None or q is None or len(q.shape) != 3:
            return Decline(f"{label}: needs 3-D query and separate 3-D key and value")
        if len(k.shape) != 3 or len(v.shape) != 3:
            return Decline(
                f"{label}: key/value must be 3-D [B, L, hidden] (BNSH key not supported)"
            )
        if n <= 0 or q.shape[2] % n or k.shape[2] % n or v.shape[2] % n:
            return Decline(
                f"{label}: hidden sizes {q.shape[2]}/{k.shape[2]}/{v.shape[2]} not divisible by num_heads={n}"
            )
        if k.shape[2] != q.shape[2]:
            return Decline(f"{label}: key width {k.shape[2]} differs from query width {q.shape[2]}")
        if ins[3] is not None and 3 not in cfg.consts:
            return Decline(f"{label}: bias must be a constant")
        mask = ins[4]
        if mask is not None and (
            mask.shape != (q.shape[0], k.shape[1] + (ins[6].shape[2] if ins[6] else 0))
            or mask.dtype != np.dtype(np.int32)
        ):
            return Decline(
                f"{label}: key_padding_mask must be int32 [B, total length], got {mask.dtype} {mask.shape}"
            )
        if (ins[6] is None) != (ins[7] is None):
            return Decline(f"{label}: past_key and past_value must both be given")
        if ins[6] is not None and len(cfg.outputs) != 3:
            return Decline(f"{label}: past KV given but present outputs missing")
        if (
            float(attr_value(node, "mask_filter_value", -10000.0)) != MHA_MASK_FILTER_VALUE
            and mask is not None
        ):
            return Decline(f"{label}: only the default mask_filter_value is supported")
        cfg.extra.update(heads=n)
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [cfg.extra["heads"], int(cfg.attrs.get("unidirectional", 0))]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [float(cfg.attrs.get("scale", 0.0))]

    def attend(self, inputs, outputs, dims, floats, *, bf16):
        n, causal = dims
        ins = list(inputs) + [None] * (8 - len(inputs))
        q, k, v = (am.as_compute(x, bf16) for x in ins[:3])
        if ins[3] is not None:
            bias = am.as_compute(ins[3], bf16)
            dq, dk = q.shape[2], k.shape[2]
            q, k, v = q + bias[:dq], k + bias[dq : dq + dk], v + bias[dq + dk :]
        qh, kh, vh = _to_bnsh(q, n), _to_bnsh(k, n), _to_bnsh(v, n)
        past = 0
        if ins[6] is not None:
            past = ins[6].shape[2]
            kh = np.concatenate([am.as_compute(ins[6], bf16), kh], axis=2)
            vh = np.concatenate([am.as_compute(ins[7], bf16), vh], axis=2)
        b, _, s, h = qh.shape
        t = kh.shape[2]
        allowed = np.ones((b, 1, s, t), bool)
        mask_bias = None
        if causal:
            allowed &= np.arange(t)[None, :] <= np.arange(s)[:, None] + past
        if ins[5] is not None:
            mask_bias = am.as_compute(ins[5], bf16)
        if ins[4] is not None:
            # onnxruntime adds mask_filter_value to a padded key's score instead of dropping the
            # key: the same where a row keeps one key, and a fully padded row averages V
            # (after attention_bias: onnxruntime's order, which matters in float32 only where a
            # whole row is padded)
            padded = np.asarray(ins[4]).reshape(b, 1, 1, t) == 0
            filt = np.where(padded, MHA_MASK_FILTER_VALUE, np.float32(0))
            mask_bias = filt if mask_bias is None else (mask_bias, filt)
        scale = floats[0] if floats[0] != 0 else 1.0 / float(np.sqrt(h))
        out = am.sdpa(qh, kh, vh, allowed, scale=scale, bias=mask_bias, bf16=bf16)
        return [_from_bnsh(out), kh, vh][: len(outputs)]


class Attention(_Attention):
    """ONNX Attention (opset 23): 3-D (with ``q_num_heads``/``kv_num_heads``) or 4-D BNSH
    Q/K/V, grouped heads, boolean or additive ``attn_mask``, past/present KV, ``is_causal``
    (aligned to the end of the past), ``scale``, ``softcap``.

    Declines ``qk_matmul_output_mode`` != 0 with that output requested, and opset >= 24 inputs.
    """

    op_type = "Attention"
    kernel_id = 902

    def match(self, node: ir.Node) -> OpConfig | Decline:
        version = opset_version(node)
        label = op_label(node)
        if version is None:
            return Decline(f"{label}: opset version unknown; declare the default-domain opset")
        if (bad := unknown_attributes(node, ATTENTION_ATTRS)) is not None:
            return bad
        cfg = match_specs(self, node, (3, 6))
        if isinstance(cfg, Decline):
            return cfg
        ins = list(cfg.inputs) + [None] * (6 - len(cfg.inputs))
        q, k, v = ins[0], ins[1], ins[2]
        if q is None or k is None or v is None or not len(q.shape) == len(k.shape) == len(v.shape):
            return Decline(f"{label}: Q, K and V must have the same rank")
        if len(cfg.outputs) > 3:
            return Decline(f"{label}: the qk_matmul_output output is not supported")
        rank = len(q.shape)
        if rank == 3:
            qn = int(attr_value(node, "q_num_heads", 0))
            kvn = int(attr_value(node, "kv_num_heads", 0))
            if qn <= 0 or kvn <= 0:
                return Decline(f"{label}: 3-D inputs need q_num_heads and kv_num_heads")
        elif rank == 4:
            qn, kvn = q.shape[1], k.shape[1]
        else:
            return Decline(f"{label}: inputs must be 3-D or 4-D, got rank {rank}")
        if qn % kvn:
            return Decline(f"{label}: q heads {qn} not a multiple of kv heads {kvn}")
        mask = ins[3]
        if mask is not None and mask.dtype not in (np.dtype(bool), *FLOAT_DTYPES):
            return Decline(f"{label}: attn_mask dtype {mask.dtype} (bool or float only)")
        if mask is not None and mask.dtype == np.dtype(bool):
            return Decline(
                f"{label}: boolean attn_mask operands are not streamed yet; use an additive float mask"
            )
        if (ins[4] is None) != (ins[5] is None):
            return Decline(f"{label}: past_key and past_value must both be given")
        cfg.extra.update(q_heads=qn, kv_heads=kvn, rank=rank)
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        e = cfg.extra
        return [e["q_heads"], e["kv_heads"], e["rank"], int(cfg.attrs.get("is_causal", 0))]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [
            float(cfg.attrs.get("scale", 0.0) or 0.0),
            float(cfg.attrs.get("softcap", 0.0) or 0.0),
        ]

    def attend(self, inputs, outputs, dims, floats, *, bf16):
        qn, kvn, rank, causal = dims
        ins = list(inputs) + [None] * (6 - len(inputs))
        q, k, v = (am.as_compute(x, bf16) for x in ins[:3])
        qh, kh, vh = _to_bnsh(q, qn), _to_bnsh(k, kvn), _to_bnsh(v, kvn)
        past = 0
        if ins[4] is not None:
            past = ins[4].shape[2]
            kh = np.concatenate([am.as_compute(ins[4], bf16), kh], axis=2)
            vh = np.concatenate([am.as_compute(ins[5], bf16), vh], axis=2)
        _, _, s, h = qh.shape
        t = kh.shape[2]
        allowed = np.ones((1, 1, s, t), bool)
        if causal:
            allowed = allowed & (np.arange(t)[None, :] <= np.arange(s)[:, None] + past)
        bias = None
        if ins[3] is not None:
            m = np.asarray(ins[3])
            if m.dtype == np.dtype(bool):
                allowed = allowed & m
            else:
                bias = am.as_compute(m, bf16)
                allowed = allowed & ~np.isneginf(bias)
        scale = floats[0] if floats[0] != 0 else 1.0 / float(np.sqrt(h))
        out = am.sdpa(qh, kh, vh, allowed, scale=scale, softcap=floats[1], bias=bias, bf16=bf16)
        y = _from_bnsh(out) if rank == 3 else out
        return [y, kh, vh][: len(outputs)]


__all__ = ["Attention", "GroupQueryAttention", "MultiHeadAttention", "match_specs"]
