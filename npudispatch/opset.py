"""The ``npudispatch`` op domain: fused ops produced by the rewriter and consumed by the operators.

Domain string :data:`DOMAIN` (``"npudispatch"``), version :data:`VERSION` (1). Every op has

* a specification (the docstring of its :class:`OpSpec` below and of its ``OpRun`` class),
* an ONNX function body (:func:`function_for`), so onnxruntime can run models containing it once
  :func:`attach_functions` has added the bodies as model-local functions, and
* an ``onnx.reference.op_run.OpRun`` subclass (:func:`reference_ops`) for
  ``onnx.reference.ReferenceEvaluator(proto, new_ops=reference_ops())``.

Ops
---
``Silu(X) -> Y``
    ``Y = X * Sigmoid(X)``; float types.
``Gelu(X) -> Y``, attribute ``approximate``: ``"none"`` (default) or ``"tanh"``
    Semantics of ONNX ``Gelu``-20: ``0.5·x·(1 + erf(x/√2))`` or
    ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``.
``MatMulBias(A, B, bias) -> Y``
    ``Y = MatMul(A, B) + bias``; ``bias`` is ``[N]``, broadcast over the last dim.
``QMatMul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point) -> y``
    ``QuantizeLinear(MatMul(DequantizeLinear(a, a_scale, a_zp), DequantizeLinear(b, b_scale, b_zp,
    axis=1)), y_scale, y_zp)``; ``a`` uint8/uint16, ``b`` int8/uint8 and 2-D ``[K, N]``,
    ``b_scale``/``b_zp`` scalar (per tensor) or ``[N]`` (per output channel).
``FusedConv(X, W, B) -> Y``, attributes of ONNX ``Conv`` plus ``activation`` (string), ``alpha``,
``beta`` (floats)
    ``Y = act(Conv(X, W, B))`` with ``act`` one of :data:`CONV_ACTIVATIONS`: ``Relu``, ``Clip``
    (``min = alpha``, ``max = beta``), ``HardSigmoid`` (``alpha``, ``beta`` as in ONNX),
    ``HardSwish``, ``Sigmoid``, ``Silu``, ``LeakyRelu`` (``alpha``). ``B`` is required (the
    rewriter writes zeros when the Conv had none). Optional ``post_scale`` and ``post_shift``
    (floats, both or neither) then give ``Y = act(...) * post_scale + post_shift``. Each
    combination is its own function overload (:func:`fused_conv_overload`), selected by
    :func:`attach_functions`.
``FusedConvTranspose(X, W, B) -> Y``, attributes of ONNX ``ConvTranspose`` plus those of
``FusedConv``
    ``Y = act(ConvTranspose(X, W, B)) * post_scale + post_shift``, activations, defaults and
    overloads as for ``FusedConv``.

Name clashes with the reference evaluator (pitfall 15): ``Gelu`` is also a standard op (opset 20)
with the same single attribute ``approximate`` and the same semantics, so ``ReferenceEvaluator``
accepts our ``npudispatch.Gelu`` class without complaint; ``Silu``, ``MatMulBias`` and ``QMatMul``
are not standard op names. ``tests/rewrites/test_opset.py`` pins this down.

Function bodies and ``Gelu(approximate="tanh")``: an ONNX function body cannot branch on a string
attribute below opset 19, so the tanh variant is a separate *overload* (``overload="tanh"``) of the
``Gelu`` function; :func:`attach_functions` points tanh nodes at it by setting ``node.overload``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference.op_run import OpRun

from npudispatch.errors import ModelError

DOMAIN = "npudispatch"
VERSION = 1

# Overload used for the tanh body of Gelu (see the module docstring).
GELU_TANH_OVERLOAD = "tanh"


@dataclass(frozen=True)
class OpSpec:
    """One op of the domain: its name, inputs, outputs, attributes (name -> default) and meaning."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, str]
    doc: str


