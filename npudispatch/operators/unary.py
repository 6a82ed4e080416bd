"""Lane-local unary float ops: Relu, Neg, Abs, Exp, Log, Tanh, Erf, Sqrt, Reciprocal, Sin, Cos,
Softplus and Pow with a constant scalar exponent (kernel ids 70..89).

Also the shared base :class:`UnaryOp` (one float input, one output of the same shape and dtype,
used by :mod:`.activations` too) and a vectorized :func:`erf`.

Every kernel follows the bf16 compute rule (:mod:`.dtypes`): the input is rounded to bf16, the
function is evaluated in float64 and the result is rounded to bf16 before it is stored. The ops
are lane-local, so padded lanes cannot leak into real ones; whatever they produce there
(``Exp(0) = 1``, ``Log(0) = -inf``) is zeroed by the framework outside the real shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    ShapeConstraints,
    TensorSpec,
    const_array,
    op_label,
)
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import LANES, FloatUnaryOp, match_float_node, same_axes

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - (a1 t + ... + a5 t^5) exp(-x^2), t = 1 / (1 + p x),
# x >= 0; absolute error <= 1.5e-7, far below bf16's resolution (2^-8 relative).
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorized error function in float64 (numpy has none; scipy is not a dependency).

    Abramowitz-Stegun 7.1.26 on ``|x|`` with the sign restored: max absolute error 1.5e-7.
    """
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x)
    t = 1.0 / (1.0 + _AS_P * z)
    poly = np.polynomial.polynomial.polyval(t, (0.0, *_AS_A))
    return np.copysign(1.0 - poly * np.exp(-z * z), x)


def softplus(x: np.ndarray) -> np.ndarray:
    """Overflow-free ``log(1 + exp(x))``."""
    return np.logaddexp(0.0, np.asarray(x, dtype=np.float64))


