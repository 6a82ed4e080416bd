"""Vectorized numpy math shared by the attention operators: rotary embedding, the KV-cache
update and masked scaled-dot-product attention with a streaming (running-max) softmax.

The NPU kernels and the numpy references call the same functions with different precision:
``bf16=True`` rounds every float operand to bf16 on entry (``dtypes.mac_operand``), keeps the
accumulators (scores, running max, running sum, P·V) in float32 and rounds the probabilities to
bf16 before they meet V, as an AIE core's bf16 MAC does. ``bf16=False`` is plain float32.

Masking is explicit: a key position contributes only where the boolean ``allowed`` mask is set,
so padded or future positions never reach a result (their scores are never exponentiated).
A query row with no allowed key yields zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from npudispatch.operators.dtypes import BF16, F32, mac_operand, to_compute
from npudispatch.overlay_abi import KernelOperandError

#: Keys processed per step of the streaming softmax (one AIE tile's worth of scores).
KEY_BLOCK = 64


def as_compute(x: np.ndarray | None, bf16: bool) -> np.ndarray | None:
    """Float operand in the kernel's compute type (bf16-rounded float32 or float32)."""
    if x is None:
        return None
    return mac_operand(x) if bf16 else np.asarray(x, dtype=F32)


def as_lanes(x: np.ndarray, bf16: bool) -> np.ndarray:
    """Lane-wise (vector unit) operand: rounded to bf16 in bf16 compute only (``bf16`` and the
    launch's precision both say so), float32 in mixed and float32 compute."""
    return to_compute(x) if bf16 else np.asarray(x, dtype=F32)


def rotate(
    x: np.ndarray, cos: np.ndarray, sin: np.ndarray, *, interleaved: bool, rotary_dim: int
) -> np.ndarray:
    """Rotary embedding of ``x [..., S, H]`` with per-position ``cos/sin [..., S, rotary_dim/2]``.

    ``cos``/``sin`` broadcast against ``x`` without the last axis (e.g. ``[B, 1, S, R/2]`` for a
    BNSH ``x``). Non-interleaved pairs element ``i`` with ``i + R/2``; interleaved pairs ``2i``
    with ``2i+1``. Lanes at and after ``rotary_dim`` pass through.
    """
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        out = np.stack([real, imag], axis=-1).reshape(rot.shape)
    else:
        out = np.concatenate([real, imag], axis=-1)
    return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def softcap_scores(scores: np.ndarray, softcap: float) -> np.ndarray:
    """``softcap · tanh(scores / softcap)`` (identity for ``softcap <= 0``)."""
    return scores if softcap <= 0 else np.tanh(scores / softcap) * softcap


def sdpa(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    allowed: np.ndarray,
    *,
    scale: float,
    softcap: float = 0.0,
    bias: np.ndarray | Sequence[np.ndarray] | None = None,
    smooth: bool = False,
    bf16: bool,
    block: int = KEY_BLOCK,
) -> np.ndarray:
    """Attention ``softmax(q·kᵀ·scale [+ bias]) · v`` over allowed keys, streamed over key blocks.

    ``q [B, N, S, H]``; ``k``/``v [B, G, T, H(v)]`` with ``N`` a multiple of ``G`` (query head
    ``n`` reads KV head ``n // (N/G)``: grouped-query attention without copying KV heads);
    ``allowed`` broadcasts to ``[B, N, S, T]``; ``bias`` (additive, float; a sequence of terms is
    added one after the other, in float32, in that order) too. The softmax keeps a
    running max ``m``, running sum ``l`` and unnormalized output per row, rescaling both when a
    new block raises the max (the online softmax an NPU tile loop runs). ``smooth`` adds 1 to the
    denominator (``exp(-m)`` after the shift), onnxruntime's ``smooth_softmax``.
    """
    b, n, s, _ = q.shape
    g, t = k.shape[1], k.shape[2]
    group = n // g
    qg = q.reshape(b, g, group, s, q.shape[-1])  # heads sharing one KV head side by side
    allowed = np.broadcast_to(allowed, (b, n, s, t)).reshape(b, g, group, s, t)
    terms = [] if bias is None else [bias] if isinstance(bias, np.ndarray) else list(bias)
    terms = [np.broadcast_to(x, (b, n, s, t)).reshape(b, g, group, s, t) for x in terms]
    m = np.full((b, g, group, s, 1), -np.inf, F32)
    l_sum = np.zeros((b, g, group, s, 1), F32)
    acc = np.zeros((b, g, group, s, v.shape[-1]), F32)
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        mask = allowed[..., lo:hi]
        if not mask.any():
            continue
        kb = k[:, :, None, lo:hi, :]  # [B, G, 1, blk, H]
        scores = np.matmul(qg, np.swapaxes(kb, -1, -2), dtype=F32) * np.float32(scale)
        scores = softcap_scores(scores, softcap)
        for term in terms:
            scores = scores + term[..., lo:hi]
        scores = np.where(mask, scores, -np.inf).astype(F32, copy=False)
        new_m = np.maximum(m, scores.max(axis=-1, keepdims=True))
        safe_m = np.where(np.isneginf(new_m), np.float32(0), new_m)
        p = np.exp(scores - safe_m)  # exp(-inf) = 0 for masked keys
        rescale = np.exp(np.where(np.isneginf(m), -np.inf, m - safe_m))
        l_sum = l_sum * rescale + p.sum(axis=-1, keepdims=True)
        if bf16:
            p = p.astype(BF16).astype(F32)
        acc = acc * rescale + np.matmul(p, v[:, :, None, lo:hi, :], dtype=F32)
        m = new_m
    if smooth:
        l_sum = l_sum + np.exp(-np.where(np.isneginf(m), np.inf, m))
    out = np.divide(acc, l_sum, out=np.zeros_like(acc), where=l_sum > 0)
    return out.reshape(b, n, s, v.shape[-1])


