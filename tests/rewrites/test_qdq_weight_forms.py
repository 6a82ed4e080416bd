"""QDQ weights in the forms the fused ops used to leave float: blocked, 16-bit, rank 3.

Hand-built QDQ graphs (uint8 and uint16 activations with nonzero zero points, odd shapes,
weights with nonzero zero points) around a MatMul, Gemm or Conv whose constant weight is

1. int8/uint8 (and int16) quantized in blocks (DequantizeLinear-21 ``block_size``; ragged last
   blocks) along K - MatMul ``[K, N]`` axis 0, Gemm ``transB=1`` axis 1 and ``transB=0`` axis 0,
   Conv ``[M, C, kh, kw]`` along C, ConvTranspose ``[C, M, kh, kw]`` along C;
2. int16/uint16 per tensor or per channel (a MatMul per output column, along axis 1, which
   QMatMul's 8-bit integer kernel cannot take);
3. a rank-3 MatMul weight ``[B, K, N]`` per tensor or per channel along any axis.

Each must become one quantized NPU operator (``QDQMatMul`` / ``QDQGemm`` / ``QDQConv``: one
kernel call, the weight in its integer type in the const image, no float op or Cast) whose
kernel dequantizes the weight like onnxruntime's DequantizeLinear, ``float32(q - zp) * scale``,
runs the op in float32 and requantizes: within one quantization step of onnxruntime's
unoptimized QDQ run per element (before, these ran in bf16 between the Q/DQs: up to ~120 steps
off at uint16 activations). A Relu the quantizer left between the op and its Q makes a
``QDQChain`` whose first stage reads the weight the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from rw_helpers import run_ort
from test_qdq_weights_along_k import (
    ACTS,
    LEVELS,
    Core,
    assert_one_quantized_kernel_within_one_step,
    ort_run,
    qdq_case,
    steps_off,
)

import npudispatch
from npudispatch import graph
from npudispatch.operators import registry
from npudispatch.operators.base import Decline
from npudispatch.rewrites import default_pipeline
from npudispatch.rewrites.qdq import run_qdq_rewrites

Form = tuple[int, int] | None  # the fused op's (weight_axis, weight_block_size), None: default


def _param_shape(shape, axis: int, block: int, per_tensor: bool) -> tuple[int, ...]:
    """Shape of the weight's scales: () per tensor, blocks of ``block`` along ``axis``, or one
    per channel along ``axis``."""
    if per_tensor:
        return ()
    axis %= len(shape)
    if block:
        return tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
    return (shape[axis],)


def _weight(rng: np.random.Generator, shape, dtype, param_shape) -> dict[str, np.ndarray]:
    """A weight over its type's whole range, with scales of a few output steps and zero points
    scattered around the middle of the range (nonzero)."""
    info = ml_dtypes.iinfo(dtype)
    span = int(info.max) - int(info.min)
    mid = (int(info.max) + int(info.min)) // 2
    return {
        "w": rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype),
        "ws": ((rng.random(param_shape) * 0.02 + 0.002) * 255 / span).astype(np.float32),
        "wz": rng.integers(mid - span // 40, mid + span // 40, param_shape, endpoint=True).astype(
            dtype
        ),
    }


def _dq(axis: int, block: int = 0) -> onnx.NodeProto:
    extra = {"block_size": block} if block else {}
    return helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["dw"], axis=axis, **extra)


def matmul(dtype, w_shape, axis: int, block: int = 0, per_tensor: bool = False):
    """MatMul of a ``[.., 5, K]`` activation and a constant weight ``w_shape``."""

    def core(rng: np.random.Generator) -> Core:
        params = _param_shape(w_shape, axis, block, per_tensor)
        inits = _weight(rng, w_shape, dtype, params)
        *batch, k, n = w_shape
        nodes = [_dq(axis, block), helper.make_node("MatMul", ["d", "dw"], ["s"])]
        lead = batch or [2]
        return nodes, inits, [*lead, 5, k], [*lead, 5, n]

    return core


def gemm(dtype, trans_b: int, axis: int, block: int = 0, per_tensor: bool = False):
    """Gemm(transB) of a ``[7, K]`` activation, a constant B and a float bias (an exact DQ)."""
    k, n = 70, 19

    def core(rng: np.random.Generator) -> Core:
        shape = (n, k) if trans_b else (k, n)
        params = _param_shape(shape, axis, block, per_tensor)
        inits = _weight(rng, shape, dtype, params)
        inits["c"] = rng.uniform(-2, 2, n).astype(np.float32)
        nodes = [
            _dq(axis, block),
            helper.make_node("Gemm", ["d", "dw", "c"], ["s"], transB=trans_b, alpha=0.75),
        ]
        return nodes, inits, [7, k], [7, n]

    return core


def conv(dtype, axis: int, block: int = 0, per_tensor: bool = False):
    """Conv 3x3 (pads 1, no bias) of a ``[1, 10, 7, 9]`` activation, weight ``[6, 10, 3, 3]``."""
    c, m = 10, 6

    def core(rng: np.random.Generator) -> Core:
        shape = (m, c, 3, 3)
        params = _param_shape(shape, axis, block, per_tensor)
        inits = _weight(rng, shape, dtype, params)
        nodes = [_dq(axis, block), helper.make_node("Conv", ["d", "dw"], ["s"], pads=[1] * 4)]
        return nodes, inits, [1, c, 7, 9], [1, m, 7, 9]

    return core


def conv_transpose(dtype, axis: int, block: int = 0):
    """ConvTranspose 3x3 stride 2 of a ``[1, 10, 5, 6]`` activation, weight ``[10, 6, 3, 3]``
    (``[C, M, kh, kw]``: C is the reduction axis 0)."""
    c, m = 10, 6

    def core(rng: np.random.Generator) -> Core:
        shape = (c, m, 3, 3)
        params = (tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
                  if block else (shape[axis],))  # fmt: skip
        inits = _weight(rng, shape, dtype, params)
        node = helper.make_node("ConvTranspose", ["d", "dw"], ["s"], strides=[2, 2])
        return [_dq(axis, block), node], inits, [1, c, 5, 6], [1, m, 11, 13]

    return core


# case -> (core, fused op, its weight form). Case 1: blocked weights; 2: 16-bit; 3: rank 3.
CASES: dict[str, tuple[Callable[[np.random.Generator], Core], str, Form]] = {
    "blocked-matmul-int8": (matmul(np.int8, (70, 19), 0, 16), "QDQMatMul", (0, 16)),
    "blocked-matmul-uint8": (matmul(np.uint8, (70, 19), 0, 32), "QDQMatMul", (0, 32)),
    "blocked-matmul-int16": (matmul(np.int16, (70, 19), 0, 16), "QDQMatMul", (0, 16)),
    "blocked-gemm-transB1-int8": (gemm(np.int8, 1, 1, 16), "QDQGemm", (1, 16)),
    "blocked-gemm-transB0-uint8": (gemm(np.uint8, 0, 0, 32), "QDQGemm", (0, 32)),
    "blocked-conv-int8": (conv(np.int8, 1, 4), "QDQConv", (1, 4)),
    "blocked-matmul-int4": (matmul(ml_dtypes.int4, (70, 19), 0, 16), "QDQMatMul", (0, 16)),
    "blocked-conv-uint4": (conv(ml_dtypes.uint4, 1, 4), "QDQConv", (1, 4)),
    "int4-matmul-per-column": (matmul(ml_dtypes.int4, (70, 19), 1), "QDQMatMul", (1, 0)),
    "blocked-conv-transpose-int8": (conv_transpose(np.int8, 0, 4), "QDQConvTranspose", (0, 4)),
    "int16-conv-transpose-axis0": (conv_transpose(np.int16, 0), "QDQConvTranspose", (0, 0)),
    "int16-matmul-per-tensor": (matmul(np.int16, (70, 19), 1, per_tensor=True), "QDQMatMul", None),
    "uint16-matmul-per-column": (matmul(np.uint16, (70, 19), 1), "QDQMatMul", (1, 0)),
    "int16-matmul-per-row": (matmul(np.int16, (70, 19), 0), "QDQMatMul", None),
    "int16-gemm-per-channel": (gemm(np.int16, 1, 0), "QDQGemm", None),
    "uint16-gemm-per-tensor": (gemm(np.uint16, 0, 1, per_tensor=True), "QDQGemm", None),
    "int16-conv-per-channel": (conv(np.int16, 0), "QDQConv", None),
    "uint16-conv-per-tensor": (conv(np.uint16, 0, per_tensor=True), "QDQConv", None),
    "rank3-matmul-per-tensor": (
        matmul(np.int8, (3, 40, 11), 1, per_tensor=True),
        "QDQMatMul",
        None,
    ),
    "rank3-matmul-axis0": (matmul(np.uint8, (3, 40, 11), 0), "QDQMatMul", None),
    "rank3-matmul-axis1": (matmul(np.int8, (3, 40, 11), 1), "QDQMatMul", (1, 0)),
    "rank3-matmul-axis-1": (matmul(np.int8, (3, 40, 11), -1), "QDQMatMul", (2, 0)),
    "rank3-matmul-int16-axis2": (matmul(np.int16, (3, 40, 11), 2), "QDQMatMul", (2, 0)),
}


def _fused(model: ir.Model, op_type: str) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == op_type]
    return node


def _form(node: ir.Node) -> Form:
    if "weight_axis" not in node.attributes:
        return None
    return node.attributes.get_int("weight_axis"), node.attributes.get_int("weight_block_size")


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", list(CASES))
def test_becomes_one_quantized_kernel_within_one_step_of_onnxruntime(case, act):
    core, fused, form = CASES[case]
    proto, feeds, ys = qdq_case(core, act)
    assert_one_quantized_kernel_within_one_step(proto, feeds, ys, fused, act)
    compiled = npudispatch.compile_model(ir.from_proto(proto))
    assert _form(_fused(compiled.model, fused)) == form


@pytest.mark.parametrize("case", list(CASES))
def test_weights_stay_integer_in_the_const_image(case):
    """The weight DQ is folded into the fused op: the partition reads the integer weight (and
    its scales), converts nothing inside, no float copy of the weight exists in the graph, and
    the const image holds less than the integer weight plus a float32 copy would."""
    from npudispatch.cli.inspect_cmd import inspect_model

    core, fused, _ = CASES[case]
    proto, _, _ = qdq_case(core, "uint16")
    dtype = ir.DataType.from_numpy(numpy_helper.to_array(proto.graph.initializer[0]).dtype)
    loaded = graph.load(proto)
    default_pipeline()(loaded)
    (part,) = inspect_model(loaded)["partitions"]
    assert len(part["quantization"]["conversions"]) == 2  # the input Q and the output DQ
    weight = _fused(loaded, fused).inputs[3].const_value
    assert weight is not None and weight.dtype == dtype
    floats = [v.const_value.size for v in loaded.graph.initializers.values()
              if v.dtype == ir.DataType.FLOAT]  # fmt: skip
    assert max(floats) < weight.size, "a float copy of the weight is left"
    (program,) = npudispatch.compile_model(ir.from_proto(proto)).programs.values()
    assert program.plan.const_bytes < weight.nbytes + 4 * weight.size


@pytest.mark.parametrize("case", [c for c, (_, _, form) in CASES.items() if form is not None])
def test_fused_function_body_computes_the_original_graph(case):
    """onnxruntime running the rewritten graph through the fused op's function body (what a
    CPU fallback or ``run --check`` executes: the weight's DequantizeLinear with the node's
    axis and block_size, as a function overload) gives the original graph's result."""
    core, fused, form = CASES[case]
    proto, feeds, _ = qdq_case(core, "uint16")
    m = graph.load(proto)
    assert run_qdq_rewrites(m).fused_ops[fused] == 1
    assert _form(_fused(m, fused)) == form
    got = run_ort(m, feeds)[0]
    np.testing.assert_array_equal(got, ort_run(proto, feeds, optimized=True))


