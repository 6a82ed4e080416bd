"""Terminal padding: pad NPU tensors to the sizes operator kernels want, crop at the borders.

Operators declare shape granularity (:meth:`Operator.granularity` -> per-axis multiples plus
*tied* axes that must share one size, e.g. every operand of an Add and its output). This pass:

1. matches every NPU node (the operator registry, or a narrower support query) and collects
   ``(tensor, axis)`` keys: one per axis of every non-constant value (shared by its producer and
   all its consumers, so chains link up), one per *use* of a constant (so a shared initializer
   can be padded differently for different consumers);
2. unites keys with a union-find (``networkx.utils.UnionFind``) along every operator's tied axes;
3. per group chooses the smallest size that is ``>=`` the current size and a multiple of the
   ``lcm`` of every member's multiple;
4. applies it: values get the padded ``shape`` and keep their unpadded shape in
   ``metadata_props["npudispatch.real_shape"]`` (``"1,11007"``); constants are zero-padded into
   new initializers with unique names (``<name>__pad_<shape>``), the old one is dropped when
   nothing else reads it;
5. re-matches every node; if one declines its padded shapes, everything is undone, that node's
   tensors are pinned, and the plan is redone (so padding never turns an NPU node into a CPU one).

Kernels zero every output lane outside the real shape and reductions (softmax, norms) use only
the real lanes, so padded lanes never leak (see :mod:`npudispatch.operators.base`).

Scope: whole model vs. per NPU partition
----------------------------------------
Padding is decided at *NPU borders*. In a whole model (:class:`PadTerminalsPass`, the pipeline
pass) a value that a non-NPU node reads or writes (a CPU node, a zero-copy view, a node the
support query declines) is **pinned** - its shape never changes - so CPU-only nodes and the CPU
segments the dispatcher extracts see exactly the user's shapes; values crossing only NPU nodes
and the graph's own inputs/outputs are padded, and a value between two NPU partitions gets one
size satisfying both (the lcm covers every operator on the chain). On an extracted partition
(``pad_model`` of ``graph.extract(model, partition)``) every graph input/output is a copy-in/copy-out tensor, so CPU
borders are padded too (tested: the extracted partitions pad a superset of the whole-model pass).
The dispatcher plans on the whole model (``dispatch.compile``), so it uses the pipeline pass.

Dispatcher contract (copy-in / copy-out)
----------------------------------------
A graph or partition **input** whose value carries a real shape is fed by the host at the real
(user) shape: the dispatcher zero-fills the padded slot and copies the real block in (row by row
when an inner axis is padded). A graph or partition **output** carrying a real shape is cropped
on copy-out to the real shape. Its declared ONNX shape becomes the padded one (an onnx_ir Value
has one shape, and the producing operator must see it); the user's declared shape is kept in
``REAL_SHAPE_KEY`` and :func:`host_shape` returns it - that is what the session must return.
Intermediates stay padded in device memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_ir as ir

from npudispatch.errors import RewriteError
from npudispatch.graph.support import SupportQuery
from npudispatch.operators import registry
from npudispatch.operators.base import REAL_SHAPE_KEY, Decline, OpConfig, node_label, real_shape
from npudispatch.rewrites.support import npu_support

__all__ = [
    "REAL_SHAPE_KEY",
    "AxisGroup",
    "PadTerminalsPass",
    "PaddingReport",
    "host_shape",
    "pad_model",
    "real_shape",
]

# A union-find key: (value, axis) for activations, (node, input slot, axis) for constant uses.
_ValueKey = tuple[ir.Value, int]
_ConstKey = tuple[ir.Node, int, int]
_Key = _ValueKey | _ConstKey


def host_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The shape the host (user, CPU segments) sees: the real shape if padded, else the static shape."""
    real = real_shape(value)
    if real is not None:
        return real
    if value.shape is None or not value.shape.is_static():
        return None
    return tuple(int(d) for d in value.shape)


