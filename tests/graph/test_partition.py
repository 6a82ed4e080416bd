"""Partitioning, the partition report and extract()."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphmodels import make_model, mlp_with_cpu_gap, vi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from npudispatch import graph
from npudispatch.errors import ModelError

AMD_MLP = {("amd.com", "MladfMatMul"), ("amd.com", "SILU"), ("amd.com", "ELWMUL")}


def _names(parts: list[graph.Partition]) -> list[tuple[str, list[str]]]:
    return [(p.kind, [n.name for n in p.nodes]) for p in parts]


def test_g14_gives_npu_then_cpu(golden_protos):
    model = graph.load(golden_protos["G14"])
    parts = graph.partition(model, {("com.amd", "MatMul")})
    assert _names(parts) == [("npu", ["matmul1", "matmul2"]), ("cpu", ["matmul3"])]
    npu, cpu = parts
    assert [v.name for v in npu.inputs] == ["X"]
    assert [v.name for v in npu.outputs] == ["Y2"]
    assert [v.name for v in npu.constants] == ["W0", "qdq", "qdq_params", "W1", "qdq1"]
    assert [v.name for v in cpu.inputs] == ["Y2"] and [v.name for v in cpu.outputs] == ["Y3"]


def test_g11_is_one_npu_partition_and_g3_parallel_ops_merge(golden_protos):
    parts = graph.partition(graph.load(golden_protos["G11"]), AMD_MLP)
    assert _names(parts) == [("npu", ["gate_proj", "up_proj", "silu", "elwmul", "down_proj"])]
    parts = graph.partition(graph.load(golden_protos["G3"]), {("com.amd", "MatMul")})
    assert _names(parts) == [("npu", ["mula", "mulb"])]
    assert [v.name for v in parts[0].outputs] == ["YA", "YB"]


def test_diamond_with_cpu_node_between_gives_separate_npu_partitions():
    # a -> c(cpu) -> b and a -> b: merging a and b would need c both before and after them.
    nodes = [
        helper.make_node("Relu", ["x"], ["ta"], name="a"),
        helper.make_node("Neg", ["ta"], ["tc"], name="c"),
        helper.make_node("Add", ["ta", "tc"], ["y"], name="b"),
    ]
    model = graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2])]))
    parts = graph.partition(model, {"Relu", "Add"})
    assert _names(parts) == [("npu", ["a"]), ("cpu", ["c"]), ("npu", ["b"])]
    assert [v.name for v in parts[2].inputs] == ["ta", "tc"]
    assert [v.name for v in parts[0].outputs] == ["ta"]


def test_independent_supported_node_joins_a_later_partition():
    # s2 only depends on x; it can join the partition of n2 even though n2 comes after a CPU node.
    nodes = [
        helper.make_node("Relu", ["x"], ["t1"], name="n1"),
        helper.make_node("Neg", ["t1"], ["t2"], name="cpu"),
        helper.make_node("Relu", ["t2"], ["y"], name="n2"),
        helper.make_node("Relu", ["x"], ["y2"], name="s2"),
    ]
    model = graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("y2", [2])]))
    parts = graph.partition(model, {"Relu"})
    assert [p.kind for p in parts] == ["npu", "cpu", "npu"]
    assert sum(p.kind == "npu" for p in parts) == 2
    assert {n.name for p in parts for n in p.nodes} == {"n1", "cpu", "n2", "s2"}


def test_report_lists_unsupported_nodes_with_reasons(golden_protos):
    rep = graph.report(graph.load(golden_protos["G14"]), {("com.amd", "MatMul")})
    assert [u.to_dict() for u in rep.unsupported] == [
        {
            "node": "matmul3",
            "op_type": "MatMul_CPU",
            "domain": "com.amd",
            "reason": "op type 'MatMul_CPU' (domain 'com.amd') is not in the supported set",
        }
    ]


def test_callable_support_supplies_reasons():
    model = graph.load(mlp_with_cpu_gap())

    def query(node: ir.Node) -> str | None:
        if node.outputs[0].shape[-1] == 16:
            return "N = 16 is not a multiple of 32"
        return None

    rep = graph.report(model, query)
    assert {u.name: u.reason for u in rep.unsupported} == {
        "mm1": "N = 16 is not a multiple of 32",
        "add1": "N = 16 is not a multiple of 32",
        "relu": "N = 16 is not a multiple of 32",
    }


def test_default_support_reasons():
    model = graph.load(mlp_with_cpu_gap())
    assert graph.default_support(model.graph.node("mm1")) is None
    reason = graph.default_support(model.graph.node("relu"))
    assert reason == "op type 'Atan' (domain 'ai.onnx') is not in the supported set"
    nodes = [helper.make_node("Cast", ["x"], ["y"], name="to_i64", to=onnx.TensorProto.INT64)]
    cast = graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2], onnx.TensorProto.INT64)]))
    assert "INT64" in graph.default_support(cast.graph.node("to_i64"))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def test_extract_partitions_pass_checker_and_reproduce_the_model():
    proto = mlp_with_cpu_gap()
    model = graph.load(proto)
    parts = graph.partition(model, graph.default_support)
    assert [p.kind for p in parts] == ["npu", "cpu", "npu"]
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    expected = _run(proto, {"x": x})
    values = {"x": x}
    for part in parts:
        sub = ir.to_proto(graph.extract(model, part))
        assert sub.ir_version == 10
        onnx.checker.check_model(sub, full_check=True)
        assert {t.name for t in sub.graph.initializer} == {v.name for v in part.constants}
        out = _run(sub, {v.name: values[v.name] for v in part.inputs})
        values.update(out)
    for name, value in expected.items():
        np.testing.assert_allclose(values[name], value, rtol=1e-5, atol=1e-5)


def test_extract_rejects_dead_nodes():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="live"),
        helper.make_node("Neg", ["x"], ["unused"], name="dead"),
    ]
    model = graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2])]))
    (part,) = graph.partition(model, {"Relu", "Neg"})
    with pytest.raises(ModelError, match=r"'dead'.*dead code"):
        graph.extract(model, part)


# ----------------------------------------------------------------------------- random DAGs


@st.composite
def random_dags(draw):
    """(ModelProto, supported node names): unary/binary float ops over random earlier values."""
    n = draw(st.integers(1, 14))
    values = ["x"]
    nodes, supported = [], set()
    for i in range(n):
        arity = draw(st.integers(1, 2))
        ins = [values[draw(st.integers(0, len(values) - 1))] for _ in range(arity)]
        op = "Add" if arity == 2 else "Relu"
        nodes.append(helper.make_node(op, ins, [f"v{i}"], name=f"n{i:02d}"))
        values.append(f"v{i}")
        if draw(st.booleans()):
            supported.add(f"n{i:02d}")
    consumed = {i for node in nodes for i in node.input}
    outputs = [vi(v, [2]) for v in values[1:] if v not in consumed]
    shuffled = draw(st.permutations(nodes))
    return make_model(shuffled, [vi("x", [2])], outputs), supported


def _contract(dg: nx.DiGraph, label: dict) -> nx.DiGraph:
    out = nx.DiGraph()
    out.add_nodes_from(set(label.values()))
    out.add_edges_from((label[u], label[v]) for u, v in dg.edges if label[u] != label[v])
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_random_dag_partitions_are_valid_and_maximal(case):
    proto, supported = case
    model = graph.load(proto)
    parts = graph.partition(model, lambda node: None if node.name in supported else "no")
    dg = graph.to_networkx(model)
    label = {node: i for i, part in enumerate(parts) for node in part.nodes}
    # Every node in exactly one partition, of the right kind.
    assert sum(len(p.nodes) for p in parts) == len(model.graph) == len(label)
    for part in parts:
        assert all((n.name in supported) == (part.kind == "npu") for n in part.nodes)
    # Acyclic after contraction, and listed in a topological order.
    contracted = _contract(dg, label)
    assert nx.is_directed_acyclic_graph(contracted)
    assert all(u < v for u, v in contracted.edges)
    # Maximal: merging any two partitions of the same kind would close a cycle.
    for i, j in itertools.combinations(range(len(parts)), 2):
        if parts[i].kind != parts[j].kind:
            continue
        merged = {node: (i if lab == j else lab) for node, lab in label.items()}
        assert not nx.is_directed_acyclic_graph(_contract(dg, merged)), (i, j)
    # Borders: inputs come from outside, outputs are read outside or are graph outputs.
    for i, part in enumerate(parts):
        for value in part.inputs:
            assert value.producer() is None or label[value.producer()] != i
        for value in part.outputs:
            outside = any(label[c] != i for c in value.consumers())
            assert outside or value.is_graph_output()
