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
            bf = DequantizeLinear <axis = 1> (b, b_scale, b_zero_point)
            p = MatMul (af, bf)
            y = QuantizeLinear (p, y_scale, y_zero_point)
        }""",
}


def function_for(op_type: str, overload: str = "", opset: int = 18) -> ir.Function:
    """The ONNX function body of ``npudispatch.<op_type>`` (``overload`` selects a variant)."""
    key = (op_type, overload)
    if key not in _BODIES:
        raise ModelError(
            f"no function body for {DOMAIN}.{op_type} overload {overload!r}; "
            f"known: {sorted(_BODIES)}"
        )
    header = f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]'
    if overload:
        header += f', overload: "{overload}"'
    proto = onnx.parser.parse_function(header + ">\n" + _BODIES[key])
    return ir.serde.deserialize_function(proto)


def attach_functions(model: ir.Model) -> list[tuple[str, str, str]]:
    """Add model-local functions for every ``npudispatch`` op the model uses (in place).

    Needed before onnxruntime can run a rewritten model. Gelu nodes with ``approximate="tanh"`` get
    ``node.overload = "tanh"`` (see the module docstring). Returns the identifiers added.
    """
    opset = model.opset_imports.get("")
    if opset is None:
        raise ModelError("model has no default-domain opset import; cannot pick function opset")
    model.opset_imports.setdefault(DOMAIN, VERSION)
    added: list[tuple[str, str, str]] = []
    for node in model.graph.all_nodes():
        if node.domain != DOMAIN:
            continue
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


_REFERENCE_OPS: dict[str, type[OpRun]] = {
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


__all__ = [
    "DOMAIN",
    "GELU_TANH_OVERLOAD",
    "OPS",
    "VERSION",
    "Gelu",
    "MatMulBias",
    "OpSpec",
    "QMatMul",
    "Silu",
    "attach_functions",
    "function_for",
    "gelu",
    "reference_op",
    "reference_ops",
]
