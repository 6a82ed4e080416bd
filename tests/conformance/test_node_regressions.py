"""Regression tests for bugs the ONNX node-test suite found, each checked against onnxruntime.

Small models built here reproduce each one directly, so a failure names the bug instead of a
node-test case.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import npudispatch
from npudispatch.rewrites.precision import tolerance_for

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opsets=(("", 21),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "regression", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_castlike_keeps_saturate_0() -> None:
    """Shape folding lowered CastLike(saturate=0) to a Cast without saturate: float8 overflow
    became the saturated maximum (±448) instead of NaN."""
    like = numpy_helper.from_array(np.zeros(1, ml_dtypes.float8_e4m3fn), "like")
    model = _model(
        [
            helper.make_node("CastLike", ["x", "like"], ["x8"], saturate=0),
            helper.make_node("Cast", ["x8"], ["y"], to=F32),
        ],
        [helper.make_tensor_value_info("x", F32, [4])],
        [helper.make_tensor_value_info("y", F32, [4])],
        [like],
    )
    feeds = {"x": np.array([1.0, 1e6, -1e6, 500.0], np.float32)}
    (want,) = _onnxruntime(model, feeds)
    assert np.isnan(want[1:]).all()  # the reference really distinguishes saturate=0
    (got,) = npudispatch.Session(model).run(None, feeds)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op", ["Atan", "Relu"])  # Atan stays on the CPU, Relu has an operator
def test_scalar_keeps_rank_0(op: str) -> None:
    """Rank-0 tensors crossing a CPU segment came back with shape [1]."""
    model = _model(
        [helper.make_node(op, ["x"], ["y"]), helper.make_node("Atan", ["y"], ["z"])],
        [helper.make_tensor_value_info("x", F32, [])],
        [helper.make_tensor_value_info("y", F32, []), helper.make_tensor_value_info("z", F32, [])],
    )
    feeds = {"x": np.array(0.5, np.float32)}
    want = _onnxruntime(model, feeds)
    got = npudispatch.Session(model).run(None, feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape == ()
        tolerance_for([op]).assert_close(g, w, f"{op} scalar")


def test_empty_tensor_stays_off_the_npu() -> None:
    """A zero-size tensor routed to the NPU made the emulator report a hang; it is refused by the
    support query with a reason and runs on the CPU, with onnxruntime's (empty) result."""
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Add", ["x", "x"], ["z"])],
        [helper.make_tensor_value_info("x", F32, [0, 16])],
        [
            helper.make_tensor_value_info("y", F32, [0, 16]),
            helper.make_tensor_value_info("z", F32, [0, 16]),
        ],
    )
    feeds = {"x": np.zeros((0, 16), np.float32)}
    session = npudispatch.Session(model)
    got = session.run(None, feeds)
    for g, w in zip(got, _onnxruntime(model, feeds)):
        assert g.shape == w.shape == (0, 16) and g.dtype == w.dtype
    reasons = [u.reason for u in session.compiled.report.unsupported]
    assert reasons and all("empty" in r for r in reasons), reasons


def test_layer_normalization_statistics_outputs() -> None:
    """LayerNormalization with its Mean/InvStdDev outputs requested never reached a rewrite
    fixpoint; the statistics stay float32 (their stash type) while Y is computed in bf16."""
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=-1)],
        [
            helper.make_tensor_value_info(n, F32, shape)
            for n, shape in (("x", [4, 64]), ("s", [64]), ("b", [64]))
        ],
        [
            helper.make_tensor_value_info(n, F32, shape)
            for n, shape in (("y", [4, 64]), ("mean", [4, 1]), ("inv", [4, 1]))
        ],
        opsets=(("", 17),),
    )
    feeds = {
        "x": rng.standard_normal((4, 64)).astype(np.float32),
        "s": rng.standard_normal(64).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32),
    }
    session = npudispatch.Session(model)
    got = session.run(None, feeds)
    assert session.compiled.kernel_calls_per_run == 1  # the norm runs on the NPU
    tol = tolerance_for(["Cast", "LayerNormalization", "Cast"])
    for name, g, w in zip(("y", "mean", "inv"), got, _onnxruntime(model, feeds)):
        assert g.dtype == np.float32
        tol.scaled(float(np.sqrt(np.mean(w**2)))).assert_close(g, w, name)


