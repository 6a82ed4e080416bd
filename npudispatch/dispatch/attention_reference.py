"""Attention in the rounding-aware reference, computed the way the NPU kernels compute it.

onnxruntime's GroupQueryAttention, MultiHeadAttention and Attention round nothing inside, while
the kernels (:mod:`npudispatch.operators.attention_math`) do: with rotary the rotated q and k are
rounded to bf16 before q·k (in mixed compute the rotation itself takes float32 q, k and cos/sin),
and the streaming softmax rounds the probabilities to bf16 before P·V, per key block of
:data:`~npudispatch.operators.attention_math.KEY_BLOCK`, each block's ``exp(s - m)`` taken against
the running max ``m`` reached so far. :func:`expand_attention` therefore replaces every NPU
attention node of the reference by primitive ONNX ops with a rounding point (and a probe jitter
input) exactly there:

* scores ``q·kᵀ · scale`` (``softcap · tanh(s / softcap)``, plus an additive bias or mask),
  masked keys at ``-inf``; keys padded to whole blocks;
* per block ``m_j = max(m_{j-1}, max_block(s))`` and ``p_j = exp(s - m_j)`` (``m_j = -inf``: 0),
  ``l_j = Σ p_j`` unrounded, ``P·V`` on the **rounded** ``p_j``; the kernel's rescaling by
  ``exp(m_{j-1} - m_j)`` at each step is, up to float32 order, ``exp(m_j - m_final)`` per block;
* ``out = Σ_j f_j·(P_j·V_j) / Σ_j f_j·l_j`` (``+ exp(-m_final)`` with ``smooth_softmax``), zeros
  for a row without an allowed key.

GroupQueryAttention keeps its head grouping, packed QKV, rotary (interleaved or not, partial
``rotary_dim``), causal + ``seqlens_k`` masking with a first prompt's right padding,
``local_window_size``, ``softcap``, ``scale``, ``smooth_softmax`` and the static BNSH present
buffer (past rows, then the new rows, zeros after); MultiHeadAttention its bias, key padding mask,
additive ``attention_bias``, past/present and ``unidirectional``; Attention-23 3-D or 4-D inputs,
grouped heads, an additive float mask, past/present, ``is_causal`` and ``softcap``. Entry roundings
of the operands are the generic ones of :mod:`.rounding_reference` (every float input in bf16
compute; in mixed compute the slots of :func:`mac_entry_slots`); bf16 compute's output roundings
too. Only float32 accumulation order then differs from the kernels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from npudispatch.operators.attention import MHA_MASK_FILTER_VALUE
from npudispatch.operators.attention_math import KEY_BLOCK
from npudispatch.rewrites.support import npu_support

__all__ = ["ATTENTION_OPS", "expand_attention", "mac_entry_slots", "npu_attention_nodes"]

ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention"})
MIN_OPSET = 12
"""Lowest default-domain opset the expansion is written for (integer Max/Min, GreaterOrEqual);
below it a node keeps onnxruntime's own operator (rounded on its operands and results only)."""

_F32 = ir.DataType.FLOAT
_SERIAL = itertools.count()
_GQA_QK, _GQA_V, _GQA_PAST = (0, 1), (2,), (3, 4)


def npu_attention_nodes(g: ir.Graph) -> list[ir.Node]:
    """The attention nodes of ``g`` that run on the NPU, in graph order."""
    return [n for n in g if n.op_type in ATTENTION_OPS and npu_support(n) is None]


def _opset(g: ir.Graph | None) -> int:
    if g is None:
        return 0
    return g.opset_imports.get("", g.opset_imports.get("ai.onnx", 0))


