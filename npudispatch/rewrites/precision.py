"""Precision: float32 models compute in bf16 on the NPU, with casts only at NPU-partition borders.

For every NPU partition (``npudispatch.graph.partition`` with the operator registry's support,
zero-copy views included) the pass:

* decides per node whether it can run in bf16: it temporarily gives the node's float32 inputs and
  outputs the bf16 type (float32 constants as bf16 copies) and asks ``registry.match``; if the
  op declines bf16 constants (e.g. scales an op needs in float32) it retries with the constants
  kept float32; if it still declines, the node stays float32 (casts bridge it, reported);
* converts float32 values that are produced and consumed only by bf16 nodes in place (same
  name, half the bytes); float32 constants read by bf16 nodes become bf16 initializers
  (``<name>__bf16``) - no Cast node, converted once at compile time;
* inserts ``Cast(to=BFLOAT16)`` on float32 values entering the partition (graph inputs, CPU
  results) and ``Cast(to=FLOAT)`` on values leaving it (graph outputs, values read by CPU nodes
  or other partitions). The float32 value keeps its name, so graph outputs and CPU consumers are
  untouched; the bf16 twin is ``<name>__bf16``. Cast is an NPU operator, so the casts run inside
  the partition (partition count unchanged) and the host moves float32 data as before.

Inserted casts carry ``metadata_props["npudispatch.precision"] = "boundary"``; the pass never
converts them again, so it is idempotent (a second run reports ``modified=False``).

Tolerance policy (bf16 NPU compute vs float32 onnxruntime)
----------------------------------------------------------
(Models compiled with ``bf16=False`` compute in float32 - no rounding to budget: compare them
with float32 tolerances, docs/numerics.md §1.1.)
bf16 keeps 8 significant bits: unit roundoff ``U = 2**-8`` (3.9e-3). Kernels round operands to
bf16, compute in float32 and round the result to bf16 (``operators.dtypes``), so each op adds a
few ``U`` of *relative* error. Budgets per op, in units of U (:data:`BUDGETS`):

=====================================================  ======  ==========================
family                                                 budget  why
=====================================================  ======  ==========================
Cast                                                   1       one rounding
Add Sub Mul Div Sigmoid Silu Gelu (elementwise)        3       operand + result rounding
Softmax                                                4       + exp, row sum
LRN                                                    4       + window sum of squares, power
LayerNormalization, (Skip)SimplifiedLayerNormalization 6       row statistics, rsqrt, scale
MatMul Gemm MatMulBias MatMulNBits QMatMul             4       operand + result rounding
Conv ConvTranspose FusedConv FusedConvTranspose        4       like matmul (dot products)
AveragePool GlobalAveragePool                          3       operand + result rounding
MaxPool GlobalMaxPool                                  1       one rounding
HardSigmoid HardSwish LeakyRelu PRelu Elu Selu         3       operand + result rounding
BatchNormalization (folded multiply-add)               3       operand + result rounding
Resize Upsample                                        3       weighted taps (nearest: exact)
Clip                                                   1       one rounding
GroupQueryAttention MultiHeadAttention Attention       8       2 matmuls + softmax (+ rope)
RotaryEmbedding                                        3       operand + result rounding
Transpose, views, Gather, integer ops, CPU ops         0       exact data movement / fp32
=====================================================  ======  ==========================

* ``rtol = U * sqrt(sum of budget**2 over the ops on the path)``: independent roundings add in
  quadrature (one elementwise op: 1.2e-2; a decoder MLP of ~6 ops: ~4e-2).
* ``atol = rtol * scale`` for values near zero, where ``scale`` is the typical magnitude of the
  operands (1 for unit-variance test data). **Matmuls** sum ``K`` products, each carrying the
  operands' rounding error: the absolute error grows like ``sqrt(K)`` for random-sign data
  (``K`` in the worst case) while results grow like ``sqrt(K)`` too, so the relative budget is
  K-independent but ``atol`` scales with ``sqrt(K)``: pass ``k`` (largest reduction length) and
  :func:`tolerance_for` multiplies ``atol`` by ``sqrt(k)``. Float32 accumulation error
  (``K * 2**-24``) is negligible below K ~ 1e5.
* Compare with :meth:`Tolerance.assert_close` / :meth:`Tolerance.close`:
  ``|actual - expected| <= atol + rtol * |expected|`` elementwise, NaN/inf must agree.

``npudispatch run --check`` should use ``tolerance_for_model(model)`` (op types of the NPU nodes
and their largest K) scaled by the inputs' RMS magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import ml_dtypes
import networkx as nx
import numpy as np
import onnx_ir as ir

from npudispatch import graph as graph_layer
from npudispatch.domains import is_onnx_domain
from npudispatch.errors import RewriteError
from npudispatch.graph.support import SupportQuery
from npudispatch.operators import registry
from npudispatch.operators.base import Decline, node_label
from npudispatch.rewrites.aliasing import can_be_view, is_view
from npudispatch.rewrites.support import npu_support

__all__ = [
    "BF16_UNIT_ROUNDOFF",
    "BOUNDARY_KEY",
    "BUDGETS",
    "PrecisionPass",
    "PrecisionReport",
    "Tolerance",
    "convert_to_bf16",
    "npu_support",
    "tolerance_for",
    "tolerance_for_model",
    "tolerance_for_output",
]

BOUNDARY_KEY = "npudispatch.precision"
BOUNDARY = "boundary"
F32, BF16 = ir.DataType.FLOAT, ir.DataType.BFLOAT16

BF16_UNIT_ROUNDOFF = 2.0**-8

_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Sigmoid", "Silu", "Gelu")
_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
MATMUL_FAMILY = frozenset({"MatMul", "Gemm", "MatMulBias", "MatMulNBits", "QMatMul"})
_CONV_FAMILY = ("Conv", "ConvTranspose", "FusedConv", "FusedConvTranspose")
_POOLS_AVG = ("AveragePool", "GlobalAveragePool")
_POOLS_MAX = ("MaxPool", "GlobalMaxPool")
_CNN_LANEWISE = ("HardSigmoid", "HardSwish", "LeakyRelu", "PRelu", "Elu", "Selu")
_CNN_WEIGHTED = ("BatchNormalization", "Resize", "Upsample")
# q·k and p·v dot products (4 each), the streaming softmax (4), rotary on q and k (3), in quadrature
_ATTENTION = ("GroupQueryAttention", "MultiHeadAttention", "Attention")
# Rounded operand through a transcendental function, rounded result (Exp amplifies the operand's
# relative error by |x|: 3 U holds for |x| up to about 4, the range of activations and logits).
_UNARY_MATH = ("Exp", "Log", "Tanh", "Erf", "Sqrt", "Reciprocal", "Sin", "Cos", "Softplus", "Pow")

#: Error budget per op type in units of :data:`BF16_UNIT_ROUNDOFF` (absent = 0: exact / float32).
BUDGETS: dict[str, float] = {
    "Cast": 1.0,
    **dict.fromkeys(_ELEMENTWISE, 3.0),
    "Softmax": 4.0,
    **dict.fromkeys(_NORMS, 6.0),
    "LRN": 4.0,
    **dict.fromkeys(MATMUL_FAMILY, 4.0),
    **dict.fromkeys(_CONV_FAMILY, 4.0),
    **dict.fromkeys(_POOLS_AVG, 3.0),
    **dict.fromkeys(_POOLS_MAX, 1.0),
    **dict.fromkeys(_CNN_LANEWISE, 3.0),
    **dict.fromkeys(_CNN_WEIGHTED, 3.0),
    **dict.fromkeys(_UNARY_MATH, 3.0),
    "Clip": 1.0,
    **dict.fromkeys(_ATTENTION, 8.0),
    "RotaryEmbedding": 3.0,
}


class Tolerance(NamedTuple):
    """``(rtol, atol)`` of the tolerance policy (unpacks like a tuple)."""

    rtol: float
    atol: float

    def scaled(self, scale: float) -> Tolerance:
        """``atol`` for operands of typical magnitude ``scale`` instead of 1."""
        return Tolerance(self.rtol, self.atol * float(scale))

    def close(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        """Whether every element is within tolerance (NaN where expected is NaN)."""
        a = np.asarray(actual, np.float64)
        e = np.asarray(expected, np.float64)
        return a.shape == e.shape and bool(
            np.allclose(a, e, rtol=self.rtol, atol=self.atol, equal_nan=True)
        )

    def assert_close(self, actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
        """``numpy.testing.assert_allclose`` with this tolerance (message names ``what``)."""
        np.testing.assert_allclose(
            np.asarray(actual, np.float64),
            np.asarray(expected, np.float64),
            rtol=self.rtol,
            atol=self.atol,
            equal_nan=True,
            err_msg=f"{what} outside the bf16 tolerance policy {self}",
        )


def tolerance_for(op_types: Iterable[str], *, k: int | None = None) -> Tolerance:
    """Tolerance for comparing bf16 NPU results with float32 onnxruntime (module docstring).

    ``op_types``: the op type of every node on the compared path (repeats count). ``k``: the
    largest matmul reduction length on the path (scales ``atol`` by ``sqrt(k)``).
    """
    ops = list(op_types)
    budget = math.sqrt(sum(BUDGETS.get(op, 0.0) ** 2 for op in ops))
    rtol = max(budget, 1.0) * BF16_UNIT_ROUNDOFF
    atol = rtol
    if k is not None and any(op in MATMUL_FAMILY for op in ops):
        atol *= math.sqrt(max(k, 1))
    return Tolerance(rtol, atol)


def tolerance_for_model(model: ir.Model, support: SupportQuery | None = None) -> Tolerance:
    """:func:`tolerance_for` over the model's NPU nodes, ``k`` = their largest matmul K."""
    query = support or npu_support
    ops, k = [], None
    for node in model.graph:
        if query(node) is not None:
            continue
        ops.append(node.op_type)
        if node.op_type in MATMUL_FAMILY:
            cfg = registry.match(node)
            if not isinstance(cfg, Decline) and "K" in cfg.extra:
                k = max(k or 0, int(cfg.extra["K"]))
    return tolerance_for(ops, k=k)


