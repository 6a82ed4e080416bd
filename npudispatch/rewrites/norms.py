"""RMSNorm fusions: decomposed RMSNorm -> SimplifiedLayerNormalization; Add + it -> SkipSimplified….

Decomposed form (what torch.onnx emits for HF ``LlamaRMSNorm`` and friends)::

    x² = Pow(x, 2) | Mul(x, x)
    ms = ReduceMean(x², axes=[-1], keepdims=1)          # axes attribute (< 18) or input (>= 18)
    d  = Add(ms, eps)
    n  = Div(x, Sqrt(d)) | Mul(x, Reciprocal(Sqrt(d))) | Mul(x, Div(1, Sqrt(d))) | Mul(x, Pow(d, -0.5))
    y  = Mul(n, weight)

becomes ``SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps)`` (ORT contrib op registered
in the default domain). Then ``SimplifiedLayerNormalization(Add(a, b), w)`` becomes
``com.microsoft.SkipSimplifiedLayerNormalization(a, b, w)``; when the sum is used elsewhere (the
residual stream) it is kept as output 3 (``input_skip_bias_sum``).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from npudispatch.rewrites._checks import (
    const_array,
    fail_unless_float,
    fail_unless_scalar,
    last_axis,
    rank,
    scalar,
)

MS_DOMAIN = "com.microsoft"


def _rms_rule(square: str, recip: str) -> pattern.RewriteRule:
    def pat(op, x, two, eps, num, weight):
        x2 = op.Pow(x, two) if square == "pow" else op.Mul(x, x)
        ms = op.ReduceMean(x2, _allow_other_inputs=True, _outputs=["ms"])
        d = op.Add(ms, eps)
        if recip == "div":
            normed = op.Div(x, op.Sqrt(d))
        elif recip == "reciprocal":
            normed = op.Mul(x, op.Reciprocal(op.Sqrt(d)))
        elif recip == "one_div":
            normed = op.Mul(x, op.Div(num, op.Sqrt(d)))
        else:  # "pow": d ** -0.5
            normed = op.Mul(x, op.Pow(d, num))
        return op.Mul(normed, weight)

    def check(context, x, eps, weight, ms, two=None, num=None, **_):
        r = pattern.MatchResult()
        if not fail_unless_float(r, x, weight):
            return r
        if square == "pow" and not fail_unless_scalar(r, two, 2.0, rtol=0.0):
            return r
        if recip == "one_div" and not fail_unless_scalar(r, num, 1.0, rtol=0.0):
            return r
        if recip == "pow" and not fail_unless_scalar(r, num, -0.5, rtol=0.0):
            return r
        eps_value = scalar(eps)
        if eps_value is None or not 0.0 < eps_value < 1.0:
            return r.fail(f"epsilon {eps.name!r} is not a constant in (0, 1): {eps_value}", eps)
        rm = ms.producer()
        if rm.attributes.get_int("keepdims", 1) != 1:
            return r.fail(f"ReduceMean {rm.name!r} has keepdims=0", rm)
        if len(rm.inputs) > 1 and rm.inputs[1] is not None:
            arr = const_array(rm.inputs[1])
            axes = None if arr is None else [int(a) for a in arr.reshape(-1)]
        else:
            axes = rm.attributes.get_ints("axes", None)
            axes = None if axes is None else list(axes)
        if not last_axis(axes, rank(x)):
            return r.fail(f"ReduceMean {rm.name!r} reduces axes {axes}, not the last axis", rm)
        if weight.shape is None or weight.shape.rank() != 1:
            return r.fail(f"weight {weight.name!r} has shape {weight.shape}, [D] required", weight)
        if x.shape is not None and x.shape.rank() and weight.shape[0] != x.shape[-1]:
            return r.fail(f"weight {weight.name!r} length != last dim of {x.name!r}", weight)
        return r

    def rewrite(op, x, eps, weight, **_):
        return op.SimplifiedLayerNormalization(
            x, weight, axis=-1, epsilon=scalar(eps), stash_type=1
        )

    return pattern.RewriteRule(pat, rewrite, check, name=f"FuseRMSNorm_{square}_{recip}")


rms_norm_rules: list[pattern.RewriteRule] = [
    _rms_rule(s, d) for s in ("pow", "mul") for d in ("div", "reciprocal", "one_div", "pow")
]


def _skip_check(context, a, b, weight, normed, **_):
    r = pattern.MatchResult()
    if not fail_unless_float(r, a, b):
        return r
    if a.shape is None or b.shape is None or a.shape != b.shape or a.shape.rank() not in (2, 3):
        return r.fail(
            f"skip inputs {a.name!r} {a.shape} and {b.name!r} {b.shape} must have one known "
            "rank-2/3 shape (SkipSimplifiedLayerNormalization does not broadcast)",
            a,
        )
    sln = normed.producer()
    if sln.attributes.get_int("axis", -1) not in (-1, a.shape.rank() - 1):
        return r.fail(f"{sln.name!r} does not normalize the last axis", sln)
    return r


def _skip_pattern_single(op, a, b, weight):
    s = op.Add(a, b)
    return op.SimplifiedLayerNormalization(
        s, weight, _allow_other_attributes=True, _outputs=["normed"]
    )


def _skip_pattern_keep_sum(op, a, b, weight):
    s = op.Add(a, b, _outputs=["skip_sum"])
    y = op.SimplifiedLayerNormalization(
        s, weight, _allow_other_attributes=True, _outputs=["normed"]
    )
    return y, s


def _skip_rewrite_single(op, a, b, weight, normed, **_):
    eps = normed.producer().attributes.get_float("epsilon", 1e-5)
    return op.SkipSimplifiedLayerNormalization(a, b, weight, epsilon=eps, _domain=MS_DOMAIN)


def _skip_rewrite_keep_sum(op, a, b, weight, normed, **_):
    eps = normed.producer().attributes.get_float("epsilon", 1e-5)
    y, mean, inv_std, s = op.SkipSimplifiedLayerNormalization(
        a, b, weight, epsilon=eps, _domain=MS_DOMAIN, _outputs=4
    )
    # Outputs 1 and 2 only exist to reach output 3; ORT types them float over the reduced last
    # axis. Typing them keeps downstream passes and the operator matcher from seeing unknowns.
    reduced = None
    if a.shape is not None and a.shape.rank() > 0:
        reduced = ir.Shape([*list(a.shape)[:-1], 1])
    for stat in (mean, inv_std):
        stat.dtype = ir.DataType.FLOAT
        stat.shape = reduced
    return y, s


skip_rms_norm_rules: list[pattern.RewriteRule] = [
    # Tried first: the sum feeds only the norm (intermediate, single use).
    pattern.RewriteRule(
        _skip_pattern_single, _skip_rewrite_single, _skip_check, name="FuseSkipRMSNorm"
    ),
    # Otherwise the sum is also a residual: keep it as output 3.
    pattern.RewriteRule(
        _skip_pattern_keep_sum,
        _skip_rewrite_keep_sum,
        _skip_check,
        name="FuseSkipRMSNormKeepSum",
    ),
]


def rms_norm_rules_set() -> pattern.RewriteRuleSet:
    """Decomposed RMSNorm -> SimplifiedLayerNormalization (all operand orders)."""
    return pattern.RewriteRuleSet(rms_norm_rules, commute=True)


def skip_rms_norm_rules_set() -> pattern.RewriteRuleSet:
    """Add + SimplifiedLayerNormalization -> com.microsoft.SkipSimplifiedLayerNormalization."""
    return pattern.RewriteRuleSet(skip_rms_norm_rules, commute=True)
