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
In mixed compute (``--precision mixed``) the rounding points and probe jitters sit on the
multiply-accumulate operands only, the rest of the graph float32, as the kernels compute
(``rounding_reference._insert_mac_rounding``, numerics.md §1.5).

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
flips add up, so there the rms also passes when it is at most :data:`RMS_PROBE_FRACTION` of a
probe run's (median over the probes), both in bf16 ulps of the output's magnitudes floored at
its typical magnitude (no sensitivity term, so independent of how many probes ran); "deep" means
a probe run moves the output by at least :data:`DEEP_SPREAD_ULPS` ulps rms, which one rounding
does not, or that accumulation order alone is measured to exceed the rms limit there:
:data:`ORDER_RUNS` more reference runs scale every rounding point by ``1 ± 2**-20`` (a few float32
ulps, ``quant_check.QJITTER``: the size of a float32 disagreement inside an op, so only values at
a bf16 boundary flip) and their rms against the reference, judged like the NPU's, is above
:data:`RMS_ULPS` (PP-PicoDet's layout detector: a probe run moves its box regressions by 1.35
ulps, and onnxruntime against itself with that 2**-20 change differs by rms 0.15, as the NPU
does). Where the order runs make the graph deep, the rms also passes within
:data:`ORDER_RMS_FACTOR` of theirs (the NPU as far from the reference as onnxruntime from
itself). DenseNet-121 with random weights: rms 0.14 against the 0.125 limit, and 0.30 of a
probe run; every weight 1 % off: 17 of a probe run; a 1 % error in its first convolution: 0.54.
A 1 % error in a single late layer of its 120 convolutions can be as small as the rounding noise
at the output: ``--fp32`` (exact float32 kernels, compared to 1e-5) is the check that finds such
a defect. The float32
onnxruntime difference is reported beside it for information only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from npudispatch.dispatch import quant_check
from npudispatch.dispatch.rounding_reference import RoundingReference

__all__ = [
    "DEEP_SPREAD_ULPS",
    "MAX_PROBES",
    "ORDER_RMS_FACTOR",
    "ORDER_RUNS",
    "PROBES",
    "RMS_PROBE_FRACTION",
    "RMS_ULPS",
    "ULPS",
    "OutputCheck",
    "RoundingReference",
    "check_outputs",
    "ulp_bf16",
]

ULPS = 2
"""Allowed difference, in bf16 ulps of the magnitudes involved (see the module docstring)."""

PROBES = 4
"""Extra reference runs with every rounding point perturbed by one ulp (random signs)."""

MAX_PROBES = 16
"""Probe runs when :data:`PROBES` do not settle the verdict (see :func:`check_outputs`)."""

RMS_ULPS = 0.125
"""Allowed root-mean-square of the per-element differences in those units: rounding flips are
sparse (clean models stay below 0.02), a systematic error (a 1 % weight change: ~0.45) is not."""

RMS_PROBE_FRACTION = 0.5
"""In deep graphs sparse flips add up: an rms above :data:`RMS_ULPS` still passes when, in bf16
ulps of the output's magnitudes, it is at most this fraction of a probe run's (median over the
probes)."""

DEEP_SPREAD_ULPS = 1.5
"""A graph counts as deep for :data:`RMS_PROBE_FRACTION` when a probe run moves its output by at
least this many bf16 ulps rms: one rounding moves it by about one (a single MatMul: 0.96), a
hundred layers amplify it (DenseNet-121: 1.8, ZFNet-512: 2.2)."""

ORDER_RUNS = 2
"""Accumulation-order runs (every rounding point scaled by ``1 ± quant_check.QJITTER``): where
their rms alone exceeds :data:`RMS_ULPS` (the larger of the runs), flips already add up to more
than the strict limit and the graph counts as deep (module docstring). Only taken when an output
fails the rms limit and a probe run does not make the graph deep."""

ORDER_RMS_FACTOR = 1.25
"""Where the order runs make a graph deep, its rms also passes within this factor of theirs: the
NPU then differs from the reference about as much as onnxruntime differs from itself (the
layout detector in mixed compute: 1.03 of it; the separable stack of the tests: 0.89, its head
weight 0.5 % off about 1.8, 0.3 % off 1.09-1.44 depending on the input: the check's
resolution)."""

