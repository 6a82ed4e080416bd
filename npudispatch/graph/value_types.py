"""Non-tensor ONNX values (sequences, maps, optionals): their type text, and how load keeps them.

The NPU computes on tensors only, but a model may take or return sequences, maps and optionals
(a scikit-learn classifier's ZipMap returns a sequence of maps). Such values stay in CPU
segments. onnx_ir represents sequence and optional types but not maps, so :func:`strip_map_types`
clears a map-holding type before the proto is read and :func:`keep_map_types` records its text in
the value's ``meta`` (:data:`TYPE_META`). :func:`copy_map_types` carries that text into extracted
segments and :func:`restore_map_types` writes the real type back wherever a model is serialized
(onnx inference, the CPU segments given to onnxruntime, saved folders): a map input must be typed
there. All three treat subgraphs (If branches, Loop and Scan bodies, nested) like the main graph:
a subgraph is paired with its proto by the position of its node and the attribute's name.

Type text is onnxruntime's ``NodeArg.type`` spelling: ``tensor(float)``, ``seq(tensor(int64))``,
``map(int64,tensor(float))``, ``optional(seq(tensor(float)))``.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

from npudispatch.errors import ModelError

__all__ = [
    "TYPE_META",
    "copy_map_types",
    "element_text",
    "has_map_types",
    "is_non_tensor",
    "keep_map_types",
    "merge_non_tensor_type",
    "parse_type_text",
    "restore_map_types",
    "strip_map_types",
    "type_text",
    "value_type_text",
]

#: ``ir.Value.meta`` key: onnxruntime's type text of a value whose type onnx_ir cannot hold.
TYPE_META = "npudispatch.non_tensor_type"

_ELEM_NAMES = {"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE}


def element_text(elem_type: int) -> str:
    """onnxruntime's name of an element type: ``float``, ``double``, ``int64``, ``bfloat16``..."""
    if elem_type == onnx.TensorProto.FLOAT:
        return "float"
    if elem_type == onnx.TensorProto.DOUBLE:
        return "double"
    return ir.DataType(elem_type).name.lower()


