"""``--check`` on quantized outputs: the tolerance is one quantization step per element.

An output is *quantized* when it is produced (through views) by a ``QuantizeLinear`` or a fused
quantized op (integers on a grid of ``scale``), or by a per-tensor ``DequantizeLinear`` with a
constant scale (floats on that grid). Such an output has a natural unit, its step, and bf16 ulps
mean nothing there: the NPU computes quantized ops exactly like onnxruntime's QDQ execution
(dequantize, the op in float32, quantize half to even), so an element can only differ where the
two float32 computations (summation order, exp/erf) put a value on opposite sides of a rounding
boundary: one step. A step taken by an earlier op can move later ones too (a residual stream, a
softmax of a requantized logit), so, as for bf16, that propagation is measured, not guessed: in
the probe runs each quantization point of the reference (every ``QuantizeLinear``, including
those inside the fused ops' function bodies, inlined for this) sees its input scaled by
``1 ± 2**-20`` (a few float32 ulps, random sign per point and run), and the largest change of
any output element, in whole steps, is what a one-step difference inside the model may carry
to the outputs (``propagated``; 0 when nothing moves, as in most A8W8 models). An output passes
when every element satisfies::

    |npu - reference| <= step * (1 + propagated)

and the root-mean-square of ``|npu - reference| / step`` stays within one step plus the largest
rms a probe caused: one step anywhere is accepted, a systematic error (a wrong zero point, a
scale off by a few steps' worth) is not. Measured: PP-OCR cls, Llama and BERT layers A8W8 are
bit-exact (propagated 0); A16W8 differ by at most 2 steps where the probes carry 1-3.
Float outputs keep the bf16 policy of :mod:`npudispatch.dispatch.check`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch import opset
from npudispatch.domains import is_onnx_domain
from npudispatch.rewrites.aliasing import VIEW_OPS

__all__ = [
    "QJITTER",
    "RMS_STEPS",
    "QuantizedOutputCheck",
    "StepGrid",
    "insert_quantization_jitter",
    "output_grids",
    "quantization_jitter_feeds",
    "step_check",
    "verdict_tail",
]

QJITTER = 2.0**-20
"""Relative perturbation of each quantization point's input in the probe runs (a few float32
ulps: the size of the NPU's and onnxruntime's float32 disagreement inside an op)."""

RMS_STEPS = 1.0
"""Allowed root-mean-square difference in steps: one step everywhere at most."""

_QJITTER_PREFIX = "npudispatch.qjitter."
_QUANTIZING_FUNCTIONS = ("QDQ", "QMatMul")  # npudispatch ops whose body ends in QuantizeLinear


@dataclass(frozen=True)
class StepGrid:
    """The quantization grid of one output: ``scale`` per step, ``qtype`` the integer type,
    ``integer``: the output holds the integers themselves (one step = 1)."""

    scale: float
    qtype: str
    integer: bool

    @property
    def step(self) -> float:
        """One step in the output's own units."""
        return 1.0 if self.integer else self.scale


def _const_scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None:
        return None
    arr = np.asarray(value.const_value.numpy())
    if arr.size != 1 or arr.dtype != np.float32 or not np.isfinite(arr).all():
        return None
    return float(arr.reshape(()))


def _grid(value: ir.Value) -> StepGrid | None:
    node = value.producer()
    while node is not None and node.op_type in VIEW_OPS and is_onnx_domain(node.domain):
        value = node.inputs[0]
        node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "DequantizeLinear" and is_onnx_domain(node.domain):
        scale = _const_scalar(node.inputs[1] if len(node.inputs) > 1 else None)
        x = node.inputs[0]
        if (
            scale is None
            or x is None
            or x.dtype is None
            or node.attributes.get_int("block_size", 0)
        ):
            return None
        return StepGrid(scale, x.dtype.name.lower(), integer=False)
    quantizing = (node.op_type == "QuantizeLinear" and is_onnx_domain(node.domain)) or (
        node.domain == opset.DOMAIN and node.op_type.startswith(_QUANTIZING_FUNCTIONS)
    )
    if not quantizing or value.dtype is None:
        return None
    y_scale = node.inputs[1] if node.op_type == "QuantizeLinear" else node.inputs[-2]
    scale = _const_scalar(y_scale)
    return None if scale is None else StepGrid(scale, value.dtype.name.lower(), integer=True)


