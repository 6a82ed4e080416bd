"""Operator registry: candidates per (domain, op_type) in priority order.

``register(OperatorClass)`` is called once per operator in ``npudispatch/operators/__init__.py``;
:func:`match` tries the candidates of a node in registration order and returns the first config,
or a :class:`Decline` that joins every candidate's reason.
"""

from __future__ import annotations

import onnx_ir as ir

from npudispatch.domains import normalize_domain
from npudispatch.operators.base import Decline, OpConfig, Operator
from npudispatch.overlay_abi import Kernel

_CANDIDATES: dict[tuple[str, str], list[Operator]] = {}
_BY_KERNEL: dict[int, Operator] = {}


def register(cls: type[Operator]) -> type[Operator]:
    """Register an operator class (usable as a decorator); kernel ids must be unique."""
    op = cls()
    other = _BY_KERNEL.get(cls.kernel_id)
    if other is not None and type(other) is not cls:
        raise ValueError(
            f"kernel id {cls.kernel_id} of {cls.__name__} is already used by "
            f"{type(other).__name__}: pick a free id"
        )
    if other is None:
        _BY_KERNEL[cls.kernel_id] = op
        _CANDIDATES.setdefault((normalize_domain(cls.domain), cls.op_type), []).append(op)
    return cls


def candidates(domain: str, op_type: str) -> list[Operator]:
    """Registered operators for ``(domain, op_type)``, highest priority first."""
    return list(_CANDIDATES.get((normalize_domain(domain), op_type), []))


def match(node: ir.Node) -> OpConfig | Decline:
    """The first candidate's config for ``node``, or a Decline listing why each one refused."""
    dynamic = _open_shape(node)
    if dynamic is not None:
        return Decline(dynamic)
    ops = candidates(node.domain, node.op_type)
    if not ops:
        where = f"domain '{node.domain}'" if normalize_domain(node.domain) else "the default domain"
        return Decline(f"op type {node.op_type} in {where} has no NPU operator")
    reasons = []
    for op in ops:
        try:
            result = op.match(node)
        except Decline as raised:  # an operator whose match is not wrapped (defined oddly)
            result = raised
        if isinstance(result, OpConfig):
            return result
        reasons.append(result.reason if len(ops) == 1 else f"{type(op).__name__}: {result.reason}")
    return Decline("; ".join(reasons))


def _open_shape(node: ir.Node) -> str | None:
    """Why ``node`` touches an open-shaped or empty tensor (None if it doesn't).

    A transaction's buffer descriptors are fixed at compile time, so every NPU operand needs a
    static shape; graph.load leaves a shape open only where it follows from run-time data.
    """
    for value in (*node.inputs, *node.outputs):
        if value is None or (not value.uses() and not value.is_graph_output()):
            continue  # absent, or an optional output nobody reads
        if value.const_value is not None:
            continue  # a parameter, not data: an empty one (Resize's roi) means "not given"
        shape = value.shape
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            producer = value.producer()
            if producer is None:  # a graph input: the user can bind it
                return (
                    f"tensor {value.name!r} has the symbolic shape {shape}; NPU programs need "
                    "static shapes: bind its dims (--shape / --dims)"
                )
            return (
                f"tensor {value.name!r} has a shape known only at run time (computed by "
                f"{producer.name} from run-time data); NPU programs need static shapes"
            )
        if 0 in shape:
            return f"tensor {value.name!r} is empty (shape {list(shape)}): nothing to compute"
    return None


def support(node: ir.Node) -> str | None:
    """None when some operator takes ``node``, else the reason (for ``graph.partition``)."""
    result = match(node)
    return result.reason if isinstance(result, Decline) else None


def operator_for_kernel(kernel_id: int) -> Operator:
    """The registered operator whose kernel id is ``kernel_id`` (KeyError if none)."""
    return _BY_KERNEL[kernel_id]


def kernels() -> dict[int, Kernel]:
    """``kernel_id -> kernel(record, operands) -> outputs`` for the emulator's overlay."""
    return {kid: op.kernel for kid, op in sorted(_BY_KERNEL.items())}


def operators() -> list[Operator]:
    """Every registered operator instance, in kernel-id order."""
    return [op for _, op in sorted(_BY_KERNEL.items())]
