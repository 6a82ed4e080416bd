"""onnxruntime sessions built from IR models: large in-memory weights are handed over, not copied.

Serializing a model with a 400 MB in-memory weight into bytes made three copies of it (the proto,
its serialized bytes, onnxruntime's tensor); now the weight goes to onnxruntime as memory
(``add_external_initializers``) and the bytes carry a placeholder: 28 MB of peak RSS growth
instead of 790 MB on a 10000x10000 MatMul.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from npudispatch.dispatch.ort_session import onnxruntime_session

_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import onnxruntime  # imported before the baseline
from test_ort_session import _matmul_model
from npudispatch.dispatch.ort_session import onnxruntime_session
w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
model = _matmul_model(w)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
session = onnxruntime_session(model, optimize=False)
session.run(None, {"x": np.ones((2, 4096), np.float32)})
print(json.dumps({"growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}))
"""


def _matmul_model(w: np.ndarray) -> ir.Model:
    """``y = x @ w`` with ``w`` an in-memory initializer holding the given array itself."""
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [numpy_helper.from_array(np.zeros((k, n), np.float32), "w")],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    model.graph.initializers["w"].const_value = ir.Tensor(w)
    return model


def test_large_in_memory_weight_is_handed_over_not_serialized():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 512)).astype(np.float32)  # 512 KiB: above the inline size
    model = _matmul_model(w)
    tensor = model.graph.initializers["w"].const_value
    session = onnxruntime_session(model, optimize=False)
    assert model.graph.initializers["w"].const_value is tensor  # the model is left as it was
    x = rng.standard_normal((2, 256)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)


def test_weights_onnxruntime_cannot_wrap_are_serialized():
    """bfloat16 has no onnxruntime numpy bridge: such a weight stays in the model bytes."""
    w = np.random.default_rng(1).standard_normal((128, 256)).astype(ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "wf"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 256])],
        [
            helper.make_tensor(
                "w",
                TensorProto.BFLOAT16,
                [128, 256],
                np.zeros(128 * 256, np.uint16).tobytes(),
                raw=True,
            )
        ],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    model.graph.initializers["w"].const_value = ir.Tensor(w)
    session = onnxruntime_session(model, optimize=False)
    x = np.ones((2, 128), np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w.astype(np.float32), rtol=1e-5, atol=1e-3)


def test_session_holds_no_copy_of_a_large_in_memory_weight():
    """A 64 MiB weight: the session grows peak RSS by far less than the weight (was ~3x it)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth < (64 << 20) // 2, f"peak RSS grew {growth / 1e6:.0f} MB for a 67 MB weight"
