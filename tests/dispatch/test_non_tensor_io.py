"""Models whose graph inputs or outputs are sequences, maps or optionals.

Such values never go to the NPU: the nodes reading or writing them run in CPU segments on
onnxruntime, non-tensor feeds are checked against their type and passed through, and non-tensor
outputs come back as onnxruntime returns them (lists, lists of dicts, None for an empty
optional). The tensor part of the graph still runs as an NPU kernel call. Every result is
compared with onnxruntime's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import npudispatch
import npudispatch.onnxruntime as npu_ort
from npudispatch.errors import ModelError

FLOAT_SEQ = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
FLOAT_OPT = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))


def _logreg_iris() -> Path:
    import onnxruntime.datasets

    path = Path(os.path.dirname(onnxruntime.datasets.__file__)) / "logreg_iris.onnx"
    if not path.is_file():
        pytest.skip(f"onnxruntime's sample {path} is not installed with this onnxruntime")
    return path


def _reference(model: onnx.ModelProto | Path, feeds: dict[str, Any]) -> list[Any]:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _assert_same(got: list[Any], want: list[Any], rtol: float = 0.0, atol: float = 0.0) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        elif isinstance(w, list):
            assert isinstance(g, list) and len(g) == len(w)
            _assert_same(g, w, rtol, atol)
        elif isinstance(w, dict):
            assert isinstance(g, dict) and g.keys() == w.keys()
            np.testing.assert_allclose(list(g.values()), list(w.values()), rtol=rtol, atol=atol)
        else:
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_logreg_iris_zipmap_runs_like_onnxruntime():
    """onnxruntime's scikit-learn sample: LinearClassifier + ZipMap, whose ``probabilities`` is a
    sequence of maps, through Session and through the onnxruntime drop-in."""
    path = _logreg_iris()
    x = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
    want = _reference(path, {"float_input": x})
    assert isinstance(want[1], list) and isinstance(want[1][0], dict)

    sess = npudispatch.Session(path, cache=False)
    _assert_same(sess.run(None, {"float_input": x}), want)
    (label_arg, probs_arg) = sess.get_outputs()
    assert (probs_arg.name, probs_arg.type, probs_arg.shape) == (
        "probabilities",
        "seq(map(int64,tensor(float)))",
        [],
    )
    assert label_arg.type == "tensor(int64)"

    drop_in = npu_ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    control = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(a.name, a.type, a.shape) for a in drop_in.get_outputs()] == [
        (a.name, a.type, a.shape) for a in control.get_outputs()
    ]
    _assert_same(drop_in.run(None, {"float_input": x}), want)
    _assert_same(drop_in.run(["probabilities"], {"float_input": x}), want[1:])
    ort_x = ort.OrtValue.ortvalue_from_numpy(x)
    (label,) = drop_in.run_with_ort_values(["label"], {"float_input": ort_x})
    np.testing.assert_array_equal(label.numpy(), want[0])
    with pytest.raises(npu_ort.InvalidArgument, match="output 'probabilities' is not a tensor"):
        drop_in.run_with_ort_values(None, {"float_input": ort_x})


def _mixed_model() -> onnx.ModelProto:
    """MatMul + Relu (NPU) feeding a SplitToSequence (sequence output), plus an optional input
    passed through and tested, and a sequence input whose length is returned."""
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Relu", ["mm"], ["y"]),
        helper.make_node("SplitToSequence", ["y"], ["parts"], axis=0, keepdims=1),
        helper.make_node("Identity", ["opt"], ["opt_out"]),
        helper.make_node("OptionalHasElement", ["opt"], ["has_opt"]),
        helper.make_node("SequenceLength", ["seq"], ["seq_len"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_value_info("opt", FLOAT_OPT),
            helper.make_value_info("seq", FLOAT_SEQ),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64]),
            helper.make_value_info("parts", FLOAT_SEQ),
            helper.make_value_info("opt_out", FLOAT_OPT),
            helper.make_tensor_value_info("has_opt", TensorProto.BOOL, []),
            helper.make_tensor_value_info("seq_len", TensorProto.INT64, []),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _mixed_feeds(opt: Any) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    return {
        "x": rng.standard_normal((2, 64)).astype(np.float32),
        "opt": opt,
        "seq": [np.ones((3,), np.float32), np.zeros((2, 2), np.float32)],
    }


BF16 = {"rtol": 2e-2, "atol": 2e-2}  # MatMul runs in bf16 on the NPU (docs/numerics.md)


@pytest.mark.parametrize("opt", [np.arange(3, dtype=np.float32), None], ids=["full", "empty"])
def test_tensor_part_on_npu_with_sequence_and_optional_io(opt):
    model = _mixed_model()
    feeds = _mixed_feeds(opt)
    want = _reference(model, feeds)
    sess = npudispatch.Session(model, cache=False)
    got = sess.run(None, feeds)
    _assert_same(got, want, **BF16)
    assert (got[2] is None) == (opt is None)
    assert sess.last_run_stats.kernel_calls == 1  # MatMul + Relu: one NPU kernel call
    npu_ops = {n.op_type for p in sess.compiled.partitions if p.kind == "npu" for n in p.nodes}
    assert {"MatMul", "Relu"} <= npu_ops
    reasons = {u.node.op_type: u.reason for u in sess.compiled.report.unsupported}
    assert reasons["SplitToSequence"] == (
        "'parts' has type seq(tensor(float)), not a tensor: the NPU computes on tensors only"
    )
    assert set(reasons) == {"SplitToSequence", "Identity", "OptionalHasElement", "SequenceLength"}
    types = {a.name: a.type for a in (*sess.get_inputs(), *sess.get_outputs())}
    assert types == {
        "x": "tensor(float)",
        "opt": "optional(tensor(float))",
        "seq": "seq(tensor(float))",
        "y": "tensor(float)",
        "parts": "seq(tensor(float))",
        "opt_out": "optional(tensor(float))",
        "has_opt": "tensor(bool)",
        "seq_len": "tensor(int64)",
    }
    # the drop-in returns the same values
    drop_in = npu_ort.InferenceSession(model.SerializeToString())
    _assert_same(drop_in.run(None, feeds), want, **BF16)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "seq",
            np.ones(3, np.float32),
            r"input 'seq' has type seq\(tensor\(float\)\), but the value fed is a numpy array, not a "
            r"seq\(tensor\(float\)\) \(a list\); feed a list",
        ),
        (
            "seq",
            [np.ones(3, np.float64)],
            r"input 'seq' has type seq\(tensor\(float\)\), but the value fed\[0\] is a "
            r"tensor\(double\) array, not a tensor\(float\)",
        ),
        (
            "opt",
            [np.ones(3, np.float32)],
            r"input 'opt' has type optional\(tensor\(float\)\), but the value fed is a list, not "
            r"a tensor\(float\) \(a numpy array\); feed None \(empty\) or the value",
        ),
    ],
)
def test_wrong_non_tensor_feed_names_the_input_and_its_type(name, value, message):
    sess = npudispatch.Session(_mixed_model(), cache=False)
    feeds = {**_mixed_feeds(None), name: value}
    with pytest.raises(ModelError, match=message):
        sess.run(None, feeds)
    with pytest.raises(npu_ort.InvalidArgument, match=message):
        npu_ort.InferenceSession(_mixed_model().SerializeToString()).run(None, feeds)


def test_tensor_checks_still_apply_next_to_non_tensor_inputs():
    sess = npudispatch.Session(_mixed_model(), cache=False)
    feeds = {**_mixed_feeds(None), "x": np.ones((2, 64), np.float64)}
    with pytest.raises(ModelError, match=r"Unexpected input data type.*'x'"):
        sess.run(None, feeds)
    with pytest.raises(ModelError, match=r"missing input\(s\) \['seq'\]"):
        sess.run(None, {k: v for k, v in _mixed_feeds(None).items() if k != "seq"})


def test_compiled_folder_and_disk_cache_keep_non_tensor_signatures(tmp_path):
    """``compile -o`` folders record the sequence / optional types (compiled.json) and run
    without the model; a second session loads the same from the compile cache."""
    model = _mixed_model()
    feeds = _mixed_feeds(np.arange(2, dtype=np.float32))
    want = _reference(model, feeds)
    npudispatch.compile_model(model).save(tmp_path / "prog")
    loaded = npudispatch.Session(tmp_path / "prog")
    _assert_same(loaded.run(None, feeds), want, **BF16)
    assert loaded.last_run_stats.kernel_calls == 1
    assert [a.type for a in loaded.get_inputs()] == [
        "tensor(float)",
        "optional(tensor(float))",
        "seq(tensor(float))",
    ]
    with pytest.raises(ModelError, match=r"input 'seq' has type seq\(tensor\(float\)\)"):
        loaded.run(None, {**feeds, "seq": None})

    logreg = _logreg_iris()
    x = np.ones((3, 2), np.float32)
    for _ in range(2):  # compiled, then from the disk cache
        sess = npudispatch.Session(logreg, cache=tmp_path / "cache")
        _assert_same(sess.run(None, {"float_input": x}), _reference(logreg, {"float_input": x}))
    assert sess.compile_log[-1].source == "disk cache"
    npudispatch.compile_model(logreg).save(tmp_path / "logreg")
    folder = npudispatch.Session(tmp_path / "logreg")
    assert folder.get_outputs()[1].type == "seq(map(int64,tensor(float)))"
    _assert_same(folder.run(None, {"float_input": x}), _reference(logreg, {"float_input": x}))


def test_cli_run_prints_non_tensor_outputs_and_refuses_what_it_cannot_handle(tmp_path, capsys):
    """``npudispatch run`` shows a sequence output by type and length; random / .npz inputs and
    ``--check`` / ``--save-outputs`` hold tensors only, so those are refused, naming the values."""
    from npudispatch.cli import main

    logreg = _logreg_iris()
    assert main(["run", str(logreg)]) == 0
    assert "probabilities: seq(map(int64,tensor(float)))[3]" in capsys.readouterr().out
    assert main(["run", str(logreg), "--check"]) == 2
    assert (
        "output(s) 'probabilities' (seq(map(int64,tensor(float)))) are not tensors, which "
        "--check cannot handle" in capsys.readouterr().err
    )
    onnx.save(_mixed_model(), tmp_path / "mixed.onnx")
    assert main(["run", str(tmp_path / "mixed.onnx")]) == 2
    assert (
        "input(s) 'opt' (optional(tensor(float))), 'seq' (seq(tensor(float))) are not tensors"
        in capsys.readouterr().err
    )


def _dict_vectorizer() -> onnx.ModelProto:
    """A map input (scikit-learn's DictVectorizer) feeding a Relu."""
    map_type = helper.make_map_type_proto(
        TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    )
    nodes = [
        helper.make_node(
            "DictVectorizer", ["d"], ["v"], domain="ai.onnx.ml", string_vocabulary=["a", "b", "c"]
        ),
        helper.make_node("Relu", ["v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dv",
        [helper.make_value_info("d", map_type)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_map_input_is_fed_through_and_checked(tmp_path):
    """onnx_ir cannot hold a map type: load keeps it as text and puts it back wherever the model
    is serialized (onnx inference, the CPU segment for onnxruntime, a saved folder)."""
    model = _dict_vectorizer()
    feeds = {"d": {"a": 1.5, "c": -2.0}}
    want = _reference(model, feeds)
    sess = npudispatch.Session(model, cache=False)
    assert sess.get_inputs()[0].type == "map(string,tensor(float))"
    _assert_same(sess.run(None, feeds), want)
    npudispatch.compile_model(model).save(tmp_path / "dv")
    _assert_same(npudispatch.Session(tmp_path / "dv").run(None, feeds), want)
    with pytest.raises(
        ModelError,
        match=r"input 'd' has type map\(string,tensor\(float\)\), but key 1 of the value fed is "
        r"an int, not a string; feed a dict",
    ):
        sess.run(None, {"d": {1: 1.0}})


@pytest.mark.parametrize("dtype", [object, str])
def test_sequence_of_string_tensors_takes_what_onnxruntime_takes(dtype):
    """Strings come as object (or str) arrays, as onnxruntime takes and returns them."""
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["s", "i"], ["y"])],
        "g",
        [helper.make_tensor_sequence_value_info("s", TensorProto.STRING, None)],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [None])],
        [numpy_helper.from_array(np.array(0, np.int64), "i")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feed = [np.array(["a", "bc"], dtype=dtype)]
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"s": feed})
    got = npudispatch.Session(model, cache=False).run(None, {"s": feed})
    assert [list(v) for v in got] == [list(v) for v in want]


