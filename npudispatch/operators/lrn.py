"""LRN: local response normalization across channels (ONNX opset 1 and 13; kernel id 780).

For ``X`` of shape ``N x C x D1 ... Dk``::

    square_sum[n, c, d] = sum(X[n, i, d] ** 2  for i in [c - floor((size-1)/2), c + ceil((size-1)/2)]
                                               clipped to [0, C-1])
    Y[n, c, d] = X[n, c, d] / (bias + alpha / size * square_sum[n, c, d]) ** beta

The window is asymmetric for an even ``size`` (one channel more after ``c`` than before), as the
ONNX spec defines it. Attributes: ``size`` (required, >= 1), ``alpha`` (1e-4), ``beta`` (0.75),
``bias`` (1.0). The record carries ``dims = [real C, size]`` and ``floats = [alpha, beta, bias]``.

Kernel math follows the bf16 rule (:mod:`.dtypes`): ``X`` rounded to bf16 on entry, squares and
their window sums accumulated in float32 over the real channels only, ``bias + alpha/size * sum``
in float32, its power and the quotient evaluated from those float32 values, the result rounded to
bf16. Padding: the last axis is padded to :data:`~.elementwise.LANES` like any lane-local op
(every position ``d`` is independent); channels added by padding hold zeros, lie after the last
real channel and are excluded from every window, and the framework zeroes their outputs.

Declines: dtypes other than float32/bfloat16 (float16/double LRN stays on the CPU), a missing or
non-positive ``size``, rank < 2 (no channel axis).

onnxruntime's CPU LRN, the reference of ``run --check`` and of the tests, runs only 4-D inputs
with an odd ``size``; the NPU computes the spec for any rank >= 2 and any size, and
:func:`lrn_window` is the one definition of the window both the kernel and the reference use.
onnxruntime's kernel slides one running sum along the channels, so a NaN or infinity there
reaches every later channel; here it stays in the windows that hold it, as the spec says.
onnx's reference evaluator (``onnx/reference/ops/op_lrn.py``, onnx 1.23) loops over the batch
axis where it means the channels: channels >= N get no sum of squares (only the bias), so it
is no reference here.
"""

from __future__ import annotations

import numpy as np

from npudispatch.operators.base import Decline, OpConfig, TensorSpec
from npudispatch.operators.dtypes import F32, store, to_compute
from npudispatch.operators.unary import UnaryOp

DEFAULT_ALPHA = 1e-4
DEFAULT_BETA = 0.75
DEFAULT_BIAS = 1.0


def lrn_window(size: int) -> tuple[int, int]:
    """Channels ``(before, after)`` of ``c`` in the window of an LRN of ``size`` (ONNX spec:
    ``floor((size - 1) / 2)`` before, ``ceil((size - 1) / 2)`` after)."""
    return (size - 1) // 2, size // 2


def square_sum(x: np.ndarray, channels: int, size: int, dtype: np.dtype) -> np.ndarray:
    """Window sums of ``x ** 2`` along axis 1 over the first ``channels`` channels, accumulated in
    ``dtype`` (one shifted add per window offset: no running-sum cancellation). Channels at or
    beyond ``channels`` contribute nothing and get a zero sum."""
    sq = np.square(np.asarray(x, dtype)[:, :channels])
    total = np.zeros(x.shape, dtype)
    before, after = lrn_window(size)
    for offset in range(-before, after + 1):
        # total[:, c] += sq[:, c + offset] for the c whose neighbour c + offset is a real channel
        lo, hi = max(0, -offset), min(channels, channels - offset)
        if lo < hi:
            total[:, lo:hi] += sq[:, lo + offset : hi + offset]
    return total


def lrn(
    x: np.ndarray, channels: int, size: int, alpha: float, beta: float, bias: float, dtype: np.dtype
) -> np.ndarray:
    """``x / (bias + alpha / size * square_sum) ** beta`` with sums and scale in ``dtype`` and the
    power evaluated in float64 from them (float64 values returned)."""
    scale = dtype.type(bias) + dtype.type(alpha / size) * square_sum(x, channels, size, dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.asarray(x, np.float64) / np.power(scale.astype(np.float64), beta)


class LRN(UnaryOp):
    """ONNX LRN (LocalResponseNormalization) on float32/bfloat16, any rank >= 2, any size."""

    op_type = "LRN"
    kernel_id = 780

    def check_attrs(self, cfg: OpConfig, label: str) -> OpConfig | Decline:
        x = cfg.inputs[0]
        assert x is not None
        if "size" not in cfg.attrs:
            return Decline(f"{label}: the required attribute 'size' is missing")
        size = int(cfg.attrs["size"])
        if size < 1:
            return Decline(f"{label}: size {size} is not a positive channel count")
        if len(x.shape) < 2:
            return Decline(
                f"{label}: X has rank {len(x.shape)}; LRN normalizes across axis 1 of N x C x ..."
            )
        cfg.extra.update(
            size=size,
            alpha=float(cfg.attrs.get("alpha", DEFAULT_ALPHA)),
            beta=float(cfg.attrs.get("beta", DEFAULT_BETA)),
            bias=float(cfg.attrs.get("bias", DEFAULT_BIAS)),
        )
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        x = cfg.inputs[0]
        assert x is not None
        return [x.logical_shape[1], cfg.extra["size"]]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [cfg.extra["alpha"], cfg.extra["beta"], cfg.extra["bias"]]

    def compute(
        self,
        inputs: list[np.ndarray | None],
        outputs: list[TensorSpec],
        dims: list[int],
        floats: list[float],
    ) -> list[np.ndarray]:
        channels, size = dims
        alpha, beta, bias = floats
        x = inputs[0]
        assert x is not None
        y = lrn(to_compute(x), channels, size, alpha, beta, bias, F32)
        return [store(y, outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The ONNX formula in float64 on the float32 input."""
        x = np.asarray(inputs[0]).astype(F32)
        e = cfg.extra
        y = lrn(x, x.shape[1], e["size"], e["alpha"], e["beta"], e["bias"], np.dtype(np.float64))
        return [y.astype(cfg.outputs[0].dtype)]