OPS: dict[str, OpSpec] = {
    "Silu": OpSpec("Silu", ("X",), ("Y",), {}, "Y = X * Sigmoid(X)"),
    "Gelu": OpSpec(
        "Gelu",
        ("X",),
        ("Y",),
        {"approximate": "none"},
        "ONNX Gelu-20 semantics; approximate is 'none' (erf) or 'tanh'",
    ),
    "MatMulBias": OpSpec(
        "MatMulBias", ("A", "B", "bias"), ("Y",), {}, "Y = MatMul(A, B) + bias, bias [N]"
    ),
    "QMatMul": OpSpec(
        "QMatMul",
        ("a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale", "y_zero_point"),
        ("y",),
        {},
        "QuantizeLinear(MatMul(DequantizeLinear(a), DequantizeLinear(b, axis=1)))",
    ),
    "FusedConv": OpSpec(
        "FusedConv",
        ("X", "W", "B"),
        ("Y",),
        {
            "activation": "Relu",
            "alpha": "(per activation)",
            "beta": "(per activation)",
            "post_scale": "1.0",
            "post_shift": "0.0",
        },
        "Y = activation(Conv(X, W, B)) * post_scale + post_shift; Conv attributes as in ONNX",
    ),
    "FusedConvTranspose": OpSpec(
        "FusedConvTranspose",
        ("X", "W", "B"),
        ("Y",),
        {
            "activation": "Relu",
            "alpha": "(per activation)",
            "beta": "(per activation)",
            "post_scale": "1.0",
            "post_shift": "0.0",
        },
        "Y = activation(ConvTranspose(X, W, B)) * post_scale + post_shift; ConvTranspose "
        "attributes as in ONNX",
    ),
}

#: Activations of ``FusedConv``: name -> (default alpha, default beta), ONNX's defaults.
CONV_ACTIVATIONS: dict[str, tuple[float, float]] = {
    "Relu": (0.0, 0.0),
    "Clip": (-math.inf, math.inf),  # alpha = min, beta = max
    "HardSigmoid": (0.2, 0.5),
    "HardSwish": (1.0 / 6.0, 0.5),
    "Sigmoid": (0.0, 0.0),
    "Silu": (0.0, 0.0),
    "LeakyRelu": (0.01, 0.0),
}

# ---------------------------------------------------------------------------------------------
# Function bodies (textual ONNX, parsed by onnx.parser; `{opset}` is the model's default opset).

_BODIES: dict[tuple[str, str], str] = {
    ("Silu", ""): """
        Silu (X) => (Y) {
            S = Sigmoid (X)
            Y = Mul (X, S)
        }""",
    ("Gelu", ""): """
        Gelu <approximate: string = "none"> (X) => (Y) {
            rsqrt2 = Constant <value_float: float = 0.7071067811865476> ()
            half = Constant <value_float: float = 0.5> ()
            one = Constant <value_float: float = 1.0> ()
            rsqrt2_t = CastLike (rsqrt2, X)
            half_t = CastLike (half, X)
            one_t = CastLike (one, X)
            xs = Mul (X, rsqrt2_t)
            e = Erf (xs)
            e1 = Add (e, one_t)
            hx = Mul (X, half_t)
            Y = Mul (hx, e1)
        }""",
    ("Gelu", GELU_TANH_OVERLOAD): """
        Gelu <approximate: string = "tanh"> (X) => (Y) {
            k = Constant <value_float: float = 0.7978845608028654> ()
            c = Constant <value_float: float = 0.044715> ()
            half = Constant <value_float: float = 0.5> ()
            one = Constant <value_float: float = 1.0> ()
            k_t = CastLike (k, X)
            c_t = CastLike (c, X)
            half_t = CastLike (half, X)
            one_t = CastLike (one, X)
            x2 = Mul (X, X)
            x3 = Mul (x2, X)
            cx3 = Mul (x3, c_t)
            inner = Add (X, cx3)
            arg = Mul (inner, k_t)
            t = Tanh (arg)
            t1 = Add (t, one_t)
            hx = Mul (X, half_t)
            Y = Mul (hx, t1)
        }""",
    ("MatMulBias", ""): """
        MatMulBias (A, B, bias) => (Y) {
            P = MatMul (A, B)
            Y = Add (P, bias)
        }""",
    ("QMatMul", ""): """
        QMatMul (a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)
            => (y) {
            af = DequantizeLinear (a, a_scale, a_zero_point)
            bf = DequantizeLinear <axis = -1> (b, b_scale, b_zero_point)
            p = MatMul (af, bf)
            y = QuantizeLinear (p, y_scale, y_zero_point)
        }""",
}

