"""The principled ``--check``: compare with a rounding-aware onnxruntime reference.

A plain float32 onnxruntime run differs from the NPU by bf16 rounding, so comparing with it needs a
tolerance guessed per op and scaled by some magnitude, which is wrong in both directions (near-zero
outputs, cancellations, large outputs shifted by a bug). Instead :func:`check_outputs` builds the
**rounding-aware reference**: the model rewritten by the same pipeline (without padding, which
changes no rounding), with bf16 turned back into float32 storage and the NPU's rounding inserted
where the NPU rounds:

* after every float output of an NPU op that rounds (``precision.BUDGETS`` > 0: arithmetic,
  casts, norms, matmuls...; data movement and views are exact) a ``Cast(bf16) -> Cast(float)``;
* on the float inputs of those ops that are not already rounded (graph inputs, CPU results,
  float32 constants), because kernels round operands to bf16 on entry;
* weights as formatted: bf16 initializers are widened exactly; 4-bit ``MatMulNBits`` weights are
  dequantized with bf16 scales and rounded to bf16, as the NPU's weight image holds them; a
  ``MatMulNBits`` with ``accuracy_level=4`` stays onnxruntime's own node (its int8 activation
  blocks are what the NPU computes too, numerics.md §1.3) with its scales rounded to bf16.

With ``bf16=False`` (``--fp32``) the NPU computes in float32, so the reference has no rounding
points (and no probes change it): it is the rewritten graph in float32, with ``MatMulNBits``
dequantized exactly (float32 scales, as the float32 weight image holds them) unless its
``accuracy_level`` is 4, where onnxruntime's int8-activation kernel is the reference as it is.
The bf16-ulp unit below is kept as the budget in that mode (a float32-ulp budget is not defined).

Quantized outputs (from a ``QuantizeLinear``, a fused quantized op or a per-tensor
``DequantizeLinear``) are judged in steps of their grid instead: one quantization step per
element plus what a one-step difference inside the model is measured to carry to them
(:mod:`npudispatch.dispatch.quant_check`).

It runs on onnxruntime (CPU, float32), so its only differences from the NPU are accumulation order
and the libm used by exp/erf/tanh: a result close to a bf16 rounding boundary may round the other
way (one bf16 ulp) and such flips propagate (through a 100-convolution detector they cascade to
about half the spread of the probes below). One onnxruntime kernel is no float32 reference:
its Sigmoid is accurate only to ~1e-7 absolute (0 below -18), so the reference computes
``Sigmoid`` as ``1 / (1 + exp(-x))`` (:func:`_accurate_sigmoid`). How far flips can propagate is
measured, not guessed: the reference is run :data:`PROBES` more times with every rounding point
multiplied by ``1 ± 2**-8`` (random signs; about one bf16 ulp), and the largest change of each
output element is its *sensitivity* ``s``: one ulp of the magnitudes involved, carried to that
element through the graph (large for a softmax of large logits or a difference of large terms,
small for a sigmoid near zero). ``s`` is a sample maximum, so a few probes can underestimate it
for single elements; when :data:`PROBES` runs do not settle the verdict it is taken again with
:data:`MAX_PROBES` (the per-element verdict only moves from fail to pass as probes are added).
An output passes when every
element satisfies::

    |npu - reference| <= ULPS * (s + ulp_bf16(|reference|) + floor)

i.e. within :data:`ULPS` bf16 ulps at the magnitudes involved (``floor``: a few float32 ulps of
the output's largest magnitude, onnxruntime's own resolution), and the root-mean-square of those
per-element ratios stays below :data:`RMS_ULPS`: rounding flips are sparse, while a systematic
defect (a weight off by 1 %) moves every element by a fraction of an ulp. In a deep graph the
flips add up, so the rms also passes when, in plain bf16 ulps of the reference (no sensitivity
term, so independent of how many probes ran), it is at most :data:`RMS_PROBE_FRACTION` of a
probe run's (median over the probes): a probe moves every rounding point by about an ulp, the
NPU only reorders sums. DenseNet-121 with random weights: 0.14 against the 0.125 limit, and
0.26 of a probe run; every weight 1 % off: 6.8 of a probe run. A 1 % error in a single one of
its 120 convolutions is as small as the rounding noise at the output (0.33 of a probe run):
``--fp32`` (exact float32 kernels, compared to 1e-5) is the check that finds such a defect. The float32
onnxruntime difference is reported beside it for information only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from npudispatch import graph, opset
from npudispatch.dispatch import quant_check
from npudispatch.operators.matmul_nbits import ACCURACY_INT8, dequantize_nbits
from npudispatch.rewrites import default_pipeline
from npudispatch.rewrites.precision import BUDGETS
from npudispatch.rewrites.support import npu_support

__all__ = [
    "MAX_PROBES",
    "PROBES",
    "RMS_PROBE_FRACTION",
    "RMS_ULPS",
    "ULPS",
    "OutputCheck",
    "RoundingReference",
    "check_outputs",
]

ULPS = 2
"""Allowed difference, in bf16 ulps of the magnitudes involved (see the module docstring)."""

PROBES = 4
"""Extra reference runs with every rounding point perturbed by one ulp (random signs)."""

MAX_PROBES = 16
"""Probe runs when :data:`PROBES` do not settle the verdict (see :func:`check_outputs`)."""

JITTER = 2.0**-8
"""Relative size of the probe perturbation: one bf16 unit roundoff (about one ulp)."""

RMS_ULPS = 0.125
"""Allowed root-mean-square of the per-element differences in those units: rounding flips are
sparse (clean models stay below 0.02), a systematic error (a 1 % weight change: ~0.45) is not."""

RMS_PROBE_FRACTION = 0.5
"""In deep graphs sparse flips add up: an rms above :data:`RMS_ULPS` still passes when, in bf16
ulps of the reference, it is at most this fraction of a probe run's (median over the probes)."""

