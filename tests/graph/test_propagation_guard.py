"""A few hundred bytes of ONNX must not make onnx's data propagation allocate gigabytes.

``Range(0, N, 1) -> Cast`` (or ``ConstantOfShape`` / ``Expand`` sized by a constant) made onnx
shape inference with ``data_prop=True`` store every element as a dimension record (~140 B each):
5e6 elements cost ~690 MB, 1e8 would cost ~14 GB. The guard skips data propagation for such
nodes; shapes are still inferred, and a tensor above the per-tensor limit is refused by name.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from npudispatch.dispatch.compile import compile_model
from npudispatch.errors import ModelError, NpuDispatchError
from npudispatch.graph import load
from npudispatch.graph.propagation_guard import DATA_PROP_MAX_ELEMENTS, oversized_propagations


def _const(name: str, values: list[int], dims: list[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(f"{name}_t", TensorProto.INT64, dims, values)
    return helper.make_node("Constant", [], [name], value=tensor)


def generator_model(op: str, count: int) -> onnx.ModelProto:
    """``op`` producing ``count`` int64 elements from constants, read by a Cast (``IfRange``:
    the Range and Cast inside the then-branch of an If on a boolean input)."""
    if op == "IfRange":
        branch = generator_model("Range", count).graph
        branch.name = "then"
        zero = helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
        other = helper.make_graph(
            [helper.make_node("Constant", [], ["y"], value=zero)],
            "else",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        )
        node = helper.make_node(
            "If", ["c"], ["out"], name="branch", then_branch=branch, else_branch=other
        )
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    if op == "Range":
        nodes = [_const("a", [0], []), _const("b", [count], []), _const("d", [1], [])]
        nodes.append(helper.make_node("Range", ["a", "b", "d"], ["r"], name="huge_range"))
    elif op == "ConstantOfShape":
        one = helper.make_tensor("v", TensorProto.INT64, [1], [1])
        nodes = [_const("s", [count], [1])]
        nodes.append(helper.make_node("ConstantOfShape", ["s"], ["r"], name="huge_fill", value=one))
    else:
        nodes = [_const("one", [1], [1]), _const("s", [count], [1])]
        nodes.append(helper.make_node("Expand", ["one", "s"], ["r"], name="huge_expand"))
    nodes.append(helper.make_node("Cast", ["r"], ["y"], name="to_float", to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from test_propagation_guard import generator_model
from npudispatch.graph import load
from npudispatch.errors import NpuDispatchError
model = generator_model(sys.argv[2], int(sys.argv[3]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
error, shape = None, None
try:
    if sys.argv[4] == "compile":
        from npudispatch.dispatch.compile import compile_model
        compile_model(model)
    else:
        out = load(model).graph.outputs[0].shape
        shape = None if out is None else [d if isinstance(d, int) else str(d) for d in out]
except NpuDispatchError as exc:
    error = f"{type(exc).__name__}: {exc}"
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"growth": growth, "error": error, "shape": shape, "size": len(model.SerializeToString())}))
"""


def _in_subprocess(op: str, count: int, what: str) -> dict:
    here = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, here, op, str(count), what],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op", ["Range", "ConstantOfShape", "Expand"])
def test_large_constant_generator_is_inferred_without_materializing(op):
    """1e8 int64 elements (800 MB, under the tensor limit): shape [1e8], memory stays small."""
    result = _in_subprocess(op, 10**8, "load")
    assert result["size"] < 300, result
    assert result["error"] is None
    assert result["shape"] == [10**8]
    assert result["growth"] < 500 << 20, f"peak RSS grew {result['growth'] / 1e6:.0f} MB"


def test_tiny_model_with_a_huge_range_is_refused_by_name():
    """The attack: a ~190-byte model declaring a 2**40-element Range."""
    result = _in_subprocess("Range", 2**40, "compile")
    assert result["growth"] < 500 << 20, f"peak RSS grew {result['growth'] / 1e6:.0f} MB"
    assert result["error"] is not None
    assert result["error"].startswith("ModelError: ")
    assert "Range node 'huge_range'" in result["error"]
    assert "8,796,093,022,208 B" in result["error"]
    assert "NPUDISPATCH_MAX_TENSOR_BYTES" in result["error"]


def test_refusal_is_our_error_in_process():
    with pytest.raises(ModelError, match=r"above the .* limit per tensor") as info:
        compile_model(generator_model("ConstantOfShape", 2**40))
    assert isinstance(info.value, NpuDispatchError)
    assert "huge_fill" in str(info.value)


def test_guard_flags_only_large_or_unknown_generators():
    small = load(generator_model("Range", 16))
    assert oversized_propagations(small.graph) == []
    assert small.graph.outputs[0].shape == [16]
    graph = load(generator_model("Expand", DATA_PROP_MAX_ELEMENTS + 1)).graph
    flagged = oversized_propagations(graph)
    n = DATA_PROP_MAX_ELEMENTS + 1
    assert [(p.node.name, p.elements) for p in flagged] == [("huge_expand", n), ("to_float", n)]


def test_shape_fed_mask_keeps_data_propagation():
    """``ConstantOfShape(Shape(x))`` of a static input: the count is known, nothing is flagged."""
    one = helper.make_tensor("v", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ConstantOfShape", ["s"], ["m"], name="mask", value=one),
        helper.make_node("Cast", ["m"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    assert oversized_propagations(ir.serde.deserialize_model(model).graph) == []
    assert load(model).graph.outputs[0].shape == [4, 8]


def test_generator_inside_an_if_branch_is_not_materialized():
    """onnx propagates data inside subgraphs too, and constant folding would evaluate the
    branch's Range before checking its size: both are kept from building 1e8 elements."""
    result = _in_subprocess("IfRange", 10**8, "load")
    assert result["error"] is None
    assert result["growth"] < 500 << 20, f"peak RSS grew {result['growth'] / 1e6:.0f} MB"
    graph = load(generator_model("IfRange", DATA_PROP_MAX_ELEMENTS + 1)).graph
    assert "huge_range" in [p.node.name for p in oversized_propagations(graph)]


def test_large_integer_constant_read_by_any_node_skips_data_propagation():
    """onnx builds a dimension record per element of a 1-d integer tensor it might need as a
    shape, even when the reader's output size is not known yet: ``Cast`` of a 1e8-element int64
    initializer made it allocate tens of GB."""
    count = DATA_PROP_MAX_ELEMENTS + 1
    big = ir.Value(
        name="r",
        shape=ir.Shape([count]),
        type=ir.TensorType(ir.DataType.INT64),
        const_value=ir.Tensor(np.broadcast_to(np.int64(1), (count,))),
    )
    cast = ir.node("Cast", [big], attributes={"to": ir.DataType.FLOAT.value}, name="to_float")
    g = ir.Graph([], cast.outputs, nodes=[cast], initializers=[big], opset_imports={"": 17})
    (flagged,) = oversized_propagations(g)
    assert flagged.node.name == "to_float" and flagged.elements == count
