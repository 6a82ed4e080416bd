"""CNN rewrites: fold BatchNormalization and constant Mul/Add into Conv, recognise the decomposed
HardSigmoid/HardSwish forms exporters emit, fuse Conv + activation into ``npudispatch.FusedConv``.

Three rule sets, applied by the default pipeline in the order below (each after
:func:`~npudispatch.rewrites.canonical.constants_last`, so constants are the second operand);
the activations go first because folding would take HardSigmoid's ``+ 3`` into a Conv bias:

* :func:`hard_activation_rules`: ``Clip(x + 3, 0, 6) / 6`` (or ``· 1/6``) -> ``HardSigmoid(x;
  1/6, 1/2)``; ``x · Clip(x + 3, 0, 6) / 6`` and ``x · HardSigmoid(x; 1/6, 1/2)`` ->
  ``HardSwish(x)``. HardSwish only exists from opset 14: in older models the result is
  ``x · HardSigmoid(x; 1/6, 1/2)``, which the Conv fusion below still recognises.
* :func:`conv_fold_rules`: ``BatchNormalization(Conv(x, W, B))`` (inference form: one output,
  constant statistics) -> ``Conv(x, W·s, (B - mean)·s + beta)`` with ``s = scale / sqrt(var + eps)``
  per output channel; ``Mul(Conv, c)`` / ``Add(Conv, c)`` with a constant ``c`` that is a scalar or
  per-output-channel (``[M, 1, 1]``, ``[1, M, 1, 1]``..., also as ``Reshape(constant, constant
  shape)``) -> scaled weights / shifted bias. The Conv result must have no other reader. The same
  for ConvTranspose, whose output channel ``g·M/G + j`` is the weight slice
  ``W[g·C/G : (g+1)·C/G, j]`` (weight ``[C, M/G, *k]``).
* :func:`conv_activation_rules`: ``act(Conv(x, W, B))`` for Relu, Clip (constant bounds),
  HardSigmoid, HardSwish (also as ``x · HardSigmoid(x; 1/6, 1/2)``), Sigmoid, ``npudispatch.Silu``
  and LeakyRelu -> ``npudispatch.FusedConv(x, W, B; activation, alpha, beta)`` with the Conv's
  attributes; ``B`` becomes zeros when the Conv had none. ``W`` must be constant (the NPU formats it).
  A following multiply and/or add by one-element constants becomes the FusedConv's
  ``post_scale`` / ``post_shift``. ``act(ConvTranspose(x, W, B))`` likewise becomes
  ``npudispatch.FusedConvTranspose`` with the ConvTranspose's attributes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from npudispatch.domains import is_onnx_domain
from npudispatch.opset import CONV_ACTIVATIONS, DOMAIN, VERSION
from npudispatch.rewrites._checks import (
    const_array,
    fail_unless_float,
    fail_unless_scalar,
    scalar,
)

HARD_ALPHA, HARD_BETA = 1.0 / 6.0, 0.5
HARDSWISH_OPSET = 14  # first default-domain opset with HardSwish


def _conv_node(value: ir.Value) -> ir.Node:
    node = value.producer()
    assert node is not None
    return node


def _conv_attrs(node: ir.Node) -> dict[str, Any]:
    """The Conv node's attributes as plain values (for re-creating it in a rewrite)."""
    return {name: attr.value for name, attr in node.attributes.items()}


def _conv_bias(node: ir.Node) -> ir.Value | None:
    return node.inputs[2] if len(node.inputs) > 2 else None


def _fail_unless_foldable_conv(r: pattern.MatchResult, conv: ir.Value, uses: int = 1) -> bool:
    """The Conv (or ConvTranspose) producing ``conv``: default domain, constant float weight (and
    bias), read only by the matched pattern (``uses`` consumers) and not a graph output."""
    node = _conv_node(conv)
    kind = node.op_type
    if not is_onnx_domain(node.domain):
        r.fail(f"{node.name!r} is not an ONNX {kind}", node)
        return False
    w = node.inputs[1]
    if w is None or const_array(w) is None:
        r.fail(f"{kind} {node.name!r} weight is not a constant", node)
        return False
    if not fail_unless_float(r, conv, w):
        return False
    bias = _conv_bias(node)
    if bias is not None and const_array(bias) is None:
        r.fail(f"{kind} {node.name!r} bias is not a constant", node)
        return False
    if len(conv.uses()) != uses or conv.is_graph_output():
        r.fail(f"{kind} output {conv.name!r} has other readers", conv)
        return False
    return True