_CONV = (
    "C = Conv <auto_pad: string = @auto_pad, dilations: ints = @dilations, group: int = @group, "
    "kernel_shape: ints = @kernel_shape, pads: ints = @pads, strides: ints = @strides> (X, W, B)"
)
_CONV_TRANSPOSE = (
    "C = ConvTranspose <auto_pad: string = @auto_pad, dilations: ints = @dilations, "
    "group: int = @group, kernel_shape: ints = @kernel_shape, output_padding: ints = "
    "@output_padding, output_shape: ints = @output_shape, pads: ints = @pads, "
    "strides: ints = @strides> (X, W, B)"
)
#: The fused convolutions: op type -> (the convolution's body line, its attribute names).
_FUSED_CONVS = {
    "FusedConv": (_CONV, "auto_pad, dilations, group, kernel_shape, pads, strides"),
    "FusedConvTranspose": (
        _CONV_TRANSPOSE,
        "auto_pad, dilations, group, kernel_shape, output_padding, output_shape, pads, strides",
    ),
}
# HardSwish and Clip are spelled with ops every opset >= 6 has (HardSwish is opset 14,
# Clip's min/max inputs opset 11), because the body takes the model's default opset.
_CONV_ACTIVATION_BODIES = {
    "Relu": "Y = Relu (C)",
    "Clip": """lo = Constant <value_float: float = @alpha> ()
            hi = Constant <value_float: float = @beta> ()
            lo_t = CastLike (lo, C)
            hi_t = CastLike (hi, C)
            m = Max (C, lo_t)
            Y = Min (m, hi_t)""",
    "HardSigmoid": "Y = HardSigmoid <alpha: float = @alpha, beta: float = @beta> (C)",
    "HardSwish": """h = HardSigmoid <alpha: float = 0.16666667, beta: float = 0.5> (C)
            Y = Mul (C, h)""",
    "Sigmoid": "Y = Sigmoid (C)",
    "Silu": """s = Sigmoid (C)
            Y = Mul (C, s)""",
    "LeakyRelu": "Y = LeakyRelu <alpha: float = @alpha> (C)",
}
_CLIP_BEFORE_CASTLIKE = """lo = Constant <value_float: float = @alpha> ()
            hi = Constant <value_float: float = @beta> ()
            m = Max (C, lo)
            Y = Min (m, hi)"""
_POST_AFFINE = """ps = Constant <value_float: float = @post_scale> ()
            pt = Constant <value_float: float = @post_shift> ()
            ps_t = CastLike (ps, A)
            pt_t = CastLike (pt, A)
            sa = Mul (A, ps_t)
            Y = Add (sa, pt_t)"""
CASTLIKE_OPSET = 15
# CastLike is opset 15: older models get constants as float32 (their Clip/Mul/Add run on float32
# there anyway); attach_functions picks those "_pre15" overloads for them.
CLIP_PRE_CASTLIKE = "Clip_pre15"


def fused_conv_overload(activation: str, affine: bool, opset: int) -> str:
    """Overload name of a FusedConv body: the activation, ``_affine`` with post_scale/post_shift,
    ``_pre15`` where the body needs CastLike and the model's opset predates it."""
    castlike = activation == "Clip" or affine
    return (
        activation
        + ("_affine" if affine else "")
        + ("_pre15" if castlike and opset < CASTLIKE_OPSET else "")
    )


