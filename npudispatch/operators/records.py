"""The tensor table carried in a params record payload, and operand/output (un)packing for kernels.

Payload layout (little-endian int64 words, then float64 words)::

    [table_words, n_in, n_out,
     per input:  src, dtype_code, rank, *shape, padded, *real_shape (only if padded)
     per output:      dtype_code, rank, *shape, padded, *real_shape (only if padded)]
    [float64 op floats...]

``src``: -1 absent optional input, 0 its own operand stream, 1 inside the const region. Operands
arrive in stream order: the ``src == 0`` inputs in index order, then one const region holding the
``src == 1`` inputs in index order, each padded to 4 bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from npudispatch.errors import DeviceError
from npudispatch.operators.dtypes import dtype_code, dtype_from_code

if TYPE_CHECKING:
    from npudispatch.operators.base import TensorSpec

SRC_ABSENT, SRC_OPERAND, SRC_CONST = -1, 0, 1


@dataclass(frozen=True)
class Table:
    """Decoded tensor table: per input ``(src, spec)`` (spec None when absent), output specs."""

    inputs: list[tuple[int, TensorSpec | None]]
    outputs: list[TensorSpec]
    words: int


def _spec_words(spec: TensorSpec) -> list[int]:
    words = [dtype_code(spec.dtype), len(spec.shape), *spec.shape]
    if spec.real_shape is not None and spec.real_shape != spec.shape:
        return [*words, 1, *spec.real_shape]
    return [*words, 0]


def encode_table(
    inputs: Sequence[tuple[TensorSpec, int] | None], outputs: Sequence[TensorSpec]
) -> bytes:
    """Encode the table; ``inputs[i]`` is ``(spec, src)`` or None for an absent optional input."""
    body: list[int] = [len(inputs), len(outputs)]
    for item in inputs:
        body += [SRC_ABSENT] if item is None else [item[1], *_spec_words(item[0])]
    for spec in outputs:
        body += _spec_words(spec)
    return np.asarray([len(body) + 1, *body], dtype="<i8").tobytes()


def decode_table(payload: bytes) -> Table:
    """Inverse of :func:`encode_table` (DeviceError when the payload is not a table).

    Remembered per payload: a program sends the same records every run. The returned table is
    shared, so callers must not modify it."""
    return _decode_table(bytes(payload))


@functools.lru_cache(maxsize=4096)
def _decode_table(payload: bytes) -> Table:
    from npudispatch.operators.base import TensorSpec

    if len(payload) < 8:
        raise DeviceError("params payload too short for a tensor table: the params record is wrong")
    n_words = int(np.frombuffer(payload, "<i8", count=1)[0])
    if not 3 <= n_words <= len(payload) // 8:
        raise DeviceError(f"params payload tensor table claims {n_words} words: record is corrupt")
    words = [int(w) for w in np.frombuffer(payload, "<i8", count=n_words)]
    pos = 1

    def take(n: int) -> list[int]:
        nonlocal pos
        if pos + n > n_words:
            raise DeviceError("params payload tensor table is truncated: record is corrupt")
        pos += n
        return words[pos - n : pos]

    def spec() -> TensorSpec:
        code, rank = take(2)
        shape = tuple(take(rank))
        (padded,) = take(1)
        real = tuple(take(rank)) if padded else None
        return TensorSpec(shape, dtype_from_code(code), real)

    n_in, n_out = take(2)
    ins: list[tuple[int, TensorSpec | None]] = []
    for _ in range(n_in):
        (src,) = take(1)
        ins.append((src, None) if src == SRC_ABSENT else (src, spec()))
    outs = [spec() for _ in range(n_out)]
    return Table(ins, outs, n_words)


def encode_floats(values: Sequence[float]) -> bytes:
    """Op floats appended after the table."""
    return np.asarray(values, dtype="<f8").tobytes()


def decode_floats(payload: bytes, table: Table) -> list[float]:
    """Op floats that follow the table in ``payload`` (payload padding ignored)."""
    rest = payload[table.words * 8 :]
    return [float(x) for x in np.frombuffer(rest[: len(rest) // 8 * 8], "<f8")]


def pack_consts(arrays: Sequence[np.ndarray]) -> bytes:
    """Concatenate arrays' bytes, each padded to a multiple of 4 bytes.

    One copy: the parts go into the result as buffer views (weight images are tens of MB).
    """
    pieces: list[memoryview | bytes] = []
    for a in arrays:
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # any dtype, bf16 included
        pieces += [memoryview(raw), b"\0" * (-raw.size % 4)]
    return b"".join(pieces)


def _as_array(data: Any, spec: TensorSpec, offset: int, what: str) -> np.ndarray:
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    nbytes = spec.nbytes
    if offset + nbytes > buf.size:
        raise DeviceError(f"{what} needs {nbytes} bytes at {offset} but its stream has {buf.size}")
    return buf[offset : offset + nbytes].view(spec.dtype).reshape(spec.shape)


def unpack_inputs(
    table: Table, operands: Sequence[Any], operand_bytes: Sequence[int]
) -> list[np.ndarray | None]:
    """Typed, shaped node inputs from the raw operand streams (read-only views)."""
    n_own = sum(1 for src, _ in table.inputs if src == SRC_OPERAND)
    has_const = any(src == SRC_CONST for src, _ in table.inputs)
    if len(operands) != n_own + has_const:
        raise DeviceError(
            f"kernel got {len(operands)} operands, its tensor table needs {n_own + has_const}"
        )
    out: list[np.ndarray | None] = []
    k, const_off = 0, 0
    for i, (src, spec) in enumerate(table.inputs):
        if spec is None:
            out.append(None)
        elif src == SRC_OPERAND:
            out.append(_as_array(operands[k], spec, 0, f"input {i} (operand {k})"))
            k += 1
        else:
            out.append(_as_array(operands[n_own], spec, const_off, f"input {i} (const region)"))
            const_off += -(-spec.nbytes // 4) * 4
    return out


def zero_padding(x: np.ndarray, real_shape: tuple[int, ...] | None) -> np.ndarray:
    """``x`` with every lane outside ``real_shape`` set to zero (no copy when not padded)."""
    if real_shape is None or tuple(real_shape) == x.shape:
        return x
    out = np.zeros_like(x)
    region = tuple(slice(0, r) for r in real_shape)
    out[region] = x[region]
    return out


def pack_outputs(
    outs: Sequence[np.ndarray], specs: Sequence[TensorSpec], output_bytes: Sequence[int]
) -> list[np.ndarray]:
    """Outputs as uint8 arrays of exactly ``output_bytes`` each, padding lanes zeroed."""
    if len(outs) != len(specs):
        raise DeviceError(f"kernel produced {len(outs)} outputs, the record expects {len(specs)}")
    packed = []
    for j, (x, spec, nbytes) in enumerate(zip(outs, specs, output_bytes)):
        x = np.asarray(x)
        if x.shape != spec.shape:
            raise DeviceError(f"kernel output {j} has shape {x.shape}, record says {spec.shape}")
        data = np.ascontiguousarray(zero_padding(x.astype(spec.dtype, copy=False), spec.real_shape))
        raw = data.reshape(-1).view(np.uint8)
        if raw.size > nbytes:
            raise DeviceError(f"kernel output {j} is {raw.size} bytes, its stream holds {nbytes}")
        if raw.size < nbytes:  # stream padding: zeros after the tensor
            raw = np.concatenate([raw, np.zeros(nbytes - raw.size, dtype=np.uint8)])
        packed.append(raw)
    return packed
