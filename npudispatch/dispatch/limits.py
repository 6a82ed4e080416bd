"""Size limits checked before anything is allocated.

A few bytes of ONNX can declare a tensor of ``[2**40, 2**40]`` elements; numpy would then fail
(or, with ``int64`` products, silently wrap to a 0-byte buffer) deep inside planning or a kernel.
:func:`check_model_sizes` walks the declared shapes with Python integers (no overflow) right after
loading and again after the rewrites, and :func:`check_program_size` checks each NPU partition's
five buffers before their images are allocated. Refusals are :class:`~npudispatch.errors.ModelError`
/ :class:`~npudispatch.errors.PlanError` naming the tensor, its producer and the limit.

Defaults (per process, environment overrides in bytes):

======================  ==========  =================================
limit                   default     environment variable
======================  ==========  =================================
one tensor              2 GiB       ``NPUDISPATCH_MAX_TENSOR_BYTES``
one NPU program         8 GiB       ``NPUDISPATCH_MAX_PROGRAM_BYTES``
======================  ==========  =================================

(the five buffers of a program together; an AIE2P NPU addresses its buffers with 32-bit offsets
per buffer, and the emulator holds every buffer in host memory).

Shape inference runs before these checks, so it must not allocate what they would refuse: onnx's
data propagation materializes constant-computed tensors (``Range``, ``ConstantOfShape``,
``Expand``, ``Tile`` of constants) at ~140 bytes per element, and is skipped for any node that
could yield more than :data:`~npudispatch.graph.propagation_guard.DATA_PROP_MAX_ELEMENTS`
elements; the tensor is then refused here by name (:mod:`npudispatch.graph.propagation_guard`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import onnx_ir as ir

from npudispatch.errors import ModelError, PlanError

__all__ = [
    "MAX_PROGRAM_BYTES",
    "MAX_TENSOR_BYTES",
    "check_model_sizes",
    "check_program_size",
    "max_program_bytes",
    "max_tensor_bytes",
]

MAX_TENSOR_BYTES = 2 << 30
MAX_PROGRAM_BYTES = 8 << 30
TENSOR_ENV = "NPUDISPATCH_MAX_TENSOR_BYTES"
PROGRAM_ENV = "NPUDISPATCH_MAX_PROGRAM_BYTES"


def _limit(env: str, default: int) -> int:
    text = os.environ.get(env)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ModelError(
            f"${env}={text!r} is not a byte count; unset it or give an integer"
        ) from None
    if value <= 0:
        raise ModelError(f"${env}={value} must be positive")
    return value


def max_tensor_bytes() -> int:
    """Largest tensor allowed (``$NPUDISPATCH_MAX_TENSOR_BYTES`` or :data:`MAX_TENSOR_BYTES`)."""
    return _limit(TENSOR_ENV, MAX_TENSOR_BYTES)


def max_program_bytes() -> int:
    """Largest NPU program allowed (``$NPUDISPATCH_MAX_PROGRAM_BYTES`` or the default)."""
    return _limit(PROGRAM_ENV, MAX_PROGRAM_BYTES)


def _nbytes(value: ir.Value) -> int | None:
    if value.dtype is None or value.shape is None or value.dtype == ir.DataType.STRING:
        return None  # strings have no fixed size (and never reach the NPU)
    dims = list(value.shape)
    if not all(isinstance(d, int) for d in dims):
        return None
    return (math.prod(dims) * value.dtype.bitwidth + 7) // 8  # Python ints: no overflow


def check_model_sizes(model: ir.Model, *, stage: str = "declared") -> None:
    """Refuse any graph input, initializer or node output larger than :func:`max_tensor_bytes`."""
    limit = max_tensor_bytes()
    g = model.graph
    values: list[tuple[ir.Value, str]] = [(v, "graph input") for v in g.inputs]
    values += [(v, "initializer") for v in g.initializers.values()]
    values += [
        (v, f"output {slot} of {node.op_type} node {node.name!r}")
        for node in g
        for slot, v in enumerate(node.outputs)
    ]
    for value, what in values:
        size = _nbytes(value)
        if size is not None and size > limit:
            raise ModelError(
                f"tensor {value.name!r} ({what}) is {list(value.shape)} of {value.dtype.name}: "
                f"{size:,} B ({stage} shape), above the {limit:,} B limit per tensor; check the "
                f"model's shapes or raise ${TENSOR_ENV}"
            )


def check_program_size(name: str, buffer_sizes: Sequence[int]) -> None:
    """Refuse a program whose five buffers together exceed :func:`max_program_bytes`."""
    limit = max_program_bytes()
    total = sum(int(s) for s in buffer_sizes)
    if total > limit:
        kinds = ("input", "output", "scratch", "const", "params")
        parts = ", ".join(f"{k} {int(s):,}" for k, s in zip(kinds, buffer_sizes))
        raise PlanError(
            f"NPU program {name!r} needs {total:,} B of buffers ({parts}), above the {limit:,} B "
            f"limit per program; split the model or raise ${PROGRAM_ENV}"
        )