def type_text(t: onnx.TypeProto) -> str:
    """onnxruntime's text for ``t``: ``seq(map(int64,tensor(float)))``, ``optional(...)``..."""
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({element_text(t.tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({type_text(t.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({type_text(t.optional_type.elem_type)})"
    if kind == "map_type":
        return f"map({element_text(t.map_type.key_type)},{type_text(t.map_type.value_type)})"
    return str(kind)


def _has_map(t: onnx.TypeProto) -> bool:
    kind = t.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind == "sequence_type":
        return _has_map(t.sequence_type.elem_type)
    if kind == "optional_type":
        return _has_map(t.optional_type.elem_type)
    return False


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def strip_map_types(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without map-holding types (a copy when it had any, else ``proto`` itself), in
    every graph: onnx_ir cannot read a map type. :func:`keep_map_types` records what was cleared."""
    if not any(
        _has_map(v.type) for g in _graphs(proto.graph) for v in (*g.input, *g.output, *g.value_info)
    ):
        return proto
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for g in _graphs(proto.graph):
        for v in (*g.input, *g.output, *g.value_info):
            if _has_map(v.type):
                v.ClearField("type")
    return proto


def _graph_pairs(
    proto: onnx.GraphProto, graph: ir.Graph
) -> Iterator[tuple[onnx.GraphProto, ir.Graph]]:
    """``proto`` and ``graph`` (one read from or serialized as the other), then every pair of
    their subgraphs, matched by node position and attribute name."""
    yield proto, graph
    nodes = list(graph)
    if len(nodes) != len(proto.node):
        raise ModelError(
            f"graph {graph.name!r} has {len(nodes)} nodes but its proto has {len(proto.node)}: "
            "the proto is not this graph serialized (an npudispatch bug: please report it)"
        )
    for node_proto, node in zip(proto.node, nodes):
        for attr in node_proto.attribute:
            if not (attr.HasField("g") or attr.graphs):
                continue
            value = node.attributes.get(attr.name)
            if node_proto.op_type != node.op_type or value is None:
                raise ModelError(
                    f"node {node.name!r} ({node.op_type}) does not match its proto "
                    f"({node_proto.op_type}, attribute {attr.name!r}): the proto is not this "
                    "graph serialized (an npudispatch bug: please report it)"
                )
            if attr.HasField("g"):
                yield from _graph_pairs(attr.g, value.as_graph())
            else:
                for sub_proto, sub in zip(attr.graphs, value.as_graphs(), strict=True):
                    yield from _graph_pairs(sub_proto, sub)


def _own_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """The values ``graph`` defines: its inputs and its nodes' outputs (not its subgraphs')."""
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def keep_map_types(source: onnx.GraphProto, graph: ir.Graph) -> None:
    """Record in ``meta`` the map-holding types ``source`` declares for ``graph``'s values
    (``graph`` was read from ``source`` after :func:`strip_map_types`), in every subgraph too."""
    for proto, g in _graph_pairs(source, graph):
        texts = {
            v.name: type_text(v.type)
            for v in (*proto.input, *proto.output, *proto.value_info)
            if _has_map(v.type)
        }
        if texts:
            for value in _own_values(g):
                if value.name in texts:
                    value.meta[TYPE_META] = texts[value.name]


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


def has_map_types(graph: ir.Graph) -> bool:
    """True when a value of ``graph`` or of any of its subgraphs holds a map type kept as text."""
    graphs = [
        graph,
        *(sub for node in ir.traversal.RecursiveGraphIterator(graph) for sub in _subgraphs(node)),
    ]
    return any(TYPE_META in v.meta for g in graphs for v in _own_values(g))


def value_type_text(value: ir.Value) -> str | None:
    """onnxruntime's type text of a non-tensor ``value``; None for a tensor or an untyped value."""
    if (text := value.meta.get(TYPE_META)) is not None:
        return str(text)
    if value.type is None or isinstance(value.type, ir.TensorType):
        return None
    return type_text(ir.serde.serialize_type(value.type))


def is_non_tensor(value: ir.Value | None) -> bool:
    """True for a sequence, map or optional value (they never go to the NPU)."""
    return value is not None and value_type_text(value) is not None


def merge_non_tensor_type(value: ir.Value, t: onnx.TypeProto) -> None:
    """Type an untyped ``value`` with the sequence / map / optional type inference found."""
    if _has_map(t):
        value.meta[TYPE_META] = type_text(t)
    else:
        value.type = ir.serde.deserialize_type_proto_for_type(t)


def _split_args(body: str) -> list[str]:
    args, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            args.append(body[start:i])
            start = i + 1
    return [*args, body[start:]]


def _elem_type(name: str) -> int:
    return _ELEM_NAMES.get(name) or int(ir.DataType[name.upper()])


def parse_type_text(text: str) -> onnx.TypeProto:
    """The ``TypeProto`` of onnxruntime's type text (the inverse of :func:`type_text`)."""
    kind, _, rest = text.partition("(")
    args = _split_args(rest[:-1])
    t = onnx.TypeProto()
    if kind == "tensor":
        t.tensor_type.elem_type = _elem_type(args[0])
    elif kind == "seq":
        t.sequence_type.elem_type.CopyFrom(parse_type_text(args[0]))
    elif kind == "optional":
        t.optional_type.elem_type.CopyFrom(parse_type_text(args[0]))
    elif kind == "map":
        t.map_type.key_type = _elem_type(args[0])
        t.map_type.value_type.CopyFrom(parse_type_text(args[1]))
    else:
        raise ValueError(f"not an onnxruntime type text: {text!r}")
    return t


def restore_map_types(proto: onnx.GraphProto, graph: ir.Graph) -> None:
    """Put back, in ``proto`` (``graph`` serialized) and its subgraphs, the map-holding types
    load kept as text: onnx inference and onnxruntime need the type of a map input, and a map
    value is declared as in the source model."""
    if not has_map_types(graph):
        return
    for sub_proto, sub in _graph_pairs(proto, graph):
        typed = [(v, v.meta.get(TYPE_META)) for v in _own_values(sub)]
        typed = [(v, text) for v, text in typed if text is not None and v.name]
        if not typed:
            continue
        entries = {v.name: v for v in (*sub_proto.input, *sub_proto.output, *sub_proto.value_info)}
        for value, text in typed:
            entry = entries.get(value.name)  # type: ignore[arg-type]
            if entry is None:
                entry = sub_proto.value_info.add(name=value.name)
            entry.type.CopyFrom(parse_type_text(str(text)))


def copy_map_types(source: ir.Graph, target: ir.Graph) -> None:
    """Carry the map types kept as text from ``source``'s values to ``target``'s same-named
    values (a graph extracted from it: its values are clones). Subgraphs need nothing: onnx_ir's
    cloner copies their values' ``meta`` with the nodes that own them."""
    texts = {
        v.name: text for v in _own_values(source) if (text := v.meta.get(TYPE_META)) is not None
    }
    if texts:
        for v in _own_values(target):
            if v.name in texts:
                v.meta[TYPE_META] = texts[v.name]