def test_ai_onnx_ml_model_without_default_opset() -> None:
    """A model importing only ai.onnx.ml was refused for lacking a default-domain opset."""
    model = _model(
        [helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)],
        [helper.make_tensor_value_info("x", F32, [3, 4])],
        [helper.make_tensor_value_info("y", F32, [3, 4])],
        opsets=(("ai.onnx.ml", 1),),
    )
    feeds = {"x": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)}
    (got,) = npudispatch.Session(model).run(None, feeds)
    np.testing.assert_array_equal(got, _onnxruntime(model, feeds)[0])


def test_string_tensors_pass_the_size_limits() -> None:
    """The per-tensor size check asked a string tensor for its bit width (TypeError)."""
    model = _model(
        [helper.make_node("StringConcat", ["a", "b"], ["y"])],
        [helper.make_tensor_value_info(n, TensorProto.STRING, [2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [2])],
        opsets=(("", 20),),
    )
    feeds = {"a": np.array(["npu", ""], object), "b": np.array(["dispatch", "x"], object)}
    (got,) = npudispatch.Session(model).run(None, feeds)
    np.testing.assert_array_equal(got, _onnxruntime(model, feeds)[0])


def test_cpu_segment_run_failure_is_our_error_naming_segment_and_node() -> None:
    """A run-time onnxruntime failure surfaced as onnxruntime's own exception type."""
    model = _model(
        [helper.make_node("Gather", ["table", "idx"], ["y"], name="lookup")],
        [
            helper.make_tensor_value_info("table", F32, [4, 3]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", F32, [2, 3])],
    )
    feeds = {"table": np.ones((4, 3), np.float32), "idx": np.array([1, 7], np.int64)}
    with pytest.raises(Exception, match="out of data bounds"):  # the control: ort refuses too
        _onnxruntime(model, feeds)
    session = npudispatch.Session(model)
    with pytest.raises(npudispatch.CpuSegmentError) as info:
        session.run(None, feeds)
    message = str(info.value)
    assert "CPU segment cpu0" in message and "node lookup (ai.onnx.Gather)" in message
    assert "onnxruntime reported:" in message and "idx [2]" in message
    assert info.value.__cause__ is not None  # onnxruntime's exception stays attached


def test_cpu_segment_load_failure_quotes_the_engine() -> None:
    """A segment onnxruntime cannot load: say what it reported, not that the op is non-standard."""
    i16 = TensorProto.INT16
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="clamp")],
        [helper.make_tensor_value_info("x", i16, [3])],
        [helper.make_tensor_value_info("y", i16, [3])],
    )  # valid ONNX; onnxruntime has no int16 Relu kernel
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        _onnxruntime(model, {})
    with pytest.raises(npudispatch.UnsupportedOpError) as info:
        npudispatch.Session(model)
    message = str(info.value)
    assert "cpu0 [clamp (ai.onnx.Relu)]" in message and "onnxruntime, which reported:" in message
    assert "standard ONNX" not in message


def test_size_one_axis_is_not_padded_away_from_broadcasting() -> None:
    """Padding gave a constant [1] scale read by an NPU Sqrt eight lanes (zeros past the first),
    so the Mul broadcasting the Sqrt's result multiplied lanes 1..7 by 0: the expanded Attention
    body's sqrt(1/sqrt(head size)) scaling of Q and K."""
    model = _model(
        [
            helper.make_node("Div", ["one", "d"], ["scale"]),
            helper.make_node("Sqrt", ["scale"], ["root"]),
            helper.make_node("Mul", ["x", "root"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", F32, [2, 8])],
        [helper.make_tensor_value_info("y", F32, [2, 8])],
        [
            numpy_helper.from_array(np.ones(1, np.float32), "one"),
            numpy_helper.from_array(np.array([4.0], np.float32), "d"),
        ],
    )
    feeds = {"x": np.linspace(-2, 2, 16, dtype=np.float32).reshape(2, 8)}
    session = npudispatch.Session(model)
    (got,) = session.run(None, feeds)
    assert session.compiled.kernel_calls_per_run == 1  # Sqrt and Mul on the NPU
    tolerance_for(["Cast", "Sqrt", "Mul", "Cast"]).assert_close(
        got, _onnxruntime(model, feeds)[0], "y"
    )