def _then_relu(core: Callable[[np.random.Generator], Core]):
    """``core`` followed by a Relu the quantizer left unquantized (quantize_static fuses
    Conv+Relu this way): ``DQ -> op -> Relu -> Q``."""

    def chained(rng: np.random.Generator) -> Core:
        nodes, inits, x_shape, y_shape = core(rng)
        nodes[-1].output[0] = "s0"
        return [*nodes, helper.make_node("Relu", ["s0"], ["s"])], inits, x_shape, y_shape

    return chained


CHAINED = ["blocked-conv-int8", "blocked-gemm-transB1-int8", "uint16-matmul-per-column",
           "rank3-matmul-axis1"]  # fmt: skip


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", CHAINED)
def test_a_chain_from_the_weight_op_takes_the_form_too(case, act):
    """``DQ -> op -> Relu -> Q`` becomes one ``QDQChain`` whose first stage reads the weight in
    its form (function overload ``<stages>:weight_axis<A>_block<B>``): within one step of
    onnxruntime, and its function body computes the original graph."""
    core, fused, form = CASES[case]
    proto, feeds, ys = qdq_case(_then_relu(core), act)
    compiled = npudispatch.compile_model(ir.from_proto(proto))
    ops = [n.op_type for n in compiled.model.graph]
    assert ops == ["QuantizeLinear", "QDQChain", "DequantizeLinear"]
    chain = _fused(compiled.model, "QDQChain")
    assert chain.attributes.get_string("stages") == f"{fused[3:]}.Relu" and _form(chain) == form
    assert compiled.kernel_calls_per_run == 1 and not compiled.report.unsupported
    got = npudispatch.Session(proto).run(None, feeds)[0]
    want = ort_run(proto, feeds)
    assert np.ptp(np.rint(want / ys)) > 0.4 * LEVELS[act], "the data must span the output grid"
    assert steps_off(got, want, ys).max() <= 1, "more than one quantization step off"
    m = graph.load(proto)
    run_qdq_rewrites(m)
    np.testing.assert_array_equal(run_ort(m, feeds)[0], ort_run(proto, feeds, optimized=True))