def tolerance_for_output(
    model: ir.Model, output: str, support: SupportQuery | None = None
) -> Tolerance:
    """Tolerance for one graph output, relative to that output's own scale.

    Budgets only the NPU ops on the output's path (its producer and every ancestor the support
    query puts on the NPU), with no ``sqrt(K)`` factor: with float32 accumulation, bf16 rounding
    of a dot product's terms gives an error proportional to the result's magnitude. Scale the
    result with ``.scaled(rms(reference output))`` before comparing.
    """
    query = support or npu_support
    digraph = graph_layer.to_networkx(model)
    value = next((v for v in model.graph.outputs if v.name == output), None)
    if value is None:
        known = [v.name for v in model.graph.outputs]
        raise KeyError(f"model has no graph output {output!r} (outputs: {known})")
    producer = value.producer()
    path = [] if producer is None else [producer, *nx.ancestors(digraph, producer)]
    return tolerance_for([n.op_type for n in path if query(n) is None])


# ---- the pass -------------------------------------------------------------------------------


def _view(node: ir.Node) -> bool:
    """A zero-copy view, marked or not yet: the pipeline marks views after this pass, and a view
    left out of its partition would split it and get float32 casts on both sides."""
    return is_view(node) or can_be_view(node)


@dataclass
class PrecisionReport:
    """Per run: casts inserted, values/constants converted, nodes kept in float32 (with reason)."""

    casts: list[str] = field(default_factory=list)
    converted_values: list[str] = field(default_factory=list)
    converted_constants: list[str] = field(default_factory=list)
    kept_float32: dict[str, str] = field(default_factory=dict)
    folded_round_trips: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(
            self.casts
            or self.converted_values
            or self.converted_constants
            or self.folded_round_trips
        )


