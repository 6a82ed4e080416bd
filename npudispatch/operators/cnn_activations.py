"""CNN activations: Clip, HardSigmoid, HardSwish, LeakyRelu, Elu, Selu (lane-local, one float
input) and PRelu (a broadcast slope), kernel ids 740..749.

The lane-local ops build on :class:`~.unary.UnaryOp` (bf16 compute rule: input rounded to bf16,
float64 evaluation, result rounded to bf16; last axis padded to :data:`~.elementwise.LANES`, every
axis tied between input and output). Their parameters (alpha, beta, gamma, Clip bounds) travel in
the params record's floats, so these launches stream nothing but ``X`` and ``Y``. Padded lanes
cannot leak: the ops are lane-local and the framework zeroes every output lane outside the real
shape (``HardSigmoid(0) = beta`` included).

PRelu reuses the broadcasting binary family (:class:`~.elementwise._Binary`): the slope is
unidirectionally broadcast to ``X`` (a ``[C, 1, 1]`` slope for NCHW), a constant slope travels
in the const region and is zero-padded with ``X``'s channel axis when that axis is padded.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    TensorSpec,
    const_array,
    node_config,
    op_label,
    opset_version,
    tensor_spec,
)
from npudispatch.operators.elementwise import _Binary, match_float_node
from npudispatch.operators.unary import UnaryOp

INTEGER_DTYPES = tuple(
    np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)
)  # int64 Clip is shape arithmetic and stays on the CPU

# ONNX float32 limits: Clip-6's default bounds (numeric_limits<float>::lowest / max).
_F32_MAX = float(np.finfo(np.float32).max)


class _AttrUnary(UnaryOp):
    """A lane-local op with float attributes ``ATTRS`` (name -> ONNX default), passed to
    :meth:`fn` as the record's floats in ``ATTRS`` order."""

    ATTRS: ClassVar[dict[str, float]] = {}

    def check_attrs(self, cfg: OpConfig, label: str) -> OpConfig | Decline:
        unknown = sorted(set(cfg.attrs) - set(self.ATTRS))
        if unknown:
            return Decline(f"{label}: unsupported attribute(s) {unknown}")
        try:
            cfg.extra["params"] = [float(cfg.attrs.get(k, d)) for k, d in self.ATTRS.items()]
        except (TypeError, ValueError):
            return Decline(f"{label}: attributes {dict(cfg.attrs)} are not floats")
        return cfg

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return list(cfg.extra["params"])


class HardSigmoid(_AttrUnary):
    """ONNX HardSigmoid: ``max(0, min(1, alpha * x + beta))``."""

    op_type = "HardSigmoid"
    kernel_id = 740
    ATTRS: ClassVar[dict[str, float]] = {"alpha": 0.2, "beta": 0.5}

    def fn(self, x, dims, floats):
        alpha, beta = floats
        return np.clip(alpha * x + beta, 0.0, 1.0)


class HardSwish(UnaryOp):
    """ONNX HardSwish (opset 14): ``x * max(0, min(1, x / 6 + 1 / 2))``."""

    op_type = "HardSwish"
    kernel_id = 741

    def fn(self, x, dims, floats):
        return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)


class LeakyRelu(_AttrUnary):
    """ONNX LeakyRelu: ``x`` for ``x >= 0`` else ``alpha * x``."""

    op_type = "LeakyRelu"
    kernel_id = 742
    ATTRS: ClassVar[dict[str, float]] = {"alpha": 0.01}

    def fn(self, x, dims, floats):
        return np.where(x >= 0.0, x, floats[0] * x)


class Elu(_AttrUnary):
    """ONNX Elu: ``x`` for ``x >= 0`` else ``alpha * (exp(x) - 1)``."""

    op_type = "Elu"
    kernel_id = 743
    ATTRS: ClassVar[dict[str, float]] = {"alpha": 1.0}

    def fn(self, x, dims, floats):
        return np.where(x >= 0.0, x, floats[0] * np.expm1(np.minimum(x, 0.0)))


class Selu(_AttrUnary):
    """ONNX Selu: ``gamma * x`` for ``x > 0`` else ``gamma * alpha * (exp(x) - 1)``
    (defaults are the float32 constants of the ONNX spec)."""

    op_type = "Selu"
    kernel_id = 744
    ATTRS: ClassVar[dict[str, float]] = {
        "alpha": 1.67326319217681884765625,
        "gamma": 1.05070102214813232421875,
    }

    def fn(self, x, dims, floats):
        alpha, gamma = floats
        return gamma * np.where(x > 0.0, x, alpha * np.expm1(np.minimum(x, 0.0)))


