"""Small predicates shared by the fusion rules' conditions (dtypes, constants with tolerance, axes)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from npudispatch.operators.base import const_array

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)

# Exporters write √2 as 1.4142, 1.41421356...; 1e-3 relative accepts those and rejects real changes.
CONST_RTOL = 1e-3


def scalar(value: ir.Value | None) -> float | None:
    """The single element of a one-element constant (any rank), else None."""
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()).astype(np.float64))


def fail_unless_float(result: pattern.MatchResult, *values: ir.Value) -> bool:
    """Record a failure on ``result`` unless every value has a known float dtype."""
    for v in values:
        if v.dtype not in FLOAT_TYPES:
            result.fail(f"{v.name!r} has dtype {v.dtype}, a float type is required", v)
            return False
    return True


def fail_unless_scalar(
    result: pattern.MatchResult, value: ir.Value, expected: float, rtol: float = CONST_RTOL
) -> bool:
    """Record a failure unless ``value`` is a one-element constant close to ``expected``."""
    got = scalar(value)
    if got is None:
        result.fail(f"{value.name!r} is not a one-element constant (expected {expected})", value)
        return False
    if not math.isclose(got, expected, rel_tol=rtol, abs_tol=0.0):
        result.fail(f"{value.name!r} = {got}, expected {expected} (rtol {rtol})", value)
        return False
    return True


def last_axis(axes: list[int] | None, rank: int | None) -> bool:
    """Whether ``axes`` names exactly the last axis of a tensor of ``rank`` (``-1`` always does)."""
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def rank(value: ir.Value) -> int | None:
    """Rank of a value, None if unknown."""
    return value.shape.rank() if value.shape is not None else None
