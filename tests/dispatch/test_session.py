"""Session: onnxruntime-like API, fallback=None errors, input validation, threads, statistics."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
from e2e_models import GOLDEN, assert_close, onnxruntime_run, random_feeds

from npudispatch import Session, UnsupportedOpError
from npudispatch.dispatch.emit import TensorBinding
from npudispatch.errors import ModelError


@pytest.fixture(scope="module")
def g11_session() -> Session:
    return Session(GOLDEN["G11"]())


def test_node_args_like_onnxruntime(g11_session):
    import onnxruntime as ort

    ref = ort.InferenceSession(GOLDEN["G11"]().SerializeToString())
    for ours, theirs in zip(
        [*g11_session.get_inputs(), *g11_session.get_outputs()],
        [*ref.get_inputs(), *ref.get_outputs()],
    ):
        assert (ours.name, ours.shape, ours.type) == (theirs.name, theirs.shape, theirs.type)


def test_fallback_none_lists_every_unsupported_node():
    b_model = GOLDEN["G14"]()
    b_model.graph.node[-1].op_type = "Atan"  # a second unsupported node at the end
    b_model.graph.node[-1].ClearField("input")
    b_model.graph.node[-1].input.append("T")
    with pytest.raises(UnsupportedOpError) as info:
        Session(b_model, fallback=None)
    msg = str(info.value)
    assert "2 node(s)" in msg and "cpu_atan" in msg and "matmul3" in msg
    assert msg.count("Atan") >= 2 and "no NPU operator" in msg


def test_fallback_none_accepts_fully_supported_models():
    model = GOLDEN["G9"]()
    feeds = random_feeds(model)
    (out,) = Session(model, fallback=None).run(None, feeds)
    assert_close(out, onnxruntime_run(model, feeds)["Z0"])


def test_bad_fallback_name():
    with pytest.raises(ValueError, match="fallback"):
        Session(GOLDEN["G6"](), fallback="cuda")


@pytest.mark.parametrize(
    ("feeds", "match"),
    [
        (
            {"X": np.zeros((1, 2, 64), np.float32), "Q": np.zeros(1)},
            r"unknown input name\(s\) \['Q'\]",
        ),
        ({}, r"missing input\(s\) \['X'\]"),
        ({"X": np.zeros((1, 2, 64), np.float64)}, "dtype float64, the model expects float32"),
        (
            {"X": np.zeros((1, 3, 64), np.float32)},
            r"shape \[1, 3, 64\], the model expects \[1, 2, 64\]",
        ),
    ],
)
def test_input_validation(g11_session, feeds, match):
    with pytest.raises(ModelError, match=match):
        g11_session.run(None, feeds)


def test_unknown_output_name(g11_session):
    with pytest.raises(ModelError, match="unknown output"):
        g11_session.run(["nope"], random_feeds(GOLDEN["G11"]()))


def test_run_stats(g11_session):
    g11_session.run(None, random_feeds(GOLDEN["G11"]()))
    stats = g11_session.last_run_stats
    program = g11_session.programs[0]
    assert stats.kernel_calls == 1 and stats.cpu_segments == 0
    assert stats.bytes_to_device == program.plan.input_bytes
    assert stats.bytes_from_device == program.plan.output_bytes
    assert stats.bytes_copied == stats.bytes_to_device + stats.bytes_from_device
    assert {"validate", "copy_in", "npu", "copy_out", "total"} <= set(stats.stage_seconds)


def test_run_is_thread_safe(g11_session):
    model = GOLDEN["G11"]()
    feeds = [random_feeds(model, seed=s) for s in range(6)]
    expected = [g11_session.run(None, f)[0].copy() for f in feeds]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = g11_session.run(None, feeds[i % len(feeds)])[0].copy()
                np.testing.assert_array_equal(results[i], expected[i % len(feeds)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 6


def test_copy_in_pads_and_copy_out_crops_without_copies():
    """A padded binding: the feed lands in the top-left corner of the padded placement (zeros
    elsewhere) and the output is a view cropped out of the buffer."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    b = TensorBinding("x", "bfloat16", (2, 3), (2, 8), 1, 32, 2 * 8 * 2)
    buf = np.zeros(32 + b.nbytes + 16, np.uint8)
    x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(bf16)
    b.view(buf)[...] = x
    full = buf[32 : 32 + b.nbytes].view(bf16).reshape(2, 8)
    np.testing.assert_array_equal(full[:, :3], x)
    assert not full[:, 3:].astype(np.float32).any() and not buf[:32].any()
    out = b.view(buf)
    assert out.shape == (2, 3) and np.shares_memory(out, buf)


def test_graph_input_passed_through_as_output():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])
    g = helper.make_graph([helper.make_node("Sigmoid", ["X"], ["Y"], name="s")], "g", [x], [y, x])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    s = Session(model)
    v = np.linspace(-1, 1, 4, dtype=np.float32)
    y_out, x_out = s.run(None, {"X": v})
    np.testing.assert_array_equal(x_out, v)
    assert_close(y_out, 1 / (1 + np.exp(-v)))


def test_cpu_segment_without_any_implementation_is_a_clear_error():
    from npudispatch.examples import build_example

    with pytest.raises(UnsupportedOpError, match=r"cpu0 \[silu \(amd\.com\.SILU\)\].*onnxruntime"):
        Session(build_example("G6"))


def test_cpu_segments_fall_back_to_onnx_reference_without_onnxruntime(monkeypatch):
    """No onnxruntime installed: CPU segments run on onnx.reference, with a warning, same answer."""
    import importlib.util

    model = GOLDEN["G14"]()  # NPU, then a CPU-only op
    feeds = random_feeds(model, seed=5)
    expected = onnxruntime_run(model, feeds)
    real_find_spec = importlib.util.find_spec

    def no_ort(name, *args, **kw):
        return None if name == "onnxruntime" else real_find_spec(name, *args, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", no_ort)
    with pytest.warns(RuntimeWarning, match="onnxruntime is not installed"):
        session = Session(model)
    assert [s.engine for s in session._segments if hasattr(s, "engine")] == ["reference"]
    for ref, got in zip(expected.values(), session.run(None, feeds)):
        assert_close(got, ref)
