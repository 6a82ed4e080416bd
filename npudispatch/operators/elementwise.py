"""Add, Sub, Mul, Div, Max, Min and Where with ONNX multidirectional (numpy) broadcasting,
float32 and bfloat16.

Broadcasting happens in the kernel, not in the DMA: each operand is streamed once at its own size
(a [1,1,N] bias is N elements on the wire, not M·N) and the core broadcasts from local memory,
which is what keeps DDR traffic minimal. A constant operand (initializer) travels in the const
region. Kernel math: operands rounded to bf16, float32 arithmetic, result rounded to bf16.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    Operator,
    ShapeConstraints,
    TensorSpec,
    check_node_kind,
    const_array,
    node_config,
    op_label,
    opset_version,
    tensor_spec,
)
from npudispatch.operators.dtypes import F32, FLOAT_DTYPES, store, to_compute

LANES = 8  # bf16 vector lanes the padding pass should round a broadcast-free last axis to


def match_float_node(
    op: Operator,
    node: ir.Node,
    n_inputs: tuple[int, int],
    *,
    const_inputs: tuple[int, ...] = (),
    unnamed_output: Callable[[int, list[TensorSpec | None]], TensorSpec] | None = None,
    omit_trailing_unnamed: bool = False,
) -> OpConfig:
    """Shared matching for float ops: op type and domain, arity, static shapes, float32/bf16
    dtypes, constant inputs. Raises a :class:`Decline` naming the first problem.

    ``const_inputs``: input indices that may be initializers (they go to ``cfg.consts``); any
    other constant input is still accepted and streamed as an activation-like operand.
    ``unnamed_output(j, input_specs)``: spec of an omitted optional output (empty name), which
    the kernel still writes (it gets a buffer nobody reads); without it such outputs decline.
    ``omit_trailing_unnamed``: nameless outputs at the end are left out of the config (the kernel
    skips them); a nameless output before a named one still declines.
    """
    if (bad := check_node_kind(op, node)) is not None:
        raise bad
    label = op_label(node)
    lo, hi = n_inputs
    if not lo <= len(node.inputs) <= hi:
        raise Decline(f"{label}: expects {lo}..{hi} inputs, got {len(node.inputs)}")
    specs: list[TensorSpec | None] = []
    consts: dict[int, np.ndarray] = {}
    for i, value in enumerate(node.inputs):
        if value is None:
            specs.append(None)
            continue
        specs.append(Decline.check(tensor_spec(value, f"{label} input {i}")))
        if i in const_inputs and (arr := const_array(value)) is not None:
            consts[i] = arr
    outputs = list(node.outputs)
    while omit_trailing_unnamed and outputs and not outputs[-1].name:
        outputs.pop()
    outs: list[TensorSpec] = []
    for j, value in enumerate(outputs):
        # An omitted optional output: nameless, or named by a loader but untyped and unread.
        omitted = not value.name or (
            value.dtype is None and not value.uses() and not value.is_graph_output()
        )
        if omitted and unnamed_output is not None:
            outs.append(unnamed_output(j, specs))
            continue
        outs.append(Decline.check(tensor_spec(value, f"{label} output {j}")))
    dtype = specs[0].dtype if specs[0] is not None else None
    if dtype not in FLOAT_DTYPES:
        raise Decline(f"{label}: dtype {dtype} not supported (float32 or bfloat16 only)")
    return node_config(op, node, specs, outs, consts=consts)


class FloatUnaryOp(Operator):
    """An op with one float32/bf16 input and one output; :meth:`match` runs
    :func:`match_float_node` and hands the specs to :meth:`match_unary`."""

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = match_float_node(self, node, (1, 1))
        x = cfg.inputs[0]
        assert x is not None
        return self.match_unary(cfg, x, cfg.outputs[0], op_label(node))

    @abstractmethod
    def match_unary(
        self, cfg: OpConfig, x: TensorSpec, y: TensorSpec, label: str
    ) -> OpConfig | Decline:
        """Op-specific checks of input ``x`` and output ``y``; ``label`` names the node."""


NUMPY_BROADCAST_SINCE = 7
"""First opset where Add/Sub/Mul/Div broadcast like numpy (before: ``broadcast``/``axis`` attrs)."""


def _legacy_broadcast(node: ir.Node, a: TensorSpec, b: TensorSpec, label: str) -> Decline | None:
    """Decline the opset <= 6 broadcasts that numpy broadcasting would get wrong.

    Before opset 7, B is broadcast onto A only with ``broadcast=1``, aligned at ``axis`` (default:
    B's shape is a suffix of A's). That equals numpy broadcasting only when B aligns at the end.
    """
    version = opset_version(node)
    legacy = (version is not None and version < NUMPY_BROADCAST_SINCE) or (
        version is None and ("broadcast" in node.attributes or "axis" in node.attributes)
    )
    if not legacy or a.shape == b.shape:
        return None
    if not node.attributes.get_int("broadcast", 0):
        return Decline(
            f"{label}: opset {version} without broadcast=1 needs equal shapes, got {a.shape} "
            f"and {b.shape}"
        )
    axis = node.attributes.get_int("axis", len(a.shape) - len(b.shape))
    if axis % max(len(a.shape), 1) != len(a.shape) - len(b.shape):
        return Decline(
            f"{label}: opset {version} broadcast of {b.shape} onto {a.shape} at axis {axis} is "
            "not numpy broadcasting; upgrade the model to opset >= 7 (onnx.version_converter)"
        )
    return None


class _Binary(Operator):
    """One class per ONNX binary arithmetic op; subclasses set ``ufunc``."""

    ufunc: ClassVar[np.ufunc]

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = match_float_node(self, node, (2, 2), const_inputs=(0, 1))
        a, b = cfg.inputs
        assert a is not None and b is not None
        label = op_label(node)
        if a.dtype != b.dtype or cfg.outputs[0].dtype != a.dtype:
            return Decline(
                f"{label}: mixed dtypes {a.dtype}, {b.dtype} -> {cfg.outputs[0].dtype} "
                "(insert a Cast; both inputs and the output must share one dtype)"
            )
        if len(cfg.consts) == 2:
            return Decline(f"{label}: both inputs are constant (fold it on the CPU instead)")
        if (legacy := _legacy_broadcast(node, a, b, label)) is not None:
            return legacy
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            return Decline(f"{label}: shapes {a.shape} and {b.shape} do not broadcast")
        if shape != cfg.outputs[0].shape:
            return Decline(
                f"{label}: output shape {cfg.outputs[0].shape} is not the broadcast shape {shape}"
            )
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return list(cfg.outputs[0].shape)

    def compute(self, inputs, outputs, dims, floats):
        a, b = inputs
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = self.ufunc(to_compute(a), to_compute(b))
        return [store(y, outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        a, b = (np.asarray(x).astype(F32) for x in inputs)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = self.ufunc(a, b)
        return [y.astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Last axis a multiple of :data:`LANES` on every tensor where it is not broadcast (1);
        every output axis tied to the operand axes (right-aligned) that are not broadcast."""

        def rule(spec: TensorSpec | None) -> tuple[int, ...] | None:
            if spec is None or not spec.shape:
                return () if spec is not None else None
            return (1,) * (len(spec.shape) - 1) + ((LANES,) if spec.shape[-1] > 1 else (1,))

        ins = tuple(None if i in cfg.consts else rule(s) for i, s in enumerate(cfg.inputs))
        out = cfg.outputs[0]
        tied: list[tuple[tuple[str, int, int], ...]] = []
        for j in range(len(out.shape)):
            back = len(out.shape) - j  # axis position counted from the right
            group = tuple(
                ("in", i, len(s.shape) - back)
                for i, s in enumerate(cfg.inputs)
                if s is not None and len(s.shape) >= back and s.shape[-back] > 1
            )
            if group:
                tied.append((*group, ("out", 0, j)))
        return ShapeConstraints(ins, (rule(out),), tuple(tied))