def _bf16_const(value: ir.Value, name: str) -> ir.Value:
    arr = np.asarray(value.const_value.numpy(), np.float32).astype(ml_dtypes.bfloat16)  # type: ignore[union-attr]
    new = ir.Value(
        name=name,
        type=ir.TensorType(BF16),
        shape=ir.Shape(arr.shape),
        const_value=ir.tensor(arr, name=name),
        metadata_props=dict(value.metadata_props),
    )
    return new


def _statistic_outputs(node: ir.Node) -> list[ir.Value]:
    """A norm's mean / inverse-std outputs: typed by its ``stash_type`` (float32), not by ``T``.

    They stay float32 when the node computes in bf16 (onnx shape inference says so too; casting
    them would be undone by the next inference and the fixpoint would never settle).
    """
    ops = registry.candidates(node.domain, node.op_type)
    kinds: tuple[str, ...] = getattr(ops[0], "output_kinds", ()) if ops else ()
    return [v for v, kind in zip(node.outputs, kinds) if kind in ("mean", "inv_std")]


def _trial(node: ir.Node, convert_consts: bool) -> str | None:
    """Whether ``node`` matches with its float32 tensors as bf16 (None) or why not."""
    saved_types: list[tuple[ir.Value, ir.TypeProtocol | None]] = []
    swapped: list[tuple[int, ir.Value]] = []
    try:
        for slot, v in enumerate(node.inputs):
            if v is None or v.dtype != F32:
                continue
            if v.const_value is not None:
                if convert_consts:
                    swapped.append((slot, v))
                    node.replace_input_with(slot, _bf16_const(v, f"{v.name}__trial"))
                continue
            saved_types.append((v, v.type))
            v.type = ir.TensorType(BF16)
        stats = _statistic_outputs(node)
        for v in node.outputs:
            if v.dtype == F32 and v not in stats:
                saved_types.append((v, v.type))
                v.type = ir.TensorType(BF16)
        result = registry.match(node)
        return result.reason if isinstance(result, Decline) else None
    finally:
        for v, t in saved_types:
            v.type = t
        for slot, v in swapped:
            node.replace_input_with(slot, v)