FLOAT32_ULPS = 4
"""Floor of the unit: float32 ulps of the output's largest magnitude (onnxruntime's resolution)."""

_F32, _BF16 = ir.DataType.FLOAT, ir.DataType.BFLOAT16
_FLOATS = (_F32, _BF16)
_QUANTIZED = frozenset({"MatMulNBits", "QMatMul", "QLinearMatMul"})
_JITTER_PREFIX = "npudispatch.jitter."
_SERIAL = itertools.count()  # unique names for inserted nodes and values


def ulp_bf16(x: np.ndarray) -> np.ndarray:
    """The bf16 ulp at each magnitude of ``x`` (``2**(exponent - 7)``; smallest normal's ulp at 0)."""
    a = np.abs(np.asarray(x, np.float64))
    tiny = float(np.finfo(ml_dtypes.bfloat16).tiny)
    exp = np.floor(np.log2(np.maximum(a, tiny)))
    return np.exp2(exp - 7)


@dataclass
class OutputCheck:
    """The comparison of one output, with the figures the user reads."""

    name: str
    ok: bool
    max_abs: float
    max_magnitude: float
    worst_ulps: float
    allowed_ulps: int
    rms_ulps: float
    fp32_max_abs: float | None
    where: tuple[int, ...] | None = None
    probes: int = PROBES
    rms_vs_probes: float | None = None

    def describe(self) -> str:
        """One sentence: what was compared, the tolerance and why."""
        verdict = "within" if self.worst_ulps <= self.allowed_ulps else "NOT within"
        text = (
            f"max |Δ| {self.max_abs:.3g} on values up to {self.max_magnitude:.3g} vs the "
            f"rounding-aware onnxruntime reference; {verdict} {self.allowed_ulps} ulp of bf16 at "
            f"the magnitudes involved"
        )
        text += (
            f", carried through the graph by {self.probes} perturbed reference runs"
            if self.probes
            else " (float32 compute: no rounding points)"
        )
        text += f" (worst element {self.worst_ulps:.2f} ulp"
        if self.worst_ulps > self.allowed_ulps and self.where is not None:
            text += f" at index {list(self.where)}"
        text += f"; rms {self.rms_ulps:.3f} ulp, limit {RMS_ULPS} for systematic errors"
        if self.rms_ulps > RMS_ULPS and self.rms_vs_probes is not None:
            text += (
                f", or {RMS_PROBE_FRACTION} of a probe run's rms in a deep graph: "
                f"{self.rms_vs_probes:.2f} of it"
            )
        text += ")"
        if not self.ok and self.worst_ulps <= self.allowed_ulps:
            text += ": the differences are systematic, not rounding"
        if self.fp32_max_abs is not None:
            text += f"; float32 onnxruntime max |Δ| {self.fp32_max_abs:.3g} (information)"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_abs": self.max_abs,
            "max_magnitude": self.max_magnitude,
            "worst_ulps": self.worst_ulps,
            "allowed_ulps": self.allowed_ulps,
            "rms_ulps": self.rms_ulps,
            "allowed_rms_ulps": RMS_ULPS,
            "rms_vs_probes": self.rms_vs_probes,
            "allowed_rms_vs_probes": RMS_PROBE_FRACTION,
            "fp32_max_abs": self.fp32_max_abs,
            "where": None if self.where is None else list(self.where),
            "probes": self.probes,
            "reference": "onnxruntime on the rewritten graph with bf16 rounding where the NPU rounds",
        }


