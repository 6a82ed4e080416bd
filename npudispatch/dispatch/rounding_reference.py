"""The rounding-aware reference of ``run --check``: onnxruntime on the rewritten graph, float32,
with a bf16 rounding inserted wherever the NPU rounds.

:class:`RoundingReference` loads and rewrites the model as the compiler does (no padding), then
inserts the roundings (each rounding op's output, operands not already rounded, weights as
formatted; ``MatMulNBits`` dequantized as the kernel does; attention nodes as primitive ops
rounded where the kernels round inside them, :mod:`.attention_reference`), gives ``Sigmoid`` an
accurate float32 form, and adds one multiplicative jitter input per rounding point so probe runs
can move every rounding by about an ulp (``JITTER``). In mixed compute the roundings and jitters
sit on the multiply-accumulate operands only, everything else float32
(:func:`_insert_mac_rounding`). How its outputs are judged is :mod:`npudispatch.dispatch.check`'s
business.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from npudispatch import graph, opset
from npudispatch.dispatch import attention_reference, quant_check
from npudispatch.operators.matmul_nbits import ACCURACY_INT8, dequantize_nbits
from npudispatch.precision import Precision, resolve_precision
from npudispatch.rewrites import default_pipeline
from npudispatch.rewrites.precision import BUDGETS, MATMUL_FAMILY
from npudispatch.rewrites.support import npu_support

__all__ = ["JITTER", "RoundingReference"]

JITTER = 2.0**-8
"""Relative size of the probe perturbation: one bf16 unit roundoff (about one ulp)."""

_F32, _BF16 = ir.DataType.FLOAT, ir.DataType.BFLOAT16
_FLOATS = (_F32, _BF16)
_QUANTIZED = frozenset({"MatMulNBits", "QMatMul", "QLinearMatMul"})
_JITTER_PREFIX = "npudispatch.jitter."
_SERIAL = itertools.count()  # unique names for inserted nodes and values


class RoundingReference:
    """The rounding-aware reference model of a model (see the module docstring)."""

    def __init__(
        self,
        model: graph.ModelLike,
        *,
        dims: Mapping[str, int] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        bf16: bool = True,
        precision: Precision | None = None,
    ) -> None:
        from npudispatch.dispatch.ort_session import float_io, onnxruntime_session

        self.precision = resolve_precision(precision, bf16)
        m = graph.load(model, dims=dims, input_shapes=input_shapes)
        default_pipeline(pad=False, bf16=self.precision == "bf16")(m)
        self.grids = quant_check.output_grids(m)  # quantized outputs: checked in steps
        # Dequantized weights are fed as inputs: onnxruntime reads them in place instead of
        # copying them through the serialized model (three float32 copies of a 4-bit MLP).
        self.weights: dict[str, np.ndarray] = {}
        if self.precision == "mixed":
            self.jitter_shapes = _insert_mac_rounding(m, self.weights)
        else:
            self.jitter_shapes = _insert_rounding(m, self.weights, fp32=self.precision == "fp32")
        if any(n.domain == opset.DOMAIN for n in m.graph.all_nodes()):
            opset.attach_functions(m)
        for body in (m.graph, *(f.graph for f in m.functions.values())):
            _accurate_sigmoid(body)
        self.quant_jitters = quant_check.insert_quantization_jitter(m)
        m.ir_version = min(m.ir_version, graph.EXTRACT_IR_VERSION)
        # bf16 outputs the roundings left (float32 compute) as float32, labelled as the model's
        self.outputs = float_io(m)
        self.session = onnxruntime_session(m, optimize=False)

    def run(
        self, feeds: Mapping[str, np.ndarray], jitter: int | None = None, size: float = JITTER
    ) -> dict[str, Any]:
        """Outputs by name; ``jitter`` = seed of a probe run (None: the reference itself) that
        scales every rounding point by ``1 ± size`` (random signs)."""
        rng = None if jitter is None else np.random.default_rng(jitter)
        full = {k: _reference_feed(v) for k, v in feeds.items()} | self.weights
        for name, shape in self.jitter_shapes.items():
            if rng is None:
                full[name] = np.ones(shape, np.float32)
            else:
                signs = rng.integers(0, 2, size=shape) * 2 - 1
                full[name] = (1.0 + size * signs).astype(np.float32)
        full |= quant_check.quantization_jitter_feeds(self.quant_jitters, rng)
        return dict(zip(self.outputs, self.session.run(None, full)))


def _reference_feed(value: Any) -> np.ndarray:
    """A feed as the float32 reference takes it: floats (bf16 included) as float32; integer and
    boolean inputs (token ids, masks) unchanged."""
    arr = np.asarray(value)
    return arr if arr.dtype.kind in "iub" else arr.astype(np.float32)


# ---- building the reference -------------------------------------------------------------------


def _rounds(node: ir.Node) -> bool:
    """An NPU op whose kernel rounds to bf16 (data movement and views are exact)."""
    return BUDGETS.get(node.op_type, 0.0) > 0 and npu_support(node) is None


def _exact_nbits(node: ir.Node) -> bool:
    """A ``MatMulNBits`` whose kernel dequantizes the weights (``accuracy_level`` below 4); at 4
    the NPU quantizes the activations to int8 blocks exactly as onnxruntime does."""
    if node.op_type != "MatMulNBits":
        return False
    return node.attributes.get_int("accuracy_level", 0) != ACCURACY_INT8


def _insert_rounding(
    model: ir.Model, weights: dict[str, np.ndarray], *, fp32: bool = False
) -> dict[str, tuple[int, ...]]:
    """Make ``model`` float32 with bf16 rounding where the NPU rounds; returns the jitter inputs.

    ``weights`` receives the weight inputs the model now takes (dequantized, already rounded).
    ``fp32`` (float32 compute): only dequantize ``MatMulNBits`` exactly; no rounding, no jitter.
    """
    g = model.graph
    if fp32:
        for node in list(g):
            if _exact_nbits(node) and npu_support(node) is None:
                _dequantize_as_formatted(g, node, weights, set(), fp32=True)
        return {}
    _widen_bf16(model)
    rounded: set[ir.Value] = set()
    jitters: dict[str, tuple[int, ...]] = {}
    replaced: set[ir.Node] = set()  # ends of dequantized MatMulNBits: round there only
    inner: set[ir.Node] = set()  # their MatMul when a bias Add follows: no rounding between
    for node in list(g):
        if node.op_type == "MatMulNBits" and not _exact_nbits(node) and _rounds(node):
            scales = node.inputs[2]
            assert scales is not None and scales.const_value is not None
            node.replace_input_with(2, _rounded_const(g, scales))
        elif _exact_nbits(node) and _rounds(node):
            new = _dequantize_as_formatted(g, node, weights, rounded)
            replaced.add(new[-1])
            inner.update(new[:-1])
    attention = attention_reference.npu_attention_nodes(g)  # expanded below, as kernels round
    for node in list(g):
        if node in inner or not (node in replaced or _rounds(node)):
            continue
        for slot, value in enumerate(node.inputs):
            if value is None or value.dtype != _F32 or value in rounded:
                continue
            if node.op_type in _QUANTIZED and slot != 0:
                continue  # scales/zero points: the operator's weight image handles them
            if value.const_value is not None:
                node.replace_input_with(slot, _rounded_const(g, value))
                continue
            node.replace_input_with(slot, _round_value(g, node, value, None, insert_before=True))
        for value in node.outputs:
            if value.dtype != _F32 or not value.name:
                continue
            rounded.add(_round_value(g, node, value, new_jitter(jitters, value.shape)))
    attention_reference.expand_attention(g, attention, jitters, mixed=False)
    _drop_replaced_initializers(g)
    return jitters


_CONVS = frozenset({"Conv", "ConvTranspose", "FusedConv", "FusedConvTranspose"})


def _mac_operands(node: ir.Node) -> list[int]:
    """Input slots a mixed-compute kernel rounds to bf16: the multiply-accumulate operands."""
    if npu_support(node) is not None:
        return []
    if node.op_type in _CONVS or (node.op_type in MATMUL_FAMILY and node.op_type not in _QUANTIZED):
        return [0, 1]  # X/A and W/B; a bias stays float32
    if node.op_type in attention_reference.ATTENTION_OPS:
        return attention_reference.mac_entry_slots(node)
    return []


def _insert_mac_rounding(
    model: ir.Model, weights: dict[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """Mixed compute (``operators.dtypes``): float32 everywhere, with a bf16 rounding (and a jitter
    input) on every multiply-accumulate operand and bf16 copies of their float weights. A
    ``MatMulNBits`` below ``accuracy_level`` 4 becomes a MatMul on its exact float32-scaled weight
    with a rounded A; at 4 onnxruntime quantizes the float32 A to int8 exactly as the NPU does.
    A bf16 tensor of the model itself (an explicit ``Cast(to=bf16)``...) is rounded where an NPU op
    stores it, as in bf16 compute."""
    g = model.graph
    stored_bf16 = [
        (node, v)
        for node in g
        if npu_support(node) is None
        for v in node.outputs
        if v.dtype == _BF16 and v.name
    ]
    _widen_bf16(model)
    jitters: dict[str, tuple[int, ...]] = {}
    for node, value in stored_bf16:
        _round_value(g, node, value, new_jitter(jitters, value.shape))
    rounded: dict[ir.Value, ir.Value] = {}  # one rounding per value, shared by its readers
    attention = attention_reference.npu_attention_nodes(g)  # expanded below, as kernels round
    for node in list(g):
        if node.op_type == "MatMulNBits" and _exact_nbits(node) and npu_support(node) is None:
            matmul = _dequantize_as_formatted(g, node, weights, set(), fp32=True)[0]
            slots = [0]
        else:
            matmul, slots = node, _mac_operands(node)
        for slot in slots:
            value = matmul.inputs[slot] if slot < len(matmul.inputs) else None
            if value is None or value.dtype != _F32:
                continue
            if value.const_value is not None:
                matmul.replace_input_with(slot, _rounded_const(g, value))
                continue
            if value not in rounded:
                jitter = new_jitter(jitters, value.shape)
                rounded[value] = _round_value(g, matmul, value, jitter, insert_before=True)
            matmul.replace_input_with(slot, rounded[value])
    attention_reference.expand_attention(g, attention, jitters, mixed=True)
    _drop_replaced_initializers(g)
    return jitters


def new_jitter(jitters: dict[str, tuple[int, ...]], shape: ir.Shape | Sequence[int] | None) -> str:
    """Name of a new jitter input of ``shape`` (static: the compiler binds every dim), registered
    in ``jitters``; one home for the jitter inputs of every rounding point."""
    assert shape is not None and (not isinstance(shape, ir.Shape) or shape.is_static()), shape
    name = f"{_JITTER_PREFIX}{len(jitters)}"
    jitters[name] = tuple(int(d) for d in shape)
    return name


def _rounded_const(g: ir.Graph, value: ir.Value) -> ir.Value:
    """A new constant holding ``value``'s float constant rounded to bf16 (a weight as formatted)."""
    arr = np.asarray(value.const_value.numpy(), np.float32)  # type: ignore[union-attr]
    return _const(g, f"{value.name}__bf16r", _round(arr))