@dataclass
class AxisGroup:
    """Tied ``(tensor, axis)`` keys padded to one size.

    ``members`` are readable labels (``"value[axis]"`` or ``"node.in<slot>[axis]"`` for constant
    uses); ``multiple`` is the lcm of every member's multiple; ``target`` the chosen size;
    ``skipped`` says why the group kept its size although ``target`` differs (a pinned member).
    """

    members: list[str]
    real: int
    current: int
    multiple: int
    target: int
    skipped: str | None = None

    @property
    def padded(self) -> bool:
        """Whether the group's size changes."""
        return self.skipped is None and self.target != self.current


@dataclass
class PaddingReport:
    """What a padding run did: groups, padded values (real -> padded), new constants, pins."""

    groups: list[AxisGroup] = field(default_factory=list)
    padded_values: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    new_initializers: list[str] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)  # value name -> why its shape is fixed
    retries: int = 0

    @property
    def modified(self) -> bool:
        return bool(self.padded_values or self.new_initializers)

    @property
    def skipped(self) -> list[AxisGroup]:
        """Groups that wanted padding but contain a pinned tensor."""
        return [g for g in self.groups if g.skipped is not None]


# ---- planning -------------------------------------------------------------------------------


def _static(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or not value.shape.is_static():
        return None
    return tuple(int(d) for d in value.shape)


def _is_const(value: ir.Value) -> bool:
    return value.const_value is not None


def _label(key: _Key) -> str:
    if len(key) == 2:
        v, axis = key  # type: ignore[misc]
        return f"{v.name}[{axis}]"
    node, slot, axis = key  # type: ignore[misc]
    return f"{node_label(node)}.in{slot}[{axis}]"


@dataclass
class _Plan:
    groups: list[AxisGroup]
    value_shapes: dict[ir.Value, tuple[int, ...]]  # new shapes of padded values
    const_shapes: dict[tuple[ir.Node, int], tuple[int, ...]]  # new shapes of constant uses


def _key_size(key: _Key) -> tuple[int, int]:
    """``(current, real)`` size of a key's axis."""
    if len(key) == 2:
        v, axis = key  # type: ignore[misc]
    else:
        node, slot, axis = key  # type: ignore[misc]
        v = node.inputs[slot]
    shape = _static(v)
    assert shape is not None
    real = real_shape(v) or shape
    return shape[axis], real[axis]


def _plan(nodes: list[tuple[ir.Node, OpConfig]], pinned: Mapping[ir.Value, str]) -> _Plan:
    uf = nx.utils.UnionFind()
    multiple: dict[_Key, int] = {}
    pin: dict[_Key, str] = {}

    def key_of(node: ir.Node, kind: str, idx: int, axis: int) -> _Key | None:
        values = node.inputs if kind == "in" else node.outputs
        v = values[idx] if idx < len(values) else None
        if v is None or _static(v) is None:
            return None
        if kind == "in" and _is_const(v):
            return (node, idx, axis)
        return (v, axis)

    for node, cfg in nodes:
        cons = cfg.operator.granularity(cfg)
        for kind, values, rules in (
            ("in", node.inputs, cons.inputs),
            ("out", node.outputs, cons.outputs),
        ):
            for idx, v in enumerate(values):
                shape = _static(v) if v is not None else None
                if shape is None:
                    continue
                rule = rules[idx] if idx < len(rules) else None
                for axis in range(len(shape)):
                    key = key_of(node, kind, idx, axis)
                    assert key is not None
                    uf[key]  # register, even if untied
                    if rule is not None:
                        multiple[key] = math.lcm(multiple.get(key, 1), int(rule[axis]))
                    elif len(key) == 2:
                        pin.setdefault(
                            key,
                            f"{cfg.op_type} node '{cfg.node_name}' needs the exact shape of "
                            f"{kind}put {idx}",
                        )
                    if len(key) == 2 and key[0] in pinned:  # type: ignore[index]
                        pin.setdefault(key, pinned[key[0]])  # type: ignore[index]
        for tie in cons.tied:
            keys = [k for k in (key_of(node, kind, i, ax) for kind, i, ax in tie) if k is not None]
            if len(keys) > 1:
                uf.union(*keys)

    groups: list[AxisGroup] = []
    value_shapes: dict[ir.Value, list[int]] = {}
    const_shapes: dict[tuple[ir.Node, int], list[int]] = {}
    for members in uf.to_sets():
        keys = sorted(members, key=_label)
        sizes = [_key_size(k) for k in keys]
        currents = {c for c, _ in sizes}
        reals = {r for _, r in sizes}
        mult = math.lcm(*(multiple.get(k, 1) for k in keys))
        current = max(currents)
        target = -(-current // mult) * mult
        if len(currents) == 1 and target == current:
            continue
        group = AxisGroup([_label(k) for k in keys], max(reals), current, mult, target)
        groups.append(group)
        if len(reals) > 1:
            group.skipped = f"tied axes have different real sizes {sorted(reals)}"
            continue
        if current == 1:
            # A size-1 axis broadcasts in elementwise consumers; padded, its lanes would be
            # read as real data (Mul(x[..., 8], scale[1]) became x * [s, pad, pad, ...]).
            group.skipped = "size-1 axes broadcast: padding one would change what readers compute"
            continue
        stuck = [(k, pin[k]) for k in keys if k in pin and _key_size(k)[0] != target]
        if stuck:
            group.skipped = f"{_label(stuck[0][0])} is pinned: {stuck[0][1]}"
            continue
        for k in keys:
            if len(k) == 2:
                v, axis = k  # type: ignore[misc]
                value_shapes.setdefault(v, list(_static(v)))[axis] = target  # type: ignore[arg-type]
            else:
                node, slot, axis = k  # type: ignore[misc]
                v = node.inputs[slot]
                const_shapes.setdefault((node, slot), list(_static(v)))[axis] = target  # type: ignore[arg-type]
    return _Plan(
        groups,
        {v: tuple(s) for v, s in value_shapes.items() if tuple(s) != _static(v)},
        {k: tuple(s) for k, s in const_shapes.items() if tuple(s) != _static(k[0].inputs[k[1]])},
    )


# ---- applying / undoing -----------------------------------------------------------------------


@dataclass
class _Undo:
    shapes: list[tuple[ir.Value, ir.Shape | None, str | None]] = field(default_factory=list)
    inputs: list[tuple[ir.Node, int, ir.Value]] = field(default_factory=list)
    added: list[ir.Value] = field(default_factory=list)
    dropped: list[ir.Value] = field(default_factory=list)

    def run(self, graph: ir.Graph) -> None:
        for node, slot, old in reversed(self.inputs):
            node.replace_input_with(slot, old)
        for v in self.added:
            graph.initializers.pop(v.name, None)
        for v in self.dropped:
            graph.register_initializer(v)
        for v, shape, meta in reversed(self.shapes):
            v.shape = shape
            if meta is None:
                v.metadata_props.pop(REAL_SHAPE_KEY, None)
            else:
                v.metadata_props[REAL_SHAPE_KEY] = meta


def _set_shape(v: ir.Value, shape: tuple[int, ...], undo: _Undo) -> None:
    undo.shapes.append((v, v.shape, v.metadata_props.get(REAL_SHAPE_KEY)))
    if REAL_SHAPE_KEY not in v.metadata_props:  # the first padding records the user's shape
        v.metadata_props[REAL_SHAPE_KEY] = ",".join(str(d) for d in _static(v))  # type: ignore[union-attr]
    v.shape = ir.Shape(shape)


def _unique_name(graph: ir.Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    return name


def _padded_const(
    graph: ir.Graph, v: ir.Value, shape: tuple[int, ...], cache: dict, undo: _Undo
) -> ir.Value:
    """A zero-padded initializer copy of constant ``v`` with ``shape`` (one per (v, shape))."""
    if (v, shape) in cache:
        return cache[(v, shape)]
    arr = np.asarray(v.const_value.numpy())  # type: ignore[union-attr]
    padded = np.pad(arr, [(0, t - s) for s, t in zip(arr.shape, shape)])
    base = v.name or "const"
    name = _unique_name(graph, f"{base}__pad_{'x'.join(map(str, shape))}")
    new = ir.Value(
        name=name,
        type=ir.TensorType(v.dtype),  # type: ignore[arg-type]
        shape=ir.Shape(shape),
        const_value=ir.tensor(padded, name=name),
    )
    new.metadata_props[REAL_SHAPE_KEY] = ",".join(str(d) for d in (real_shape(v) or arr.shape))
    graph.register_initializer(new)
    undo.added.append(new)
    cache[(v, shape)] = new
    return new


def _apply(graph: ir.Graph, plan: _Plan) -> _Undo:
    undo = _Undo()
    for v, shape in plan.value_shapes.items():
        _set_shape(v, shape, undo)
    cache: dict = {}
    touched: set[ir.Value] = set()
    for (node, slot), shape in plan.const_shapes.items():
        old = node.inputs[slot]
        assert old is not None
        new = _padded_const(graph, old, shape, cache, undo)
        undo.inputs.append((node, slot, old))
        node.replace_input_with(slot, new)
        touched.add(old)
    for old in touched:  # drop initializers nobody reads any more
        if (
            old.is_initializer()
            and not old.uses()
            and not old.is_graph_input()
            and not old.is_graph_output()
            and graph.initializers.get(old.name) is old
        ):
            graph.initializers.pop(old.name)
            undo.dropped.append(old)
    return undo


# ---- entry points ---------------------------------------------------------------------------


def pad_model(model: ir.Model, support: SupportQuery | None = None) -> PaddingReport:
    """Pad every NPU node of ``model``'s main graph in place (see the module docstring).

    ``support``: the NPU support query (default :func:`~npudispatch.rewrites.support.npu_support`),
    or a narrower one. Only NPU nodes an operator runs are padded: zero-copy views are NPU nodes
    too, but they pin their tensors (a view cannot change the layout of the data it views). Raises :class:`RewriteError` if the plan cannot be made to
    keep every NPU node matched.
    """
    graph = model.graph
    query = support or npu_support
    npu: list[ir.Node] = []
    for node in graph:
        if query(node) is None and isinstance(registry.match(node), OpConfig):
            npu.append(node)
    members = set(npu)
    pinned: dict[ir.Value, str] = {}
    for node in graph:
        if node in members:
            continue
        why = f"read or written by non-NPU node '{node_label(node)}' ({node.op_type})"
        for v in (*node.inputs, *node.outputs):
            if v is not None:
                pinned.setdefault(v, why)
    report = PaddingReport()
    for attempt in range(len(npu) + 1):
        configs = []
        for node in npu:
            cfg = registry.match(node)
            if isinstance(cfg, Decline):  # only possible after a failed attempt was undone
                raise RewriteError(f"node '{node_label(node)}' stopped matching: {cfg.reason}")
            configs.append((node, cfg))
        plan = _plan(configs, pinned)
        undo = _apply(graph, plan)
        bad = [(n, r) for n in npu if isinstance(r := registry.match(n), Decline)]
        if not bad:
            report.groups = plan.groups
            report.retries = attempt
            for v in plan.value_shapes:
                report.padded_values[v.name or ""] = (real_shape(v) or (), _static(v) or ())
            report.new_initializers = [v.name or "" for v in undo.added]
            report.pinned = {v.name or "": why for v, why in pinned.items()}
            return report
        undo.run(graph)
        for node, decline in bad:
            why = f"node '{node_label(node)}' declines padded shapes: {decline.reason}"
            for v in (*node.inputs, *node.outputs):
                if v is not None:
                    pinned.setdefault(v, why)
    raise RewriteError(
        "terminal padding found no plan that keeps every NPU node matched; "
        "report this model (operators' granularity and match disagree)"
    )


class PadTerminalsPass(ir.passes.InPlacePass):
    """onnx_ir in-place pass wrapping :func:`pad_model`; idempotent (second run: no change).

    ``report`` holds the last run's :class:`PaddingReport`.
    """

    def __init__(self, support: SupportQuery | None = None) -> None:
        super().__init__()
        self.support = support
        self.report: PaddingReport | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = pad_model(model, self.support)
        return ir.passes.PassResult(model, self.report.modified)
