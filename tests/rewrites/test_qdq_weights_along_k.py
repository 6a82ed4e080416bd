"""QDQ weights quantized along the reduction axis, and ConvTranspose with ``output_shape``.

Hand-built QDQ graphs (uint8 and uint16 activations with nonzero zero points, int8 weights with
nonzero per-row zero points) whose quantized form the QDQ rewrites used to leave as float ops:

- MatMul whose constant ``W [K, N]`` is quantized per row (axis 0, along K);
- Gemm(transB=1) whose ``B [N, K]`` is quantized along axis 1 (along K);
- ConvTranspose with ``output_shape`` (its pads derived at compile time).

A scale per K cannot be factored out of an integer sum (``y = sum_k x_k s_k (w_kn - z_k)``), so
the fused op dequantizes the weight in float32 in the kernel, as onnxruntime does, and
requantizes. Every case must become one quantized NPU operator (one kernel call, int8 weights in
the const region, no float op or Cast left) whose output is within one quantization step of
onnxruntime's QDQ execution per element.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from rw_helpers import run_ort

import npudispatch
from npudispatch import graph
from npudispatch.rewrites import default_pipeline
from npudispatch.rewrites.qdq import run_qdq_rewrites

# Activation dtype -> (numpy type, ONNX type, x scale, x zero point).
ACTS = {
    "uint8": (np.uint8, TensorProto.UINT8, 0.04, 131),
    "uint16": (np.uint16, TensorProto.UINT16, 0.0002, 29_950),
}
LEVELS = {"uint8": 255, "uint16": 65_535}

Core = tuple[list[onnx.NodeProto], dict[str, np.ndarray], list[int], list[int]]


def _per_k_weight(rng: np.random.Generator, shape: tuple[int, int], axis: int) -> dict:
    """int8 weight with a scale and a nonzero zero point per entry of ``axis`` (K)."""
    k = shape[axis]
    return {
        "w": rng.integers(-128, 127, shape, endpoint=True).astype(np.int8),
        "ws": (rng.random(k) * 0.02 + 0.002).astype(np.float32),
        "wz": rng.integers(-6, 6, k, endpoint=True).astype(np.int8),
    }


def matmul_core(rng: np.random.Generator) -> Core:
    k, n = 72, 20
    inits = _per_k_weight(rng, (k, n), axis=0)
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["dw"], axis=0),
        helper.make_node("MatMul", ["d", "dw"], ["s"]),
    ]
    return nodes, inits, [2, 6, k], [2, 6, n]


def gemm_core(rng: np.random.Generator) -> Core:
    k, n = 72, 20
    inits = _per_k_weight(rng, (n, k), axis=1)
    inits["c"] = rng.uniform(-2, 2, n).astype(np.float32)  # a float bias: an exact DQ
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["dw"], axis=1),
        helper.make_node("Gemm", ["d", "dw", "c"], ["s"], transB=1, alpha=0.75, beta=1.5),
    ]
    return nodes, inits, [7, k], [7, n]


def conv_transpose_core(rng: np.random.Generator, out_hw=(10, 12), **attrs) -> Core:
    c, m = 4, 6
    inits = {
        "w": rng.integers(-128, 127, (c, m, 3, 3), endpoint=True).astype(np.int8),
        "ws": (rng.random(m) * 0.02 + 0.002).astype(np.float32),
        "wz": np.zeros(m, np.int8),
    }
    attrs = {"strides": [2, 2], "output_shape": list(out_hw)} | attrs
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["dw"], axis=1),
        helper.make_node("ConvTranspose", ["d", "dw"], ["s"], **attrs),
    ]
    return nodes, inits, [1, c, 5, 6], [1, m, *out_hw]


def _proto(nodes, inits, x_shape, out, out_shape) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(np.asarray(v), name) for name, v in inits.items()],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def ort_run(proto: onnx.ModelProto, feeds: dict, optimized: bool = False) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def qdq_case(core: Callable[[np.random.Generator], Core], act: str, seed: int = 0):
    """``x -> Q -> DQ -> <core> -> Q -> DQ -> out``: (model, feeds, output scale). The output
    scale and zero point cover onnxruntime's float result of the core with 5 % to spare, so
    the comparison exercises the whole grid without saturating."""
    rng = np.random.default_rng(seed)
    dtype, _, xs, xz = ACTS[act]
    nodes, inits, x_shape, y_shape = core(rng)
    inits |= {"xs": np.float32(xs), "xz": dtype(xz)}
    head = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["d"]),
    ]
    lo, hi = -xs * xz, xs * (LEVELS[act] - xz)
    feeds = {"x": rng.uniform(lo, hi, x_shape).astype(np.float32)}
    s = ort_run(_proto(head + nodes, inits, x_shape, "s", y_shape), feeds)
    ys = np.float32(np.ptp(s) * 1.05 / LEVELS[act])
    yz = dtype(np.clip(np.rint(-s.min() / ys) + 3, 0, LEVELS[act]))
    inits |= {"ys": ys, "yz": yz}
    tail = [
        helper.make_node("QuantizeLinear", ["s", "ys", "yz"], ["qs"]),
        helper.make_node("DequantizeLinear", ["qs", "ys", "yz"], ["out"]),
    ]
    return _proto(head + nodes + tail, inits, x_shape, "out", y_shape), feeds, float(ys)


CASES = {
    "matmul-per-row": (matmul_core, "QDQMatMul"),
    "gemm-transB-axis1": (gemm_core, "QDQGemm"),
    "conv-transpose-output-shape": (conv_transpose_core, "QDQConvTranspose"),
    "conv-transpose-output-shape-same-upper": (
        lambda rng: conv_transpose_core(rng, auto_pad="SAME_UPPER"),
        "QDQConvTranspose",
    ),
    "conv-transpose-output-shape-output-padding": (
        lambda rng: conv_transpose_core(rng, (9, 11), output_padding=[1, 1]),
        "QDQConvTranspose",
    ),
}


def steps_off(got: np.ndarray, want: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(np.abs(got.astype(np.float64) - want) / scale)


def assert_one_quantized_kernel_within_one_step(
    proto: onnx.ModelProto, feeds: dict, ys: float, fused: str, act: str
) -> np.ndarray:
    """The QDQ group compiles to ``[QuantizeLinear, fused, DequantizeLinear]`` in one kernel
    call and runs within one output step of onnxruntime, on data spanning the output grid;
    returns our output."""
    compiled = npudispatch.compile_model(ir.from_proto(proto))
    assert [n.op_type for n in compiled.model.graph] == [
        "QuantizeLinear",
        fused,
        "DequantizeLinear",
    ]
    assert compiled.kernel_calls_per_run == 1 and not compiled.report.unsupported
    sess = npudispatch.Session(proto)
    got = sess.run(None, feeds)[0]
    assert sess.last_run_stats.kernel_calls == 1
    want = ort_run(proto, feeds)
    assert np.ptp(np.rint(want / ys)) > 0.8 * LEVELS[act], "the data must span the output grid"
    assert steps_off(got, want, ys).max() <= 1, "more than one quantization step off"
    return got


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", list(CASES))
def test_becomes_one_quantized_kernel_within_one_step_of_onnxruntime(case, act):
    core, fused = CASES[case]
    proto, feeds, ys = qdq_case(core, act)
    got = assert_one_quantized_kernel_within_one_step(proto, feeds, ys, fused, act)
    # onnxruntime's optimized run keeps these float (no integer kernel takes a per-K scale)
    assert steps_off(got, ort_run(proto, feeds, optimized=True), ys).max() <= 1


@pytest.mark.parametrize("case", list(CASES)[:3])
def test_weights_stay_int8_in_the_npu_partition(case):
    """The weight DQ is folded into the fused op: the partition reads the int8 weight (and its
    scales), converts nothing inside, and no float copy of the weight exists."""
    from npudispatch.cli.inspect_cmd import inspect_model

    proto, _, _ = qdq_case(CASES[case][0], "uint8")
    loaded = graph.load(proto)
    default_pipeline()(loaded)
    (part,) = inspect_model(loaded)["partitions"]
    assert len(part["quantization"]["conversions"]) == 2  # the input Q and the output DQ
    (fused,) = [n for n in loaded.graph if n.op_type == CASES[case][1]]
    weight = fused.inputs[3].const_value
    assert weight is not None and weight.dtype == ir.DataType.INT8
    floats = [v.const_value.size for v in loaded.graph.initializers.values()
              if v.dtype == ir.DataType.FLOAT]  # fmt: skip
    assert max(floats) < weight.size, "a float copy of the weight is left"
    if "gemm" in case:  # transB=1 along K: transposed at compile time to B [K, N] along axis 0
        assert fused.attributes.get_int("transB", 0) == 0 and weight.shape == (72, 20)


def test_output_shape_larger_than_the_full_output_stays_float_with_reason():
    """ONNX leaves a negative total padding undefined (onnxruntime pads with zeros at the end):
    not fused, the float ConvTranspose is declined with the reason and runs on the CPU; the
    quantized output still matches onnxruntime exactly."""
    proto, feeds, ys = qdq_case(lambda rng: conv_transpose_core(rng, (12, 13)), "uint8")
    compiled = npudispatch.compile_model(ir.from_proto(proto))
    assert "QDQConvTranspose" not in [n.op_type for n in compiled.model.graph]
    (bad,) = compiled.report.unsupported
    assert bad.op_type == "ConvTranspose" and "larger than the full output" in bad.reason
    got = npudispatch.Session(proto).run(None, feeds)[0]
    assert steps_off(got, ort_run(proto, feeds), ys).max() == 0


def test_matmul_of_activations_still_chains_after_an_unquantized_op():
    """A MatMul may now read a per-row weight, but a MatMul of two per-tensor activations is
    still a later stage of a chain (``Softmax -> MatMul`` with the softmax left float)."""
    rng = np.random.default_rng(3)
    inits = {
        "xs": np.float32(0.05), "xz": np.uint8(128), "vs": np.float32(0.03),
        "vz": np.uint8(120), "ys": np.float32(0.02), "yz": np.uint8(40),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["d"]),
        helper.make_node("QuantizeLinear", ["v", "vs", "vz"], ["qv"]),
        helper.make_node("DequantizeLinear", ["qv", "vs", "vz"], ["dv"]),
        helper.make_node("Softmax", ["d"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "dv"], ["s"]),
        helper.make_node("QuantizeLinear", ["s", "ys", "yz"], ["qs"]),
        helper.make_node("DequantizeLinear", ["qs", "ys", "yz"], ["out"]),
    ]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 8, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 5])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    compiled = npudispatch.compile_model(ir.from_proto(proto))
    chain = [n for n in compiled.model.graph if n.op_type == "QDQChain"]
    assert len(chain) == 1 and chain[0].attributes.get_string("stages") == "Softmax.MatMul"
    feeds = {
        "x": rng.uniform(-6, 6, (2, 4, 8)).astype(np.float32),
        "v": rng.uniform(-3, 3, (2, 8, 5)).astype(np.float32),
    }
    got = npudispatch.Session(proto).run(None, feeds)[0]
    assert steps_off(got, ort_run(proto, feeds), 0.02).max() <= 1


@pytest.mark.parametrize("case", list(CASES))
def test_fused_function_body_computes_the_original_graph(case):
    """onnxruntime running the rewritten graph through the fused ops' function bodies (what a
    CPU fallback or ``run --check`` executes: the per-K DQ along axis 0, the transposed Gemm
    weight, the explicit ConvTranspose pads) gives the original graph's result."""
    proto, feeds, _ = qdq_case(CASES[case][0], "uint16")
    m = graph.load(proto)
    assert run_qdq_rewrites(m).fused_ops[CASES[case][1]] == 1
    got = run_ort(m, feeds)[0]
    np.testing.assert_array_equal(got, ort_run(proto, feeds, optimized=True))
