"""Unary activations: Sigmoid, npudispatch.Silu, npudispatch.Gelu and standard Gelu (opset 20).

Every kernel rounds its input to bf16, evaluates in float32 and rounds the result to bf16. The
elementwise kernels are lane-local, so padded lanes cannot leak; their outputs (e.g. Sigmoid(0) =
0.5) are zeroed by the framework outside the real shape.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from npudispatch.operators.base import Decline, OpConfig, ShapeConstraints, TensorSpec
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.elementwise import LANES, FloatUnaryOp, same_axes
from npudispatch.opset import DOMAIN

NPU_DOMAIN = DOMAIN

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """Element-wise error function in float64 (numpy has none; scipy is not a dependency)."""
    return _erf(np.asarray(x, dtype=np.float64)).astype(np.float64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """ONNX Gelu-20: ``"none"`` (erf) or ``"tanh"`` approximation, in float64."""
    x = np.asarray(x, dtype=np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


class _Unary(FloatUnaryOp):
    """One float input, one output of the same shape and dtype."""

    def fn(self, x: np.ndarray, cfg_dims: list[int]) -> np.ndarray:
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

    def compute(self, inputs, outputs, dims, floats):
        return [store(self.fn(to_compute(inputs[0]), dims), outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0]).astype(F32)
        return [self.fn(x, self.op_dims(cfg)).astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Last axis a multiple of :data:`LANES`; input and output padded alike (every axis)."""
        rank = len(cfg.outputs[0].shape)
        rule = (1,) * (rank - 1) + (LANES,) if rank else ()
        return ShapeConstraints((rule,), (rule,), same_axes(rank))


class Sigmoid(_Unary):
    """ONNX Sigmoid."""

    op_type = "Sigmoid"
    kernel_id = 10

    def fn(self, x, dims):
        return sigmoid(x)


class Silu(_Unary):
    """``npudispatch.Silu(X) = X * Sigmoid(X)``."""

    domain = NPU_DOMAIN
    op_type = "Silu"
    kernel_id = 11

    def fn(self, x, dims):
        return np.asarray(x, np.float64) * sigmoid(x)


class _GeluBase(_Unary):
    """Gelu with attribute ``approximate`` ("none" | "tanh"); dims = [1 if tanh else 0]."""

    APPROX: ClassVar[tuple[str, ...]] = ("none", "tanh")

    def check_attrs(self, cfg: OpConfig, label: str) -> OpConfig | Decline:
        approx = cfg.attrs.get("approximate", "none")
        if isinstance(approx, bytes):
            approx = approx.decode()
        if approx not in self.APPROX:
            return Decline(
                f"{label}: attribute approximate={approx!r} not supported ('none'|'tanh')"
            )
        cfg.extra["approximate"] = approx
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [int(cfg.extra["approximate"] == "tanh")]

    def fn(self, x, dims):
        return gelu(x, "tanh" if dims[0] else "none")


class Gelu(_GeluBase):
    """ONNX Gelu (opset 20), default domain."""

    op_type = "Gelu"
    kernel_id = 13


class NpuGelu(_GeluBase):
    """``npudispatch.Gelu(X; approximate)``, same semantics as ONNX Gelu-20."""

    domain = NPU_DOMAIN
    op_type = "Gelu"
    kernel_id = 12