class RoundingReference:
    """The rounding-aware reference model of a model (see the module docstring)."""

    def __init__(
        self,
        model: graph.ModelLike,
        *,
        dims: Mapping[str, int] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        bf16: bool = True,
    ) -> None:
        from npudispatch.dispatch.ort_session import onnxruntime_session

        m = graph.load(model, dims=dims, input_shapes=input_shapes)
        default_pipeline(pad=False, bf16=bf16)(m)
        self.grids = quant_check.output_grids(m)  # quantized outputs: checked in steps
        # Dequantized weights are fed as inputs: onnxruntime reads them in place instead of
        # copying them through the serialized model (three float32 copies of a 4-bit MLP).
        self.weights: dict[str, np.ndarray] = {}
        self.fp32_compute = not bf16
        self.jitter_shapes = _insert_rounding(m, self.weights, fp32=self.fp32_compute)
        if any(n.domain == opset.DOMAIN for n in m.graph.all_nodes()):
            opset.attach_functions(m)
        for body in (m.graph, *(f.graph for f in m.functions.values())):
            _accurate_sigmoid(body)
        self.quant_jitters = quant_check.insert_quantization_jitter(m)
        m.ir_version = min(m.ir_version, graph.EXTRACT_IR_VERSION)
        self.session = onnxruntime_session(m, optimize=False)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], jitter: int | None = None) -> dict[str, Any]:
        """Outputs by name; ``jitter`` = seed of a probe run (None: the reference itself)."""
        rng = None if jitter is None else np.random.default_rng(jitter)
        full = {k: _reference_feed(v) for k, v in feeds.items()} | self.weights
        for name, shape in self.jitter_shapes.items():
            if rng is None:
                full[name] = np.ones(shape, np.float32)
            else:
                signs = rng.integers(0, 2, size=shape) * 2 - 1
                full[name] = (1.0 + JITTER * signs).astype(np.float32)
        full |= quant_check.quantization_jitter_feeds(self.quant_jitters, rng)
        return dict(zip(self.outputs, self.session.run(self.outputs, full)))


def _reference_feed(value: Any) -> np.ndarray:
    """A feed as the float32 reference takes it: floats (bf16 included) as float32; integer and
    boolean inputs (token ids, masks) unchanged."""
    arr = np.asarray(value)
    return arr if arr.dtype.kind in "iub" else arr.astype(np.float32)


def check_outputs(
    reference: RoundingReference,
    feeds: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    fp32: Mapping[str, np.ndarray] | None = None,
    *,
    ulps: int = ULPS,
) -> dict[str, OutputCheck]:
    """Compare NPU outputs with the rounding-aware reference (module docstring).

    The sensitivity is a sample maximum over probe runs, so it can only grow with more probes,
    and every per-element verdict can only turn from failing to passing. :data:`PROBES` runs
    decide when everything passes; otherwise the verdict is taken again with
    :data:`MAX_PROBES`, the estimate the check stands by.
    """
    ref = reference.run(feeds)
    probes = [reference.run(feeds, jitter=seed) for seed in range(PROBES)]
    jittered = bool(reference.jitter_shapes or reference.quant_jitters)
    out = {
        name: _judge(name, value, ref, probes, fp32, ulps, jittered)
        for name, value in actual.items()
    }
    out |= quant_check.step_checks(reference.grids, actual, ref, probes, fp32)
    if jittered and not all(v.ok for v in out.values()):
        probes += [reference.run(feeds, jitter=seed) for seed in range(PROBES, MAX_PROBES)]
        out = {
            name: _judge(name, value, ref, probes, fp32, ulps, jittered)
            for name, value in actual.items()
        }
        out |= quant_check.step_checks(reference.grids, actual, ref, probes, fp32)
    return out


