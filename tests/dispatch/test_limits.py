"""Sizes are checked before anything is allocated: per-tensor and per-program limits, overridable."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from npudispatch.dispatch.compile import compile_model
from npudispatch.dispatch.limits import PROGRAM_ENV, TENSOR_ENV, max_tensor_bytes
from npudispatch.errors import ModelError, PlanError
from npudispatch.operators.base import TensorSpec


def _relu(shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("shape", [[2**40, 2**40], [1000, 1000000]])
def test_huge_declared_tensors_are_refused_at_load(shape):
    """[2**40, 2**40] used to wrap to a 0-byte buffer; 1e9 floats failed only inside numpy."""
    with pytest.raises(ModelError, match=r"tensor 'x' \(graph input\).*limit per tensor"):
        compile_model(_relu(shape))


def test_tensor_spec_bytes_do_not_overflow():
    spec = TensorSpec((2**40, 2**40), np.dtype(np.float32))
    assert spec.nbytes == 2**82


def test_limits_are_overridable(monkeypatch):
    monkeypatch.setenv(TENSOR_ENV, "1000")
    assert max_tensor_bytes() == 1000
    with pytest.raises(ModelError, match=TENSOR_ENV):
        compile_model(_relu([4, 64]))  # 1,024 B
    monkeypatch.delenv(TENSOR_ENV)
    monkeypatch.setenv(PROGRAM_ENV, "100")
    with pytest.raises(PlanError, match=r"NPU program 'npu0' needs .* limit per program"):
        compile_model(_relu([4, 64]))
    monkeypatch.setenv(PROGRAM_ENV, "lots")
    with pytest.raises(ModelError, match="not a byte count"):
        compile_model(_relu([4, 64]))