def output_grids(model: ir.Model) -> dict[str, StepGrid]:
    """The quantized graph outputs of ``model`` and their grids (module docstring)."""
    out = {}
    for value in model.graph.outputs:
        grid = _grid(value)
        if grid is not None and value.name:
            out[value.name] = grid
    return out


def insert_quantization_jitter(model: ir.Model) -> list[str]:
    """Inline the quantizing ``npudispatch`` functions of ``model`` (same ops, same results) and
    scale the input of every ``QuantizeLinear`` by a new scalar graph input; returns their names
    (all ones in the reference run, ``1 ± QJITTER`` in the probes)."""
    if not any(
        name.startswith(_QUANTIZING_FUNCTIONS) for (_, name, _) in model.functions
    ) and not any(n.op_type == "QuantizeLinear" for n in model.graph):
        return []
    ir.passes.common.InlinePass(
        criteria=lambda f: f.domain == opset.DOMAIN and f.name.startswith(_QUANTIZING_FUNCTIONS)
    )(model)
    g = model.graph
    names: list[str] = []
    for node in list(g):
        if node.op_type != "QuantizeLinear" or not is_onnx_domain(node.domain):
            continue
        x = node.inputs[0]
        if x is None or x.dtype != ir.DataType.FLOAT:
            continue
        name = f"{_QJITTER_PREFIX}{len(names)}"
        jitter = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
        g.inputs.append(jitter)
        mul = ir.Node("", "Mul", [x, jitter], name=f"{name}.mul")
        mul.outputs[0].name = f"{name}.out"
        mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
        g.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
        names.append(name)
    return names