def _judge(
    name: str,
    value: np.ndarray,
    ref: Mapping[str, Any],
    probes: Sequence[Mapping[str, Any]],
    fp32: Mapping[str, np.ndarray] | None,
    ulps: int,
    jittered: bool,
) -> OutputCheck:
    """One output's verdict against the reference, with the sensitivity from ``probes``."""
    r = np.asarray(ref[name], np.float64)
    a = np.asarray(value, np.float64)
    if a.shape != r.shape:
        raise ValueError(f"output {name!r}: NPU shape {a.shape}, reference {r.shape}")
    sens = np.zeros_like(r)
    for p in probes:
        with np.errstate(invalid="ignore"):
            sens = np.fmax(sens, np.abs(np.asarray(p[name], np.float64) - r))
    # onnxruntime's own float32 resolution at the output's scale: libm differences
    # (a sigmoid saturating to 0 vs 3e-8) are no rounding question.
    floor = (
        FLOAT32_ULPS
        * 2.0**-23
        * (float(np.abs(r[np.isfinite(r)]).max()) if np.isfinite(r).any() else 0.0)
    )
    unit = sens + ulp_bf16(r) + floor
    both_nan = np.isnan(a) & np.isnan(r)
    same_inf = np.isinf(a) & (a == r)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan | same_inf, 0.0, np.abs(a - r))
    diff = np.where(np.isnan(diff), np.inf, diff)
    ratio = diff / unit
    worst = int(np.argmax(ratio)) if ratio.size else 0
    finite = np.isfinite(r)
    fp = None
    if fp32 is not None and name in fp32:
        e = np.asarray(fp32[name], np.float64)
        ok_fp = np.isfinite(e) & np.isfinite(a)
        fp = float(np.abs(a - e)[ok_fp].max()) if ok_fp.any() else 0.0
    worst_ulps = float(ratio.reshape(-1)[worst]) if ratio.size else 0.0
    rms = float(np.sqrt(np.mean(np.square(ratio)))) if ratio.size else 0.0
    vs_probes = _rms_vs_probes(name, r, a, probes, ulp_bf16(r) + floor)
    rms_ok = rms <= RMS_ULPS or (vs_probes is not None and vs_probes <= RMS_PROBE_FRACTION)
    return OutputCheck(
        name=name,
        ok=bool(worst_ulps <= ulps and rms_ok),
        max_abs=float(diff[np.isfinite(diff)].max()) if np.isfinite(diff).any() else 0.0,
        max_magnitude=float(np.abs(r[finite]).max()) if finite.any() else 0.0,
        worst_ulps=worst_ulps,
        allowed_ulps=ulps,
        rms_ulps=rms,
        fp32_max_abs=fp,
        where=tuple(int(i) for i in np.unravel_index(worst, r.shape)) if r.size else None,
        probes=len(probes) if jittered else 0,
        rms_vs_probes=vs_probes,
    )


def _rms_vs_probes(
    name: str,
    r: np.ndarray,
    a: np.ndarray,
    probes: Sequence[Mapping[str, Any]],
    unit: np.ndarray,
) -> float | None:
    """rms of ``a - r`` over the median rms of a probe run's ``p - r``, both in ``unit`` (bf16
    ulps of the reference: no sensitivity term, so the figure does not depend on how many probes
    ran); None without probes or when the probes move nothing."""
    if not probes or not r.size:
        return None

    def rms(x: np.ndarray) -> float:
        with np.errstate(invalid="ignore"):
            d = np.abs(x - r) / unit
        d = d[np.isfinite(d)]
        return float(np.sqrt(np.mean(np.square(d)))) if d.size else 0.0

    spread = float(np.median([rms(np.asarray(p[name], np.float64)) for p in probes]))
    return rms(a) / spread if spread > 0 else None