def test_parameters_that_do_not_fit_the_form_are_declined_with_the_reason():
    """A fused node whose weight parameters do not match its ``weight_axis`` /
    ``weight_block_size`` (here the block size changed after the rewrite) is refused by the
    operator library naming the node, the operand and the shapes, never run with the wrong
    dequantization."""
    proto, _, _ = qdq_case(CASES["blocked-matmul-int8"][0], "uint8")
    m = graph.load(proto)
    run_qdq_rewrites(m)
    node = _fused(m, "QDQMatMul")
    assert not isinstance(registry.match(node), Decline)
    node.attributes["weight_block_size"] = ir.AttrInt64("weight_block_size", 32)
    got = registry.match(node)
    assert isinstance(got, Decline)
    assert "weight x1 (70, 19) scale (5, 19)" in got.reason and "block size 32" in got.reason


def test_weight_only_blocked_4bit_matmul_still_becomes_matmul_nbits():
    """Without a QuantizeLinear after it (a weight-only model), ``MatMul(a, DQ(int4 W))``
    keeps the 4-bit MatMulNBits path; inside a DQ -> MatMul -> Q group the fused op takes it
    (``blocked-matmul-int4`` above)."""
    core = CASES["blocked-matmul-int4"][0]
    nodes, inits, x_shape, y_shape = core(np.random.default_rng(5))
    proto = _plain(nodes, inits, x_shape, y_shape)
    m = graph.load(proto)
    report = run_qdq_rewrites(m)
    assert report.counts["nbits"] == 1 and not report.fused_ops
    assert [n.op_type for n in m.graph] == ["MatMulNBits"]


def _plain(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    """``core`` on a float input ``d``, its float result ``s`` the output (no Q/DQ around)."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, y_shape)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
