"""Load an ONNX model into onnx_ir with validated structure, stable names and static shapes.

:func:`load` is the single entry point of the pipeline. Unlike DD's generator it never trusts the
file: it sorts, names and checks the graph, binds symbolic dims explicitly and re-runs shape
inference, and it refuses external data that points outside the model's folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from npudispatch.errors import ModelError
from npudispatch.graph.naming import assign_unique_names
from npudispatch.graph.order import topological_order

__all__ = ["ModelLike", "load"]

ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model

# Initializers larger than this are handed to onnx shape inference as typed graph inputs instead of
# tensors: inference only needs their type, and serializing big weights would copy them.
_INFERENCE_INLINE_LIMIT = 1024
_OPAQUE_DOMAIN = "npudispatch.opaque"
_MAX_DIM = 2**63 - 1


def load(model: ModelLike, dims: Mapping[str, int] | None = None) -> ir.Model:
    """Load ``model`` into an ``onnx_ir.Model`` ready for the pipeline.

    Steps: reject external data outside the model folder; treat initializers also listed in
    ``graph.input`` as constants (they leave the input list); lift ``Constant`` nodes into
    initializers; reject dangling inputs; give every node a unique, file-order-independent name
    (see :func:`npudispatch.graph.naming.assign_unique_names`); reject cycles and store the nodes in
    :func:`~npudispatch.graph.topological_order`; bind the symbolic dims named in ``dims``
    everywhere they appear; run onnx shape inference (custom-domain ops keep their declared
    value_info); finally require a dtype and a fully static shape on every value.

    An ``ir.Model`` argument is modified in place and returned; paths and protos are converted.
    Raises :class:`~npudispatch.errors.ModelError` naming the node, tensor or dim at fault.
    """
    ir_model = _to_ir(model)
    graph = ir_model.graph
    _drop_initializers_from_inputs(graph)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    _check_dangling_inputs(graph)
    assign_unique_names(graph)
    order = topological_order(graph)  # raises ModelError on a cycle
    graph.remove(order)  # unsafe removal keeps the use-def links; re-added right below
    graph.extend(order)
    _bind_dims(graph, dict(dims or {}))
    _check_inputs_static(graph)
    _infer_shapes(ir_model)
    _check_values_typed(graph)
    return ir_model


# --------------------------------------------------------------------------------------------
# Reading and external data


def _to_ir(model: ModelLike) -> ir.Model:
    if isinstance(model, ir.Model):
        for value in _all_initializers(model.graph):
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                _check_location(
                    value.name or "",
                    tensor.location,
                    tensor.base_dir or None,
                    tensor.offset or 0,
                    tensor.length,
                )
        return model
    if isinstance(model, onnx.ModelProto):
        _check_proto_external_data(model.graph, None)
        return ir.from_proto(model)
    path = Path(model)
    if path.is_dir():
        raise ModelError(f"model path {str(path)!r} is a directory; give the path to a .onnx file")
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} does not exist (give a path to a .onnx file)")
    size = path.stat().st_size
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(
            f"cannot parse {str(path)!r} ({size} bytes) as an ONNX model: {exc}; the file is "
            "truncated or not an ONNX model (re-export or re-download it)"
        ) from exc
    if not proto.HasField("graph") or not proto.graph.output:
        # An empty (or unrelated but parseable) file decodes to a ModelProto without a graph.
        raise ModelError(
            f"{str(path)!r} ({size} bytes) holds no ONNX graph with outputs; the file is empty "
            "or not an ONNX model (re-export or re-download it)"
        )
    _check_proto_external_data(proto.graph, path.parent)
    ir_model = ir.from_proto(proto)
    ir.external_data.set_base_dir(ir_model.graph, path.parent)
    return ir_model


def _all_initializers(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from attr.as_graph().initializers.values()
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    yield from sub.initializers.values()


def _proto_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _proto_tensors(attr.g)
            for sub in attr.graphs:
                yield from _proto_tensors(sub)


def _check_proto_external_data(graph: onnx.GraphProto, base_dir: Path | None) -> None:
    for tensor in _proto_tensors(graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        length = int(entries["length"]) if "length" in entries else None
        offset = int(entries.get("offset", 0))
        _check_location(tensor.name, entries.get("location", ""), base_dir, offset, length)


def _check_location(
    tensor: str,
    location: str,
    base_dir: str | os.PathLike[str] | None,
    offset: int = 0,
    length: int | None = None,
) -> None:
    """Reject external data that is absolute, leaves the model's folder, or is missing/short."""
    fix = "move the data file next to the model and store a relative location"
    if not location:
        raise ModelError(f"tensor {tensor!r} is external but has no 'location'; {fix}")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise ModelError(
            f"tensor {tensor!r} stores its data at the absolute location {location!r}; "
            f"external data must stay inside the model's folder: {fix}"
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise ModelError(
            f"tensor {tensor!r} stores its data at {location!r}, outside the model's folder; {fix}"
        )
    if base_dir is None or str(base_dir) == "":
        # Resolving against the working directory would read whatever file happens to be there.
        raise ModelError(
            f"tensor {tensor!r} is stored externally at {location!r} but the model has no folder "
            "to resolve it against; pass the .onnx path to load() (or onnx.load it with "
            "load_external_data=True)"
        )
    # A symlink could still point elsewhere: compare resolved paths.
    root = Path(base_dir).resolve()
    target = (root / location).resolve()
    if not target.is_relative_to(root):
        raise ModelError(
            f"tensor {tensor!r} stores its data at {location!r}, which resolves to "
            f"{str(target)!r} outside the model's folder {str(root)!r}; {fix}"
        )
    if not target.is_file():
        raise ModelError(
            f"tensor {tensor!r} stores its data in {str(target)!r}, which does not exist; "
            "copy the data file next to the model"
        )
    size = target.stat().st_size
    if length is not None and offset + length > size:
        raise ModelError(
            f"tensor {tensor!r} needs bytes {offset}..{offset + length} of {str(target)!r}, "
            f"which has only {size} bytes; the data file is truncated or stale"
        )


# --------------------------------------------------------------------------------------------
# Structure


def _drop_initializers_from_inputs(graph: ir.Graph) -> None:
    # ONNX lets an initializer double as an overridable input (IR < 4 style). The NPU bakes
    # constants into the const buffer, so these are treated as constants, not as feeds.
    keep = [v for v in graph.inputs if not v.is_initializer()]
    if len(keep) != len(graph.inputs):
        graph.inputs.clear()
        graph.inputs.extend(keep)


def _check_dangling_inputs(graph: ir.Graph) -> None:
    for node in graph:
        for slot, value in enumerate(node.inputs):
            if value is None or value.producer() is not None:
                continue
            if value.is_graph_input() or value.is_initializer():
                continue
            raise ModelError(
                f"input {slot} of node {node.name or node.op_type!r} ({node.op_type}) reads "
                f"tensor {value.name!r}, which no node produces and which is neither a graph "
                "input nor an initializer; add the missing producer, input or initializer"
            )


def _bind_dims(graph: ir.Graph, dims: dict[str, int]) -> None:
    """Replace every symbolic dim named in ``dims`` by its value, wherever it appears."""
    if not dims:
        return
    for name, size in dims.items():
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_DIM:
            raise ModelError(
                f"dims[{name!r}] must be an int between 1 and 2**63-1 (ONNX dims are int64; 0 leaves "
                f"empty tensors with nothing to compute), got {size!r}"
            )
    known = sorted(_symbolic_dim_names(graph))  # before binding, for the error message
    used: set[str] = set()
    for value in _main_graph_values(graph):
        shape = value.shape
        if shape is None or shape.is_static():
            continue
        new = []
        for dim in shape:
            if isinstance(dim, ir.SymbolicDim) and dim.value in dims:
                used.add(dim.value)
                new.append(dims[dim.value])
            else:
                new.append(dim)
        value.shape = ir.Shape(new)
    unused = sorted(set(dims) - used)
    if unused:
        raise ModelError(
            f"dims names {unused} do not appear in the model; its symbolic dims are "
            f"{known or 'none'} (check the spelling of dims=/--dims)"
        )


def _symbolic_dim_names(graph: ir.Graph) -> set[str]:
    names: set[str] = set()
    for value in _main_graph_values(graph):
        if value.shape is not None:
            names.update(d.value for d in value.shape if isinstance(d, ir.SymbolicDim) and d.value)
    return names


def _main_graph_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _check_inputs_static(graph: ir.Graph) -> None:
    for value in graph.inputs:
        if value.dtype is None or value.shape is None:
            raise ModelError(
                f"graph input {value.name!r} has no declared dtype/shape; "
                "declare its type in graph.input"
            )
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                continue
            if dim.value:
                raise ModelError(
                    f"graph input {value.name!r} dim {axis} is the symbolic dim {dim.value!r}; "
                    f"bind it with dims={{{dim.value!r}: N}} (CLI: --dims {dim.value}=N)"
                )
            raise ModelError(
                f"graph input {value.name!r} dim {axis} is unknown (unnamed); give the model a "
                "static or named dim there (e.g. onnx.tools.update_model_dims) and bind it "
                "with dims="
            )


# --------------------------------------------------------------------------------------------
# Shape inference


def _infer_shapes(model: ir.Model) -> None:
    """Run onnx shape inference (strict) and merge inferred types into the IR by value name."""
    proto = _inference_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:  # onnx raises InferenceError / ValidationError / RuntimeError
        raise ModelError(
            f"onnx shape inference failed: {str(exc).strip()}. Fix the node named in the "
            "message (types, shapes or attributes), or bind symbolic dims with dims="
        ) from exc
    found: dict[str, onnx.ValueInfoProto] = {}
    for info in (*inferred.graph.value_info, *inferred.graph.output):
        found[info.name] = info
    for node in model.graph:
        for value in node.outputs:
            info = found.get(value.name or "")
            if info is None or not info.type.HasField("tensor_type"):
                continue
            elem = info.type.tensor_type.elem_type
            if elem:
                value.dtype = ir.DataType(elem)
            shape = ir.serde.deserialize_type_proto_for_shape(info.type)
            if shape is not None:
                value.shape = shape


def _inference_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` for inference without copying big weights (they become typed inputs)."""
    graph = model.graph
    out = onnx.GraphProto(name=graph.name or "main")
    out.input.extend(ir.serde.serialize_value(v) for v in graph.inputs)
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is not None:
            value.dtype = value.dtype or tensor.dtype
            value.shape = value.shape or ir.Shape(tensor.shape)
        if (
            tensor is not None
            and not isinstance(tensor, ir.ExternalTensor)
            and tensor.nbytes <= _INFERENCE_INLINE_LIMIT
        ):
            proto = ir.serde.serialize_tensor(tensor)
            proto.name = name
            out.initializer.append(proto)
        else:
            out.input.append(ir.serde.serialize_value(value))
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in graph:
        proto = ir.serde.serialize_node(node)
        if (
            node.domain in ("", "ai.onnx")
            and (node.domain, node.op_type) not in functions
            and not onnx.defs.has(node.op_type)
        ):
            # DD graphs put vendor ops (MladfMatMul...) in the default domain; strict inference
            # rejects those, so they are treated like custom-domain ops: declared types are kept.
            proto.domain = _OPAQUE_DOMAIN
        out.node.append(proto)
    out.output.extend(ir.serde.serialize_value(v) for v in graph.outputs)
    declared = {v for v in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if value not in declared and (value.dtype is not None or value.shape is not None):
                out.value_info.append(ir.serde.serialize_value(value))
    result = onnx.ModelProto(ir_version=model.ir_version, graph=out)
    for domain, version in graph.opset_imports.items():
        result.opset_import.append(onnx.helper.make_opsetid(domain, version))
    result.opset_import.append(onnx.helper.make_opsetid(_OPAQUE_DOMAIN, 1))
    result.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return result


def _check_values_typed(graph: ir.Graph) -> None:
    for node in graph:
        for slot, value in enumerate(node.outputs):
            if not value.name and not value.uses() and not value.is_graph_output():
                continue  # an unused optional output
            where = f"tensor {value.name!r} (output {slot} of node {node.name!r}, {node.op_type})"
            if value.dtype is None:
                raise ModelError(
                    f"{where} has no dtype after shape inference; declare it in value_info "
                    "(custom-domain ops are not inferred by onnx)"
                )
            if value.shape is None:
                raise ModelError(
                    f"{where} has no shape after shape inference; declare it in value_info "
                    "(custom-domain ops are not inferred by onnx)"
                )
            for axis, dim in enumerate(value.shape):
                if not isinstance(dim, int):
                    hint = (
                        f"bind {dim.value!r} with dims={{{dim.value!r}: N}}"
                        if dim.value and not dim.value.startswith("unk__")
                        else "it depends on data or on an unbound dim; declare it in value_info"
                    )
                    raise ModelError(f"{where} dim {axis} is not static ({dim!r}): {hint}")