for _act, _body in _CONV_ACTIVATION_BODIES.items():
    for _affine in (False, True):
        for _old in (False, True):
            _text = _CLIP_BEFORE_CASTLIKE if _old and _act == "Clip" else _body
            if _affine:
                tail = _POST_AFFINE
                if _old:
                    tail = tail.replace("CastLike (ps, A)", "Identity (ps)")
                    tail = tail.replace("CastLike (pt, A)", "Identity (pt)")
                _text = _text.replace("Y = ", "A = ") + "\n            " + tail
            for _op, (_line, _attrs) in _FUSED_CONVS.items():
                _BODIES[(_op, fused_conv_overload(_act, _affine, 0 if _old else 99))] = f"""
        {_op} <{_attrs}, activation, alpha, beta, post_scale, post_shift> (X, W, B) => (Y) {{
            {_line}
            {_text}
        }}"""


def function_for(op_type: str, overload: str = "", opset: int = 18) -> ir.Function:
    """The ONNX function body of ``npudispatch.<op_type>`` (``overload`` selects a variant)."""
    key = (op_type, overload)
    text = _BODIES.get(key) or (
        chain_body(overload) if op_type == CHAIN else weight_form_body(op_type, overload)
    )
    if text is None:
        raise ModelError(
            f"no function body for {DOMAIN}.{op_type} overload {overload!r}; "
            f"known: {sorted(_BODIES)}"
        )
    if opset < PER_AXIS_OPSET:  # DequantizeLinear-10 has no axis: per channel in arithmetic
        text = lower_per_axis_dq(text)
    header = f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]'
    if overload:
        header += f', overload: "{overload}"'
    proto = onnx.parser.parse_function(header + ">\n" + text)
    return ir.serde.deserialize_function(proto)


def attach_functions(model: ir.Model) -> list[tuple[str, str, str]]:
    """Add model-local functions for every ``npudispatch`` op the model uses (in place).

    Needed before onnxruntime can run a rewritten model. Gelu nodes with ``approximate="tanh"`` get
    ``node.overload = "tanh"`` (see the module docstring). Returns the identifiers added.
    """
    ours = [node for node in model.graph.all_nodes() if node.domain == DOMAIN]
    if not ours:
        return []  # nothing to attach: e.g. a pure ai.onnx.ml model needs no default opset
    opset = model.opset_imports.get("")
    if opset is None:
        raise ModelError(
            f"model has no default-domain opset import but uses {DOMAIN}.{ours[0].op_type} "
            f"(node {ours[0].name!r}), whose function body needs one; import the default domain"
        )
    model.opset_imports.setdefault(DOMAIN, VERSION)
    added: list[tuple[str, str, str]] = []
    for node in ours:
        if node.op_type not in OPS:
            raise ModelError(
                f"node {node.name!r} uses unknown op {DOMAIN}.{node.op_type}; "
                f"known ops: {sorted(OPS)}"
            )
        if node.op_type == "Gelu":
            approx = node.attributes.get_string("approximate", "none")
            if approx not in ("none", "tanh"):
                raise ModelError(
                    f"node {node.name!r}: Gelu approximate={approx!r}, expected 'none' or 'tanh'"
                )
            node.overload = GELU_TANH_OVERLOAD if approx == "tanh" else ""
        if node.op_type == CHAIN:  # the body is generated from the stage list
            node.overload = node.attributes.get_string("stages", "")
        if WEIGHT_AXIS in node.attributes:  # a QDQ op's weight quantized in another form
            node.overload = weight_form_overload(
                node.attributes.get_int(WEIGHT_AXIS),
                node.attributes.get_int(WEIGHT_BLOCK, 0),
                node.overload if node.op_type == CHAIN else "",
            )
        if node.op_type in _FUSED_CONVS:
            act = node.attributes.get_string("activation", "")
            if act not in CONV_ACTIVATIONS:
                raise ModelError(
                    f"node {node.name!r}: {node.op_type} activation={act!r}, expected one of "
                    f"{sorted(CONV_ACTIVATIONS)}"
                )
            affine = {"post_scale", "post_shift"} & set(node.attributes)
            if len(affine) == 1:
                raise ModelError(
                    f"node {node.name!r}: {node.op_type} post_scale and post_shift go together"
                )
            node.overload = fused_conv_overload(act, bool(affine), opset)
        ident = (DOMAIN, node.op_type, node.overload)
        if ident not in model.functions:
            model.functions[ident] = function_for(node.op_type, node.overload, opset)
            added.append(ident)
    return added