# ---- building the reference -------------------------------------------------------------------


def _rounds(node: ir.Node) -> bool:
    """An NPU op whose kernel rounds to bf16 (data movement and views are exact)."""
    return BUDGETS.get(node.op_type, 0.0) > 0 and npu_support(node) is None


def _exact_nbits(node: ir.Node) -> bool:
    """A ``MatMulNBits`` whose kernel dequantizes the weights (``accuracy_level`` below 4); at 4
    the NPU quantizes the activations to int8 blocks exactly as onnxruntime does."""
    if node.op_type != "MatMulNBits":
        return False
    return node.attributes.get_int("accuracy_level", 0) != ACCURACY_INT8


def _insert_rounding(
    model: ir.Model, weights: dict[str, np.ndarray], *, fp32: bool = False
) -> dict[str, tuple[int, ...]]:
    """Make ``model`` float32 with bf16 rounding where the NPU rounds; returns the jitter inputs.

    ``weights`` receives the weight inputs the model now takes (dequantized, already rounded).
    ``fp32`` (float32 compute): only dequantize ``MatMulNBits`` exactly; no rounding, no jitter.
    """
    g = model.graph
    if fp32:
        for node in list(g):
            if _exact_nbits(node) and npu_support(node) is None:
                _dequantize_as_formatted(g, node, weights, set(), fp32=True)
        return {}
    _widen_bf16(model)
    rounded: set[ir.Value] = set()
    jitters: dict[str, tuple[int, ...]] = {}
    replaced: set[ir.Node] = set()  # ends of dequantized MatMulNBits: round there only
    inner: set[ir.Node] = set()  # their MatMul when a bias Add follows: no rounding between
    for node in list(g):
        if node.op_type == "MatMulNBits" and not _exact_nbits(node) and _rounds(node):
            scales = node.inputs[2]
            assert scales is not None and scales.const_value is not None
            arr = np.asarray(scales.const_value.numpy(), np.float32)
            node.replace_input_with(2, _const(g, f"{scales.name}__bf16r", _round(arr)))
        elif _exact_nbits(node) and _rounds(node):
            new = _dequantize_as_formatted(g, node, weights, rounded)
            replaced.add(new[-1])
            inner.update(new[:-1])
    for node in list(g):
        if node in inner or not (node in replaced or _rounds(node)):
            continue
        for slot, value in enumerate(node.inputs):
            if value is None or value.dtype != _F32 or value in rounded:
                continue
            if node.op_type in _QUANTIZED and slot != 0:
                continue  # scales/zero points: the operator's weight image handles them
            if value.const_value is not None:
                arr = np.asarray(value.const_value.numpy(), np.float32)
                node.replace_input_with(slot, _const(g, f"{value.name}__bf16r", _round(arr)))
                continue
            node.replace_input_with(slot, _round_value(g, node, value, None, insert_before=True))
        for value in node.outputs:
            if value.dtype != _F32 or not value.name:
                continue
            jitter = f"{_JITTER_PREFIX}{len(jitters)}"
            assert value.shape is not None and value.shape.is_static()
            jitters[jitter] = tuple(int(d) for d in value.shape)
            rounded.add(_round_value(g, node, value, jitter))
    for name, init in list(g.initializers.items()):  # replaced by their rounded copies
        if not init.uses() and not init.is_graph_output() and init not in g.inputs:
            del g.initializers[name]
    return jitters


