"""--check on quantized outputs (npudispatch.dispatch.quant_check), proved both ways: the NPU
passes with one quantization step per element, a one-step difference everywhere passes, a
three-step difference or a wrong zero point fails, float outputs keep the bf16 policy, and
the verdict says the step in words."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from npudispatch.dispatch.check import OutputCheck, RoundingReference, check_outputs
from npudispatch.dispatch.quant_check import QuantizedOutputCheck, StepGrid, output_grids
from npudispatch.dispatch.session import Session
from npudispatch.graph import load

SCALE_OUT = 0.0039


def _quantized_model() -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> Conv (int8 per-channel weight, int32 bias) -> Q -> DQ -> Reshape
    -> ``out`` (float on a 0.0039 grid); the Q itself -> ``q`` (uint8 integers); and a float
    Tanh of x -> ``f`` (bf16 policy)."""
    rng = np.random.default_rng(0)
    ws = (rng.random(4) * 0.01 + 0.005).astype(np.float32)
    inits = {
        "xs": np.float32(0.05), "xz": np.uint8(128),
        "w": rng.integers(-127, 127, (4, 3, 3, 3), endpoint=True).astype(np.int8), "ws": ws,
        "wz": np.zeros(4, np.int8), "b": rng.integers(-400, 400, 4).astype(np.int32),
        "bs": ws * np.float32(0.05), "bz": np.zeros(4, np.int32),
        "ys": np.float32(SCALE_OUT), "yz": np.uint8(100), "shape": np.array([1, -1], np.int64),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["qx"]),
        helper.make_node("DequantizeLinear", ["qx", "xs", "xz"], ["dx"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["dw"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["db"], axis=0),
        helper.make_node("Conv", ["dx", "dw", "db"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "ys", "yz"], ["dq"]),
        helper.make_node("Reshape", ["dq", "shape"], ["out"]),
        helper.make_node("Tanh", ["x"], ["f"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 256]),
         helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4, 8, 8]),
         helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 3, 8, 8])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.fixture(scope="module")
def checked():
    """(reference, feeds, NPU outputs, reference outputs) of the quantized model."""
    model = _quantized_model()
    feeds = {"x": np.random.default_rng(1).uniform(-6, 6, (1, 3, 8, 8)).astype(np.float32)}
    sess = Session(model, cache=False)
    got = dict(zip(["out", "q", "f"], sess.run(None, feeds)))
    reference = RoundingReference(model)
    return reference, feeds, got, reference.run(feeds)


def test_quantized_outputs_are_found_through_views():
    grids = output_grids(load(_quantized_model()))
    assert grids == {
        "out": StepGrid(np.float32(SCALE_OUT).item(), "uint8", integer=False),
        "q": StepGrid(np.float32(SCALE_OUT).item(), "uint8", integer=True),
    }


def test_npu_passes_with_one_step_and_says_so(checked):
    reference, feeds, got, want = checked
    assert np.ptp(want["q"].astype(int)) > 100, "the data must exercise the output range"
    verdicts = check_outputs(reference, feeds, got)
    assert all(v.ok for v in verdicts.values()), [v.describe() for v in verdicts.values()]
    for name in ("out", "q"):
        v = verdicts[name]
        assert isinstance(v, QuantizedOutputCheck) and v.propagated_steps == 0
        assert "(uint8, scale 0.0039)" in v.describe()
        assert "within 1 quantization step per element" in v.describe()
    assert type(verdicts["f"]) is OutputCheck  # float output: bf16 policy
    assert "ulp of bf16" in verdicts["f"].describe()


def test_one_step_everywhere_passes(checked):
    reference, feeds, _, want = checked
    q = want["q"].astype(np.int32)
    shifted = {"out": want["out"] + np.float32(SCALE_OUT), "q": np.where(q < 255, q + 1, q - 1)}
    verdicts = check_outputs(reference, feeds, shifted)
    assert all(v.ok for v in verdicts.values()), [v.describe() for v in verdicts.values()]
    assert "max |Δ| 1 step of 0.0039 (uint8, scale 0.0039)" in verdicts["out"].describe()


@pytest.mark.parametrize("name", ["out", "q"])
def test_three_steps_on_one_element_fail(checked, name):
    reference, feeds, _, want = checked
    bad = want[name].copy()
    flat = bad.reshape(-1)
    i = int(np.argmin(flat))  # room above it, also in uint8
    flat[i] += 3 * (np.float32(SCALE_OUT) if name == "out" else 1)
    v = check_outputs(reference, feeds, {name: bad})[name]
    assert not v.ok and "NOT within 1 quantization step" in v.describe(), v.describe()
    assert round(v.worst_steps) == 3


def test_wrong_zero_point_fails(checked):
    """The NPU's integers dequantized with zero point 103 instead of 100: every element three
    steps off (an off-by-one zero point is one step everywhere, which the tolerance allows)."""
    reference, feeds, got, _ = checked
    wrong = ((got["q"].astype(np.float32) - 103) * np.float32(SCALE_OUT)).reshape(1, -1)
    v = check_outputs(reference, feeds, {"out": wrong})["out"]
    assert not v.ok and v.rms_steps > 2.9, v.describe()