def _drop_replaced_initializers(g: ir.Graph) -> None:
    """Remove initializers nothing reads any more (replaced by their rounded copies)."""
    for name, init in list(g.initializers.items()):
        if not init.uses() and not init.is_graph_output() and init not in g.inputs:
            del g.initializers[name]


def _accurate_sigmoid(g: ir.Graph) -> None:
    """Each ``Sigmoid`` becomes ``Reciprocal(1 + Exp(-x))``, correct to a few float32 ulps.

    onnxruntime's CPU Sigmoid (MLAS's logistic: a rational approximation on ``x`` clamped to
    [-18, 18], plus 0.5) is accurate to ~1e-7 *absolute*: 0.5 % off at -12, 100 % at -17, and 0
    below -18, while the NPU's sigmoid is correct to bf16 *relative* precision down to 1e-38.
    A probability map of large negative logits (a detector's background) is all such values, so
    the reference takes the exact formula, which onnxruntime's Exp and Reciprocal evaluate to
    float32 relative precision over the whole range (``exp`` overflow gives the limit 0).
    """
    for node in list(g):
        if node.op_type != "Sigmoid" or node.domain not in ("", "ai.onnx"):
            continue
        (x,), (y,) = node.inputs, node.outputs
        assert x is not None
        # a Constant node, not an initializer: function bodies (FusedConv's Sigmoid) have none
        one = ir.Node("", "Constant", [], attributes=[ir.AttrFloat32("value_float", 1.0)])
        neg = ir.Node("", "Neg", [x])
        exp = ir.Node("", "Exp", [neg.outputs[0]])
        den = ir.Node("", "Add", [exp.outputs[0], one.outputs[0]])
        rec = ir.Node("", "Reciprocal", [den.outputs[0]])
        chain = [one, neg, exp, den, rec]
        for n in chain:
            n.name = f"{node.name}__npud_sigmoid_{next(_SERIAL)}"
            n.outputs[0].name = n.name
            n.outputs[0].type, n.outputs[0].shape = y.type, y.shape
        one.outputs[0].type, one.outputs[0].shape = ir.TensorType(_F32), ir.Shape([])
        g.insert_before(node, chain)
        result = rec.outputs[0]
        for use_node, slot in list(y.uses()):
            use_node.replace_input_with(slot, result)
        idx = [i for i, o in enumerate(g.outputs) if o is y]
        for i in idx:
            g.outputs[i] = result
        g.remove(node, safe=True)
        result.name = y.name