def _out_channels(node: ir.Node) -> int:
    """Output channels ``M`` of a Conv (weight ``[M, C/G, *k]``) or a ConvTranspose (weight
    ``[C, M/G, *k]``)."""
    w = const_array(node.inputs[1])
    assert w is not None
    if node.op_type == "ConvTranspose":
        return int(w.shape[1]) * node.attributes.get_int("group", 1)
    return int(w.shape[0])


def _scale_out(node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The weight ``w`` of ``node`` with output channel ``m`` multiplied by ``s[m]``; a
    ConvTranspose's output channel ``g·Mg + j`` is ``W[g·Cg : (g+1)·Cg, j]``."""
    if node.op_type != "ConvTranspose":
        return w * s.reshape(-1, *(1,) * (w.ndim - 1))
    group = node.attributes.get_int("group", 1)
    c, mg, k = w.shape[0], w.shape[1], w.shape[2:]
    per_group = s.reshape(group, 1, mg, *(1,) * len(k))
    return (w.reshape(group, c // group, mg, *k) * per_group).reshape(w.shape)


def _const(op, arr: np.ndarray, like: ir.Value):
    dtype = like.dtype.numpy() if like.dtype is not None else np.float32
    return op.Constant(value=ir.tensor(np.asarray(arr).astype(dtype)))


def _rebuild_conv(op, x, node: ir.Node, w: np.ndarray, b: np.ndarray):
    """The same Conv / ConvTranspose with new weight and bias constants."""
    wv = node.inputs[1]
    assert wv is not None
    make = getattr(op, node.op_type)
    return make(x, _const(op, w, wv), _const(op, b, wv), **_conv_attrs(node))


def _weights(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """Float64 weight and bias (zeros when absent) of a Conv or ConvTranspose node."""
    w = np.asarray(const_array(node.inputs[1]), np.float64)
    bias = _conv_bias(node)
    m = _out_channels(node)
    b = np.zeros(m) if bias is None else np.asarray(const_array(bias), np.float64)
    return w, b.reshape(-1)


def _channel_vector(c: np.ndarray, out_rank: int, m: int) -> np.ndarray | None:
    """``c`` as a per-output-channel vector of length ``m``, or None if it varies over other axes
    (or would change the Conv output's shape by broadcasting)."""
    if c.ndim > out_rank:
        return None
    full = c.reshape((1,) * (out_rank - c.ndim) + c.shape)
    if full.shape[0] != 1 or any(d != 1 for d in full.shape[2:]) or full.shape[1] not in (1, m):
        return None
    return np.broadcast_to(full.reshape(-1).astype(np.float64), (m,))


# ---- folding -------------------------------------------------------------------------------


def _bn_rule(conv_type: str) -> pattern.RewriteRule:
    """``BatchNormalization(conv_type(x, W, B))`` folded into the convolution."""

    def pat(op, x, scale, beta, mean, var):
        conv = getattr(op, conv_type)(x, _allow_other_inputs=True, _outputs=["conv"])
        return op.BatchNormalization(conv, scale, beta, mean, var, _outputs=["bn"])

    return pattern.RewriteRule(pat, _bn_rewrite, _bn_check, name=f"Fold{conv_type}BatchNorm")


def _bn_check(context, x, scale, beta, mean, var, conv, bn, **_):
    r = pattern.MatchResult()
    if not _fail_unless_foldable_conv(r, conv):
        return r
    node = bn.producer()
    if len(node.outputs) != 1 or node.attributes.get_int("training_mode", 0):
        return r.fail(f"BatchNormalization {node.name!r} is in training mode", node)
    m = _out_channels(_conv_node(conv))
    for v in (scale, beta, mean, var):
        arr = const_array(v)
        if arr is None or arr.size != m:
            return r.fail(f"{v.name!r} is not a constant of {m} values", v)
    return r


def _bn_rewrite(op, x, scale, beta, mean, var, conv, bn, **_):
    node = _conv_node(conv)
    eps = bn.producer().attributes.get_float("epsilon", 1e-5)
    w, b = _weights(node)
    s = np.asarray(const_array(scale), np.float64).reshape(-1) / np.sqrt(
        np.asarray(const_array(var), np.float64).reshape(-1) + eps
    )
    mean_v = np.asarray(const_array(mean), np.float64).reshape(-1)
    beta_v = np.asarray(const_array(beta), np.float64).reshape(-1)
    return _rebuild_conv(op, x, node, _scale_out(node, w, s), (b - mean_v) * s + beta_v)


def _reshaped_const(c: ir.Value, shape: ir.Value | None) -> np.ndarray | None:
    """The constant ``c``, reshaped by the constant ``shape`` when given (ONNX Reshape rules)."""
    arr = const_array(c)
    if arr is None or shape is None:
        return arr
    dims = const_array(shape)
    if dims is None:
        return None
    target = [arr.shape[i] if d == 0 else int(d) for i, d in enumerate(dims.reshape(-1))]
    try:
        return arr.reshape(target)
    except ValueError:
        return None


def _affine_rule(kind: str, reshaped: bool, conv_type: str = "Conv") -> pattern.RewriteRule:
    """``Mul``/``Add`` of a ``conv_type`` (Conv or ConvTranspose) by a constant; ``reshaped``:
    the constant arrives through ``Reshape(constant, constant shape)`` (paddle2onnx writes biases
    as ``[C]`` reshaped to ``[1, C, 1, 1]``)."""

    def pat(op, x, c, shape):
        conv = getattr(op, conv_type)(x, _allow_other_inputs=True, _outputs=["conv"])
        other = op.Reshape(c, shape) if reshaped else c
        return op.Mul(conv, other) if kind == "Mul" else op.Add(conv, other)

    def plain(op, x, c):
        return pat(op, x, c, None)

    def check(context, x, c, conv, shape=None, **_):
        r = pattern.MatchResult()
        if not _fail_unless_foldable_conv(r, conv):
            return r
        arr = _reshaped_const(c, shape)
        if arr is None:
            return r.fail(f"{c.name!r} is not a constant (or a constant reshaped)", c)
        out_rank = conv.shape.rank() if conv.shape is not None else None
        node = _conv_node(conv)
        w = const_array(node.inputs[1])
        rank = out_rank or w.ndim  # type: ignore[union-attr]
        if _channel_vector(arr, rank, _out_channels(node)) is None:
            return r.fail(f"{c.name!r} of shape {arr.shape} is not per output channel", c)
        return r

    def rewrite(op, x, c, conv, shape=None, **_):
        node = _conv_node(conv)
        w, b = _weights(node)
        v = _channel_vector(np.asarray(_reshaped_const(c, shape)), w.ndim, b.size)
        assert v is not None
        if kind == "Mul":
            return _rebuild_conv(op, x, node, _scale_out(node, w, v), b * v)
        return _rebuild_conv(op, x, node, w, b + v)

    name = f"Fold{conv_type}{kind}{'_reshaped' if reshaped else ''}"
    return pattern.RewriteRule(pat if reshaped else plain, rewrite, check, name=name)


def conv_fold_rules() -> pattern.RewriteRuleSet:
    """BatchNormalization, then constant Mul and Add, folded into the preceding Conv or
    ConvTranspose."""
    return pattern.RewriteRuleSet(
        [
            rule
            for conv_type in ("Conv", "ConvTranspose")
            for rule in (
                _bn_rule(conv_type),
                *(_affine_rule(k, rs, conv_type) for k in ("Mul", "Add") for rs in (False, True)),
            )
        ],
        commute=True,  # a reshaped constant is not moved last by constants_last
    )


# ---- decomposed HardSigmoid / HardSwish ----------------------------------------------------


def _relu6_plus3(op, x, three, zero, six):
    return op.Clip(op.Add(x, three), zero, six)


def _check_relu6(r: pattern.MatchResult, x, three, zero, six) -> bool:
    return (
        fail_unless_float(r, x)
        and fail_unless_scalar(r, three, 3.0)
        and fail_unless_scalar(r, zero, 0.0)
        and fail_unless_scalar(r, six, 6.0)
    )


def _opset(context) -> int:
    return int(context.model.opset_imports.get("", 0) or 0)


def _hard_sigmoid(op, x):
    return op.HardSigmoid(x, alpha=HARD_ALPHA, beta=HARD_BETA)


def _hard_swish(op, x, opset: int):
    if opset >= HARDSWISH_OPSET:
        return op.HardSwish(x)
    return op.Mul(x, _hard_sigmoid(op, x))


def _hsig_rule(divide: bool) -> pattern.RewriteRule:
    def pat(op, x, three, zero, six, k):
        r6 = _relu6_plus3(op, x, three, zero, six)
        return op.Div(r6, k) if divide else op.Mul(r6, k)

    def check(context, x, three, zero, six, k, **_):
        r = pattern.MatchResult()
        _ = _check_relu6(r, x, three, zero, six) and fail_unless_scalar(
            r, k, 6.0 if divide else 1.0 / 6.0
        )
        return r

    def rewrite(op, x, **_):
        return _hard_sigmoid(op, x)

    return pattern.RewriteRule(
        pat, rewrite, check, name=f"HardSigmoid_{'div' if divide else 'mul'}"
    )


def _hswish_rule(divide: bool, opset_ge_14: bool) -> pattern.RewriteRule:
    def pat(op, x, three, zero, six, k):
        prod = op.Mul(x, _relu6_plus3(op, x, three, zero, six))
        return op.Div(prod, k) if divide else op.Mul(prod, k)

    def check(context, x, three, zero, six, k, **_):
        r = pattern.MatchResult()
        if (_opset(context) >= HARDSWISH_OPSET) != opset_ge_14:
            return r.fail("rule variant for the other opset range")
        _ = _check_relu6(r, x, three, zero, six) and fail_unless_scalar(
            r, k, 6.0 if divide else 1.0 / 6.0
        )
        return r

    def rewrite(op, x, **_):
        return _hard_swish(op, x, HARDSWISH_OPSET if opset_ge_14 else 0)

    tag = f"{'div' if divide else 'mul'}_{'opset14' if opset_ge_14 else 'old_opset'}"
    return pattern.RewriteRule(pat, rewrite, check, name=f"HardSwish_{tag}")


def _fail_unless_hard_sigmoid_1_6(r: pattern.MatchResult, hs: ir.Value) -> bool:
    node = hs.producer()
    alpha = node.attributes.get_float("alpha", 0.2)
    beta = node.attributes.get_float("beta", 0.5)
    if not (math.isclose(alpha, HARD_ALPHA, rel_tol=1e-3) and math.isclose(beta, HARD_BETA)):
        r.fail(f"HardSigmoid {node.name!r} alpha={alpha}, beta={beta} is not HardSwish's", node)
        return False
    return True


def _mul_hsig_pattern(op, x):
    return op.Mul(x, op.HardSigmoid(x, _outputs=["hs"]))


def _mul_hsig_check(context, x, hs, **_):
    r = pattern.MatchResult()
    if _opset(context) < HARDSWISH_OPSET:
        return r.fail(f"HardSwish needs opset {HARDSWISH_OPSET}; this form is kept")
    _ = fail_unless_float(r, x) and _fail_unless_hard_sigmoid_1_6(r, hs)
    return r


mul_hard_sigmoid_rule = pattern.RewriteRule(
    _mul_hsig_pattern, lambda op, x, **_: op.HardSwish(x), _mul_hsig_check, name="HardSwish_hsig"
)


def hard_activation_rules() -> pattern.RewriteRuleSet:
    """Decomposed HardSwish (first, it contains the HardSigmoid form) and HardSigmoid."""
    return pattern.RewriteRuleSet(
        [
            *(_hswish_rule(d, new) for d in (True, False) for new in (True, False)),
            mul_hard_sigmoid_rule,
            _hsig_rule(True),
            _hsig_rule(False),
        ],
        commute=True,
    )


# ---- Conv + activation ---------------------------------------------------------------------

#: The fused op of each convolution.
FUSED_OF = {"Conv": "FusedConv", "ConvTranspose": "FusedConvTranspose"}


def _fused(op, x, conv: ir.Value, activation: str, alpha: float, beta: float):
    node = _conv_node(conv)
    w = node.inputs[1]
    bias = _conv_bias(node)
    if bias is None:
        bias = _const(op, np.zeros(_out_channels(node)), w)  # type: ignore[arg-type]
    return getattr(op, FUSED_OF[node.op_type])(
        x, w, bias, **_conv_attrs(node), activation=activation, alpha=float(alpha),
        beta=float(beta), _domain=DOMAIN, _version=VERSION,
    )  # fmt: skip


def _conv_out(op, x, conv_type: str):
    return getattr(op, conv_type)(x, _allow_other_inputs=True, _outputs=["conv"])


def _simple_act_rule(act: str, conv_type: str = "Conv") -> pattern.RewriteRule:
    domain = DOMAIN if act == "Silu" else ""

    def pat(op, x):
        return getattr(op, act)(_conv_out(op, x, conv_type), _domain=domain, _outputs=["y"])

    def check(context, x, conv, y, **_):
        r = pattern.MatchResult()
        _fail_unless_foldable_conv(r, conv)
        return r

    def rewrite(op, x, conv, y, **_):
        node = y.producer()
        alpha, beta = CONV_ACTIVATIONS[act]
        if act in ("HardSigmoid", "LeakyRelu"):
            alpha = node.attributes.get_float("alpha", alpha)
            beta = node.attributes.get_float("beta", beta)
        return _fused(op, x, conv, act, alpha, beta)

    return pattern.RewriteRule(pat, rewrite, check, name=f"Fuse{conv_type}{act}")


def _clip_check(context, x, lo, hi, conv, **_):
    r = pattern.MatchResult()
    if not _fail_unless_foldable_conv(r, conv):
        return r
    for v in (lo, hi):
        if scalar(v) is None:
            return r.fail(f"Clip bound {v.name!r} is not a one-element constant", v)
    return r


def _clip_rewrite(op, x, lo, hi, conv, **_):
    return _fused(op, x, conv, "Clip", scalar(lo), scalar(hi))  # type: ignore[arg-type]


def _clip_rule(conv_type: str) -> pattern.RewriteRule:
    def pat(op, x, lo, hi):
        return op.Clip(_conv_out(op, x, conv_type), lo, hi)

    return pattern.RewriteRule(pat, _clip_rewrite, _clip_check, name=f"Fuse{conv_type}Clip")


def _conv_hswish_check(context, x, conv, hs, **_):
    r = pattern.MatchResult()
    _ = _fail_unless_foldable_conv(r, conv, uses=2) and _fail_unless_hard_sigmoid_1_6(r, hs)
    return r


def _hswish_hsig_rule(conv_type: str) -> pattern.RewriteRule:
    """``conv · HardSigmoid(conv; 1/6, 1/2)``: HardSwish in opsets before 14."""

    def pat(op, x):
        conv = _conv_out(op, x, conv_type)
        return op.Mul(conv, op.HardSigmoid(conv, _outputs=["hs"]))

    def rewrite(op, x, conv, **_):
        return _fused(op, x, conv, "HardSwish", HARD_ALPHA, HARD_BETA)

    return pattern.RewriteRule(
        pat, rewrite, _conv_hswish_check, name=f"Fuse{conv_type}HardSwish_hsig"
    )


def _post_affine_rule(kind: str, fused_type: str = "FusedConv") -> pattern.RewriteRule:
    """``FusedConv · s`` (``kind`` "Mul") or ``FusedConv + t`` ("Add") with a one-element
    constant -> folded into the FusedConv's (or FusedConvTranspose's) ``post_scale`` /
    ``post_shift`` (composing with any affine it already has; PP-OCRv4 scales and shifts every
    HardSwish output by learned scalars)."""

    def pat(op, x, w, b, k):
        y = getattr(op, fused_type)(x, w, b, _domain=DOMAIN, _outputs=["fused"])
        return op.Mul(y, k) if kind == "Mul" else op.Add(y, k)

    def check(context, x, w, b, k, fused, **_):
        r = pattern.MatchResult()
        if len(fused.uses()) != 1 or fused.is_graph_output():
            return r.fail(f"{fused_type} output {fused.name!r} has other readers", fused)
        if scalar(k) is None:
            return r.fail(f"{k.name!r} is not a one-element constant", k)
        return r

    def rewrite(op, x, w, b, k, fused, **_):
        attrs = _conv_attrs(fused.producer())
        scale = float(attrs.pop("post_scale", 1.0))
        shift = float(attrs.pop("post_shift", 0.0))
        value = float(scalar(k))  # type: ignore[arg-type]
        if kind == "Mul":
            scale, shift = scale * value, shift * value
        else:
            shift += value
        return getattr(op, fused_type)(
            x, w, b, **attrs, post_scale=scale, post_shift=shift, _domain=DOMAIN,
            _version=VERSION,
        )  # fmt: skip

    return pattern.RewriteRule(pat, rewrite, check, name=f"Fuse{fused_type[5:]}Post{kind}")


def conv_activation_rules() -> pattern.RewriteRuleSet:
    """Conv (ConvTranspose) followed by one activation -> npudispatch.FusedConv
    (FusedConvTranspose); then a scalar affine after it into the fused op."""
    rules: list[pattern.RewriteRule] = []
    for conv_type, fused_type in FUSED_OF.items():
        rules += [
            _hswish_hsig_rule(conv_type),
            _clip_rule(conv_type),
            *(_simple_act_rule(a, conv_type) for a in CONV_ACTIVATIONS if a != "Clip"),
            _post_affine_rule("Mul", fused_type),
            _post_affine_rule("Add", fused_type),
        ]
    return pattern.RewriteRuleSet(rules, commute=True)


__all__ = [
    "conv_activation_rules",
    "conv_fold_rules",
    "hard_activation_rules",
]
