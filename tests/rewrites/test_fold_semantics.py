"""Shape folding never changes what a graph computes (checked by onnxruntime on both graphs)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from npudispatch.rewrites import FoldShapesPass


def _run(proto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_castlike_without_saturation_keeps_it_through_folding():
    # onnxscript's folder turns CastLike into a Cast and drops saturate=0: out-of-range values
    # would saturate to 448 instead of becoming NaN.
    nodes = [
        helper.make_node("CastLike", ["x", "like"], ["f8"], saturate=0, name="castlike"),
        helper.make_node("Cast", ["f8"], ["y"], to=TensorProto.FLOAT, name="back"),
    ]
    like = helper.make_tensor("like", TensorProto.FLOAT8E4M3FN, [1], [1.0])
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [like],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    model = ir.from_proto(proto)
    assert FoldShapesPass()(model).modified
    cast = next(n for n in model.graph if n.name == "castlike")
    assert cast.op_type == "Cast" and cast.attributes["saturate"].as_int() == 0
    x = np.array([1.0, 300.0, 1000.0, -5000.0], np.float32)
    want = _run(proto, {"x": x})
    got = _run(ir.serde.serialize_model(model), {"x": x})
    assert np.isnan(want[2:]).all()
    np.testing.assert_array_equal(got, want)