# ---------------------------------------------------------------------------------------------
# Reference (numpy) implementations for onnx.reference.


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """Numpy Gelu with ONNX Gelu-20 semantics, computed in float64 and cast back."""
    xd = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * xd * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd**3)))
    elif approximate == "none":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        y = 0.5 * xd * (1.0 + erf(xd / math.sqrt(2.0)))
    else:
        raise ModelError(f"Gelu approximate={approximate!r}, expected 'none' or 'tanh'")
    return y.astype(x.dtype)


def _dequantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    scale = np.asarray(scale, np.float32)
    zp_f = np.zeros_like(scale) if zp is None else np.asarray(zp).astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zp_f = scale.reshape(shape), zp_f.reshape(shape)
    return (x.astype(np.float32) - zp_f) * scale


def _quantize(y: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    info = np.iinfo(zp.dtype)
    q = np.rint(y / np.float32(scale)) + zp.astype(np.float32)  # rint = round half to even
    return np.clip(q, info.min, info.max).astype(zp.dtype)


class Silu(OpRun):
    """``npudispatch.Silu``: ``Y = X * Sigmoid(X)``."""

    op_domain = DOMAIN

    def _run(self, x):
        return ((x / (1.0 + np.exp(-x))).astype(x.dtype),)


class Gelu(OpRun):
    """``npudispatch.Gelu``: ONNX Gelu-20 semantics (``approximate`` 'none' or 'tanh')."""

    op_domain = DOMAIN

    def _run(self, x, approximate=None):
        return (gelu(x, approximate or "none"),)


class MatMulBias(OpRun):
    """``npudispatch.MatMulBias``: ``Y = MatMul(A, B) + bias``."""

    op_domain = DOMAIN

    def _run(self, a, b, bias):
        return ((np.matmul(a, b) + bias).astype(a.dtype),)


class QMatMul(OpRun):
    """``npudispatch.QMatMul``: dequantize a and b (b per tensor or per column), MatMul, quantize."""

    op_domain = DOMAIN

    def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp):
        af = _dequantize(a, a_scale, a_zp, axis=0)
        bf = _dequantize(b, b_scale, b_zp, axis=1)
        return (_quantize(np.matmul(af, bf), y_scale, y_zp),)


def conv_activation(y: np.ndarray, name: str, alpha: float, beta: float) -> np.ndarray:
    """``FusedConv``'s activation ``name`` applied to ``y``, evaluated in float64."""
    y = np.asarray(y, np.float64)
    if name == "Relu":
        return np.maximum(y, 0.0)
    if name == "Clip":
        return np.minimum(np.maximum(y, alpha), beta)
    if name == "HardSigmoid":
        return np.clip(alpha * y + beta, 0.0, 1.0)
    if name == "HardSwish":
        return y * np.clip(y / 6.0 + 0.5, 0.0, 1.0)
    if name in ("Sigmoid", "Silu"):
        e = np.exp(-np.abs(y))
        sig = np.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return sig if name == "Sigmoid" else y * sig
    if name == "LeakyRelu":
        return np.where(y >= 0, y, alpha * y)
    raise ModelError(f"FusedConv activation {name!r}, expected one of {sorted(CONV_ACTIVATIONS)}")


