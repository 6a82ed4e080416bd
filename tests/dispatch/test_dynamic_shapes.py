"""Dynamic shapes: compile per new input shapes, LRU of specialisations, warmup, bucketing,
onnxruntime-style errors for bad feeds. References are onnxruntime runs of the same model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from e2e_models import assert_close
from onnx import TensorProto, helper, numpy_helper

from npudispatch import Session
from npudispatch.errors import ModelError

D = 64


def gated_mlp(x_dims=("batch", None, D)) -> onnx.ModelProto:
    """``y = silu(x @ W)`` with free leading dims (named and unnamed)."""
    w = np.random.default_rng(0).standard_normal((D, D)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
        helper.make_node("Mul", ["h", "s"], ["y"], name="mul"),
    ]
    g = helper.make_graph(
        nodes,
        "gated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_dims))],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return gated_mlp()


@pytest.fixture(scope="module")
def reference(model):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def test_free_dims_compile_on_first_run_per_shape(model, reference):
    s = Session(model, cache=False)
    assert s.get_inputs()[0].shape == ["batch", None, D]  # as onnxruntime shows them
    assert s.compile_log == [] and s.programs == []  # nothing to compile before a feed
    for i, shape in enumerate([(1, 5, D), (2, 7, D), (1, 5, D)]):
        x = _x(*shape, seed=i)
        (y,) = s.run(None, {"x": x})
        assert y.shape == shape
        assert_close(y, reference(x))
        stats = s.last_run_stats
        assert stats.kernel_calls == 1 and stats.input_shapes == {"x": shape}
        assert stats.compiled == (i < 2)
    assert [(e.input_shapes, e.source, e.run) for e in s.compile_log] == [
        ({"x": (1, 5, D)}, "compiled", 1),
        ({"x": (2, 7, D)}, "compiled", 2),
    ]
    assert all(e.seconds > 0 for e in s.compile_log)


def test_lru_keeps_a_bounded_number_of_specialisations(model):
    s = Session(model, cache=False, max_specialisations=2)
    for n in (1, 2, 3):
        s.run(None, {"x": _x(1, n, D)})
    assert len(s._variants) == 2
    s.run(None, {"x": _x(1, 3, D)})  # most recent: kept
    assert not s.last_run_stats.compiled
    s.run(None, {"x": _x(1, 1, D)})  # evicted first: compiled again
    assert s.last_run_stats.compiled and len(s.compile_log) == 4
    with pytest.raises(ModelError, match="max_specialisations"):
        Session(model, cache=False, max_specialisations=0)


def test_warmup_compiles_ahead_of_time(model):
    s = Session(model, cache=False)
    events = s.warmup([{"x": (1, 3, D)}, {"x": (2, 3, D)}])
    assert [e.input_shapes for e in events] == [{"x": (1, 3, D)}, {"x": (2, 3, D)}]
    assert all(e.run is None for e in events)
    s.run(None, {"x": _x(2, 3, D)})
    assert not s.last_run_stats.compiled
    assert s.warmup({"x": (2, 3, D)}) == []  # already there
    with pytest.raises(ModelError, match="Invalid rank"):
        s.warmup({"x": (3, D)})


def test_input_shapes_and_dims_bind_up_front(model, reference):
    s = Session(model, cache=False, input_shapes={"x": (2, 4, D)})
    assert s.get_inputs()[0].shape == [2, 4, D]
    assert [e.run for e in s.compile_log] == [None]  # compiled at construction
    x = _x(2, 4, D)
    assert_close(s.run(None, {"x": x})[0], reference(x))
    partly = Session(model, cache=False, dims={"batch": 1})
    assert partly.get_inputs()[0].shape == [1, None, D] and partly.compile_log == []
    with pytest.raises(ModelError, match="Got invalid dimensions for input: x"):
        partly.run(None, {"x": _x(2, 4, D)})
    with pytest.raises(ModelError, match="rank 2"):
        Session(model, cache=False, input_shapes={"x": (4, D)})
    with pytest.raises(ModelError, match="not model inputs"):
        Session(model, cache=False, input_shapes={"y": (1, 4, D)})
    with pytest.raises(ModelError, match="do not appear"):
        Session(model, cache=False, dims={"batchh": 1})


def test_reused_dim_name_with_different_values():
    """Exporters name unrelated dims alike (ppocr's classifier: ``[-1, 3, '?', '?']``);
    onnxruntime does not tie them, neither do we."""
    model = gated_mlp(("?", "?", D))
    x = _x(2, 3, D)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert_close(Session(model, cache=False).run(None, {"x": x})[0], ref)


@pytest.mark.parametrize(
    ("feed", "match"),
    [
        (np.zeros((1, 5), np.float32), r"Invalid rank for input: x Got: 2 Expected: 3"),
        (np.zeros((1, 5, D), np.float64), r"Unexpected input data type.*tensor\(double\)"),
        (np.zeros((1, 5, 8), np.float32), r"index: 2 Got: 8 Expected: 64"),
    ],
)
def test_bad_feeds_read_like_onnxruntime(model, feed, match):
    s = Session(model, cache=False)
    with pytest.raises(ModelError, match=match):
        s.run(None, {"x": feed})
    assert s.compile_log == []  # refused before compiling anything


def test_unknown_output_name_reads_like_onnxruntime(model):
    with pytest.raises(ModelError, match="Invalid output name:nope"):
        Session(model, cache=False).run(["nope"], {"x": _x(1, 2, D)})


def test_bucketing_pads_in_crops_out_and_shares_programs(model, reference):
    s = Session(model, cache=False, bucket={"x:1": 8})
    for n in (5, 7, 8):
        x = _x(1, n, D, seed=n)
        (y,) = s.run(None, {"x": x})
        assert y.shape == (1, n, D)
        assert_close(y, reference(x))
        assert s.last_run_stats.program_shapes == {"x": (1, 8, D)}
    assert len(s.compile_log) == 1
    s.run(None, {"x": _x(1, 9, D)})
    assert s.last_run_stats.program_shapes == {"x": (1, 16, D)} and len(s.compile_log) == 2
    by_name = Session(model, cache=False, bucket={"batch": 4})
    (y,) = by_name.run(None, {"x": _x(3, 2, D)})
    assert y.shape == (3, 2, D) and by_name.last_run_stats.program_shapes == {"x": (4, 2, D)}
    with pytest.raises(ModelError, match="names no free input dim"):
        Session(model, cache=False, bucket={"x:2": 8})


def test_cli_run_binds_free_dims_from_the_inputs_file(model, tmp_path, capsys):
    """``run MODEL --inputs x.npz --check``: the arrays' shapes bind the free dims, for the
    session and for the onnxruntime reference."""
    from npudispatch.cli import main

    path, npz = tmp_path / "dyn.onnx", tmp_path / "x.npz"
    onnx.save(model, path)
    np.savez(npz, x=_x(2, 3, D))
    capsys.readouterr()
    assert main(["run", str(path), "--inputs", str(npz), "--check", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] is True and summary["outputs"]["y"]["shape"] == [2, 3, D]
    assert main(["run", str(path)]) == 2  # random inputs need a shape
    assert "free dims" in capsys.readouterr().err


def test_sequence_of_maps_output_runs_and_shows_its_type():
    """A scikit-learn classifier's ZipMap output (as in onnxruntime's logreg_iris sample) is a
    sequence of maps: it runs on the CPU and comes back as onnxruntime returns it, a list of
    dicts, with onnxruntime's type text; the free batch dim is still bound from the feed."""
    seq = helper.make_value_info(
        "probs",
        helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, None))
        ),
    )
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node(
                "ZipMap", ["y"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[4, 7]
            ),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]), seq],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    )
    sess = Session(model, cache=False)
    assert [(o.name, o.type, o.shape) for o in sess.get_outputs()] == [
        ("y", "tensor(float)", ["batch", 2]),
        ("probs", "seq(map(int64,tensor(float)))", []),
    ]
    x = np.array([[1.0, -2.0], [-0.5, 3.0], [0.25, 0.0]], np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ref, probs_ref = want.run(None, {"x": x})
    y, probs = sess.run(None, {"x": x})
    assert_close(y, y_ref)
    assert probs == probs_ref and probs[1] == {4: 0.0, 7: 3.0}