def _accurate_sigmoid(g: ir.Graph) -> None:
    """Each ``Sigmoid`` becomes ``Reciprocal(1 + Exp(-x))``, correct to a few float32 ulps.

    onnxruntime's CPU Sigmoid (MLAS's logistic: a rational approximation on ``x`` clamped to
    [-18, 18], plus 0.5) is accurate to ~1e-7 *absolute*: 0.5 % off at -12, 100 % at -17, and 0
    below -18, while the NPU's sigmoid is correct to bf16 *relative* precision down to 1e-38.
    A probability map of large negative logits (a detector's background) is all such values, so
    the reference takes the exact formula, which onnxruntime's Exp and Reciprocal evaluate to
    float32 relative precision over the whole range (``exp`` overflow gives the limit 0).
    """
    for node in list(g):
        if node.op_type != "Sigmoid" or node.domain not in ("", "ai.onnx"):
            continue
        (x,), (y,) = node.inputs, node.outputs
        assert x is not None
        # a Constant node, not an initializer: function bodies (FusedConv's Sigmoid) have none
        one = ir.Node("", "Constant", [], attributes=[ir.AttrFloat32("value_float", 1.0)])
        neg = ir.Node("", "Neg", [x])
        exp = ir.Node("", "Exp", [neg.outputs[0]])
        den = ir.Node("", "Add", [exp.outputs[0], one.outputs[0]])
        rec = ir.Node("", "Reciprocal", [den.outputs[0]])
        chain = [one, neg, exp, den, rec]
        for n in chain:
            n.name = f"{node.name}__npud_sigmoid_{next(_SERIAL)}"
            n.outputs[0].name = n.name
            n.outputs[0].type, n.outputs[0].shape = y.type, y.shape
        one.outputs[0].type, one.outputs[0].shape = ir.TensorType(_F32), ir.Shape([])
        g.insert_before(node, chain)
        result = rec.outputs[0]
        for use_node, slot in list(y.uses()):
            use_node.replace_input_with(slot, result)
        idx = [i for i, o in enumerate(g.outputs) if o is y]
        for i in idx:
            g.outputs[i] = result
        g.remove(node, safe=True)
        result.name = y.name


def _widen_bf16(model: ir.Model) -> None:
    """bf16 values and initializers become float32 (exactly); Cast(to=bf16) becomes a Cast to
    float whose output the caller rounds (Cast is a rounding NPU op)."""
    g = model.graph
    for name, init in list(g.initializers.items()):
        if init.dtype == _BF16 and init.const_value is not None:
            arr = np.asarray(init.const_value.numpy()).astype(np.float32)
            init.const_value = ir.tensor(arr, name=name)
            init.type = ir.TensorType(_F32)
    for node in g:
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) == _BF16.value:
            node.attributes["to"] = ir.AttrInt64("to", _F32.value)
        for value in node.outputs:
            if value.dtype == _BF16:
                value.type = ir.TensorType(_F32)
    for value in g.inputs:
        if value.dtype == _BF16:
            value.type = ir.TensorType(_F32)


