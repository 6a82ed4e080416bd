"""Unary activations: Sigmoid, npudispatch.Silu, npudispatch.Gelu and standard Gelu (opset 20).

Built on :class:`~.unary.UnaryOp` (bf16 compute rule, float64 evaluation); Gelu's erf is the
vectorized :func:`~.unary.erf`. The kernels are lane-local, so padded lanes cannot leak; their
outputs (e.g. Sigmoid(0) = 0.5) are zeroed by the framework outside the real shape.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from npudispatch.operators.base import Decline, OpConfig
from npudispatch.operators.unary import UnaryOp, erf
from npudispatch.opset import DOMAIN

NPU_DOMAIN = DOMAIN

# Old name of the shared unary base (now unary.UnaryOp); tests/rewrites/test_padding.py patches it.
_Unary = UnaryOp


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


class Sigmoid(UnaryOp):
    """ONNX Sigmoid."""

    op_type = "Sigmoid"
    kernel_id = 10

    def fn(self, x, dims, floats):
        return sigmoid(x)


class Silu(UnaryOp):
    """``npudispatch.Silu(X) = X * Sigmoid(X)``."""

    domain = NPU_DOMAIN
    op_type = "Silu"
    kernel_id = 11

    def fn(self, x, dims, floats):
        return np.asarray(x, np.float64) * sigmoid(x)


class _GeluBase(UnaryOp):
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

    def fn(self, x, dims, floats):
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