class _Namer:
    def __init__(self, graph: ir.Graph) -> None:
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        self.used |= {v.name for n in graph for v in n.outputs}
        self.used |= {n.name for n in graph}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _cast(value: ir.Value, to: ir.DataType, name: str, out_name: str) -> ir.Node:
    node = ir.node("Cast", [value], {"to": to}, name=name, metadata_props={BOUNDARY_KEY: BOUNDARY})
    out = node.outputs[0]
    out.name, out.type = out_name, ir.TensorType(to)
    out.shape = ir.Shape(value.shape) if value.shape is not None else None
    out.metadata_props.update(value.metadata_props)
    return node


def _convert_partition(
    graph: ir.Graph, part: graph_layer.Partition, namer: _Namer, report: PrecisionReport
) -> list[ir.Node]:
    """Convert one NPU partition; returns the nodes that must still match (bf16 nodes, casts)."""
    bf16_nodes: dict[ir.Node, bool] = {}  # node -> convert its float constants
    compute = [n for n in part.nodes if n.metadata_props.get(BOUNDARY_KEY) != BOUNDARY]
    if all(_view(n) for n in compute):
        return []  # views only: nothing computes, and the dispatcher runs them on the CPU
    for node in compute:
        floats = [v for v in (*node.inputs, *node.outputs) if v is not None and v.dtype == F32]
        if not floats:
            continue
        if _view(node):
            src = node.inputs[0]
            if src is not None and src.dtype == F32 and src.const_value is None:
                bf16_nodes[node] = False  # data input only; shape inputs are int64
            elif src is not None and src.const_value is not None:
                # A view of a float32 constant stays float32 (the dispatcher cannot alias a
                # constant; it runs such a view on the CPU); its output enters with a cast.
                report.kept_float32[node_label(node)] = "view of a constant"
            continue
        why = _trial(node, True)
        if why is None:
            bf16_nodes[node] = True
        elif _trial(node, False) is None:
            bf16_nodes[node] = False
        else:
            report.kept_float32[node_label(node)] = why

    order = {n: i for i, n in enumerate(graph)}
    values: dict[ir.Value, None] = {}
    for node in bf16_nodes:
        for v in (*node.inputs, *node.outputs):
            if v is not None and v.dtype == F32:
                values.setdefault(v)
    keep_f32 = {v for node in bf16_nodes for v in _statistic_outputs(node)}
    const_cache: dict[ir.Value, ir.Value] = {}
    checked: list[ir.Node] = [n for n in bf16_nodes if not _view(n)]
    for v in values:
        uses = [(n, i) for n, i in v.uses() if n in bf16_nodes]
        if v.const_value is not None:
            uses = [(n, i) for n, i in uses if bf16_nodes[n] and not _view(n)]
            if not uses:
                continue
            if v not in const_cache:
                new = _bf16_const(v, namer(f"{v.name}__bf16"))
                graph.register_initializer(new)
                const_cache[v] = new
                report.converted_constants.append(new.name or "")
            for n, i in uses:
                n.replace_input_with(i, const_cache[v])
            if not v.uses() and v.is_initializer() and not v.is_graph_output():
                graph.initializers.pop(v.name or "", None)
            continue
        producer = v.producer()
        outside = [(n, i) for n, i in v.uses() if n not in bf16_nodes]
        if v in keep_f32 and not uses:
            continue  # a float32 statistic read only outside the bf16 nodes
        if producer in bf16_nodes and v not in keep_f32:
            if not outside and not v.is_graph_output():
                v.type = ir.TensorType(BF16)  # internal: converted in place
                report.converted_values.append(v.name or "")
                continue
            # Leaving the partition (or read by a float32 node): the bf16 twin is produced
            # here and Cast back to float32 under the original name.
            name = v.name or "value"
            twin_name = namer(f"{name}__bf16")
            cast = _cast(v, F32, namer(f"{name}__to_float32"), name)
            f32 = cast.outputs[0]
            v.name, v.type = twin_name, ir.TensorType(BF16)
            f32.name = name
            for n, i in outside:
                n.replace_input_with(i, f32)
            for k, out in enumerate(graph.outputs):
                if out is v:
                    graph.outputs[k] = f32
            graph.insert_after(producer, cast)  # type: ignore[arg-type]
        else:
            # Entering the partition: one Cast before its first bf16 reader.
            name = v.name or "value"
            cast = _cast(v, BF16, namer(f"{name}__to_bf16"), namer(f"{name}__bf16"))
            for n, i in uses:
                n.replace_input_with(i, cast.outputs[0])
            graph.insert_before(min((n for n, _ in uses), key=order.__getitem__), cast)
        report.casts.append(cast.name or "")
        checked.append(cast)
    return checked


