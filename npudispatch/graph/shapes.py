"""Static shapes from bound inputs: infer every tensor's type and fold shape arithmetic to a fixpoint.

Exporters leave shapes to be computed at run time (Shape -> Gather -> Concat -> Reshape, Range or
ConstantOfShape sized by an input dim, value_info holding symbolic expressions such as
``floor(width/2 - 1/2) + 1``). Once the graph inputs have static shapes, all of that is static too.
:func:`resolve_shapes` gets there in rounds:

1. onnx shape inference over the whole graph, with data propagation (standard ops);
2. a topological sweep for what it left open: custom-domain ops (``com.microsoft`` MatMulNBits,
   GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding, ...) through
   onnxruntime's symbolic shape inference, one node at a time, and standard ops whose inputs only
   became known through such a node;
3. constant folding of the shape arithmetic (:func:`fold_shape_arithmetic`, onnxscript's folder
   restricted to small integer tensors so weights are never copied).

Rounds repeat until nothing changes. Whatever is still not static afterwards depends on the data
of a tensor at run time; :func:`data_dependent_values` names the producers.

Why onnxruntime's symbolic shape inference for custom ops: it is maintained next to the kernels it
describes (the contrib-op specs change with onnxruntime releases) and covers every op the genai
model builder and the transformer optimizer emit. It runs on one node at a time here, so a node it
cannot handle (it asserts on some standard-op forms) never poisons the rest of the graph.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
from onnxscript.optimizer import fold_constants_ir

from npudispatch.domains import is_onnx_domain, normalize_domain
from npudispatch.errors import ModelError
from npudispatch.graph.folding_guards import (
    castlike_to_cast,
    hide_split_shapes,
    shield_sequence_ops,
)
from npudispatch.graph.propagation_guard import (
    GENERATOR_OPS,
    generated_elements,
    oversized_propagations,
)
from npudispatch.graph.value_types import merge_non_tensor_type, restore_map_types

__all__ = [
    "SHAPE_OPS",
    "apply_output_hints",
    "data_dependent_values",
    "fold_shape_arithmetic",
    "forget_stale_shapes",
    "is_static",
    "resolve_shapes",
]

log = logging.getLogger(__name__)

# Ops that carry shape arithmetic in exported graphs. Only these are folded, and only on small
# integer tensors: float maths is model maths, left to the fusions.
SHAPE_OPS = frozenset(
    {
        "Shape",
        "Size",
        "Gather",
        "Concat",
        "Unsqueeze",
        "Squeeze",
        "Slice",
        "Cast",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Equal",
        "Where",
        "ConstantOfShape",
        "Range",
        "Constant",
        "Identity",
        "Reshape",
        "Expand",
        "Neg",
        "Abs",
        "Max",
        "Min",
        "Mod",
        "Floor",
        "Ceil",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "Not",
        "And",
        "Or",
        "ReduceProd",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "Tile",
        "Flatten",
    }
)
# Exporters compute dims through floats too (Cast -> Div -> Floor -> Cast for ``floor(w / 2)``):
# float results this small are shape maths, never weights.
_SMALL_FLOAT_ELEMENTS = 8

# Shape tensors hold a handful of int64s; 1024 elements is far above any shape and far below weights.
SHAPE_TENSOR_LIMIT = 1024
# Initializers up to this many bytes are given to inference as data (shape constants); larger ones
# only as typed inputs, so weights are never serialized or read to infer shapes.
INFERENCE_INLINE_LIMIT = 1024
OPAQUE_DOMAIN = "npudispatch.opaque"
_MAX_ROUNDS = 16


def is_static(value: ir.Value) -> bool:
    """True when ``value`` has a dtype and a shape of non-negative integers."""
    shape = value.shape
    return (
        value.dtype is not None
        and shape is not None
        and all(isinstance(d, int) and d >= 0 for d in shape)
    )


def _is_read(value: ir.Value) -> bool:
    """False for an optional output nobody reads (onnx_ir may have named it anyway)."""
    return bool(value.uses()) or value.is_graph_output()


def _main_values(graph: ir.Graph) -> Iterator[ir.Value]:
    for node in graph:
        yield from node.outputs


def forget_stale_shapes(graph: ir.Graph) -> dict[ir.Value, ir.Shape]:
    """Drop every non-static shape on node outputs so inference re-derives it from the inputs.

    Exporters write value_info in terms of their symbolic input dims (``floor(width/2) + 1``);
    after the inputs are bound those expressions are stale, and strict inference would reject the
    conflict between them and the now static truth. Static declarations are kept: they are what
    custom-domain ops that no inference knows still rely on. Returns, per graph output whose
    shape was dropped, its declaration with anonymous dims: :func:`apply_output_hints` gives it
    back after inference to an output whose shape follows from run-time data (``SequenceAt``),
    where the declared rank is all that is known (a wrong declaration never reaches inference).
    """
    hints: dict[ir.Value, ir.Shape] = {}
    for value in _main_values(graph):
        if not _is_read(value):
            continue
        shape = value.shape
        if shape is not None and not all(isinstance(d, int) and d >= 0 for d in shape):
            if value.is_graph_output():
                hints[value] = ir.Shape(
                    [d if isinstance(d, int) and d >= 0 else None for d in shape]
                )
            value.shape = None
    return hints


def apply_output_hints(hints: dict[ir.Value, ir.Shape]) -> None:
    """Give each graph output that inference left without a shape its declared rank back."""
    for value, shape in hints.items():
        if value.shape is None:
            value.shape = shape


def resolve_shapes(model: ir.Model) -> None:
    """Infer and fold until every tensor is static or provably depends on run-time data."""
    for _ in range(_MAX_ROUNDS):
        infer_whole_graph(model)
        swept = _sweep_open_nodes(model)
        if all(is_static(v) for v in _main_values(model.graph)):
            return
        folded = fold_shape_arithmetic(model)
        if not (swept or folded):
            return


def data_dependent_values(graph: ir.Graph) -> list[tuple[ir.Value, ir.Node]]:
    """Values whose shape is still open, each with the first producer upstream that made it so.

    The producer is the node whose own inputs are all static: its output shape follows from the
    *data* of one of them (NonZero, a Reshape whose target is computed from values, ...).
    """
    origin: dict[ir.Value, ir.Node] = {}
    result = []
    for node in graph:
        open_inputs = [v for v in node.inputs if v is not None and v in origin]
        for value in node.outputs:
            if not _is_read(value) or is_static(value):
                continue
            origin[value] = origin[open_inputs[0]] if open_inputs else node
            result.append((value, origin[value]))
    return result


# --------------------------------------------------------------------------------------------
# Whole-graph onnx inference


def infer_whole_graph(model: ir.Model) -> None:
    """Run onnx shape inference (strict, data propagation) and merge inferred types by name.

    Data propagation is left out of the round when it could materialize a large constant
    (:func:`~npudispatch.graph.propagation_guard.oversized_propagations`): onnx would allocate
    ~140 bytes per element before anything could refuse the tensor.
    """
    risky = oversized_propagations(model.graph)
    if risky:
        log.debug(
            "shape inference without data propagation this round: %s",
            ", ".join(p.describe() for p in risky[:5]),
        )
    proto = _inference_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=True, data_prop=not risky
        )
    except Exception as exc:  # onnx raises InferenceError / ValidationError / RuntimeError
        raise ModelError(
            f"onnx shape inference failed: {str(exc).strip()}. Fix the node named in the "
            "message (types, shapes or attributes), or bind the input shapes with --shape / "
            "input_shapes="
        ) from exc
    found = {info.name: info for info in (*inferred.graph.value_info, *inferred.graph.output)}
    for value in _main_values(model.graph):
        info = found.get(value.name or "")
        if info is not None and info.type.HasField("tensor_type"):
            _merge_type(value, info.type)
        elif info is not None and info.type.WhichOneof("value") and value.type is None:
            merge_non_tensor_type(value, info.type)


def _merge_type(value: ir.Value, type_proto: onnx.TypeProto) -> bool:
    """Take the dtype and the (more) static shape from ``type_proto``; True if anything changed."""
    changed = False
    elem = type_proto.tensor_type.elem_type
    if elem and value.dtype is None:
        value.dtype = ir.DataType(elem)
        changed = True
    shape = ir.serde.deserialize_type_proto_for_shape(type_proto)
    current = value.shape
    if (
        shape is not None
        and (current is None or not current.is_static())
        and (current is None or shape.is_static() or len(shape) == len(current))
    ):
        changed = changed or current != shape
        value.shape = shape
    return changed


def _small_constant(value: ir.Value) -> ir.TensorProtocol | None:
    tensor = value.const_value
    if tensor is None or tensor.nbytes > INFERENCE_INLINE_LIMIT:
        return None
    return tensor


def _inference_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` for inference without copying big weights (they become typed inputs).

    Small initializers are inlined even when stored externally (they are read, a few bytes each):
    shape constants are what data propagation needs.
    """
    graph = model.graph
    out = onnx.GraphProto(name=graph.name or "main")
    out.input.extend(ir.serde.serialize_value(v) for v in graph.inputs)
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is not None:
            value.dtype = value.dtype or tensor.dtype
            value.shape = value.shape or ir.Shape(tensor.shape)
        small = _small_constant(value)
        if small is not None:
            proto = ir.serde.serialize_tensor(ir.tensor(small.numpy(), dtype=small.dtype))
            proto.name = name
            out.initializer.append(proto)
        else:
            out.input.append(ir.serde.serialize_value(value))
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in graph:
        proto = ir.serde.serialize_node(node)
        if (
            is_onnx_domain(node.domain)
            and (node.domain, node.op_type) not in functions
            and not onnx.defs.has(node.op_type)
        ):
            # DD graphs put vendor ops (MladfMatMul...) in the default domain; strict inference
            # rejects those, so they are treated like custom-domain ops: declared types are kept.
            proto.domain = OPAQUE_DOMAIN
        out.node.append(proto)
    out.output.extend(ir.serde.serialize_value(v) for v in graph.outputs)
    declared = set(graph.outputs)
    for value in _main_values(graph):
        if value not in declared and (value.dtype is not None or value.shape is not None):
            out.value_info.append(ir.serde.serialize_value(value))
    restore_map_types(out, graph)  # onnx inference needs a map input's type
    result = onnx.ModelProto(ir_version=model.ir_version, graph=out)
    for domain, version in graph.opset_imports.items():
        result.opset_import.append(onnx.helper.make_opsetid(domain, version))
    if "" not in graph.opset_imports and "ai.onnx" not in graph.opset_imports:
        # ai.onnx.ml-only models: onnx inference wants a default-domain opset to exist.
        result.opset_import.append(onnx.helper.make_opsetid("", onnx.defs.onnx_opset_version()))
    result.opset_import.append(onnx.helper.make_opsetid(OPAQUE_DOMAIN, 1))
    result.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return result


