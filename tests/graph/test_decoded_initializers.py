"""graph.load decodes in-proto initializers once: the same numpy array on every read (compiling
reads each weight several times), values and metadata unchanged; sub-byte tensors keep their
proto."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from npudispatch import graph


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5, "w")
    w.doc_string = "weights"
    packed = helper.make_tensor("q", TensorProto.INT4, [4], [1, -2, 3, -8])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Add", ["y", "q32"], ["z"], name="add"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        initializer=[w, packed],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_initializers_are_decoded_once_with_their_values():
    proto = _model()
    model = graph.load(proto)
    w = model.graph.initializers["w"].const_value
    assert not isinstance(w, ir.serde.TensorProtoTensor)
    first, second = w.numpy(), w.numpy()
    assert np.shares_memory(first, second)  # no copy per read
    np.testing.assert_array_equal(first, numpy_helper.to_array(proto.graph.initializer[0]))
    assert w.dtype == ir.DataType.FLOAT and w.name == "w" and w.doc_string == "weights"


def test_sub_byte_initializers_keep_their_proto():
    model = graph.load(_model())
    q = model.graph.initializers["q"].const_value
    assert isinstance(q, ir.serde.TensorProtoTensor)
    np.testing.assert_array_equal(q.numpy().astype(np.int8), [1, -2, 3, -8])