SEQ_MAP = helper.make_sequence_type_proto(
    helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    )
)
VOCAB = [f"k{i}" for i in range(64)]


def _zipmap(data: str, out: str) -> onnx.NodeProto:
    return helper.make_node(
        "ZipMap", [data], [out], domain="ai.onnx.ml", classlabels_int64s=list(range(64))
    )


def _branch(name: str, op: str) -> onnx.GraphProto:
    """``op(acc) + DictVectorizer(d)`` (``d``: the main graph's map input), beside a ZipMap of
    ``op(acc)`` declared ``seq(map(int64,tensor(float)))`` in the branch's value_info."""
    nodes = [
        helper.make_node(op, ["acc"], [f"{name}_a"]),
        _zipmap(f"{name}_a", f"{name}_probs"),
        helper.make_node(
            "DictVectorizer", ["d"], [f"{name}_v"], domain="ai.onnx.ml", string_vocabulary=VOCAB
        ),
        helper.make_node("Add", [f"{name}_a", f"{name}_v"], [f"{name}_out"]),
    ]
    return helper.make_graph(
        nodes,
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 64])],
        value_info=[helper.make_value_info(f"{name}_probs", SEQ_MAP)],
    )


def _maps_in_subgraphs_model() -> onnx.ModelProto:
    """MatMul + Relu (NPU) feeding a Loop whose body holds a ZipMap and an If whose branches
    hold ZipMaps and read the map input: map-typed values one and two subgraphs deep.

    onnxruntime (and the ONNX spec) take no map-holding type as an If / Loop / Scan output and
    no op reads a ``seq(map)``, so inside a subgraph a map value can only be read from the outer
    scope or be a ZipMap result nobody reads (which npudispatch's dead-code pass removes)."""
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32) / 8
    body = helper.make_graph(
        [
            _zipmap("acc", "body_probs"),
            helper.make_node("Greater", ["i", "one"], ["late"]),
            helper.make_node(
                "If",
                ["late"],
                ["acc_out"],
                then_branch=_branch("then", "Sigmoid"),
                else_branch=_branch("else", "Neg"),
            ),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2, 64]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 64]),
        ],
        value_info=[helper.make_value_info("body_probs", SEQ_MAP)],
    )
    map_type = helper.make_map_type_proto(
        TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"]),
            helper.make_node("Relu", ["mm"], ["y"]),
            helper.make_node("Loop", ["n", "", "y"], ["z"], body=body),
        ],
        "maps_in_subgraphs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_value_info("d", map_type),
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _subgraph_map_types(graph: onnx.GraphProto, top: bool = True) -> dict[str, str]:
    """Name -> type text of every map-holding value declared inside ``graph``'s subgraphs."""
    from npudispatch.graph.value_types import type_text

    found: dict[str, str] = {}
    if not top:
        for v in (*graph.input, *graph.output, *graph.value_info):
            if v.type.HasField("map_type") or v.type.sequence_type.elem_type.HasField("map_type"):
                found[v.name] = type_text(v.type)
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                found.update(_subgraph_map_types(sub, top=False))
    return found


