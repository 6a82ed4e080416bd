"""MaxPool, AveragePool, GlobalAveragePool and GlobalMaxPool on the emulator vs onnxruntime, and
padded lanes never reaching a pooling window (through Session with terminal padding)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from opkit import assert_close, one_node_model, random, reference, run_emu, run_ort

from npudispatch import Session, compile_model
from npudispatch.operators import registry
from npudispatch.operators.base import Decline

F32 = np.dtype(np.float32)

POOL_CASES = {
    "max-2x2": ("MaxPool", (1, 3, 11, 13), (1, 3, 5, 6), {"kernel_shape": [2, 2],
                                                         "strides": [2, 2]}),
    "max-ceil": ("MaxPool", (1, 3, 11, 13), (1, 3, 6, 7), {"kernel_shape": [2, 2],
                                                          "strides": [2, 2], "ceil_mode": 1}),
    "max-dilated-asym-ceil": ("MaxPool", (1, 3, 11, 13), (1, 3, 4, 5),
                              {"kernel_shape": [3, 3], "strides": [3, 3], "dilations": [2, 1],
                               "pads": [1, 0, 0, 2], "ceil_mode": 1}),
    "max-stride-gt-kernel": ("MaxPool", (2, 3, 11, 13), (2, 3, 3, 3),
                             {"kernel_shape": [2, 2], "strides": [4, 4]}),
    "max-same-upper": ("MaxPool", (2, 3, 11, 13), (2, 3, 6, 7),
                       {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "max-1d": ("MaxPool", (2, 5, 17), (2, 5, 8), {"kernel_shape": [3], "strides": [2]}),
    "avg-2x2": ("AveragePool", (1, 3, 11, 13), (1, 3, 5, 6), {"kernel_shape": [2, 2],
                                                             "strides": [2, 2]}),
    "avg-include-pad": ("AveragePool", (1, 3, 11, 13), (1, 3, 6, 7),
                        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                         "count_include_pad": 1}),
    "avg-exclude-pad": ("AveragePool", (1, 3, 11, 13), (1, 3, 6, 7),
                        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "avg-ceil-include-pad": ("AveragePool", (1, 3, 11, 13), (1, 3, 6, 7),
                             {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1],
                              "count_include_pad": 1, "ceil_mode": 1}),
    "avg-ceil-exclude-pad": ("AveragePool", (1, 3, 11, 13), (1, 3, 6, 7),
                             {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1],
                              "ceil_mode": 1}),
    "avg-dilated": ("AveragePool", (1, 3, 12, 13), (1, 3, 6, 6),
                    {"kernel_shape": [3, 3], "strides": [2, 2], "dilations": [2, 2],
                     "pads": [1, 1, 1, 1], "count_include_pad": 1, "ceil_mode": 1}),
    "avg-same-lower": ("AveragePool", (1, 3, 12, 13), (1, 3, 6, 7),
                       {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "avg-7x7": ("AveragePool", (1, 2, 7, 9), (1, 2, 1, 3), {"kernel_shape": [7, 7]}),
    "global-avg": ("GlobalAveragePool", (2, 5, 7, 9), (2, 5, 1, 1), {}),
    "global-max": ("GlobalMaxPool", (2, 5, 7, 9), (2, 5, 1, 1), {}),
    "global-max-3d": ("GlobalMaxPool", (2, 5, 7, 9, 3), (2, 5, 1, 1, 1), {}),
    "global-avg-1d": ("GlobalAveragePool", (3, 4, 11), (3, 4, 1), {}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pool_matches_onnxruntime(case, float_dtype):
    op, x_shape, y_shape, attrs = POOL_CASES[case]
    model = one_node_model(op, [("X", float_dtype, x_shape)], [("Y", float_dtype, y_shape)],
                           **attrs)  # fmt: skip
    x = random(x_shape, float_dtype)
    res = run_emu(model, {"X": x})
    expected = run_ort(model, {"X": x})[0]
    assert res["Y"].shape == expected.shape and res["Y"].dtype == float_dtype
    assert_close(res["Y"], expected)
    assert_close(reference(res, {"X": x})[0], expected)


@pytest.mark.parametrize(
    ("op", "attrs", "why"),
    [
        ("MaxPool", {"kernel_shape": [2, 2], "storage_order": 1}, "storage_order=1"),
        ("MaxPool", {"strides": [2, 2]}, "kernel_shape is required"),
        ("AveragePool", {"kernel_shape": [2, 2], "pads": [2, 0, 0, 0]}, "reach a whole window"),
        ("AveragePool", {"kernel_shape": [2, 2], "auto_pad": "BAD"}, "auto_pad 'BAD'"),
    ],
)
def test_unsupported_attributes_decline(op, attrs, why):
    model = one_node_model(op, [("X", F32, (1, 2, 6, 6))], [("Y", F32, (1, 2, 5, 5))], **attrs)
    got = registry.match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(got, Decline) and why in got.reason, got


def test_maxpool_with_indices_declines():
    node = helper.make_node("MaxPool", ["X"], ["Y", "I"], kernel_shape=[2, 2])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2, 5, 5]),
         helper.make_tensor_value_info("I", TensorProto.INT64, [1, 2, 5, 5])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    got = registry.match(next(iter(ir.from_proto(model).graph)))
    assert isinstance(got, Decline) and "Indices" in got.reason


def _negated_pools_model():
    """Neg (pads the width 13 -> 16 with zeros) feeding pools whose windows reach the padded
    lanes: a leak would make MaxPool return 0 instead of a negative value and dilute averages."""
    shape = [1, 3, 9, 13]
    nodes = [
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["n"]),
        helper.make_node("MaxPool", ["n"], ["mx"], kernel_shape=[2, 2], strides=[2, 2],
                         ceil_mode=1),
        helper.make_node("AveragePool", ["n"], ["av"], kernel_shape=[3, 3], strides=[2, 2],
                         ceil_mode=1),
        helper.make_node("GlobalAveragePool", ["n"], ["ga"]),
        helper.make_node("GlobalMaxPool", ["n"], ["gm"]),
    ]  # fmt: skip
    outs = {"mx": [1, 3, 5, 7], "av": [1, 3, 4, 6], "ga": [1, 3, 1, 1], "gm": [1, 3, 1, 1]}
    graph = helper.make_graph(
        nodes, "pools",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outs.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_padded_lanes_never_reach_pooling_windows():
    model = _negated_pools_model()
    compiled = compile_model(model)
    assert [p.kind for p in compiled.partitions] == ["npu"]
    neg_out = next(n for n in compiled.model.graph if n.op_type == "Neg").outputs[0]
    assert neg_out.metadata_props.get("npudispatch.real_shape") == "1,3,9,13"
    assert neg_out.shape[-1] % 8 == 0  # padded: the windows see the padded tensor
    x = random((1, 3, 9, 13), F32, seed=5) + 0.5
    outs = Session(model).run(None, {"x": x})
    expected = run_ort(model, {"x": x})
    for got, want in zip(outs, expected):
        assert got.shape == want.shape
        assert (want < 0).all()
        assert_close(got, want)