def convert_to_bf16(model: ir.Model, support: SupportQuery | None = None) -> PrecisionReport:
    """Run the precision conversion on ``model`` in place (see the module docstring).

    ``support``: NPU support query (default :func:`npu_support`). Raises :class:`RewriteError`
    naming the node if a converted node or an inserted cast does not match an operator.
    """
    report = PrecisionReport()
    namer = _Namer(model.graph)
    parts = graph_layer.partition(model, support or npu_support)
    checked: list[ir.Node] = []
    for part in parts:
        if part.kind == "npu":
            checked += _convert_partition(model.graph, part, namer, report)
    for node in checked:
        result = registry.match(node)
        if isinstance(result, Decline):
            raise RewriteError(
                f"precision pass: node '{node_label(node)}' ({node.op_type}) no longer matches "
                f"an NPU operator after the bf16 conversion: {result.reason}"
            )
    report.folded_round_trips += fold_cast_round_trips(model)
    return report


def _cast_to(node: ir.Node) -> int | None:
    if node.op_type != "Cast" or not is_onnx_domain(node.domain):
        return None
    return node.attributes.get_int("to", None)


def fold_cast_round_trips(model: ir.Model) -> list[str]:
    """Remove lossless ``bf16 -> float32 -> bf16`` Cast pairs left between NPU ops.

    They appear when a node the precision pass saw on the CPU joins the NPU later (a rewrite in a
    later fixpoint step): its boundary casts then sit between two bf16 NPU ops. Widening bf16 to
    float32 and rounding back is exact, so consumers of the second cast can read the original bf16
    value. Returns the names of the folded second casts.
    """
    folded: list[str] = []
    for node in list(model.graph):
        if _cast_to(node) != BF16 or node.inputs[0] is None:
            continue
        wide = node.inputs[0]
        first = wide.producer()
        if first is None or _cast_to(first) != ir.DataType.FLOAT:
            continue
        src = first.inputs[0]
        if src is None or src.dtype != BF16 or node.outputs[0].is_graph_output():
            continue
        node.outputs[0].replace_all_uses_with(src)
        folded.append(node.name or node.outputs[0].name or "")
        model.graph.remove(node, safe=True)
        if not wide.uses() and not wide.is_graph_output():
            model.graph.remove(first, safe=True)
    return folded


class PrecisionPass(ir.passes.InPlacePass):
    """onnx_ir in-place pass wrapping :func:`convert_to_bf16`; ``report`` holds the last run's."""

    def __init__(self, support: SupportQuery | None = None) -> None:
        super().__init__()
        self.support = support
        self.report: PrecisionReport | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = convert_to_bf16(model, self.support)
        return ir.passes.PassResult(model, self.report.modified)
