"""Dtype helpers: ONNX ↔ numpy mapping, the kernels' compute rule, and the dtype codes kernels read.

Every launch computes in one of three precisions (:data:`Precision`), chosen at compile time and
carried by the params record's flags:

* ``"bf16"`` (the default; ARCHITECTURE §4 / operators contract): float32 activations are rounded
  to bf16 on entry, arithmetic runs in float32 (the accumulator), and results are rounded to bf16
  before being stored in the output dtype (the precision pass stores them as bf16 tensors).
* ``"mixed"`` (:data:`~npudispatch.overlay_abi.FLAG_MIXED_COMPUTE`): only the operands of
  multiply-accumulate kernels (matmuls, convolutions, attention) are rounded to bf16, as an AIE
  core's bf16 MAC takes them, with bf16 weight images; every other operand and every result stays
  float32 (norms, residual adds, activations, softmax statistics, stored tensors).
* ``"fp32"`` (:data:`~npudispatch.overlay_abi.FLAG_FP32_COMPUTE`, ``bf16=False``, CLI ``--fp32``):
  operands enter as float32, results are stored without rounding, weight images are float32.

:func:`to_compute`, :func:`mac_operand` and :func:`store` implement the rule so every kernel
shares it (round-to-nearest-even). The operator framework sets the precision for the duration of
each kernel call (:func:`launch_precision`); kernels ask :func:`fp32_compute` (or
:func:`weight_dtype` for the float element type of their formatted weights) and never see the
flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import ml_dtypes
import numpy as np
import onnx_ir as ir

from npudispatch.precision import Precision, check_precision

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
FLOAT_DTYPES = (F32, BF16)

# Stable small integer per dtype, written into params records so kernels can decode operands
# without the OpConfig (the emulator only hands them the record and raw bytes).
_CODES: dict[np.dtype, int] = {
    F32: 1,
    BF16: 2,
    np.dtype(np.uint8): 3,
    np.dtype(np.int8): 4,
    np.dtype(np.uint16): 5,
    np.dtype(np.int16): 6,
    np.dtype(np.int32): 7,
    np.dtype(np.int64): 8,
    np.dtype(ml_dtypes.int4): 9,  # one value per byte (ml_dtypes storage)
    np.dtype(ml_dtypes.uint4): 10,
}
_BY_CODE = {code: dt for dt, code in _CODES.items()}


def dtype_code(dtype: np.dtype) -> int:
    """Record code of ``dtype`` (ValueError for a dtype kernels cannot receive)."""
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no kernel dtype code") from None


def dtype_from_code(code: int) -> np.dtype:
    """Inverse of :func:`dtype_code`."""
    try:
        return _BY_CODE[code]
    except KeyError:
        raise ValueError(f"unknown kernel dtype code {code}") from None


def np_dtype(dtype: ir.DataType | None) -> np.dtype | None:
    """numpy dtype of an ONNX data type (bfloat16 via ml_dtypes), None when unknown/unsupported."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype.numpy())
    except (TypeError, ValueError, AttributeError):
        return None


_PRECISION: ContextVar[Precision] = ContextVar("npudispatch_precision", default="bf16")


@contextlib.contextmanager
def launch_precision(precision: Precision | bool) -> Iterator[None]:
    """Run the enclosed kernel call in ``precision`` (``True``/``False``: fp32 / bf16)."""
    if isinstance(precision, bool):
        precision = "fp32" if precision else "bf16"
    token = _PRECISION.set(check_precision(precision))
    try:
        yield
    finally:
        _PRECISION.reset(token)


def current_precision() -> Precision:
    """The current launch's precision (see the module docstring)."""
    return _PRECISION.get()


def fp32_compute() -> bool:
    """Whether the current launch computes with float32 operands and float32 weight images."""
    return _PRECISION.get() == "fp32"


def bf16_operands(mac: bool) -> bool:
    """Whether a kernel rounds its float operands to bf16 in the current launch: every kernel in
    bf16 compute, multiply-accumulate kernels (``mac``) in mixed compute, none in float32."""
    precision = _PRECISION.get()
    return precision == "bf16" or (mac and precision == "mixed")