class Clip(UnaryOp):
    """ONNX Clip: bounds from the ``min``/``max`` attributes (opset 6) or from constant scalar
    inputs (opset 11+; an absent input means no bound). ``floats = [lo, hi]``; ``min > max``
    gives ``max`` everywhere, as ONNX specifies. Float data follows the bf16 rule; 8/16/32-bit
    integer data (Clip-12+) is clamped exactly."""

    op_type = "Clip"
    kernel_id = 745

    def match(self, node: ir.Node) -> OpConfig | Decline:
        try:
            cfg = match_float_node(self, node, (1, 3))
        except Decline as why:  # not float data: integer Clip, or the float matcher's reason
            cfg = self._match_integer(node, why)
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        version = opset_version(node)
        if version is None:
            return Decline(
                f"{label}: the model declares no opset version for the ONNX domain, so whether "
                "the bounds are attributes (Clip-6) or inputs (Clip-11+) is unknown"
            )
        bounds: list[float] = [-np.inf, np.inf]
        if version < 11:
            if len(node.inputs) > 1:
                return Decline(f"{label}: Clip-{version} takes one input, got {len(node.inputs)}")
            bounds = [
                float(cfg.attrs.get("min", -_F32_MAX)),
                float(cfg.attrs.get("max", _F32_MAX)),
            ]
        else:
            if cfg.attrs:
                return Decline(
                    f"{label}: Clip-{version} has no attributes, got {sorted(cfg.attrs)}"
                )
            for i, value in enumerate(node.inputs[1:], start=1):
                if value is None or not value.name:
                    continue  # absent bound
                arr = const_array(value)
                if arr is None:
                    return Decline(
                        f"{label}: {('min', 'max')[i - 1]} '{value.name}' is not a constant "
                        "(only constant bounds run on the NPU; fold it or keep Clip on the CPU)"
                    )
                if arr.size != 1:
                    return Decline(
                        f"{label}: {('min', 'max')[i - 1]} '{value.name}' has shape {arr.shape}; "
                        "ONNX Clip bounds are scalars"
                    )
                bounds[i - 1] = float(arr.reshape(()).astype(np.float64))
        x, y = cfg.inputs[0], cfg.outputs[0]
        assert x is not None
        cfg.inputs[1:] = [None] * (len(cfg.inputs) - 1)  # the bounds travel in the record
        cfg.consts.clear()
        cfg.extra["bounds"] = bounds
        return self.match_unary(cfg, x, y, label)

    def _match_integer(self, node: ir.Node, why: Decline) -> OpConfig | Decline:
        """Specs of a Clip on integer data (``why``: the float matcher's decline, returned when
        the data is not 8/16/32-bit integers)."""
        if len(node.inputs) > 3 or node.inputs[0] is None or len(node.outputs) != 1:
            return why
        specs: list[TensorSpec | None] = []
        for i, value in enumerate(node.inputs):
            try:
                spec = None if value is None else tensor_spec(value, f"{op_label(node)} input {i}")
            except Decline:
                return why
            if isinstance(spec, Decline):
                return why
            specs.append(spec)
        try:
            out = tensor_spec(node.outputs[0], f"{op_label(node)} output 0")
        except Decline:
            return why
        if isinstance(out, Decline) or specs[0] is None or specs[0].dtype not in INTEGER_DTYPES:
            return why
        return node_config(self, node, specs, [out])

    def check_attrs(self, cfg: OpConfig, label: str) -> OpConfig | Decline:
        return cfg  # validated in match (attributes are the bounds of Clip-6)

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return list(cfg.extra["bounds"])

    def fn(self, x, dims, floats):
        lo, hi = floats
        return np.minimum(np.maximum(x, lo), hi)

    def compute(self, inputs, outputs, dims, floats):
        x = inputs[0]
        assert x is not None
        if x.dtype in INTEGER_DTYPES:  # exact: int32 and narrower fit float64
            return [self.fn(x.astype(np.float64), dims, floats).astype(outputs[0].dtype)]
        return super().compute(inputs, outputs, dims, floats)

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0])
        if x.dtype in INTEGER_DTYPES:
            lo, hi = cfg.extra["bounds"]
            return [np.minimum(np.maximum(x.astype(np.float64), lo), hi).astype(x.dtype)]
        return super().reference(cfg, inputs)


def prelu(x: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """``x`` where ``x >= 0`` else ``slope * x`` (broadcast)."""
    return np.where(x >= 0, x, slope * x)


class PRelu(_Binary):
    """ONNX PRelu(X, slope): the slope (constant or streamed) broadcasts unidirectionally to X."""

    op_type = "PRelu"
    kernel_id = 746
    ufunc = staticmethod(prelu)  # type: ignore[assignment]

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = super().match(node)
        if isinstance(cfg, Decline):
            return cfg
        x = cfg.inputs[0]
        assert x is not None
        if 0 in cfg.consts:
            return Decline(f"{op_label(node)}: X is a constant (fold it on the CPU instead)")
        if cfg.outputs[0].shape != x.shape:
            return Decline(
                f"{op_label(node)}: slope {cfg.inputs[1].shape} does not broadcast to X "  # type: ignore[union-attr]
                f"{x.shape} unidirectionally (the output would be {cfg.outputs[0].shape})"
            )
        return cfg