def _round(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return arr.astype(ml_dtypes.bfloat16).astype(np.float32)


def _const(g: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    if name in g.initializers:
        return g.initializers[name]
    value = ir.Value(name=name, type=ir.TensorType(_F32), shape=ir.Shape(arr.shape))
    value.const_value = ir.tensor(arr, name=name)
    g.register_initializer(value)
    return value


def _round_value(
    g: ir.Graph, node: ir.Node, value: ir.Value, jitter: str | None, *, insert_before: bool = False
) -> ir.Value:
    """``value`` rounded to bf16 (times the jitter input), placed next to ``node``.

    For an output, every use and the graph-output slot move to the rounded value, which takes
    over the name so the model's outputs keep theirs.
    """
    base = value.name
    new_nodes = _rounding_nodes(g, value)
    result = new_nodes[-1].outputs[0]
    if jitter is not None:
        j = ir.Value(name=jitter, type=ir.TensorType(_F32), shape=value.shape)
        g.inputs.append(j)
        mul = ir.Node("", "Mul", [result, j], name=f"{base}__npud_jitter_{next(_SERIAL)}")
        new_nodes.append(mul)
        result = mul.outputs[0]
    for n in new_nodes:
        n.outputs[0].name = f"{base}__npud_{n.op_type.lower()}_{next(_SERIAL)}"
        n.outputs[0].shape = value.shape
        if n.outputs[0].type is None:
            n.outputs[0].type = ir.TensorType(_F32)
    if insert_before:
        g.insert_before(node, new_nodes)
        return result
    for use_node, slot in list(value.uses()):
        if use_node not in new_nodes:
            use_node.replace_input_with(slot, result)
    g.insert_after(node, new_nodes)
    if value.is_graph_output():
        idx = [i for i, o in enumerate(g.outputs) if o is value]
        for i in idx:
            g.outputs[i] = result
        value.name, result.name = f"{base}__raw", base
    return result


CAST_BF16_SINCE = 13
"""First opset whose Cast accepts bfloat16; older models round with Veltkamp's splitting."""

VELTKAMP = np.float32(2.0**16 + 1)
"""Splits a float32 (24-bit significand) into its leading 8 bits: bf16's precision."""


def _rounding_nodes(g: ir.Graph, value: ir.Value) -> list[ir.Node]:
    """Nodes rounding ``value`` to bf16, last node's output the rounded float32.

    ``Cast(bf16) -> Cast(float)`` from opset 13. Before, Cast has no bf16, so float32 arithmetic
    rounds instead (Veltkamp: ``t = x * (2**16 + 1); x_hi = t - (t - x)``, round to nearest
    with the leading 8 significant bits; ties may round away from even, and |x| > 5e33
    overflows: both far rarer than the differences the check allows).
    """
    opset = g.opset_imports.get("", g.opset_imports.get("ai.onnx", CAST_BF16_SINCE))
    if opset >= CAST_BF16_SINCE:
        to_bf16 = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", _BF16.value)])
        to_bf16.outputs[0].type = ir.TensorType(_BF16)
        back = ir.Node(
            "", "Cast", [to_bf16.outputs[0]], attributes=[ir.AttrInt64("to", _F32.value)]
        )
        nodes = [to_bf16, back]
    else:
        split = _const(g, "npudispatch.veltkamp_bf16", np.asarray(VELTKAMP))
        t = ir.Node("", "Mul", [value, split])
        u = ir.Node("", "Sub", [t.outputs[0], value])
        hi = ir.Node("", "Sub", [t.outputs[0], u.outputs[0]])
        nodes = [t, u, hi]
    for n in nodes:
        n.name = f"{value.name}__npud_round_{next(_SERIAL)}"
    return nodes


def _dequantize_as_formatted(
    g: ir.Graph,
    node: ir.Node,
    weights: dict[str, np.ndarray],
    rounded: set[ir.Value],
    *,
    fp32: bool = False,
) -> list[ir.Node]:
    """MatMulNBits -> MatMul (+ Add bias) on the bf16 weight the NPU's image holds (``fp32``: the
    exact float32 weight); the weight is a new graph input whose array goes to ``weights``;
    returns the new nodes."""
    k, n = int(node.attributes.get_int("K")), int(node.attributes.get_int("N"))
    block = int(node.attributes.get_int("block_size"))
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    consts = [None if v is None or v.const_value is None else v.const_value.numpy() for v in ins]
    scales = np.asarray(consts[2], np.float32)
    if not fp32:
        scales = _round(scales)
    w = dequantize_nbits(consts[1], scales, consts[3], k, n, block).astype(np.float32)
    if not fp32:
        w = _round(w)
    weight = ir.Value(
        name=f"{node.name}__w_bf16_{next(_SERIAL)}",
        type=ir.TensorType(_F32),
        shape=ir.Shape(w.shape),
    )
    g.inputs.append(weight)
    weights[weight.name] = np.ascontiguousarray(w)
    rounded.add(weight)
    out = node.outputs[0]
    matmul = ir.Node("", "MatMul", [ins[0], weight], name=f"{node.name}__deq")
    new = [matmul]
    result = matmul.outputs[0]
    if ins[5] is not None:
        add = ir.Node("", "Add", [result, ins[5]], name=f"{node.name}__bias")
        new.append(add)
        result.type, result.shape, result.name = out.type, out.shape, f"{out.name}__mm"
        result = add.outputs[0]
    g.insert_after(node, new)
    result.type, result.shape = out.type, out.shape
    for use_node, slot in list(out.uses()):
        use_node.replace_input_with(slot, result)
    was_output = out.is_graph_output()
    name = out.name
    if was_output:
        for i, o in enumerate(g.outputs):
            if o is out:
                g.outputs[i] = result
    g.remove(node, safe=True)
    out.name = f"{name}__nbits"
    result.name = name
    return new