def _widen_bf16(model: ir.Model) -> None:
    """bf16 values and initializers become float32 (exactly); Cast(to=bf16) becomes a Cast to
    float whose output the caller rounds (Cast is a rounding NPU op)."""
    g = model.graph
    for name, init in list(g.initializers.items()):
        if init.dtype == _BF16 and init.const_value is not None:
            arr = np.asarray(init.const_value.numpy()).astype(np.float32)
            init.const_value = ir.tensor(arr, name=name)
            init.type = ir.TensorType(_F32)
    for node in g:
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) == _BF16.value:
            node.attributes["to"] = ir.AttrInt64("to", _F32.value)
        for value in node.outputs:
            if value.dtype == _BF16:
                value.type = ir.TensorType(_F32)
    for value in g.inputs:
        if value.dtype == _BF16:
            value.type = ir.TensorType(_F32)


def _round(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return arr.astype(ml_dtypes.bfloat16).astype(np.float32)


def _const(g: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    if name in g.initializers:
        return g.initializers[name]
    value = ir.Value(name=name, type=ir.TensorType(_F32), shape=ir.Shape(arr.shape))
    value.const_value = ir.tensor(arr, name=name)
    g.register_initializer(value)
    return value


def _round_value(
    g: ir.Graph, node: ir.Node, value: ir.Value, jitter: str | None, *, insert_before: bool = False
) -> ir.Value:
    """``value`` rounded to bf16 (times the jitter input), placed next to ``node``.

    For an output, every use and the graph-output slot move to the rounded value, which takes
    over the name so the model's outputs keep theirs.
    """
    base = value.name
    new_nodes = _rounding_nodes(g, value)
    result = new_nodes[-1].outputs[0]
    if jitter is not None:
        j = ir.Value(name=jitter, type=ir.TensorType(_F32), shape=value.shape)
        g.inputs.append(j)
        mul = ir.Node("", "Mul", [result, j], name=f"{base}__npud_jitter_{next(_SERIAL)}")
        new_nodes.append(mul)
        result = mul.outputs[0]
    for n in new_nodes:
        n.outputs[0].name = f"{base}__npud_{n.op_type.lower()}_{next(_SERIAL)}"
        n.outputs[0].shape = value.shape
        if n.outputs[0].type is None:
            n.outputs[0].type = ir.TensorType(_F32)
    if insert_before:
        g.insert_before(node, new_nodes)
        return result
    for use_node, slot in list(value.uses()):
        if use_node not in new_nodes:
            use_node.replace_input_with(slot, result)
    g.insert_after(node, new_nodes)
    if value.is_graph_output():
        idx = [i for i, o in enumerate(g.outputs) if o is value]
        for i in idx:
            g.outputs[i] = result
        value.name, result.name = f"{base}__raw", base
    return result


CAST_BF16_SINCE = 13
"""First opset whose Cast accepts bfloat16; older models round with Veltkamp's splitting."""

VELTKAMP = np.float32(2.0**16 + 1)
"""Splits a float32 (24-bit significand) into its leading 8 bits: bf16's precision."""


def _rounding_nodes(g: ir.Graph, value: ir.Value) -> list[ir.Node]:
    """Nodes rounding ``value`` to bf16, last node's output the rounded float32.

    ``Cast(bf16) -> Cast(float)`` from opset 13. Before, Cast has no bf16, so float32 arithmetic
    rounds instead (Veltkamp: ``t = x * (2**16 + 1); x_hi = t - (t - x)``, round to nearest
    with the leading 8 significant bits; ties may round away from even, and |x| > 5e33
    overflows: both far rarer than the differences the check allows).
    """
    opset = g.opset_imports.get("", g.opset_imports.get("ai.onnx", CAST_BF16_SINCE))
    if opset >= CAST_BF16_SINCE:
        to_bf16 = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", _BF16.value)])
        to_bf16.outputs[0].type = ir.TensorType(_BF16)
        back = ir.Node(
            "", "Cast", [to_bf16.outputs[0]], attributes=[ir.AttrInt64("to", _F32.value)]
        )
        nodes = [to_bf16, back]
    else:
        split = _const(g, "npudispatch.veltkamp_bf16", np.asarray(VELTKAMP))
        t = ir.Node("", "Mul", [value, split])
        u = ir.Node("", "Sub", [t.outputs[0], value])
        hi = ir.Node("", "Sub", [t.outputs[0], u.outputs[0]])
        nodes = [t, u, hi]
    for n in nodes:
        n.name = f"{value.name}__npud_round_{next(_SERIAL)}"
    return nodes


def _dequantize_as_formatted(
    g: ir.Graph,
    node: ir.Node,
    weights: dict[str, np.ndarray],
    rounded: set[ir.Value],
    *,
    fp32: bool = False,
) -> list[ir.Node]:
    """MatMulNBits -> MatMul (+ Add bias) on the bf16 weight the NPU's image holds (``fp32``: the
    exact float32 weight); the weight is a new graph input whose array goes to ``weights``;
    returns the new nodes."""
    k, n = int(node.attributes.get_int("K")), int(node.attributes.get_int("N"))
    block = int(node.attributes.get_int("block_size"))
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    consts = [None if v is None or v.const_value is None else v.const_value.numpy() for v in ins]
    scales = np.asarray(consts[2], np.float32)
    if not fp32:
        scales = _round(scales)
    w = dequantize_nbits(consts[1], scales, consts[3], k, n, block).astype(np.float32)
    if not fp32:
        w = _round(w)
    weight = ir.Value(
        name=f"{node.name}__w_bf16_{next(_SERIAL)}",
        type=ir.TensorType(_F32),
        shape=ir.Shape(w.shape),
    )
    g.inputs.append(weight)
    weights[weight.name] = np.ascontiguousarray(w)
    rounded.add(weight)
    out = node.outputs[0]
    matmul = ir.Node("", "MatMul", [ins[0], weight], name=f"{node.name}__deq")
    new = [matmul]
    result = matmul.outputs[0]
    if ins[5] is not None:
        add = ir.Node("", "Add", [result, ins[5]], name=f"{node.name}__bias")
        new.append(add)
        result.type, result.shape, result.name = out.type, out.shape, f"{out.name}__mm"
        result = add.outputs[0]
    g.insert_after(node, new)
    result.type, result.shape = out.type, out.shape
    for use_node, slot in list(out.uses()):
        use_node.replace_input_with(slot, result)
    was_output = out.is_graph_output()
    name = out.name
    if was_output:
        for i, o in enumerate(g.outputs):
            if o is out:
                g.outputs[i] = result
    g.remove(node, safe=True)
    out.name = f"{name}__nbits"
    result.name = name
    return new