def weight_dtype(fp32: bool) -> np.dtype:
    """Element type of formatted float weights and q4 scales: float32 in float32 compute."""
    return F32 if fp32 else BF16


_SIGN, _QUIET_NAN = np.uint32(0x80000000), np.uint32(0x7FC00000)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to bf16 (nearest, ties to even) and widened back: a new float32 array
    with exactly the bits of ``x.astype(BF16).astype(F32)`` for every float32 input (NaNs become
    the quiet NaN of their sign, overflow becomes infinity, subnormals are kept; checked over all
    2**32 bit patterns). Integer arithmetic on the bits: about 9x faster than ml_dtypes' casts."""
    return _rounded_bits(np.asarray(x, dtype=F32)).view(F32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to bf16: the same bits as ``x.astype(BF16)`` (see
    :func:`round_bf16`); a bf16 ``x`` is returned as it is."""
    x = np.asarray(x)
    if x.dtype == BF16:
        return x
    r = _rounded_bits(np.asarray(x, dtype=F32))
    r >>= 16
    return r.astype(np.uint16).view(BF16)


def _rounded_bits(x: np.ndarray) -> np.ndarray:
    """The float32 bits of float32 ``x`` rounded to bf16 (low half zero), a new uint32 array."""
    u = x.view(np.uint32)
    r = u >> 16
    r &= 1  # the kept half's lowest bit: ties round to even
    r += 0x7FFF
    r += u  # never wraps: the largest non-NaN pattern is -inf, 0xFF800000
    r &= 0xFFFF0000
    # A NaN's payload can carry into the exponent: give it the quiet NaN of its sign. The max is
    # NaN exactly when some element is (one reduction instead of a mask).
    if x.size and np.isnan(x.max()):
        nan = np.isnan(x)
        r[nan] = (u[nan] & _SIGN) | _QUIET_NAN
    return r


def widen(x: np.ndarray) -> np.ndarray:
    """A bf16 array as a new C-ordered float32 array (exact: the bf16 bits are the float32's high
    half), float32 as it is; faster than ml_dtypes' cast. Other dtypes are cast with ``astype``."""
    x = np.asarray(x)
    if x.dtype == BF16:
        # One casting copy into a C-ordered uint32 array, then an in-place shift: fast for
        # strided views too (kernels widen gathered windows this way).
        out = np.empty(x.shape, dtype=np.uint32)
        np.copyto(out, x.view(np.uint16), casting="safe")
        out <<= 16
        return out.view(F32)
    return x if x.dtype == F32 else x.astype(F32)


def to_compute(x: np.ndarray) -> np.ndarray:
    """Kernel entry of a float operand as float32: rounded to bf16 first in bf16 compute only
    (mixed compute keeps vector operands float32; :func:`mac_operand` is the MAC's entry)."""
    return _entry(x, _PRECISION.get() == "bf16")


def mac_operand(x: np.ndarray) -> np.ndarray:
    """Kernel entry of a multiply-accumulate operand (a matmul's A, attention's q/k/v) as float32:
    rounded to bf16 first unless in float32 compute."""
    return _entry(x, _PRECISION.get() != "fp32")


def _entry(x: np.ndarray, rounds: bool) -> np.ndarray:
    x = np.asarray(x)
    if not rounds:
        return x if x.dtype == F32 else (widen(x) if x.dtype == BF16 else x.astype(F32))
    if x.dtype == F32:
        return round_bf16(x)
    if x.dtype == BF16:
        return widen(x)
    return x.astype(BF16).astype(F32)


def store(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Kernel exit: a float32 result stored in ``dtype``; rounded to bf16 first in bf16 compute
    (mixed and float32 compute store float32 results as they are)."""
    if _PRECISION.get() != "bf16":
        return np.asarray(x, dtype=F32).astype(dtype)
    if dtype == BF16:
        return to_bf16(np.asarray(x, dtype=F32))
    rounded = round_bf16(np.asarray(x, dtype=F32))
    return rounded if dtype == F32 else rounded.astype(BF16).astype(dtype)