# --------------------------------------------------------------------------------------------
# Node-by-node sweep (custom-domain ops, and what depends on them)


def _sweep_open_nodes(model: ir.Model) -> bool:
    """Infer, in topological order, nodes whose inputs are known but outputs are not."""
    opsets = dict(model.graph.opset_imports)
    changed = False
    for node in model.graph:
        outputs = [v for v in node.outputs if _is_read(v)]
        if not outputs or all(is_static(v) for v in outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not all(is_static(v) for v in inputs):
            continue
        types = _infer_node(node, opsets, model.ir_version)
        for value in node.outputs:
            if value.name in types:
                changed |= _merge_type(value, types[value.name])
    return changed


def _type_proto(value: ir.Value) -> onnx.TypeProto:
    proto = ir.serde.serialize_type(ir.TensorType(value.dtype))  # type: ignore[arg-type]
    ir.serde.serialize_shape_into(proto, value.shape)  # type: ignore[arg-type]
    return proto


def _infer_node(
    node: ir.Node, opsets: dict[str, int], ir_version: int
) -> dict[str, onnx.TypeProto]:
    domain = normalize_domain(node.domain)
    if domain == "" and onnx.defs.has(node.op_type):
        return _infer_standard_node(node, opsets, ir_version)
    # Custom-domain ops, and onnxruntime's contrib ops registered in the default domain
    # (SimplifiedLayerNormalization): onnxruntime knows them.
    return _infer_custom_node(node, opsets, ir_version)


def _infer_standard_node(
    node: ir.Node, opsets: dict[str, int], ir_version: int
) -> dict[str, onnx.TypeProto]:
    version = opsets.get("", opsets.get("ai.onnx", onnx.defs.onnx_opset_version()))
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
        inputs = {v.name: _type_proto(v) for v in node.inputs if v is not None}
        data = {}
        for v in node.inputs:
            small = _small_constant(v) if v is not None else None
            if small is not None:
                data[v.name] = ir.serde.serialize_tensor(
                    ir.tensor(small.numpy(), dtype=small.dtype)
                )
        result = onnx.shape_inference.infer_node_outputs(
            schema, ir.serde.serialize_node(node), inputs, data
        )
    except Exception as exc:  # the whole-graph pass already reported real errors
        log.debug("node-level inference of %s failed: %s", node.name, exc)
        return {}
    return dict(result)


def _infer_custom_node(
    node: ir.Node, opsets: dict[str, int], ir_version: int
) -> dict[str, onnx.TypeProto]:
    """onnxruntime's symbolic shape inference on a one-node model holding ``node``."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return {}
    graph = onnx.GraphProto(name="one_node")
    for v in node.inputs:
        if v is None or any(i.name == v.name for i in graph.input):
            continue
        small = _small_constant(v)
        if small is not None:
            tensor = ir.serde.serialize_tensor(ir.tensor(small.numpy(), dtype=small.dtype))
            tensor.name = v.name or ""
            graph.initializer.append(tensor)
        graph.input.append(onnx.helper.make_value_info(v.name or "", _type_proto(v)))
    graph.node.append(ir.serde.serialize_node(node))
    for v in node.outputs:
        if v.name:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(v.name))
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d or "", ver) for d, ver in opsets.items()],
        ir_version=ir_version or onnx.IR_VERSION,
    )
    try:
        inferred = _symbolic_infer(SymbolicShapeInference, proto)
    except Exception as exc:  # it asserts on forms it does not handle
        log.debug("onnxruntime symbolic inference of %s failed: %s", node.name, exc)
        return {}
    if inferred is None:
        return {}
    infos = (*inferred.graph.output, *inferred.graph.value_info)
    types = {
        info.name: info.type
        for info in infos
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type
    }
    if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
        _fix_gqa_present_length(node, types)
    return types


_TEMP_FILE = "sym_shape_infer_temp.onnx"


def _symbolic_infer(engine: Any, proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """``SymbolicShapeInference.infer_shapes`` without its side effect: when a shape stays
    unknown it saves the model as ``sym_shape_infer_temp.onnx`` in the working directory. Its own
    steps are run instead (None when not every shape was inferred); should a release rename
    them, the public call runs and a temp file it leaves behind is removed."""
    try:
        sym = engine(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
        sym._preprocess(proto)
        done = False
        while sym.run_:
            done = sym._infer_impl()
        sym._update_output_from_vi()
        return sym.out_mp_ if done else None
    except AttributeError:
        pass
    existed = os.path.exists(_TEMP_FILE)
    try:
        return engine.infer_shapes(proto, auto_merge=True)
    finally:
        if not existed and os.path.exists(_TEMP_FILE):
            os.remove(_TEMP_FILE)


def _fix_gqa_present_length(node: ir.Node, types: dict[str, onnx.TypeProto]) -> None:
    """GroupQueryAttention's present KV holds max(past length, total_sequence_length), where the
    total is a *value* (input 6). onnxruntime's symbolic inference assumes the shared-buffer case
    (present = past); with a constant total we set the true length, otherwise it is run-time data.
    """
    total = node.inputs[6] if len(node.inputs) > 6 else None
    past = node.inputs[3] if len(node.inputs) > 3 else None
    if total is None or past is None or past.shape is None:
        return
    known = _small_constant(total)
    for value in node.outputs[1:3]:
        info = types.get(value.name or "")
        if info is None or not info.tensor_type.HasField("shape"):
            continue
        dim = info.tensor_type.shape.dim[2]
        if known is None:
            dim.Clear()
            dim.dim_param = f"{node.name}_present_length"
        else:
            dim.Clear()
            dim.dim_value = max(int(past.shape[2]), int(np.asarray(known.numpy()).reshape(-1)[0]))


# --------------------------------------------------------------------------------------------
# Folding


def _is_int_shape_value(v: ir.Value) -> bool:
    return v.dtype in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, None)


def should_fold_shape_node(node: ir.Node, size_limit: int = SHAPE_TENSOR_LIMIT) -> bool | None:
    """onnxscript ``should_fold`` predicate: shape arithmetic on small integer tensors only."""
    if not is_onnx_domain(node.domain) or node.op_type not in SHAPE_OPS:
        return False
    if node.op_type == "ConstantOfShape":
        # onnxscript never folds it by default; we do when the result is small.
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] else None
        return shape is not None and int(np.prod(shape.numpy())) <= size_limit
    if node.op_type in GENERATOR_OPS:
        # folding evaluates before it checks the output's size: refuse a known-large output
        count = generated_elements(node)
        if count is not None and count > size_limit:
            return False
    if node.op_type in ("Shape", "Size", "Constant", "Range"):
        return None
    # Float arithmetic is model maths, not shape maths: leave it to the fusions (except on
    # scalars and short vectors).
    if not all(
        _is_int_shape_value(o) or _is_tiny(o) for o in node.outputs if node.op_type != "Cast"
    ):
        return False
    return None


def _is_tiny(value: ir.Value) -> bool:
    shape = value.shape
    return (
        shape is not None
        and shape.is_static()
        and int(np.prod(shape.numpy() if hasattr(shape, "numpy") else list(shape)))
        <= _SMALL_FLOAT_ELEMENTS
    )


def fold_shape_arithmetic(model: ir.Model, size_limit: int = SHAPE_TENSOR_LIMIT) -> bool:
    """Fold Shape/Gather/Concat/Range/ConstantOfShape/... chains into constants; True if changed.

    Folded values become initializers: onnxscript writes them as ``Constant(value_ints=...)``
    nodes, which opset < 12 models cannot hold.
    """
    pinned = castlike_to_cast(model)
    hidden = hide_split_shapes(model)
    shielded = shield_sequence_ops(model)
    try:
        result = fold_constants_ir(
            model,
            onnx_shape_inference=True,
            input_size_limit=size_limit,
            output_size_limit=size_limit,
            should_fold=lambda node: should_fold_shape_node(node, size_limit),
        )
    finally:
        for value, shape in hidden:
            value.shape = shape
        for node in shielded:
            node.domain = ""
    if result.modified:
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        _forget_dropped_branches(model)
        RemoveUnusedNodesPass()(model)  # the folded chains' leftover constants
    return bool(result.modified) or pinned


def _live_graphs(graph: ir.Graph) -> set[ir.Graph]:
    graphs = {graph}
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                graphs |= _live_graphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    graphs |= _live_graphs(sub)
    return graphs


def _forget_dropped_branches(model: ir.Model) -> None:
    """Detach nodes of subgraphs that folding dropped from the values they read.

    When the folder inlines an ``If`` with a constant condition, the nodes of the branch it
    drops still count as users of outer values, which keeps those values' producers alive
    through dead-code removal. Their reads are dropped here: the branch can never run.
    """
    live = _live_graphs(model.graph)
    for graph in live:
        values = [*graph.inputs, *graph.initializers.values()]
        values += [v for node in graph for v in node.outputs]
        for value in values:
            for user, index in list(value.uses()):
                if user.graph is not None and user.graph not in live:
                    user.replace_input_with(index, None)
