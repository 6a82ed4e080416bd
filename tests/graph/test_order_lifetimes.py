"""networkx view, topological order and tensor lifetimes."""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnx_ir as ir
import pytest
from graphmodels import const, make_model, reversed_nodes, vi
from onnx import helper

from npudispatch import graph
from npudispatch.errors import ModelError
from npudispatch.examples import build_example


def _by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    values.update({v.name: v for n in model.graph for v in n.outputs})
    return values


def test_to_networkx_nodes_edges_and_values(golden_protos):
    model = graph.load(golden_protos["G11"])
    dg = graph.to_networkx(model)
    assert isinstance(dg, nx.DiGraph)
    assert set(dg.nodes) == set(model.graph)
    names = {(u.name, v.name): [x.name for x in d["values"]] for u, v, d in dg.edges(data=True)}
    assert names == {
        ("gate_proj", "silu"): ["Y0"],
        ("up_proj", "elwmul"): ["Y1"],
        ("silu", "elwmul"): ["Z0"],
        ("elwmul", "down_proj"): ["A"],
    }


def test_one_value_feeding_two_slots_is_listed_once():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r"),
        helper.make_node("Mul", ["a", "a"], ["y"], name="sq"),
    ]
    model = graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2])]))
    dg = graph.to_networkx(model)
    (edge,) = dg.edges(data=True)
    assert [v.name for v in edge[2]["values"]] == ["a"]


def test_order_is_independent_of_file_order_for_a_fork():
    # A -> B, A -> C -> B: DD's DFS wrongly gives A, B, C.
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="A"),
        helper.make_node("Add", ["a", "c"], ["y"], name="B"),
        helper.make_node("Neg", ["a"], ["c"], name="C"),
    ]
    proto = make_model(nodes, [vi("x", [2])], [vi("y", [2])])
    for p in (proto, reversed_nodes(proto)):
        assert [n.name for n in graph.topological_order(graph.load(p))] == ["A", "C", "B"]


def test_lifetimes_llama2_mlp_match_dd_reference(golden_protos):
    model = graph.load(golden_protos["G11"])
    life = graph.lifetimes(model)
    v = _by_name(model)
    expected = {"X": (0, 1), "Y0": (0, 2), "Y1": (1, 3), "Z0": (2, 3), "A": (3, 4), "C": (4, 4)}
    assert {k: (life[v[k]].first, life[v[k]].last) for k in expected} == expected
    assert life[v["X"]].is_input and not life[v["X"]].is_output
    assert life[v["C"]].is_output
    assert life[v["mul3_weights"]].is_constant and life[v["mul3_weights"]].first == 0
    assert life[v["mul3_weights"]].last == 4
    assert not life[v["Y0"]].overlaps(life[v["A"]]) and life[v["Y0"]].overlaps(life[v["Y1"]])


def test_lifetimes_standard_llama2_mlp():
    model = graph.load(build_example("llama2-mlp-small"))
    life = graph.lifetimes(model)
    v = _by_name(model)
    assert (life[v["X"]].first, life[v["X"]].last) == (0, 1)
    assert (life[v["/mlp/gate_proj/output_0"]].first, life[v["/mlp/gate_proj/output_0"]].last) == (
        0,
        3,
    )
    assert (life[v["/mlp/Mul_output_0"]].first, life[v["/mlp/Mul_output_0"]].last) == (4, 5)
    assert (life[v["Y"]].first, life[v["Y"]].last) == (5, 5)


def test_graph_output_read_by_a_later_node_lives_to_the_end():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="first"),
        helper.make_node("Neg", ["a"], ["b"], name="second"),
        helper.make_node("Neg", ["b"], ["y"], name="third"),
        helper.make_node("Abs", ["x"], ["unused"], name="dead"),
    ]
    model = graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("a", [2])]))
    life = graph.lifetimes(model)
    v = _by_name(model)
    assert life[v["a"]].last == 3 and life[v["a"]].is_output
    order = [n.name for n in graph.topological_order(model)]
    dead = order.index("dead")
    assert (life[v["unused"]].first, life[v["unused"]].last) == (dead, dead)


def test_lifetimes_reject_a_bad_order():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="first"),
        helper.make_node("Neg", ["a"], ["y"], name="second"),
    ]
    model = graph.load(make_model(nodes, [vi("x", [2])], [vi("y", [2])]))
    order = graph.topological_order(model)
    with pytest.raises(ModelError, match=r"'second'.*before the producer"):
        graph.lifetimes(model, list(reversed(order)))
    with pytest.raises(ModelError, match="exactly once"):
        graph.lifetimes(model, order[:1])


def test_if_body_captures_count_as_inputs():
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["t"], name="neg_in_then")], "then", [], [vi("t", [2])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["e"], name="relu_in_else")], "else", [], [vi("e", [2])]
    )
    nodes = [
        helper.make_node(
            "If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph
        ),
        helper.make_node("Abs", ["x"], ["a"], name="producer"),
    ]
    from onnx import TensorProto

    proto = make_model(nodes, [vi("x", [2]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2])])
    model = graph.load(proto)
    assert [n.name for n in graph.topological_order(model)] == ["producer", "branch"]
    life = graph.lifetimes(model)
    assert life[_by_name(model)["a"]].last == 1
    dg = graph.to_networkx(model)
    assert [
        v.name for v in dg.edges[model.graph.node("producer"), model.graph.node("branch")]["values"]
    ] == ["a"]


def test_constant_fed_node_has_depth_zero():
    nodes = [
        helper.make_node("Add", ["c", "c"], ["k"], name="z_const"),
        helper.make_node("Relu", ["x"], ["r"], name="a_relu"),
        helper.make_node("Add", ["r", "k"], ["y"], name="join"),
    ]
    proto = make_model(nodes, [vi("x", [2])], [vi("y", [2])], [const("c", np.ones(2, np.float32))])
    # Both sources are at depth 0, so names decide between them.
    order = [n.name for n in graph.topological_order(graph.load(proto))]
    assert order == ["a_relu", "z_const", "join"]
