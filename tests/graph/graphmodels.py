"""Small ONNX model factories shared by the graph-layer tests (all built in memory).

Imported by the test modules as ``graphmodels`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[onnx.TensorProto] = (),
    value_info: Sequence[onnx.ValueInfoProto] = (),
    opset: int = 21,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """A ModelProto with ir_version 10 (onnxruntime can load it)."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    graph.value_info.extend(value_info)
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def vi(name: str, shape: Sequence[int | str], dtype: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def reversed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose node list is in reverse file order."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend(reversed(nodes))
    return copy


def mlp_with_cpu_gap(seed: int = 0) -> onnx.ModelProto:
    """Standard ops: MatMul -> Add -> [Atan on CPU] -> MatMul -> Add, with a side Mul branch."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["h1"], name="add1"),
        helper.make_node("Atan", ["h1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="mm2"),
        helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
        helper.make_node("Add", ["o", "sq"], ["y"], name="add2"),
    ]
    return make_model(
        nodes,
        [vi("x", [2, 8])],
        [vi("y", [2, 8]), vi("h1", [2, 16])],
        [const("w1", w1), const("b1", b1), const("w2", w2)],
    )