@dataclass(frozen=True)
class GqaShape:
    """The sizes of one GroupQueryAttention call."""

    batch: int
    seq: int
    num_heads: int
    kv_heads: int
    head_size: int
    past_len: int  # rows of the past buffer (0 without past)
    present_len: int  # rows of the present buffer


def gqa_positions(
    seqlens_k: np.ndarray, total_sequence_length: int, seq: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(past_rows[B], total_rows[B], first_prompt)`` as onnxruntime derives them.

    ``seqlens_k[b] + 1`` keys are valid for batch ``b``. A first prompt (``seq ==
    total_sequence_length``) starts at position 0, so right-padded prompts are allowed;
    otherwise the ``seq`` new tokens follow ``seqlens_k + 1 - seq`` cached ones.
    """
    total = np.asarray(seqlens_k, np.int64).reshape(-1) + 1
    first = seq == int(total_sequence_length)
    past = np.zeros_like(total) if first else total - seq
    return past, total, first


def gqa(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    past_k: np.ndarray | None,
    past_v: np.ndarray | None,
    seqlens_k: np.ndarray,
    total_sequence_length: int,
    cos: np.ndarray | None,
    sin: np.ndarray | None,
    shape: GqaShape,
    *,
    scale: float,
    softcap: float,
    local_window: int,
    interleaved: bool,
    smooth: bool,
    bf16: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """com.microsoft GroupQueryAttention on BSNH ``q [B,S,N,H]``, ``k``/``v [B,S,G,H]``.

    Returns ``(output [B,S,N·H], present_k, present_v [B,G,present_len,H])`` (float32). The
    present buffers hold the first ``past_rows`` rows of the past, the ``S`` new rows after them
    and zeros elsewhere; ``cos``/``sin`` (``[max_pos, R/2]``) turn rotary on, positions being
    ``past_rows + s``.
    """
    b, s, n, g, h = shape.batch, shape.seq, shape.num_heads, shape.kv_heads, shape.head_size
    if past_k is None and total_sequence_length != s:
        raise KernelOperandError(
            f"total_sequence_length {total_sequence_length} must equal the {s} new tokens when "
            "there is no past key/value (onnxruntime refuses it too)"
        )
    past_rows, total_rows, _ = gqa_positions(seqlens_k, total_sequence_length, s)
    if int(total_rows.max(initial=0)) > shape.present_len or int(past_rows.min(initial=0)) < 0:
        raise KernelOperandError(
            f"seqlens_k {seqlens_k.tolist()} do not fit a present buffer of {shape.present_len} "
            f"rows with {s} new tokens"
        )
    rotary = cos is not None and sin is not None
    # With rotary, q and k meet the MAC only once rotated: they and the caches enter as lane-wise
    # operands (float32 in mixed compute); the rotated q and k are rounded below.
    qk_entry = as_lanes if rotary else as_compute
    qc, kc = (np.swapaxes(qk_entry(x, bf16), 1, 2) for x in (q, k))  # BNSH
    vc = np.swapaxes(as_compute(v, bf16), 1, 2)
    if cos is not None and sin is not None:
        pos = past_rows[:, None] + np.arange(s)[None, :]  # [B, S]
        pos = np.clip(pos, 0, cos.shape[0] - 1)  # padded rows of a prompt: any valid row
        cb, sb = as_lanes(cos, bf16)[pos][:, None], as_lanes(sin, bf16)[pos][:, None]
        rdim = 2 * cos.shape[1]
        qc = rotate(qc, cb, sb, interleaved=interleaved, rotary_dim=rdim)
        kc = rotate(kc, cb, sb, interleaved=interleaved, rotary_dim=rdim)
        if bf16:  # the rotated operands are stored (bf16) before the attention reads them
            qc, kc = qc.astype(BF16).astype(F32), kc.astype(BF16).astype(F32)
    present_k = np.zeros((b, g, shape.present_len, h), F32)
    present_v = np.zeros_like(present_k)
    pk, pv = as_compute(past_k, bf16), as_compute(past_v, bf16)
    for i in range(b):
        p = int(past_rows[i])
        if p and pk is not None and pv is not None:
            present_k[i, :, :p] = pk[i, :, :p]
            present_v[i, :, :p] = pv[i, :, :p]
        rows = min(s, shape.present_len - p)
        present_k[i, :, p : p + rows] = kc[i, :, :rows]
        present_v[i, :, p : p + rows] = vc[i, :, :rows]
    keys = np.arange(shape.present_len)[None, None, :]  # [1, 1, T]
    causal_end = past_rows[:, None, None] + np.arange(s)[None, :, None] + 1  # [B, S, 1]
    end = np.minimum(causal_end, total_rows[:, None, None])
    allowed = keys < end
    if local_window > 0:
        allowed &= keys >= causal_end - local_window
    out = sdpa(
        qc,
        present_k,
        present_v,
        allowed[:, None],
        scale=scale if scale != 0 else 1.0 / float(np.sqrt(h)),
        softcap=softcap,
        smooth=smooth,
        bf16=bf16,
    )
    return np.swapaxes(out, 1, 2).reshape(b, s, n * h), present_k, present_v


__all__ = [
    "KEY_BLOCK",
    "GqaShape",
    "as_compute",
    "as_lanes",
    "gqa",
    "gqa_positions",
    "rotate",
    "sdpa",
    "softcap_scores",
]
