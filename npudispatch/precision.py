"""Compute precision names: the one home of the ``bf16`` / ``mixed`` / ``fp32`` choice.

Light on purpose (no numpy): the command line builds its ``--precision`` choices from here. What
each precision means for the kernels is :mod:`npudispatch.operators.dtypes`' business;
``docs/numerics.md`` measures them.
"""

from __future__ import annotations

from typing import Literal, get_args

from npudispatch.errors import OptionError

__all__ = ["PRECISIONS", "Precision", "check_precision", "resolve_precision"]

Precision = Literal["bf16", "mixed", "fp32"]
"""Where kernels round float operands and results to bf16 (:mod:`npudispatch.operators.dtypes`):
``"bf16"`` everywhere (the default), ``"mixed"`` only multiply-accumulate operands, ``"fp32"`` nowhere."""

PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def check_precision(precision: str) -> Precision:
    """``precision`` as a :data:`Precision`; raises :class:`OptionError` naming the valid ones."""
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision  # type: ignore[return-value]


def resolve_precision(precision: str | None, bf16: bool = True) -> Precision:
    """The precision a public call asked for: ``precision`` when given, else the older ``bf16``
    switch (``bf16=False`` is ``"fp32"``). Both given and contradicting is an error."""
    if precision is None:
        return "bf16" if bf16 else "fp32"
    checked = check_precision(precision)
    if not bf16 and checked != "fp32":
        raise OptionError(f"bf16=False asks for float32 compute but precision={precision!r}")
    return checked
