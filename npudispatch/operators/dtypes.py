"""Dtype helpers: ONNX ↔ numpy mapping, bf16 rounding, and the dtype codes kernels read.

Kernels compute float math in bf16 (ARCHITECTURE §4 / operators contract): float32 activations are
rounded to bf16 on entry, arithmetic runs in float32 (the accumulator), and results are rounded to
bf16 before being stored in the output dtype. :func:`to_compute` and :func:`store` implement
exactly that so every kernel shares one rounding rule (round-to-nearest-even, via ml_dtypes).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

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


def to_compute(x: np.ndarray) -> np.ndarray:
    """Kernel entry: round a float operand to bf16 and widen it to the float32 accumulator type."""
    return np.asarray(x).astype(BF16).astype(F32)


def store(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Kernel exit: round a float32 result to bf16, then store it in ``dtype``."""
    return np.asarray(x, dtype=F32).astype(BF16).astype(dtype)
