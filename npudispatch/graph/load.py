"""Load an ONNX model into onnx_ir with validated structure, stable names and static shapes.

:func:`load` is the single entry point of the pipeline. Unlike DD's generator it never trusts the
file: it sorts, names and checks the graph, binds symbolic dims explicitly and re-runs shape
inference, and it refuses external data that points outside the model's folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from npudispatch.domains import domain_label
from npudispatch.errors import ModelError
from npudispatch.graph import shapes
from npudispatch.graph.naming import assign_unique_names
from npudispatch.graph.order import topological_order
from npudispatch.graph.value_types import is_non_tensor, keep_map_types, strip_map_types

__all__ = ["ModelLike", "load", "proto_to_ir"]

ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model

_MAX_DIM = 2**63 - 1
_IR_INITIALIZERS_NEED_NOT_BE_INPUTS = 4


def load(
    model: ModelLike,
    dims: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ir.Model:
    """Load ``model`` into an ``onnx_ir.Model`` ready for the pipeline.

    Steps: reject external data outside the model folder; treat initializers also listed in
    ``graph.input`` as constants (they leave the input list); lift ``Constant`` nodes into
    initializers; reject dangling inputs; give every node a unique, file-order-independent name
    (see :func:`npudispatch.graph.naming.assign_unique_names`); reject cycles and store the nodes in
    :func:`~npudispatch.graph.topological_order`; bind the graph inputs' shapes (``input_shapes``
    gives whole shapes per input name, ``dims`` values per symbolic dim name; every dim left
    unbound is reported at once); forget the exporter's stale symbolic value_info; then infer and
    fold shape arithmetic to a fixpoint (:func:`npudispatch.graph.shapes.resolve_shapes`), which
    also types custom-domain ops through onnxruntime's symbolic shape inference. Every value ends
    with a dtype; a shape stays open only where it depends on run-time data, and
    :func:`npudispatch.graph.shapes.data_dependent_values` names those (they run on the CPU).

    An ``ir.Model`` argument is modified in place and returned; paths and protos are converted.
    Raises :class:`~npudispatch.errors.ModelError` naming the node, tensor or dim at fault.
    """
    ir_model = _to_ir(model)
    graph = ir_model.graph
    _drop_initializers_from_inputs(ir_model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    _check_dangling_inputs(graph)
    assign_unique_names(graph)
    _sort(graph)
    _bind_dims(graph, dict(dims or {}))
    _bind_input_shapes(graph, dict(input_shapes or {}))
    _check_inputs_static(graph)
    hints = shapes.forget_stale_shapes(graph)
    shapes.resolve_shapes(ir_model)
    shapes.apply_output_hints(hints)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    _sort(graph)
    _check_values_typed(graph)
    _decode_proto_tensors(graph)
    return ir_model


def _decode_proto_tensors(graph: ir.Graph) -> None:
    """Initializers still backed by a ``TensorProto`` become numpy-backed tensors, decoded once.

    ``TensorProtoTensor.numpy()`` copies the protobuf's bytes on every call, and compiling reads
    each weight many times (operator matching, padding, formatting): on a 72 MB model those
    copies were a third of the compile time. Sub-byte and string tensors keep their proto.
    """
    for value in _all_initializers(graph):
        tensor = value.const_value
        if (
            not isinstance(tensor, ir.serde.TensorProtoTensor)
            or tensor.dtype in (ir.DataType.UNDEFINED, ir.DataType.STRING)
            or tensor.dtype.bitwidth < 8
        ):
            continue
        value.const_value = ir.Tensor(
            tensor.numpy(),
            dtype=tensor.dtype,
            name=tensor.name,
            doc_string=tensor.doc_string or None,
            metadata_props=dict(tensor.metadata_props) or None,
        )


def _sort(graph: ir.Graph) -> None:
    order = topological_order(graph)  # raises ModelError on a cycle
    graph.remove(order)  # unsafe removal keeps the use-def links; re-added right below
    graph.extend(order)


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
        return proto_to_ir(model)
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
    ir_model = proto_to_ir(proto)
    ir.external_data.set_base_dir(ir_model.graph, path.parent)
    return ir_model


def proto_to_ir(proto: onnx.ModelProto) -> ir.Model:
    """``ir.from_proto`` after the single-assignment checks it would fail on without a name; map
    types, which onnx_ir cannot hold, are cleared and kept as type text (:mod:`.value_types`)."""
    _check_single_assignment(proto.graph)
    stripped = strip_map_types(proto)
    try:
        model = ir.from_proto(stripped)
    except Exception as exc:  # onnx_ir raises SerdeError chained to the real cause
        cause = exc.__cause__ or exc
        raise ModelError(
            f"the model's graph cannot be read: {cause}; fix the file (re-export it) and retry"
        ) from exc
    if stripped is not proto:
        keep_map_types(proto.graph, model.graph)
    return model


def _check_single_assignment(graph: onnx.GraphProto) -> None:
    """Every tensor has one producer: no node output may reuse an input, initializer or output."""
    owners = {v.name: "a graph input" for v in graph.input}
    owners.update({t.name: "an initializer" for t in graph.initializer})
    for index, node in enumerate(graph.node):
        label = f"node {node.name or index!r} ({node.op_type})"
        for name in node.output:
            if not name:
                continue
            if name in owners:
                raise ModelError(
                    f"{label} writes tensor {name!r}, which is already {owners[name]}; every "
                    "tensor must have exactly one producer (rename the output)"
                )
            owners[name] = f"the output of node {node.name or index!r} ({node.op_type})"


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


def _drop_initializers_from_inputs(model: ir.Model) -> None:
    # ONNX lets an initializer double as an overridable input (IR < 4 style). The NPU bakes
    # constants into the const buffer, so these are treated as constants, not as feeds.
    graph = model.graph
    keep = [v for v in graph.inputs if not v.is_initializer()]
    if len(keep) != len(graph.inputs):
        graph.inputs.clear()
        graph.inputs.extend(keep)
    # Below IR 4 an initializer must also be a graph input: onnx inference and onnxruntime
    # ignore the ones that are not, so the model (now without them) is IR 4, which opset 9
    # models are valid in.
    model.ir_version = max(model.ir_version or 0, _IR_INITIALIZERS_NEED_NOT_BE_INPUTS)


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
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MAX_DIM:
            raise ModelError(
                f"dims[{name!r}] must be an int between 0 and 2**63-1 (ONNX dims are int64), "
                f"got {size!r}"
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


def _bind_input_shapes(graph: ir.Graph, input_shapes: dict[str, Sequence[int]]) -> None:
    """Give graph inputs the whole shapes the user named (``--shape x=1x3x224x224``)."""
    if not input_shapes:
        return
    inputs = {v.name: v for v in graph.inputs}
    unknown = sorted(set(input_shapes) - set(inputs))
    if unknown:
        raise ModelError(
            f"input_shapes names {unknown}, which are not graph inputs; the inputs are "
            f"{sorted(inputs)} (check the spelling of --shape / input_shapes=)"
        )
    for name, wanted in input_shapes.items():
        value = inputs[name]
        shape = [int(d) for d in wanted]
        if any(d < 0 or d > _MAX_DIM for d in shape):
            raise ModelError(
                f"input_shapes[{name!r}] = {shape}: every dim must be an int >= 0 (ONNX dims "
                "are int64)"
            )
        declared = value.shape
        if declared is not None and len(declared) != len(shape):
            raise ModelError(
                f"input_shapes[{name!r}] has rank {len(shape)} but input {name!r} is declared "
                f"with rank {len(declared)} ({_show(declared)}); give {len(declared)} dims"
            )
        for axis, dim in enumerate(declared or []):
            if isinstance(dim, int) and dim >= 0 and dim != shape[axis]:
                raise ModelError(
                    f"input_shapes[{name!r}] = {shape} sets dim {axis} to {shape[axis]}, but it "
                    f"is {dim} ({_show(declared)}: fixed by the model or bound by dims=)"
                )
        value.shape = ir.Shape(shape)


def _show(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else repr(d.value) for d in shape) + "]"


def _check_inputs_static(graph: ir.Graph) -> None:
    """Every graph input needs a dtype and a static shape; report every unbound dim at once."""
    problems: list[str] = []
    names: set[str] = set()
    for value in graph.inputs:
        if is_non_tensor(value):
            continue  # a sequence / map / optional: fed through to the CPU segments reading it
        if value.dtype is None or value.shape is None:
            problems.append(f"input {value.name!r} has no declared dtype/shape (declare its type)")
            continue
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim >= 0:
                continue
            label = repr(dim.value) if isinstance(dim, ir.SymbolicDim) and dim.value else "unnamed"
            if isinstance(dim, int):
                label = f"{dim} (unknown)"
            elif dim.value:
                names.add(dim.value)
            problems.append(f"input {value.name!r} dim {axis} is {label} in {_show(value.shape)}")
    if not problems:
        return
    example = next(v for v in graph.inputs if v.shape is None or not v.shape.is_static())
    dims_text = "x".join(
        str(d) if isinstance(d, int) and d >= 0 else "N" for d in (example.shape or ["N"])
    )
    how = (
        f"bind whole input shapes with --shape {example.name}={dims_text} (Python: "
        f"input_shapes={{{example.name!r}: (...)}})"
    )
    if names:
        how += f", or name dims with --dims {sorted(names)[0]}=N (Python: dims={{...}})"
    raise ModelError(
        f"{len(problems)} input dim(s) are not static:\n  "
        + "\n  ".join(problems)
        + f"\n{how}; `--inputs data.npz` (run) takes the shapes from the arrays"
    )


def _check_values_typed(graph: ir.Graph) -> None:
    """Every used value needs a dtype; an open shape must be explained by run-time data."""
    for node in graph:
        for slot, value in enumerate(node.outputs):
            if not value.uses() and not value.is_graph_output():
                continue  # an optional output nobody reads
            if is_non_tensor(value):
                continue  # typed by its type text (a map type onnx_ir cannot hold)
            if value.dtype is None:
                where = (
                    f"tensor {value.name!r} (output {slot} of node {node.name!r}, {node.op_type})"
                )
                domain = domain_label(node.domain)
                raise ModelError(
                    f"{where} has no dtype after shape inference: neither onnx nor onnxruntime's "
                    f"symbolic shape inference knows {domain}.{node.op_type}; declare the tensor's "
                    "type in the model's value_info"
                )