def same_axes(
    rank: int, perm: list[int] | None = None
) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """Ties of a one-input op whose output axis ``i`` is input axis ``perm[i]`` (identity by
    default): an op that requires exactly matching shapes keeps matching after padding."""
    order = perm if perm is not None else list(range(rank))
    return tuple((("in", 0, p), ("out", 0, i)) for i, p in enumerate(order))


class Add(_Binary):
    """ONNX Add."""

    op_type = "Add"
    kernel_id = 1
    ufunc = np.add


class Sub(_Binary):
    """ONNX Sub."""

    op_type = "Sub"
    kernel_id = 2
    ufunc = np.subtract


class Mul(_Binary):
    """ONNX Mul."""

    op_type = "Mul"
    kernel_id = 3
    ufunc = np.multiply


class Div(_Binary):
    """ONNX Div (division by zero gives ±inf/NaN like IEEE; padded lanes are zeroed)."""

    op_type = "Div"
    kernel_id = 4
    ufunc = np.divide


class Max(_Binary):
    """ONNX Max with exactly two inputs (NaN propagates, like onnxruntime)."""

    op_type = "Max"
    kernel_id = 5
    ufunc = np.maximum


class Min(_Binary):
    """ONNX Min with exactly two inputs (NaN propagates, like onnxruntime)."""

    op_type = "Min"
    kernel_id = 6
    ufunc = np.minimum