def _rotary(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.attributes.get_int("do_rotary", 0) != 0


def mac_entry_slots(node: ir.Node) -> list[int]:
    """Input slots of an attention node that a mixed-compute kernel rounds on entry: every
    operand, except that with rotary q and k (or the packed QKV) enter the lane-wise rotation in
    float32 (:func:`expand_attention` rounds them once rotated, and a packed v after the split)
    and the cos/sin caches are never MAC operands."""
    if node.op_type != "GroupQueryAttention":
        return list(range(len(node.inputs)))
    expanded = _rotary(node) and _opset(node.graph) >= MIN_OPSET  # else onnxruntime rotates
    slots = (*_GQA_V, *_GQA_PAST) if expanded else (*_GQA_QK, *_GQA_V, *_GQA_PAST)
    return [i for i in slots if i < len(node.inputs)]


def expand_attention(
    g: ir.Graph,
    nodes: Sequence[ir.Node],
    jitters: dict[str, tuple[int, ...]],
    *,
    mixed: bool,
    rounds: bool = True,
) -> None:
    """Replace each of ``nodes`` (NPU attention nodes whose operands the caller has rounded on
    entry) by its kernel's computation in primitive ops, adding the inner rounding points (and
    their jitter inputs to ``jitters``). ``mixed``: mixed compute (see :func:`mac_entry_slots`);
    ``rounds=False``: no rounding point at all, the float32 computation (what the tests compare
    with onnxruntime's own operators)."""
    opset = _opset(g)
    if opset < MIN_OPSET:
        return
    for node in nodes:
        b = _Builder(g, node, jitters, opset, rounds=rounds)
        if node.op_type == "GroupQueryAttention":
            outs = _gqa(b, node, mixed=mixed)
        elif node.op_type == "MultiHeadAttention":
            outs = _mha(b, node)
        else:
            outs = _onnx_attention(b, node)
        b.replace(outs)


class _Builder:
    """Default-domain nodes inserted before ``anchor``, with unique names and constants as
    initializers; :meth:`replace` swaps them in for the anchor."""

    def __init__(
        self,
        g: ir.Graph,
        anchor: ir.Node,
        jitters: dict[str, tuple[int, ...]],
        opset: int,
        *,
        rounds: bool,
    ) -> None:
        self.g, self.anchor, self.jitters, self.opset = g, anchor, jitters, opset
        self.rounds = rounds
        self.nodes: list[ir.Node] = []
        self.tag = f"{anchor.name or anchor.op_type}__npud_attn"

    def _name(self) -> str:
        return f"{self.tag}_{next(_SERIAL)}"

    def op(self, op_type: str, *inputs: ir.Value | None, **attrs) -> ir.Value:
        node = ir.Node(
            "", op_type, inputs, ir.convenience.convert_attributes(attrs), name=self._name()
        )
        node.outputs[0].name = node.name
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, arr) -> ir.Value:
        arr = np.asarray(arr)
        name = self._name()
        value = ir.Value(
            name=name, shape=ir.Shape(arr.shape), const_value=ir.tensor(arr, name=name)
        )
        value.type = ir.TensorType(value.const_value.dtype)
        self.g.register_initializer(value)
        return value

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.asarray(values, np.int64))

    def f32(self, value: float) -> ir.Value:
        return self.const(np.asarray(value, np.float32))

    def reshape(self, x: ir.Value, shape: Sequence[int]) -> ir.Value:
        return self.op("Reshape", x, self.ints(*shape))

    def unsqueeze(self, x: ir.Value, axis: int) -> ir.Value:
        if self.opset >= 13:  # axes an input from opset 13
            return self.op("Unsqueeze", x, self.ints(axis))
        return self.op("Unsqueeze", x, axes=[axis])

    def slice(self, x: ir.Value, axis: int, start: int, end: int) -> ir.Value:
        return self.op("Slice", x, self.ints(start), self.ints(end), self.ints(axis))

    def reduce(self, op_type: str, x: ir.Value, axis: int, keepdims: int = 1) -> ir.Value:
        # ReduceSum takes its axes as an input from opset 13, ReduceMax from 18
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, x, self.ints(axis), keepdims=keepdims)
        return self.op(op_type, x, axes=[axis], keepdims=keepdims)

    def where_neginf(self, x: ir.Value, then: ir.Value) -> ir.Value:
        """``then`` where ``x`` is -inf, else ``x``."""
        return self.op("Where", self.op("IsInf", x, detect_positive=0), then, x)

    def round(self, x: ir.Value, shape: Sequence[int]) -> ir.Value:
        """``x`` rounded to bf16 times a new jitter input: one rounding point of the kernel."""
        if not self.rounds:
            return x
        # imported here: rounding_reference imports this module
        from npudispatch.dispatch.rounding_reference import _rounding_nodes, new_jitter

        x.type, x.shape = ir.TensorType(_F32), ir.Shape(shape)
        new = _rounding_nodes(self.g, x)
        for n in new:
            n.outputs[0].name = self._name()
        self.nodes += new
        name = new_jitter(self.jitters, shape)
        jitter = ir.Value(name=name, type=ir.TensorType(_F32), shape=ir.Shape(shape))
        self.g.inputs.append(jitter)
        return self.op("Mul", new[-1].outputs[0], jitter)

    def replace(self, outputs: Sequence[ir.Value]) -> None:
        """Insert the new nodes before the anchor, move the anchor's outputs' readers (and graph
        output slots, with their names) to ``outputs`` and remove the anchor."""
        g, anchor = self.g, self.anchor
        for old, new in zip(anchor.outputs, outputs):
            if not old.name:
                continue
            if new.producer() not in self.nodes:  # an input passed through (4-D K, no past)
                new = self.op("Identity", new)
            new.type, new.shape = old.type, old.shape
            for use_node, slot in list(old.uses()):
                use_node.replace_input_with(slot, new)
            if old.is_graph_output():
                for i, o in enumerate(g.outputs):
                    if o is old:
                        g.outputs[i] = new
                name = old.name
                old.name, new.name = f"{name}__npud_replaced", name
        g.insert_before(anchor, self.nodes)
        g.remove(anchor, safe=True)