def quantization_jitter_feeds(
    names: Sequence[str], rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """Feeds of the jitter inputs: ones (``rng`` None) or ``1 ± QJITTER`` with random signs."""
    if rng is None:
        return {n: np.ones((), np.float32) for n in names}
    signs = rng.integers(0, 2, size=len(names)) * 2 - 1
    return {n: np.asarray(1.0 + QJITTER * s, np.float32) for n, s in zip(names, signs)}


@dataclass
class QuantizedOutputCheck:
    """The comparison of one quantized output, in steps of its grid."""

    name: str
    ok: bool
    within: bool
    grid: StepGrid
    max_abs: float
    max_magnitude: float
    worst_steps: float
    propagated_steps: float
    rms_steps: float
    allowed_rms_steps: float
    fp32_max_abs: float | None
    where: tuple[int, ...] | None = None
    allowed_steps: int = 1
    allowed_ulps: None = None  # the bf16 ulp policy does not apply

    def describe(self) -> str:
        """One sentence: what was compared, the tolerance and why."""
        g = self.grid
        worst = round(self.worst_steps)
        text = (
            f"max |Δ| {worst} step{'' if worst == 1 else 's'} of {g.step:.3g} ({g.qtype}, "
            f"scale {g.scale:.3g}) vs the rounding-aware onnxruntime reference; "
            f"{'within' if self.within else 'NOT within'} {self.allowed_steps} quantization step "
            "per element"
        )
        if self.propagated_steps:
            text += (
                f" plus the {self.propagated_steps:.0f} a one-step difference inside the model "
                "was measured to carry to this output (perturbed reference runs)"
            )
        if not self.within and self.where is not None:
            text += f", worst at index {list(self.where)}"
        text += f"; rms {self.rms_steps:.3f} steps, limit {self.allowed_rms_steps:.3g}"
        return text + verdict_tail(not self.ok and self.within, self.fp32_max_abs)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_abs": self.max_abs,
            "max_magnitude": self.max_magnitude,
            "step": self.grid.step,
            "scale": self.grid.scale,
            "quantized_type": self.grid.qtype,
            "worst_steps": self.worst_steps,
            "allowed_steps": self.allowed_steps,
            "propagated_steps": self.propagated_steps,
            "rms_steps": self.rms_steps,
            "allowed_rms_steps": self.allowed_rms_steps,
            "fp32_max_abs": self.fp32_max_abs,
            "where": None if self.where is None else list(self.where),
            "reference": "onnxruntime on the rewritten graph; quantized output: steps of its grid",
        }


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def step_check(
    name: str,
    grid: StepGrid,
    actual: np.ndarray,
    reference: np.ndarray,
    probes: Sequence[Mapping[str, np.ndarray]],
    fp32: np.ndarray | None = None,
) -> QuantizedOutputCheck:
    """Compare one quantized output with the reference (module docstring)."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(reference, np.float64)
    if a.shape != r.shape:
        raise ValueError(f"output {name!r}: NPU shape {a.shape}, reference {r.shape}")
    with np.errstate(invalid="ignore"):
        diff = np.where(np.isnan(a) & np.isnan(r), 0.0, np.abs(a - r))
    diff = np.where(np.isnan(diff), np.inf, diff)
    steps = diff / grid.step
    # Whole steps (probe outputs are on the grid too): the most any probe moved any element,
    # and the largest rms movement of one probe.
    moved = [np.rint(np.abs(np.asarray(p[name], np.float64) - r) / grid.step) for p in probes]
    propagated = max((float(np.nan_to_num(m).max()) for m in moved if m.size), default=0.0)
    probe_rms = max((_rms(np.nan_to_num(m)) for m in moved), default=0.0)
    worst = int(np.argmax(steps)) if steps.size else 0
    worst_steps = float(steps.reshape(-1)[worst]) if steps.size else 0.0
    within = worst_steps <= 1 + propagated + 1e-3
    rms = _rms(steps)
    fp = None
    if fp32 is not None:
        e = np.asarray(fp32, np.float64)
        ok_fp = np.isfinite(e) & np.isfinite(a)
        fp = float(np.abs(a - e)[ok_fp].max()) if ok_fp.any() else 0.0
    finite = np.isfinite(r)
    return QuantizedOutputCheck(
        name=name,
        ok=within and rms <= (RMS_STEPS + probe_rms) * (1 + 1e-3),  # 1e-3: float grid
        within=within,
        grid=grid,
        max_abs=float(diff[np.isfinite(diff)].max()) if np.isfinite(diff).any() else 0.0,
        max_magnitude=float(np.abs(r[finite]).max()) if finite.any() else 0.0,
        worst_steps=worst_steps,
        propagated_steps=propagated,
        rms_steps=rms,
        allowed_rms_steps=RMS_STEPS + probe_rms,
        fp32_max_abs=fp,
        where=tuple(int(i) for i in np.unravel_index(worst, r.shape)) if r.size else None,
    )


def verdict_tail(systematic: bool, fp32_max_abs: float | None) -> str:
    """The end of a check's sentence, shared by the step and the ulp verdicts: that the
    differences are systematic, and the float32 onnxruntime difference for information."""
    text = ": the differences are systematic, not rounding" if systematic else ""
    if fp32_max_abs is not None:
        text += f"; float32 onnxruntime max |Δ| {fp32_max_abs:.3g} (information)"
    return text


def step_checks(
    grids: Mapping[str, StepGrid],
    actual: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    probes: Sequence[Mapping[str, np.ndarray]],
    fp32: Mapping[str, np.ndarray] | None = None,
) -> dict[str, QuantizedOutputCheck]:
    """:func:`step_check` of every output of ``actual`` that has a grid."""
    return {
        name: step_check(
            name,
            grids[name],
            value,
            reference[name],
            probes,
            None if fp32 is None else fp32.get(name),
        )
        for name, value in actual.items()
        if name in grids
    }