WIRE_BOOL = np.dtype(np.uint8)
"""How a bool tensor travels: one byte per element, 0 or 1 (numpy's bool layout)."""


class Where(_Binary):
    """ONNX Where(condition, X, Y): bool condition, float32/bf16 X and Y, all three broadcast.

    The condition is 1 byte per element on the wire; its spec says uint8 (the kernel reads
    ``!= 0``) because records carry no bool dtype code. Any input but not all may be a constant
    (masks often are); constants travel in the const region.
    """

    op_type = "Where"
    kernel_id = 7

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := check_node_kind(self, node)) is not None:
            return bad
        label = op_label(node)
        if len(node.inputs) != 3 or len(node.outputs) != 1:
            return Decline(f"{label}: expects 3 inputs and 1 output")
        specs: list[TensorSpec] = []
        consts: dict[int, np.ndarray] = {}
        for i, value in enumerate(node.inputs):
            spec = Decline.check(tensor_spec(value, f"{label} input {i}"))
            if (arr := const_array(value)) is not None:
                consts[i] = arr
            specs.append(spec)
        out = Decline.check(tensor_spec(node.outputs[0], f"{label} output 0"))
        cond, x, y = specs
        if cond.dtype != np.dtype(bool):
            return Decline(f"{label}: condition dtype {cond.dtype} is not bool")
        if x.dtype not in FLOAT_DTYPES or not x.dtype == y.dtype == out.dtype:
            return Decline(
                f"{label}: X/Y/output dtypes {x.dtype}, {y.dtype} -> {out.dtype} (float32 or "
                "bfloat16, all the same; insert a Cast)"
            )
        if len(consts) == 3:
            return Decline(f"{label}: every input is constant (fold it on the CPU instead)")
        try:
            shape = np.broadcast_shapes(cond.shape, x.shape, y.shape)
        except ValueError:
            return Decline(f"{label}: shapes {cond.shape}, {x.shape}, {y.shape} do not broadcast")
        if shape != out.shape:
            return Decline(f"{label}: output shape {out.shape} is not the broadcast shape {shape}")
        wire = TensorSpec(cond.shape, WIRE_BOOL, cond.real_shape)
        if 0 in consts:
            consts[0] = consts[0].astype(WIRE_BOOL)
        return node_config(self, node, [wire, x, y], [out], consts=consts)

    def compute(self, inputs, outputs, dims, floats):
        cond, x, y = inputs
        return [store(np.where(cond != 0, to_compute(x), to_compute(y)), outputs[0].dtype)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        cond, x, y = inputs
        picked = np.where(np.asarray(cond).astype(bool), np.asarray(x), np.asarray(y))
        return [picked.astype(cfg.outputs[0].dtype)]