def _shape(v: ir.Value | None) -> tuple[int, ...]:
    assert v is not None and v.shape is not None and v.shape.is_static(), v
    return tuple(int(d) for d in v.shape)


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _sdpa(
    b: _Builder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    dims: tuple[int, int, int, int, int, int, int],
    *,
    allowed: ir.Value | None,
    scale: float,
    softcap: float = 0.0,
    bias: ir.Value | Sequence[ir.Value] | None = None,
    smooth: bool = False,
) -> ir.Value:
    """``attention_math.sdpa`` in ONNX ops: ``q [B,N,S,H]``, ``k [B,G,T,H]``, ``v [B,G,T,Hv]``,
    ``allowed`` (bool) and ``bias`` (one value or terms added in order) broadcasting to
    ``[B,G,N/G,S,T]``; returns ``[B,N,S,Hv]``."""
    bsz, n, g, s, t, h, hv = dims
    grp = n // g
    blk = min(t, KEY_BLOCK)
    nb = -(-t // blk)
    lead = [bsz, g, grp, s]
    qg = b.reshape(q, [*lead, h])
    kt = b.unsqueeze(b.op("Transpose", k, perm=[0, 1, 3, 2]), 2)  # [B,G,1,H,T]
    scores = b.op("Mul", b.op("MatMul", qg, kt), b.f32(np.float32(scale)))
    if softcap > 0:
        c = b.f32(np.float32(softcap))
        scores = b.op("Mul", b.op("Tanh", b.op("Div", scores, c)), c)
    for term in [] if bias is None else [bias] if isinstance(bias, ir.Value) else bias:
        scores = b.op("Add", scores, term)
    ninf = b.f32(-np.inf)
    if allowed is not None:
        scores = b.op("Where", allowed, scores, ninf)
    if nb * blk > t:  # the last block's missing keys: masked
        pad = b.const(np.full([*lead, nb * blk - t], -np.inf, np.float32))
        scores = b.op("Concat", scores, pad, axis=-1)
        vpad = b.const(np.zeros([bsz, g, nb * blk - t, hv], np.float32))
        v = b.op("Concat", v, vpad, axis=2)
    sb = b.reshape(scores, [*lead, nb, blk])
    block_max = b.reduce("ReduceMax", sb, -1)  # [..., nb, 1]
    running = [b.slice(block_max, 4, 0, 1)]
    for j in range(1, nb):
        running.append(b.op("Max", running[-1], b.slice(block_max, 4, j, j + 1)))
    m = running[0] if nb == 1 else b.op("Concat", *running, axis=4)
    zero = b.f32(0.0)
    p = b.op("Exp", b.op("Sub", sb, b.where_neginf(m, zero)))  # exp(-inf) = 0: masked keys
    l_blocks = b.reduce("ReduceSum", p, -1)  # unrounded, as the kernel's running sum
    p = b.round(p, [*lead, nb, blk])  # the kernel's bf16 probabilities before P·V
    pv = b.op(
        "MatMul",
        b.op("Transpose", p, perm=[0, 1, 2, 4, 3, 5]),  # [B,G,grp,nb,S,blk]
        b.reshape(v, [bsz, g, 1, nb, blk, hv]),
    )  # [B,G,grp,nb,S,Hv]
    m_final = running[-1]  # [B,G,grp,S,1,1]
    factor = b.op("Exp", b.op("Sub", m, b.where_neginf(m_final, zero)))  # exp(m_j - m_final)
    l_sum = b.reduce("ReduceSum", b.op("Mul", l_blocks, factor), 4, keepdims=0)  # [..., S, 1]
    acc = b.op("Mul", pv, b.op("Transpose", factor, perm=[0, 1, 2, 4, 3, 5]))
    acc = b.reduce("ReduceSum", acc, 3, keepdims=0)  # [B,G,grp,S,Hv]
    if smooth:
        mf = b.reshape(m_final, [*lead, 1])
        extra = b.op("Exp", b.op("Neg", mf))
        l_sum = b.op("Add", l_sum, b.op("Where", b.op("IsInf", mf, detect_positive=0), zero, extra))
    out = b.op("Where", b.op("Greater", l_sum, zero), b.op("Div", acc, l_sum), zero)
    return b.reshape(out, [bsz, n, s, hv])


def _rotate(
    b: _Builder,
    x: ir.Value,
    cos: ir.Value,
    sin: ir.Value,
    shape: Sequence[int],
    *,
    half: int,
    interleaved: bool,
) -> ir.Value:
    """``attention_math.rotate`` on BSNH ``x`` with ``cos``/``sin [B,S,1,half]``."""
    bsz, s, heads, h = shape
    rdim = 2 * half
    rot = b.slice(x, 3, 0, rdim) if rdim < h else x
    if interleaved:
        pairs = b.reshape(rot, [bsz, s, heads, half, 2])
        x1, x2 = b.slice(pairs, 4, 0, 1), b.slice(pairs, 4, 1, 2)
        cos, sin = b.unsqueeze(cos, 4), b.unsqueeze(sin, 4)
    else:
        x1, x2 = b.slice(rot, 3, 0, half), b.slice(rot, 3, half, rdim)
    real = b.op("Sub", b.op("Mul", cos, x1), b.op("Mul", sin, x2))
    imag = b.op("Add", b.op("Mul", sin, x1), b.op("Mul", cos, x2))
    if interleaved:
        out = b.reshape(b.op("Concat", real, imag, axis=4), [bsz, s, heads, rdim])
    else:
        out = b.op("Concat", real, imag, axis=3)
    return b.op("Concat", out, b.slice(x, 3, rdim, h), axis=3) if rdim < h else out


def _gqa(b: _Builder, node: ir.Node, *, mixed: bool) -> list[ir.Value]:
    """GroupQueryAttention as ``attention_math.gqa`` computes it."""
    attrs = node.attributes
    n, g = attrs.get_int("num_heads"), attrs.get_int("kv_num_heads")
    query, key, value = _input(node, 0), _input(node, 1), _input(node, 2)
    assert query is not None
    bsz, s, d = _shape(query)
    packed = key is None
    h = d // (n + 2 * g) if packed else d // n
    past_k, past_v = _input(node, 3), _input(node, 4)
    t = _shape(node.outputs[1])[2]
    rotary = _rotary(node)
    if packed:
        qkv = b.reshape(query, [bsz, s, n + 2 * g, h])
        q = b.slice(qkv, 2, 0, n)
        k = b.slice(qkv, 2, n, n + g)
        v = b.slice(qkv, 2, n + g, n + 2 * g)
        if rotary and mixed:  # the packed input was left float32 for the rotation
            v = b.round(v, [bsz, s, g, h])
    else:
        assert key is not None and value is not None
        q = b.reshape(query, [bsz, s, n, h])
        k, v = b.reshape(key, [bsz, s, g, h]), b.reshape(value, [bsz, s, g, h])
    # positions (gqa_positions): a first prompt starts at 0, otherwise after seqlens_k + 1 - S
    seqlens, total_len = _input(node, 5), _input(node, 6)
    total_rows = b.op("Add", b.op("Cast", seqlens, to=ir.DataType.INT64.value), b.ints(1))  # [B]
    total_len = b.reshape(b.op("Cast", total_len, to=ir.DataType.INT64.value), [1])
    first = b.op("Equal", total_len, b.ints(s))
    past_rows = b.op("Where", first, b.ints(0), b.op("Sub", total_rows, b.ints(s)))  # [B]
    new_pos = b.op("Add", b.unsqueeze(past_rows, 1), b.ints(*range(s)))  # [B, S]
    if rotary:
        cos_cache, sin_cache = _input(node, 7), _input(node, 8)
        max_pos, half = _shape(cos_cache)
        pos = b.op("Min", b.op("Max", new_pos, b.ints(0)), b.ints(max_pos - 1))
        cos = b.unsqueeze(b.op("Gather", cos_cache, pos), 2)  # [B, S, 1, R/2]
        sin = b.unsqueeze(b.op("Gather", sin_cache, pos), 2)
        interleaved = attrs.get_int("rotary_interleaved", 0) != 0
        # the kernel stores the rotated q and k (bf16) before q·k reads them
        q = _rotate(b, q, cos, sin, [bsz, s, n, h], half=half, interleaved=interleaved)
        k = _rotate(b, k, cos, sin, [bsz, s, g, h], half=half, interleaved=interleaved)
        q, k = b.round(q, [bsz, s, n, h]), b.round(k, [bsz, s, g, h])
    qh = b.op("Transpose", q, perm=[0, 2, 1, 3])
    kh, vh = (b.op("Transpose", x, perm=[0, 2, 1, 3]) for x in (k, v))  # [B, G, S, H]
    # the static present buffer: past rows, then the S new rows, zeros after
    keys = b.ints(*range(t))
    rel = b.op("Sub", b.unsqueeze(keys, 0), b.unsqueeze(past_rows, 1))  # [B, T]: t - past
    new_row = b.op("And", b.op("GreaterOrEqual", rel, b.ints(0)), b.op("Less", rel, b.ints(s)))
    new_row = b.reshape(new_row, [bsz, 1, t, 1])
    is_past = b.reshape(b.op("Less", rel, b.ints(0)), [bsz, 1, t, 1])
    index = b.op("Min", b.op("Max", rel, b.ints(0)), b.ints(s - 1))
    index = b.op("Expand", b.reshape(index, [bsz, 1, t, 1]), b.ints(bsz, g, t, h))
    zero = b.f32(0.0)
    presents = []
    for new, past in ((kh, past_k), (vh, past_v)):
        rows = b.op("GatherElements", new, index, axis=2)
        old = zero
        if past is not None:
            p_len = _shape(past)[2]
            old = past if p_len == t else b.slice(past, 2, 0, t)
            if p_len < t:
                fill = b.const(np.zeros([bsz, g, t - p_len, h], np.float32))
                old = b.op("Concat", past, fill, axis=2)
        presents.append(b.op("Where", new_row, rows, b.op("Where", is_past, old, zero)))
    # masking: causal up to each row, valid keys below seqlens_k + 1, the local window
    causal_end = b.unsqueeze(b.op("Add", new_pos, b.ints(1)), 2)  # [B, S, 1]
    end = b.op("Min", causal_end, b.reshape(total_rows, [bsz, 1, 1]))
    allowed = b.op("Less", keys, end)  # [B, S, T]
    window = attrs.get_int("local_window_size", -1)
    if window > 0:
        start = b.op("Sub", causal_end, b.ints(window))
        allowed = b.op("And", allowed, b.op("GreaterOrEqual", keys, start))
    allowed = b.reshape(allowed, [bsz, 1, 1, s, t])
    scale = attrs.get_float("scale", 0.0)
    out = _sdpa(
        b,
        qh,
        presents[0],
        presents[1],
        (bsz, n, g, s, t, h, h),
        allowed=allowed,
        scale=scale if scale != 0 else 1.0 / float(np.sqrt(h)),
        softcap=attrs.get_float("softcap", 0.0),
        smooth=attrs.get_int("smooth_softmax", 0) != 0,
    )
    y = b.reshape(b.op("Transpose", out, perm=[0, 2, 1, 3]), [bsz, s, n * h])
    return [y, *presents]


def _bnsh(b: _Builder, x: ir.Value, heads: int, shape: Sequence[int]) -> ir.Value:
    """``x`` of ``shape [B, S, heads·H]`` → ``[B, heads, S, H]``; 4-D is already BNSH."""
    if len(shape) == 4:
        return x
    bsz, s, d = shape
    return b.op("Transpose", b.reshape(x, [bsz, s, heads, d // heads]), perm=[0, 2, 1, 3])


def _bsnh_flat(b: _Builder, x: ir.Value, shape: Sequence[int]) -> ir.Value:
    bsz, n, s, h = shape
    return b.reshape(b.op("Transpose", x, perm=[0, 2, 1, 3]), [bsz, s, n * h])


def _with_past(b: _Builder, x: ir.Value, past: ir.Value | None) -> ir.Value:
    return x if past is None else b.op("Concat", past, x, axis=2)


def _causal(b: _Builder, s: int, t: int, past: int) -> ir.Value:
    """Key ``t`` allowed for query row ``s`` when ``t <= s + past``: ``[1, 1, 1, S, T]``."""
    keep = np.arange(t)[None, :] <= np.arange(s)[:, None] + past
    return b.const(keep.reshape(1, 1, 1, s, t))


def _grouped_bias(
    b: _Builder, bias: ir.Value, bsz: int, n: int, g: int, s: int, t: int
) -> ir.Value:
    """An additive bias broadcasting to ``[B, N, S, T]`` as ``[B, G, N/G, S, T]``."""
    full = b.op("Expand", bias, b.ints(bsz, n, s, t))
    return b.reshape(full, [bsz, g, n // g, s, t])


def _mha(b: _Builder, node: ir.Node) -> list[ir.Value]:
    """com.microsoft MultiHeadAttention as ``operators.attention.MultiHeadAttention.attend``."""
    n = node.attributes.get_int("num_heads")
    q, k, v = (_input(node, i) for i in range(3))
    assert q is not None and k is not None and v is not None
    dq, dk, dv = (_shape(x)[2] for x in (q, k, v))
    bias = _input(node, 3)
    if bias is not None:
        q = b.op("Add", q, b.slice(bias, 0, 0, dq))
        k = b.op("Add", k, b.slice(bias, 0, dq, dq + dk))
        v = b.op("Add", v, b.slice(bias, 0, dq + dk, dq + dk + dv))
    bsz, s, _ = _shape(_input(node, 0))
    past_k = _input(node, 6)
    past = 0 if past_k is None else _shape(past_k)[2]
    qh = _bnsh(b, q, n, (bsz, s, dq))
    kv_len = _shape(_input(node, 1))[1]
    kh = _with_past(b, _bnsh(b, k, n, (bsz, kv_len, dk)), past_k)
    vh = _with_past(b, _bnsh(b, v, n, (bsz, kv_len, dv)), _input(node, 7))
    t = past + kv_len
    h, hv = dq // n, dv // n
    allowed = _causal(b, s, t, past) if node.attributes.get_int("unidirectional", 0) else None
    attn_bias = _input(node, 5)
    grouped = None if attn_bias is None else _grouped_bias(b, attn_bias, bsz, n, n, s, t)
    mask = _input(node, 4)
    if mask is not None:  # onnxruntime's meaning: mask_filter_value added to padded keys
        padded = b.op("Equal", mask, b.const(np.int32(0)))
        filt = b.op("Where", padded, b.const(MHA_MASK_FILTER_VALUE), b.const(np.float32(0)))
        filt = _grouped_bias(b, b.reshape(filt, [bsz, 1, 1, t]), bsz, n, n, s, t)
        grouped = filt if grouped is None else (grouped, filt)  # the kernel's (onnxruntime's) order
    scale = node.attributes.get_float("scale", 0.0)
    out = _sdpa(
        b,
        qh,
        kh,
        vh,
        (bsz, n, n, s, t, h, hv),
        allowed=allowed,
        scale=scale if scale != 0 else 1.0 / float(np.sqrt(h)),
        bias=grouped,
    )
    return [_bsnh_flat(b, out, (bsz, n, s, hv)), kh, vh]


def _onnx_attention(b: _Builder, node: ir.Node) -> list[ir.Value]:
    """ONNX Attention-23 as ``operators.attention.Attention.attend``."""
    q, k, v = (_input(node, i) for i in range(3))
    assert q is not None and k is not None and v is not None
    rank = len(_shape(q))
    if rank == 3:
        qn, kvn = node.attributes.get_int("q_num_heads"), node.attributes.get_int("kv_num_heads")
    else:
        qn, kvn = _shape(q)[1], _shape(k)[1]
    qh, kh, vh = (_bnsh(b, x, heads, _shape(x)) for x, heads in ((q, qn), (k, kvn), (v, kvn)))
    bsz = _shape(q)[0]
    s = _shape(q)[1] if rank == 3 else _shape(q)[2]
    h = (_shape(q)[2] // qn) if rank == 3 else _shape(q)[3]
    hv = (_shape(v)[2] // kvn) if rank == 3 else _shape(v)[3]
    past_k = _input(node, 4)
    past = 0 if past_k is None else _shape(past_k)[2]
    kh, vh = _with_past(b, kh, past_k), _with_past(b, vh, _input(node, 5))
    t = past + (_shape(k)[1] if rank == 3 else _shape(k)[2])
    allowed = _causal(b, s, t, past) if node.attributes.get_int("is_causal", 0) else None
    mask = _input(node, 3)
    bias = None
    if mask is not None:  # an additive float mask (the kernel declines boolean ones)
        bias = _grouped_bias(b, mask, bsz, qn, kvn, s, t)
        finite = b.op("Not", b.op("IsInf", bias, detect_positive=0))
        allowed = finite if allowed is None else b.op("And", allowed, finite)
    scale = node.attributes.get_float("scale", 0.0) or 0.0
    out = _sdpa(
        b,
        qh,
        kh,
        vh,
        (bsz, qn, kvn, s, t, h, hv),
        allowed=allowed,
        scale=scale if scale != 0 else 1.0 / float(np.sqrt(h)),
        softcap=node.attributes.get_float("softcap", 0.0) or 0.0,
        bias=bias,
    )
    y = _bsnh_flat(b, out, (bsz, qn, s, hv)) if rank == 3 else out
    return [y, kh, vh]