FLOAT32_ULPS = 4
"""Floor of the unit: float32 ulps of the output's largest magnitude (onnxruntime's resolution)."""


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
    order_rms: float | None = None

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
            else " (no rounding point: float32 compute, or mixed compute without a MAC)"
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
            if self.order_rms is not None and self.order_rms > RMS_ULPS:
                text += (
                    f"; accumulation order alone reaches rms {self.order_rms:.3f} here "
                    f"(limit {ORDER_RMS_FACTOR} of it)"
                )
        text += ")"
        systematic = not self.ok and self.worst_ulps <= self.allowed_ulps
        return text + quant_check.verdict_tail(systematic, self.fp32_max_abs)

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
            "order_rms": self.order_rms,
            "fp32_max_abs": self.fp32_max_abs,
            "where": None if self.where is None else list(self.where),
            "probes": self.probes,
            "reference": "onnxruntime on the rewritten graph with bf16 rounding where the NPU rounds "
            "(every op in bf16 compute, multiply-accumulate operands in mixed, none in fp32)",
        }


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
    :data:`MAX_PROBES`, the estimate the check stands by. An output still failing only on its
    rms, in a graph no probe run makes deep, is judged once more with :data:`ORDER_RUNS`
    accumulation-order runs telling whether flips alone exceed the limit there.
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
    if jittered and any(_needs_order_runs(v) for v in out.values()):
        size = quant_check.QJITTER
        seeds = range(MAX_PROBES, MAX_PROBES + ORDER_RUNS)
        orders = [reference.run(feeds, jitter=seed, size=size) for seed in seeds]
        for name, value in actual.items():
            if _needs_order_runs(out[name]):
                out[name] = _judge(name, value, ref, probes, fp32, ulps, jittered, orders)
    return out


def _needs_order_runs(verdict: Any) -> bool:
    """A float output failing only on its rms where no probe run made the graph deep."""
    return (
        isinstance(verdict, OutputCheck)
        and not verdict.ok
        and verdict.worst_ulps <= verdict.allowed_ulps
        and verdict.rms_vs_probes is None
    )


def _judge(
    name: str,
    value: np.ndarray,
    ref: Mapping[str, Any],
    probes: Sequence[Mapping[str, Any]],
    fp32: Mapping[str, np.ndarray] | None,
    ulps: int,
    jittered: bool,
    orders: Sequence[Mapping[str, Any]] = (),
) -> OutputCheck:
    """One output's verdict against the reference, with the sensitivity from ``probes`` and,
    when given, the rms of accumulation-order runs ``orders`` (:data:`ORDER_RUNS`)."""
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
    diff = _difference(a, r)
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
    order_rms = None
    if orders and ratio.size:
        order_ratios = (_difference(np.asarray(o[name], np.float64), r) / unit for o in orders)
        order_rms = max(float(np.sqrt(np.mean(np.square(q)))) for q in order_ratios)
    deep_by_order = order_rms is not None and order_rms > RMS_ULPS
    vs_probes = _rms_vs_probes(name, r, a, probes, deep=deep_by_order)
    rms_ok = (
        rms <= RMS_ULPS
        or (vs_probes is not None and vs_probes <= RMS_PROBE_FRACTION)
        or (deep_by_order and rms <= ORDER_RMS_FACTOR * order_rms)  # type: ignore[operator]
    )
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
        order_rms=order_rms,
    )


def _difference(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``|a - r|`` elementwise, 0 where both are NaN or the same infinity, inf where one is NaN."""
    both_nan = np.isnan(a) & np.isnan(r)
    same_inf = np.isinf(a) & (a == r)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan | same_inf, 0.0, np.abs(a - r))
    return np.where(np.isnan(diff), np.inf, diff)


def _rms_vs_probes(
    name: str,
    r: np.ndarray,
    a: np.ndarray,
    probes: Sequence[Mapping[str, Any]],
    *,
    deep: bool = False,
) -> float | None:
    """rms of ``a - r`` over the median rms of a probe run's ``p - r`` when the graph is deep
    (that median is at least :data:`DEEP_SPREAD_ULPS`, or ``deep``: accumulation order alone
    exceeds the rms limit), else None.

    Both are in bf16 ulps of ``max(|r|, rms |r|)``: no sensitivity term (so the figure does not
    depend on how many probes ran), and a floor at the output's typical magnitude (elements that
    cancel to near zero would otherwise dominate and make the figure noise)."""
    finite = np.isfinite(r)
    if not probes or not finite.any():
        return None
    typical = float(np.sqrt(np.mean(np.square(r[finite]))))
    unit = ulp_bf16(np.maximum(np.abs(r), typical))

    def rms(x: np.ndarray) -> float:
        with np.errstate(invalid="ignore"):
            d = (x - r) / unit
        d = d[finite & np.isfinite(d)]
        return float(np.sqrt(np.mean(np.square(d)))) if d.size else 0.0

    spread = float(np.median([rms(np.asarray(p[name], np.float64)) for p in probes]))
    if spread < DEEP_SPREAD_ULPS and not deep:
        return None
    return rms(a) / spread
