"""One failed run never poisons a Session or a virtual NPU; overflow to infinity is a value.

A kernel exception mid-program used to leave the emulator with half-consumed streams, so every
later good run raised ``EmulatorHang ... surplus``. These tests fail a run on purpose (a kernel
that raises once, numpy's ``raise`` error mode on inputs that overflow bf16) and check that the
next good run gives onnxruntime's answer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import npudispatch
from npudispatch.emulator import KernelRegistry, VirtualNpu
from npudispatch.emulator.errors import KernelError
from npudispatch.operators import registry
from npudispatch.testing import harness


def _mlp_model() -> onnx.ModelProto:
    """MatMul -> Tanh -> Mul: three NPU ops in one program (several launches to interrupt)."""
    w = numpy_helper.from_array(
        np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32) / 8, "w"
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Tanh", ["h"], ["s"], name="tanh"),
        helper.make_node("Mul", ["s", "h"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


class _Flaky:
    """Wraps an operator: its kernel raises on the first ``failures`` calls, then works."""

    def __init__(self, op, failures: int) -> None:
        self.op, self.failures = op, failures

    def kernel(self, record, operands):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected kernel failure")
        return self.op.kernel(record, operands)


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)


def test_session_recovers_after_a_kernel_exception(monkeypatch, x):
    """The second launch (Tanh) raises once; the next run must be exactly the first one's."""
    tanh_id = registry.candidates("", "Tanh")[0].kernel_id
    flaky = _Flaky(registry.operator_for_kernel(tanh_id), failures=1)
    real = registry.operator_for_kernel
    monkeypatch.setattr(
        registry, "operator_for_kernel", lambda kid: flaky if kid == tanh_id else real(kid)
    )
    model = _mlp_model()
    sess = npudispatch.Session(model)
    with pytest.raises(KernelError, match="injected kernel failure") as info:
        sess.run(None, {"x": x})
    assert flaky.failures == 0 and isinstance(info.value.__cause__, RuntimeError)
    (y,) = sess.run(None, {"x": x})
    (again,) = sess.run(None, {"x": x})
    np.testing.assert_array_equal(y, again)
    np.testing.assert_allclose(y, _ort(model, x), rtol=2e-2, atol=2e-2)


def test_overflow_to_bf16_infinity_is_a_value_not_an_exception(x):
    """Inputs beyond bf16's range under numpy's ``raise`` mode: the run gives inf, not an error,
    and the session keeps giving right answers afterwards."""
    model = _mlp_model()
    sess = npudispatch.Session(model)
    (good,) = sess.run(None, {"x": x})
    big = x.copy()
    big[0] = 3.4e38  # rounds to +inf in bf16 (max 3.39e38)
    with np.errstate(all="raise"):
        (y,) = sess.run(None, {"x": big})
    assert not np.isfinite(y[0]).all()
    np.testing.assert_array_equal(y[1:], good[1:])
    (after,) = sess.run(None, {"x": x})
    np.testing.assert_array_equal(after, good)


def test_virtual_npu_runs_again_after_a_failed_run(x):
    """The emulator itself: a run that fails mid-program is reset, the same NPU runs again."""
    node = helper.make_node("Sigmoid", ["x"], ["y"], name="sig")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    prepared = harness.prepare(model, {"x": x})
    kid = prepared.cfg.operator.kernel_id
    flaky = _Flaky(prepared.cfg.operator, failures=1)
    npu = VirtualNpu(
        [bytes(b) for b in prepared.buffers],
        num_cols=prepared.num_cols,
        kernels=KernelRegistry({kid: flaky.kernel}),
    )
    with pytest.raises(KernelError, match="injected"):
        npu.run(prepared.transaction)
    npu.run(prepared.transaction)
    expected = harness.execute(prepared)["y"]
    out = npu.buffers[1][: expected.nbytes].view(expected.dtype).reshape(expected.shape)
    np.testing.assert_array_equal(out, expected)