def test_map_types_inside_if_and_loop_bodies_are_kept(tmp_path):
    """Map types inside subgraphs get the main graph's treatment: kept as text at load (onnx_ir
    cannot hold them) and written back wherever a model is serialized, so a saved CPU segment
    declares them as the source does; the results are onnxruntime's."""
    model = _maps_in_subgraphs_model()
    source_types = _subgraph_map_types(model.graph)
    assert source_types == dict.fromkeys(
        ["body_probs", "then_probs", "else_probs"], "seq(map(int64,tensor(float)))"
    )
    feeds = {
        "x": np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32),
        "d": {"k1": 0.5, "k9": -1.0, "k63": 2.0},
        "n": np.array(4, np.int64),
    }
    want = _reference(model, feeds)

    sess = npudispatch.Session(model, cache=False)
    _assert_same(sess.run(None, feeds), want, **BF16)
    assert sess.last_run_stats.kernel_calls == 1  # MatMul + Relu

    # Without rewrites the ZipMaps survive (the dead-code pass would remove them) and the CPU
    # segment holding the Loop is written with the declared subgraph types.
    npudispatch.compile_model(model, rewrite=False).save(tmp_path / "prog")
    saved: dict[str, str] = {}
    for path in sorted((tmp_path / "prog").glob("cpu*/model.onnx")):
        saved.update(_subgraph_map_types(onnx.load(str(path), load_external_data=False).graph))
    assert saved == source_types
    _assert_same(npudispatch.Session(tmp_path / "prog").run(None, feeds), want, **BF16)