class UnaryOp(FloatUnaryOp):
    """One float input, one output of the same shape and dtype; subclasses define :meth:`fn`.

    :meth:`fn` gets the input (bf16-rounded in the kernel, float32 in the reference), the
    record's :meth:`op_dims` and :meth:`op_floats`, and returns float64 values.
    """

    def fn(self, x: np.ndarray, dims: list[int], floats: list[float]) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} must define fn()")

    def match_unary(
        self, cfg: OpConfig, x: TensorSpec, y: TensorSpec, label: str
    ) -> OpConfig | Decline:
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            return Decline(
                f"{label}: output {y.shape} {y.dtype} differs from input {x.shape} {x.dtype}"
            )
        return self.check_attrs(cfg, label)

    def check_attrs(self, cfg: OpConfig, label: str) -> OpConfig | Decline:
        """Validate attributes (default: none expected)."""
        return cfg

    def _eval(self, x: np.ndarray, dims: list[int], floats: list[float]) -> np.ndarray:
        # Log(0), Reciprocal(0), Sqrt(-1)...: IEEE results (inf/NaN) like onnxruntime, no warnings.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return self.fn(np.asarray(x, dtype=np.float64), dims, floats)

    def compute(self, inputs, outputs, dims, floats):
        return [store(self._eval(to_compute(inputs[0]), dims, floats), outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0]).astype(F32)
        y = self._eval(x, self.op_dims(cfg), self.op_floats(cfg))
        return [y.astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Last axis a multiple of :data:`LANES`; input and output padded alike (every axis)."""
        rank = len(cfg.outputs[0].shape)
        rule = (1,) * (rank - 1) + (LANES,) if rank else ()
        ins = tuple(rule if i == 0 else None for i in range(len(cfg.inputs)))
        return ShapeConstraints(ins, (rule,), same_axes(rank))


class _MathUnary(UnaryOp):
    """A unary op that is one numpy function of its input (``func``, float64 in and out)."""

    func: ClassVar[Callable[[np.ndarray], np.ndarray]]

    def fn(self, x, dims, floats):
        return type(self).func(x)


class Relu(_MathUnary):
    """ONNX Relu."""

    op_type = "Relu"
    kernel_id = 70
    func = staticmethod(lambda x: np.maximum(x, 0.0))


class Neg(_MathUnary):
    """ONNX Neg (float only; integer Neg stays on the CPU)."""

    op_type = "Neg"
    kernel_id = 71
    func = np.negative


class Abs(_MathUnary):
    """ONNX Abs (float only)."""

    op_type = "Abs"
    kernel_id = 72
    func = np.abs


class Exp(_MathUnary):
    """ONNX Exp."""

    op_type = "Exp"
    kernel_id = 73
    func = np.exp


class Log(_MathUnary):
    """ONNX Log (``Log(0) = -inf``, negative inputs give NaN)."""

    op_type = "Log"
    kernel_id = 74
    func = np.log


class Tanh(_MathUnary):
    """ONNX Tanh."""

    op_type = "Tanh"
    kernel_id = 75
    func = np.tanh


class Erf(_MathUnary):
    """ONNX Erf (vectorized :func:`erf`)."""

    op_type = "Erf"
    kernel_id = 76
    func = staticmethod(erf)


class Sqrt(_MathUnary):
    """ONNX Sqrt (negative inputs give NaN)."""

    op_type = "Sqrt"
    kernel_id = 77
    func = np.sqrt


class Reciprocal(_MathUnary):
    """ONNX Reciprocal (``1/0 = inf``)."""

    op_type = "Reciprocal"
    kernel_id = 78
    func = np.reciprocal


class Sin(_MathUnary):
    """ONNX Sin (RoPE tables some exports compute at run time)."""

    op_type = "Sin"
    kernel_id = 79
    func = np.sin


class Cos(_MathUnary):
    """ONNX Cos."""

    op_type = "Cos"
    kernel_id = 80
    func = np.cos


class Softplus(_MathUnary):
    """ONNX Softplus: ``log(1 + exp(x))`` (overflow-free)."""

    op_type = "Softplus"
    kernel_id = 81
    func = staticmethod(softplus)


class Pow(UnaryOp):
    """ONNX Pow ``X ** c`` with a constant scalar exponent ``c`` (any float: 2, 0.5, -1, 3...).

    The exponent is folded into the record (``floats = [c]``, float64, exact); it is neither an
    operand nor in the const region. A non-constant or non-scalar exponent declines.
    """

    op_type = "Pow"
    kernel_id = 82

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = match_float_node(self, node, (2, 2))
        label = op_label(node)
        x, y = cfg.inputs[0], cfg.outputs[0]
        assert x is not None
        value = node.inputs[1]
        assert value is not None
        exponent = const_array(value)
        if exponent is None:
            return Decline(
                f"{label}: exponent '{value.name}' is not a constant (only X ** constant scalar "
                "runs on the NPU; fold the exponent or keep Pow on the CPU)"
            )
        if exponent.size != 1:
            return Decline(
                f"{label}: exponent '{value.name}' has shape {exponent.shape}; only a scalar "
                "exponent runs on the NPU"
            )
        if exponent.dtype.kind not in "fiu":
            return Decline(f"{label}: exponent '{value.name}' has dtype {exponent.dtype}")
        if np.broadcast_shapes(x.shape, exponent.shape) != x.shape:
            return Decline(
                f"{label}: exponent shape {exponent.shape} would broadcast X {x.shape} up"
            )
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            return Decline(
                f"{label}: output {y.shape} {y.dtype} differs from input {x.shape} {x.dtype}"
            )
        cfg.inputs[1] = None  # the exponent travels in the record's floats
        cfg.extra["exponent"] = float(exponent.reshape(()).astype(np.float64))
        return cfg

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [cfg.extra["exponent"]]

    def fn(self, x, dims, floats):
        c = floats[0]
        if c == 2.0:  # the RMSNorm square: one multiply, exact like x * x
            return x * x
        return np.power(x, c)
