"""Activation fusions: x·Sigmoid(x) -> npudispatch.Silu; erf and tanh GELU -> npudispatch.Gelu.

Constants are bound as pattern variables and checked in the conditions with a relative tolerance
(:data:`~npudispatch.rewrites._checks.CONST_RTOL`), because exporters write √2 as ``1.4142``,
``1.4142135`` or multiply by ``0.7071`` instead, and may give scalars shape ``[]`` or ``[1]``.

Operand orders: the patterns put constants second in Add/Mul and enumerate the orders of the
non-constant operands explicitly. Run them after :func:`~npudispatch.rewrites.canonical.constants_last`
(``rules_pass(activation_rules(), canonicalize=True)`` does it), so every exporter order matches
without the thousand variants ``commute=True`` would generate for tanh GELU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from onnxscript.rewriter import pattern

from npudispatch.opset import DOMAIN, VERSION
from npudispatch.rewrites._checks import fail_unless_float, fail_unless_scalar

# --------------------------------------------------------------------------------------- SiLU


def _silu_pattern(op, x):
    return op.Mul(x, op.Sigmoid(x))


def _silu_pattern_swapped(op, x):
    return op.Mul(op.Sigmoid(x), x)


def _silu_check(context, x, **_):
    result = pattern.MatchResult()
    fail_unless_float(result, x)
    return result


def _silu_rewrite(op, x):
    return op.Silu(x, _domain=DOMAIN, _version=VERSION)


silu_rules = [
    pattern.RewriteRule(_silu_pattern, _silu_rewrite, _silu_check, name="FuseSilu"),
    pattern.RewriteRule(_silu_pattern_swapped, _silu_rewrite, _silu_check, name="FuseSilu_swapped"),
]

# --------------------------------------------------------------------------------------- GELU
# Outer shapes exporters produce for 0.5·x·(1 + t), with both orders of the non-constant Mul:
#   (x·(1+t))·0.5   (torch.onnx),   (x·0.5)·(1+t)   (HF "0.5 * x * ..."),   x·((1+t)·0.5)


def _outer_a(op, x, term, half, swap):
    return op.Mul(op.Mul(term, x) if swap else op.Mul(x, term), half)


def _outer_b(op, x, term, half, swap):
    xh = op.Mul(x, half)
    return op.Mul(term, xh) if swap else op.Mul(xh, term)


def _outer_c(op, x, term, half, swap):
    th = op.Mul(term, half)
    return op.Mul(th, x) if swap else op.Mul(x, th)


_OUTERS: dict[str, Callable] = {"a": _outer_a, "b": _outer_b, "c": _outer_c}
_OUTER_VARIANTS = [(o, swap) for o in _OUTERS for swap in (False, True)]


def _erf_gelu_rule(inner_div: bool, outer: str, swap: bool) -> pattern.RewriteRule:
    make_outer = _OUTERS[outer]

    def pat(op, x, c_sqrt, one, half):
        scaled = op.Div(x, c_sqrt) if inner_div else op.Mul(x, c_sqrt)
        return make_outer(op, x, op.Add(op.Erf(scaled), one), half, swap)

    def check(context, x, c_sqrt, one, half, **_):
        r = pattern.MatchResult()
        expect = math.sqrt(2.0) if inner_div else 1.0 / math.sqrt(2.0)
        _ = (
            fail_unless_float(r, x)
            and fail_unless_scalar(r, c_sqrt, expect)
            and fail_unless_scalar(r, one, 1.0)
            and fail_unless_scalar(r, half, 0.5)
        )
        return r

    def rewrite(op, x, **_):
        return op.Gelu(x, approximate="none", _domain=DOMAIN, _version=VERSION)

    kind = "div" if inner_div else "mul"
    return pattern.RewriteRule(
        pat, rewrite, check, name=f"FuseErfGelu_{kind}_{outer}{'_swapped' if swap else ''}"
    )


def _cube(op, x, three, form: str):
    if form == "pow":
        return op.Pow(x, three)
    return op.Mul(op.Mul(x, x), x) if form == "mul_l" else op.Mul(x, op.Mul(x, x))


def _tanh_gelu_rule(cube: str, x_first: bool, outer: str, swap: bool) -> pattern.RewriteRule:
    make_outer = _OUTERS[outer]

    def body(op, x, three, kappa, beta, one, half):
        kx3 = op.Mul(_cube(op, x, three, cube), kappa)
        inner = op.Mul(op.Add(x, kx3) if x_first else op.Add(kx3, x), beta)
        return make_outer(op, x, op.Add(op.Tanh(inner), one), half, swap)

    if cube == "pow":

        def pat(op, x, three, kappa, beta, one, half):
            return body(op, x, three, kappa, beta, one, half)

    else:

        def pat(op, x, kappa, beta, one, half):
            return body(op, x, None, kappa, beta, one, half)

    def check(context, x, kappa, beta, one, half, three=None, **_):
        r = pattern.MatchResult()
        _ = (
            fail_unless_float(r, x)
            and (cube != "pow" or fail_unless_scalar(r, three, 3.0))
            and fail_unless_scalar(r, kappa, 0.044715)
            and fail_unless_scalar(r, beta, math.sqrt(2.0 / math.pi))
            and fail_unless_scalar(r, one, 1.0)
            and fail_unless_scalar(r, half, 0.5)
        )
        return r

    def rewrite(op, x, **_):
        return op.Gelu(x, approximate="tanh", _domain=DOMAIN, _version=VERSION)

    tag = f"{cube}_{'x' if x_first else 'k'}_{outer}{'_swapped' if swap else ''}"
    return pattern.RewriteRule(pat, rewrite, check, name=f"FuseTanhGelu_{tag}")


gelu_rules: list[pattern.RewriteRule] = [
    *(_erf_gelu_rule(d, o, sw) for d in (True, False) for o, sw in _OUTER_VARIANTS),
    *(
        _tanh_gelu_rule(c, xf, o, sw)
        for c in ("pow", "mul_l", "mul_r")
        for xf in (True, False)
        for o, sw in _OUTER_VARIANTS
    ),
]


def activation_rules() -> pattern.RewriteRuleSet:
    """SiLU and GELU fusions; apply after :func:`~npudispatch.rewrites.canonical.constants_last`."""
    return pattern.RewriteRuleSet([*silu_rules, *gelu_rules], commute=False)