class FusedConv(OpRun):
    """``npudispatch.FusedConv``: ``activation(Conv(X, W, B))`` (onnx.reference's Conv)."""

    op_domain = DOMAIN

    def _run(self, x, w, b, activation=None, alpha=None, beta=None, auto_pad=None,
             dilations=None, group=None, kernel_shape=None, pads=None, strides=None,
             post_scale=None, post_shift=None):  # fmt: skip
        from onnx.reference.ops.op_conv import _conv_implementation

        name = activation.decode() if isinstance(activation, bytes) else activation or "Relu"
        auto = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad or "NOTSET"
        y = _conv_implementation(
            x, w, b, auto, dilations, group or 1, kernel_shape or list(w.shape[2:]), pads, strides
        )
        da, db = CONV_ACTIVATIONS[name]
        a = da if alpha is None else alpha
        bb = db if beta is None else beta
        y = conv_activation(y, name, a, bb)
        if post_scale is not None or post_shift is not None:
            y = y * (1.0 if post_scale is None else post_scale) + (post_shift or 0.0)
        return (y.astype(x.dtype),)


class FusedConvTranspose(OpRun):
    """``npudispatch.FusedConvTranspose``: ``activation(ConvTranspose(X, W, B))``
    (onnx.reference's ConvTranspose, one group at a time: it mishandles ``group`` > 1)."""

    op_domain = DOMAIN

    def _run(self, x, w, b, activation=None, alpha=None, beta=None, post_scale=None,
             post_shift=None, group=None, **conv_attrs):  # fmt: skip
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        attrs = {k: v for k, v in conv_attrs.items() if v is not None}
        node = ReferenceEvaluator(helper.make_node("ConvTranspose", ["X", "W"], ["Y"], **attrs))
        g = group or 1
        cg = x.shape[1] // g
        y = np.concatenate(
            [
                node.run(None, {"X": x[:, i * cg : (i + 1) * cg], "W": w[i * cg : (i + 1) * cg]})[0]
                for i in range(g)
            ],
            axis=1,
        )
        y = y + b.reshape(1, -1, *(1,) * (y.ndim - 2))
        name = activation.decode() if isinstance(activation, bytes) else activation or "Relu"
        da, db = CONV_ACTIVATIONS[name]
        y = conv_activation(y, name, da if alpha is None else alpha, db if beta is None else beta)
        if post_scale is not None or post_shift is not None:
            y = y * (1.0 if post_scale is None else post_scale) + (post_shift or 0.0)
        return (y.astype(x.dtype),)


_REFERENCE_OPS: dict[str, type[OpRun]] = {
    "FusedConv": FusedConv,
    "FusedConvTranspose": FusedConvTranspose,
    "Silu": Silu,
    "Gelu": Gelu,
    "MatMulBias": MatMulBias,
    "QMatMul": QMatMul,
}


def reference_ops() -> list[type[OpRun]]:
    """The ``OpRun`` classes of the domain, for ``ReferenceEvaluator(..., new_ops=...)``."""
    return list(_REFERENCE_OPS.values())


def reference_op(op_type: str) -> type[OpRun]:
    """The ``OpRun`` class implementing ``npudispatch.<op_type>``."""
    try:
        return _REFERENCE_OPS[op_type]
    except KeyError:
        raise ModelError(f"unknown op {DOMAIN}.{op_type}; known ops: {sorted(OPS)}") from None


# Quantized fused ops (QDQAdd, QDQSoftmax, ...): specs and bodies generated from one table.
from npudispatch.opset_quant import (  # noqa: E402
    CHAIN,
    PER_AXIS_OPSET,
    WEIGHT_AXIS,
    WEIGHT_BLOCK,
    chain_body,
    lower_per_axis_dq,
    quantized_bodies,
    quantized_specs,
    weight_form_body,
    weight_form_overload,
)

OPS.update({name: OpSpec(name, *spec) for name, spec in quantized_specs().items()})
_BODIES.update(quantized_bodies())


__all__ = [
    "CONV_ACTIVATIONS",
    "DOMAIN",
    "GELU_TANH_OVERLOAD",
    "OPS",
    "VERSION",
    "FusedConv",
    "FusedConvTranspose",
    "Gelu",
    "MatMulBias",
    "OpSpec",
    "QMatMul",
    "Silu",
    "attach_functions",
    "conv_activation",
    "function_for",
    "fused_conv_overload",
    "gelu",
    "reference_op",
    "reference_ops",
]
