"""graph.load: golden graphs, naming, initializers, symbolic dims, external data, bad graphs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphmodels import F32, const, make_model, reversed_nodes, vi
from onnx import helper

from npudispatch import graph
from npudispatch.errors import ModelError
from npudispatch.examples import EXAMPLES

GOLDEN = [name for name in EXAMPLES if name.startswith("G")]
MLP_LADDER = {
    "G8": ["gate_proj", "silu"],
    "G9": ["gate_proj", "down_proj"],
    "G10": ["gate_proj", "up_proj", "silu", "elwmul"],
    "G11": ["gate_proj", "up_proj", "silu", "elwmul", "down_proj"],
    "G4": ["id1", "id2", "mul1", "id3", "id4", "mul2", "id5", "id6"],
    "G14": ["matmul1", "matmul2", "matmul3"],
    "G15": ["sq1", "cube1", "sq2"],
}


def _names(model: ir.Model) -> list[str]:
    return [n.name for n in graph.topological_order(model)]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_graph_loads_typed_and_ordered(golden_protos, name):
    model = graph.load(golden_protos[name])
    order = graph.topological_order(model)
    assert len(order) == len(golden_protos[name].graph.node)
    position = {n: i for i, n in enumerate(order)}
    for node in order:
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                assert position[value.producer()] < position[node]
        for value in node.outputs:
            assert value.dtype is not None and value.shape is not None
            assert value.shape.is_static(), (name, value.name, value.shape)
    # The file order is adopted as the canonical order, and reversing the file changes nothing.
    assert [n.name for n in model.graph] == [n.name for n in order]
    again = graph.load(reversed_nodes(golden_protos[name]))
    assert _names(again) == [n.name for n in order]


@pytest.mark.parametrize("name", sorted(MLP_LADDER))
def test_expected_node_order(golden_protos, name):
    assert _names(graph.load(reversed_nodes(golden_protos[name]))) == MLP_LADDER[name]


def test_golden_declared_shapes_survive_for_custom_ops(golden_protos):
    model = graph.load(golden_protos["G11"])
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert values["C"].shape == [1, 1, 4096]
    assert values["Y1"].dtype == ir.DataType.BFLOAT16


def _unnamed_chain(names: list[str]) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name=names[0]),
        helper.make_node("Relu", ["a"], ["b"], name=names[1]),
        helper.make_node("Neg", ["a"], ["c"], name=names[2]),
        helper.make_node("Add", ["b", "c"], ["y"], name=names[3]),
    ]
    return make_model(nodes, [vi("x", [4])], [vi("y", [4])])


def test_unnamed_nodes_get_unique_order_independent_names():
    proto = _unnamed_chain(["", "", "", ""])
    forward = _names(graph.load(proto))
    backward = _names(graph.load(reversed_nodes(proto)))
    assert forward == backward
    assert len(set(forward)) == 4
    assert forward == ["Relu_a", "Neg_c", "Relu_b", "Add_y"]


def test_duplicate_names_are_made_unique_order_independently():
    proto = _unnamed_chain(["n", "n", "n", "add"])
    forward = _names(graph.load(proto))
    assert forward == _names(graph.load(reversed_nodes(proto)))
    assert sorted(forward) == ["add", "n_a", "n_b", "n_c"]


def test_derived_name_clash_is_resolved_deterministically():
    # An unnamed Relu producing "a" derives "Relu_a", which another node already owns.
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["y"], name="Relu_a"),
    ]
    proto = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    forward = _names(graph.load(proto))
    assert forward == _names(graph.load(reversed_nodes(proto)))
    assert forward == ["Relu_a_1", "Relu_a"]


def test_op_fed_only_by_initializers_is_kept_and_ordered():
    nodes = [
        helper.make_node("Add", ["c1", "c2"], ["k"], name="fold_me"),  # no graph input upstream
        helper.make_node("Mul", ["x", "k"], ["y"], name="scale"),
    ]
    proto = make_model(
        nodes,
        [vi("x", [3])],
        [vi("y", [3])],
        [const("c1", np.ones(3, np.float32)), const("c2", np.ones(3, np.float32))],
    )
    model = graph.load(reversed_nodes(proto))
    assert _names(model) == ["fold_me", "scale"]
    k = model.graph.node("fold_me").outputs[0]
    assert k.shape == [3] and k.dtype == ir.DataType.FLOAT


def test_initializer_also_listed_as_graph_input_is_a_constant():
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    proto = make_model(
        nodes,
        [vi("x", [3]), vi("w", [3])],
        [vi("y", [3])],
        [const("w", np.arange(3, dtype=np.float32))],
    )
    model = graph.load(proto)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert model.graph.initializers["w"].is_initializer()
    life = graph.lifetimes(model)
    assert life[model.graph.initializers["w"]].is_constant


def test_ir3_initializer_inputs_are_typed_for_inference():
    """IR 3 (onnx's light model zoo): initializers count only when listed as inputs. Once they
    leave the input list the model is IR 4, or onnx inference would see untyped tensors."""
    nodes = [helper.make_node("Unsqueeze", ["b"], ["u"], name="unsq", axes=[1])]
    nodes.append(helper.make_node("Add", ["x", "u"], ["y"], name="add"))
    proto = make_model(
        nodes,
        [vi("x", [3, 2]), vi("b", [3])],
        [vi("y", [3, 2])],
        [const("b", np.arange(3, dtype=np.float32))],
    )
    proto.ir_version = 3
    proto.opset_import[0].version = 9
    model = graph.load(proto)
    assert model.ir_version == 4
    assert [v.name for v in model.graph.inputs] == ["x"]
    unsqueezed = model.graph.node("unsq").outputs[0]
    assert unsqueezed.dtype == ir.DataType.FLOAT and list(unsqueezed.shape) == [3, 1]


def test_constant_nodes_become_initializers():
    nodes = [
        helper.make_node("Constant", [], ["k"], value=const("k", np.ones(3, np.float32))),
        helper.make_node("Mul", ["x", "k"], ["y"], name="mul"),
    ]
    model = graph.load(make_model(nodes, [vi("x", [3])], [vi("y", [3])]))
    assert _names(model) == ["mul"]
    assert "k" in model.graph.initializers


def _symbolic() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
    ]
    return make_model(
        nodes,
        [vi("x", ["batch", 8])],
        [vi("y", ["batch", 4])],
        [const("w", np.ones((8, 4), np.float32))],
        value_info=[vi("r", ["batch", 8])],
    )


def test_symbolic_dim_without_binding_names_tensor_and_dim():
    with pytest.raises(ModelError) as err:
        graph.load(_symbolic())
    message = str(err.value)
    assert "'x'" in message and "'batch'" in message
    assert "dims=" in message and "--dims batch=" in message


def test_symbolic_dim_binding_reinfers_shapes():
    model = graph.load(_symbolic(), dims={"batch": 3})
    assert model.graph.inputs[0].shape == [3, 8]
    assert model.graph.outputs[0].shape == [3, 4]
    assert model.graph.node("relu").outputs[0].shape == [3, 8]


def test_unknown_dims_name_is_rejected():
    with pytest.raises(ModelError, match=r"'batc'.*batch"):
        graph.load(_symbolic(), dims={"batc": 3})


def test_custom_op_without_declared_shape_is_rejected():
    nodes = [helper.make_node("Mystery", ["x"], ["y"], name="mystery", domain="com.acme")]
    proto = make_model(
        nodes,
        [vi("x", [3])],
        [helper.make_empty_tensor_value_info("y")],
        extra_opsets={"com.acme": 1},
    )
    with pytest.raises(ModelError, match=r"'y'.*'mystery'.*value_info"):
        graph.load(proto)


def test_inconsistent_declared_shape_is_rejected_naming_the_node():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    proto = make_model(
        nodes, [vi("x", [2, 4])], [vi("y", [2, 6])], [const("w", np.ones((4, 5), np.float32))]
    )
    with pytest.raises(ModelError, match=r"node name: mm.*\(5\) vs \(6\)"):
        graph.load(proto)


def test_cycle_is_rejected_naming_nodes():
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="add"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    with pytest.raises(ModelError, match=r"cycle.*'add'.*'neg'|cycle.*'neg'.*'add'"):
        graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2])]))


def test_dangling_input_is_rejected_naming_node_and_tensor():
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    with pytest.raises(ModelError, match=r"'add'.*'ghost'"):
        graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2])]))


def _external_model(tmp_path: Path, location: str) -> Path:
    weight = const("w", np.arange(64, dtype=np.float32))
    onnx.external_data_helper.set_external_data(weight, location=location)
    weight.ClearField("raw_data")
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    proto = make_model(nodes, [vi("x", [64])], [vi("y", [64])], [weight])
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../x.bin", "sub/../../x.bin", "/etc/passwd", "C:\\w.bin"])
def test_external_data_outside_model_folder_is_rejected(tmp_path, location):
    path = _external_model(tmp_path, location)
    with pytest.raises(ModelError, match=r"tensor 'w'.*folder"):
        graph.load(path)
    with pytest.raises(ModelError, match=r"tensor 'w'.*(absolute|outside)"):
        graph.load(onnx.load(path, load_external_data=False))


def test_external_data_symlink_escape_is_rejected(tmp_path):
    path = _external_model(tmp_path, "link.bin")
    (tmp_path / "outside.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    (path.parent / "link.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ModelError, match="outside the model's folder"):
        graph.load(path)


def test_external_data_inside_model_folder_is_accepted(tmp_path):
    path = _external_model(tmp_path, "weights/w.bin")
    (path.parent / "weights").mkdir()
    (path.parent / "weights" / "w.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    model = graph.load(path)
    np.testing.assert_array_equal(
        model.graph.initializers["w"].const_value.numpy(), np.arange(64, dtype=np.float32)
    )


def test_external_data_missing_short_or_folderless_is_rejected(tmp_path):
    path = _external_model(tmp_path, "w.bin")
    with pytest.raises(ModelError, match=r"tensor 'w'.*does not exist"):
        graph.load(path)
    (path.parent / "w.bin").write_bytes(b"\0" * 100)  # 256 bytes needed
    proto = onnx.load(path, load_external_data=False)
    entry = proto.graph.initializer[0].external_data.add()
    entry.key, entry.value = "length", "256"
    onnx.save(proto, path)
    with pytest.raises(ModelError, match=r"tensor 'w'.*only 100 bytes"):
        graph.load(path)
    with pytest.raises(ModelError, match=r"tensor 'w'.*no folder.*pass the .onnx path"):
        graph.load(onnx.load(path, load_external_data=False))


def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        graph.load(tmp_path / "nope.onnx")


def test_ir_model_argument_is_loaded_in_place():
    proto = _unnamed_chain(["", "", "", ""])
    model = ir.from_proto(proto)
    assert graph.load(model) is model
    assert all(n.name for n in model.graph)


def _chain(n: int) -> onnx.ModelProto:
    ops = ("Relu", "Neg", "Sigmoid", "Abs")
    nodes = [
        helper.make_node(ops[i % 4], [f"t{i}"], [f"t{i + 1}"]) for i in range(n)
    ]  # unnamed, like many exporters
    nodes[n // 2] = helper.make_node("Add", [f"t{n // 2}", "t0"], [f"t{n // 2 + 1}"])
    return make_model(nodes, [vi("t0", [4], F32)], [vi(f"t{n}", [4], F32)])


def test_ten_thousand_node_graph_loads_and_partitions_fast():
    proto = reversed_nodes(_chain(10_000))
    start = time.perf_counter()
    model = graph.load(proto)
    parts = graph.partition(model, {"Relu", "Neg", "Add"})
    elapsed = time.perf_counter() - start
    assert len(graph.topological_order(model)) == 10_000
    assert sum(len(p.nodes) for p in parts) == 10_000
    assert elapsed < 20, f"load + partition of 10k nodes took {elapsed:.1f} s"


def test_a_graph_output_declared_with_a_wrong_rank_still_loads():
    """onnxruntime warns and runs it; the stale declaration must not reach strict inference."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    proto = make_model(nodes, [vi("x", [2, 8, 4])], [vi("y", ["batch", "seq"])], [])
    model = graph.load(proto)
    assert list(model.graph.outputs[0].shape) == [2, 8, 4]
