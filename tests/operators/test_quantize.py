"""QuantizeLinear / DequantizeLinear NPU operators on the emulator against onnxruntime.

Both are exact in float32 (a division, round half to even, clamp; an integer subtraction and one
product), so results must equal onnxruntime's bit for bit. Data puts values exactly on rounding
ties, beyond the type's range (saturation) and uses zero points at the range ends.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from npudispatch.operators import registry
from npudispatch.operators.base import Decline
from npudispatch.operators.quantize import DequantizeLinear, QuantizeLinear, dequantize, quant_range
from npudispatch.testing import harness

ONNX_T = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint16): TensorProto.UINT16,
    np.dtype(np.int16): TensorProto.INT16,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(ml_dtypes.int4): TensorProto.INT4,
    np.dtype(ml_dtypes.uint4): TensorProto.UINT4,
    np.dtype(ml_dtypes.float8_e4m3fn): TensorProto.FLOAT8E4M3FN,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
}
QTYPES = {
    "u8": np.dtype(np.uint8),
    "i8": np.dtype(np.int8),
    "u16": np.dtype(np.uint16),
    "i16": np.dtype(np.int16),
    "u4": np.dtype(ml_dtypes.uint4),
    "i4": np.dtype(ml_dtypes.int4),
}


def qdq_model(op, x_dtype, y_dtype, shape, scale, zp, *, opset=21, scale_const=True, **attrs):
    """One Q or DQ node; ``zp`` None = no zero point input."""
    names = ["x", "scale"] + ([] if zp is None else ["zp"])
    inits = [numpy_helper.from_array(np.asarray(zp), "zp")] if zp is not None else []
    inputs = [helper.make_tensor_value_info("x", ONNX_T[np.dtype(x_dtype)], list(shape))]
    if scale_const:
        inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), "scale"))
    else:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    node = helper.make_node(op, names, ["y"], name="q0", **attrs)
    out = helper.make_tensor_value_info("y", ONNX_T[np.dtype(y_dtype)], list(shape))
    graph = helper.make_graph([node], "g", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def ort_run(model, feeds):
    """onnxruntime's output; 4-bit tensors cross the Python boundary as int8/uint8 (onnxruntime's
    Python API has no int4 arrays), converted by Cast nodes inside the model."""
    model = _wide_4bit_io(model)
    feeds = {k + ("_wide" if _widen(v) is not v else ""): _widen(v) for k, v in feeds.items()}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


_WIDE = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}


def _widen(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.dtype(ml_dtypes.int4):
        return x.astype(np.int8)
    if x.dtype == np.dtype(ml_dtypes.uint4):
        return x.astype(np.uint8)
    return x


def _wide_4bit_io(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for vi in g.input:
        t = vi.type.tensor_type.elem_type
        if t in _WIDE:
            cast = helper.make_node("Cast", [vi.name + "_wide"], [vi.name], to=t)
            vi.name += "_wide"
            vi.type.tensor_type.elem_type = _WIDE[t]
            g.node.insert(0, cast)
    for vi in g.output:
        t = vi.type.tensor_type.elem_type
        if t in _WIDE:
            g.node.append(helper.make_node("Cast", [vi.name], [vi.name + "_wide"], to=_WIDE[t]))
            vi.name += "_wide"
            vi.type.tensor_type.elem_type = _WIDE[t]
    return model


def params(kind, shape, qdtype, rng, axis=1, block=0):
    lo, hi = quant_range(qdtype)
    if kind == "tensor":
        pshape: tuple[int, ...] = ()
    elif kind == "axis":
        pshape = (shape[axis],)
    else:
        pshape = tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
    scale = (rng.random(pshape) * 0.05 + 0.01).astype(np.float32)
    zp = rng.integers(lo, hi, pshape, endpoint=True)
    # Zero points at both range ends.
    flat = zp.reshape(-1)
    flat[0] = lo
    if flat.size > 1:
        flat[-1] = hi
    return scale, zp.astype(qdtype)


def float_input(shape, scale, zp, axis, block, qdtype, rng):
    """Values on exact .5 ties of the grid and far outside the type's range (saturation)."""
    from npudispatch.operators.quantize import expand_param

    lo, hi = quant_range(qdtype)
    s = expand_param(scale, shape, axis, block, 1.0)
    z = expand_param(zp.astype(np.int64), shape, axis, block, 0)
    steps = rng.integers(lo - 40, hi + 40, shape) - z
    x = ((steps + rng.choice([0.0, 0.5, -0.5, 0.25], shape)) * s).astype(np.float32)
    x.reshape(-1)[:2] = [1e6, -1e6]  # saturate at both ends for every type
    return x


CASES = [("tensor", 0), ("axis", 0), ("block", 4)]


@pytest.mark.parametrize("qname", list(QTYPES))
@pytest.mark.parametrize(("kind", "block"), CASES, ids=[c[0] for c in CASES])
def test_quantize_linear_matches_onnxruntime(qname, kind, block):
    qdtype, shape, axis = QTYPES[qname], (3, 10, 6), 1
    rng = np.random.default_rng(zlib.crc32(f"q{qname}{kind}".encode()))
    scale, zp = params(kind, shape, qdtype, rng, axis, block)
    attrs = {"axis": axis} | ({"block_size": block} if block else {})
    model = qdq_model("QuantizeLinear", np.float32, qdtype, shape, scale, zp, **attrs)
    x = float_input(shape, scale, zp, axis, block, qdtype, rng)
    got = harness.run_single(ir.from_proto(model), {"x": x}).outputs["y"]
    want = ort_run(model, {"x": x})
    assert got.dtype == qdtype
    np.testing.assert_array_equal(got.astype(np.int32), want.astype(np.int32))
    lo, hi = quant_range(qdtype)
    assert (want.astype(np.int32) == lo).any() and (want.astype(np.int32) == hi).any(), (
        "data must saturate at both ends"
    )


@pytest.mark.parametrize("qname", [*QTYPES, "i32"])
@pytest.mark.parametrize(("kind", "block"), CASES, ids=[c[0] for c in CASES])
def test_dequantize_linear_matches_onnxruntime(qname, kind, block):
    qdtype = np.dtype(np.int32) if qname == "i32" else QTYPES[qname]
    shape, axis = (2, 9, 5), 1
    rng = np.random.default_rng(zlib.crc32(f"dq{qname}{kind}".encode()))
    if qname == "i32":
        scale, _ = params(kind, shape, np.dtype(np.int8), rng, axis, block)
        zp = np.zeros(scale.shape, np.int32)
        x = rng.integers(-(2**20), 2**20, shape).astype(np.int32)
    else:
        scale, zp = params(kind, shape, qdtype, rng, axis, block)
        lo, hi = quant_range(qdtype)
        x = rng.integers(lo, hi, shape, endpoint=True).astype(qdtype)
    attrs = {"axis": axis} | ({"block_size": block} if block else {})
    model = qdq_model("DequantizeLinear", qdtype, np.float32, shape, scale, zp, **attrs)
    got = harness.run_single(ir.from_proto(model), {"x": x}).outputs["y"]
    np.testing.assert_array_equal(got, ort_run(model, {"x": x}))


def test_quantize_without_zero_point_is_uint8():
    shape = (4, 8)
    model = qdq_model("QuantizeLinear", np.float32, np.uint8, shape, np.float32(0.1), None)
    x = np.linspace(-3, 30, 32, dtype=np.float32).reshape(shape)
    got = harness.run_single(ir.from_proto(model), {"x": x}).outputs["y"]
    np.testing.assert_array_equal(got, ort_run(model, {"x": x}))
    assert got.min() == 0 and got.max() == 255


def test_negative_axis_and_opset13():
    shape = (2, 3, 7)
    rng = np.random.default_rng(3)
    scale, zp = params("axis", shape, np.dtype(np.int8), rng, axis=2)
    model = qdq_model("QuantizeLinear", np.float32, np.int8, shape, scale, zp, opset=13, axis=-1)
    x = float_input(shape, scale, zp, 2, 0, np.dtype(np.int8), rng)
    got = harness.run_single(ir.from_proto(model), {"x": x}).outputs["y"]
    np.testing.assert_array_equal(got, ort_run(model, {"x": x}))


def _node(model) -> ir.Node:
    return next(iter(ir.from_proto(model).graph))


def _declines(model, *phrases):
    r = registry.match(_node(model))
    assert isinstance(r, Decline), "must be refused"
    for p in phrases:
        assert p in r.reason, r.reason


def test_declines_float8_with_reason():
    zp = np.zeros((), ml_dtypes.float8_e4m3fn)
    model = qdq_model(
        "QuantizeLinear", np.float32, ml_dtypes.float8_e4m3fn, (2, 4), np.float32(0.5), zp
    )
    _declines(model, "FLOAT8E4M3FN", "runs on the CPU")
    model = qdq_model(
        "DequantizeLinear", ml_dtypes.float8_e4m3fn, np.float32, (2, 4), np.float32(0.5), zp
    )
    _declines(model, "FLOAT8E4M3FN")


def test_declines_bad_parameters_with_reason():
    shape = (2, 4)
    model = qdq_model(
        "QuantizeLinear", np.float32, np.uint8, shape, 0.1, np.uint8(3), scale_const=False
    )
    _declines(model, "scale 'scale' is not a constant")
    model = qdq_model("QuantizeLinear", np.float32, np.uint8, shape, np.float32(0.0), np.uint8(3))
    _declines(model, "zero, negative or non-finite")
    model = qdq_model("DequantizeLinear", np.int32, np.float32, shape, np.float32(0.1), np.int32(5))
    _declines(model, "int32 dequantization requires a zero point of 0")
    model = qdq_model(
        "QuantizeLinear", np.float32, np.uint8, shape, np.full(3, 0.1, np.float32),
        np.zeros(3, np.uint8), axis=1,
    )  # fmt: skip
    _declines(model, "per-axis scale of shape (3,) does not match axis 1")
    model = qdq_model(
        "QuantizeLinear", np.float32, np.uint8, shape, np.full((2, 3), 0.1, np.float32),
        np.zeros((2, 3), np.uint8), axis=1, block_size=3,
    )  # fmt: skip
    _declines(model, "block_size 3 needs a scale of shape (2, 2)")


def test_declines_zero_point_of_another_type():
    """A zero point whose type differs from the quantized tensor (int16 zp, uint8 output)."""
    model = qdq_model("QuantizeLinear", np.float32, np.uint8, (2, 4), np.float32(0.1), np.int16(3))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8
    _declines(model, "zero point 'zp' is INT16", "must have the quantized type")


def test_declines_bf16_float_side():
    model = qdq_model(
        "QuantizeLinear", ml_dtypes.bfloat16, np.uint8, (2, 4), np.float32(0.1), np.uint8(0)
    )
    node = _node(model)
    r = QuantizeLinear().match(node)
    assert isinstance(r, Decline) and "float32 only" in r.reason


def test_constant_input_declines_to_fold():
    model = qdq_model("DequantizeLinear", np.int8, np.float32, (2, 4), np.float32(0.1), np.int8(0))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 4), np.int8), "x"))
    r = DequantizeLinear().match(_node(model))
    assert isinstance(r, Decline) and "folded at compile time" in r.reason


def test_models_are_valid_onnx():
    """Guard: the reference models are valid ONNX (the checker accepts them)."""
    rng = np.random.default_rng(0)
    scale, zp = params("block", (3, 10, 6), QTYPES["i4"], rng, 1, 4)
    onnx.checker.check_model(
        qdq_model("DequantizeLinear", QTYPES["i4"], np.float32, (3, 10, 6), scale, zp,
                  axis=1, block_size=4)
    )  # fmt: skip


# ---- npudispatch.QDQ<Op>: DQ -> op -> Q fused kernels ------------------------------------------

FUSED = {
    # name: (inner inputs' shapes, attrs, activation dtype)
    "QDQAdd": ([(2, 8, 16), (16,)], {}, np.uint8),
    "QDQMul": ([(2, 8, 16), (2, 8, 16)], {}, np.uint16),
    "QDQDiv": ([(4, 16), ()], {}, np.int8),
    "QDQPow": ([(4, 16), ()], {}, np.uint8),
    "QDQMatMul": ([(2, 8, 32), (2, 32, 8)], {}, np.uint16),
    "QDQRequantize": ([(3, 40)], {}, np.uint8),
    "QDQSigmoid": ([(3, 40)], {}, np.uint16),
    "QDQErf": ([(3, 40)], {}, np.uint8),
    "QDQTanh": ([(3, 40)], {}, np.int16),
    "QDQSqrt": ([(3, 40)], {}, np.uint8),
    "QDQReciprocal": ([(3, 40)], {}, np.uint16),
    "QDQSoftmax": ([(2, 4, 8, 8)], {"axis": -1}, np.uint16),
    "QDQTranspose": ([(2, 8, 4, 16)], {"perm": [0, 2, 1, 3]}, np.uint8),
    "QDQReduceMean": ([(2, 8, 64)], {"axes": [-1], "keepdims": 1}, np.uint16),
    "QDQLayerNormalization": ([(2, 8, 64), (64,), (64,)], {"axis": -1, "epsilon": 1e-5}, np.uint8),
    "QDQGlobalAveragePool": ([(1, 8, 6, 10)], {}, np.uint16),
    "QDQHardSigmoid": ([(3, 40)], {"alpha": 0.25, "beta": 0.4}, np.uint8),
    "QDQHardSwish": ([(3, 40)], {}, np.uint16),
    "QDQLeakyRelu": ([(3, 40)], {"alpha": 0.1}, np.int8),
}


def fused_model(name: str, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One fused node: activation inputs streamed, later operands of Pow/Div/LN constant."""
    from npudispatch.operators.qdq_fused import QDQ_OPERATORS, STAGE_FLOATS, float_op

    shapes, attrs, adt = FUSED[name]
    adt = np.dtype(adt)
    op = next(c for c in QDQ_OPERATORS if c.op_type == name)
    rng = np.random.default_rng(seed)
    lo, hi = quant_range(adt)
    names, inits, inputs, feeds, deq = [], {}, [], {}, []
    for i, shape in enumerate(shapes):
        const = name in ("QDQPow", "QDQDiv", "QDQLayerNormalization") and i > 0
        if name == "QDQPow" and i == 1:
            q, s, z = np.array(2, np.int8), np.float32(1.0), np.int8(0)
        elif const and name == "QDQLayerNormalization" and i == 2:
            q = rng.integers(-1000, 1000, shape).astype(np.int32)
            s, z = np.float32(1e-4), np.int32(0)
        elif const:
            q = rng.integers(1, 127, shape).astype(np.int8)
            s, z = np.float32(0.02), np.int8(0)
        elif name in ("QDQSqrt", "QDQReciprocal"):  # positive inputs
            q = rng.integers(lo + (hi - lo) // 8, hi, shape, endpoint=True).astype(adt)
            s, z = np.float32(4.0 / (hi - lo)), np.array(lo, adt)
        else:
            q = rng.integers(lo, hi, shape, endpoint=True).astype(adt)
            s = np.float32(4.0 / (hi - lo))
            z = np.array((lo + hi) // 2 + 3, adt)
        names += [f"x{i}", f"x{i}_s", f"x{i}_z"]
        inits |= {f"x{i}_s": np.asarray(s, np.float32), f"x{i}_z": np.asarray(z)}
        if const:
            inits[f"x{i}"] = q
        else:
            inputs.append(helper.make_tensor_value_info(f"x{i}", ONNX_T[q.dtype], list(shape)))
            feeds[f"x{i}"] = q
        deq.append(dequantize(q, s, z))
    cfg_dims = []
    if "axis" in attrs:
        cfg_dims = [attrs["axis"] % len(shapes[0])]
    if name == "QDQTranspose":
        cfg_dims = attrs["perm"]
    if name == "QDQReduceMean":
        cfg_dims = [attrs["keepdims"], len(shapes[0]) - 1]
    floats = [attrs.get(k, d) for k, d in STAGE_FLOATS.get(op.spec.inner, ())]
    r = float_op(op.spec.inner, deq, cfg_dims, floats)
    # Output scale spanning the result's range, zero point inside it.
    y_s = np.float32(max(float(np.ptp(r)), 1e-3) / (hi - lo) * 1.1)
    y_z = np.array(int(np.clip(lo - np.floor(r.min() / y_s), lo, hi)), adt)
    names += ["y_s", "y_z"]
    inits |= {"y_s": y_s, "y_z": y_z}
    node = helper.make_node(name, names, ["y"], domain="npudispatch", name="fused", **attrs)
    out = helper.make_tensor_value_info("y", ONNX_T[adt], list(r.shape))
    graph = helper.make_graph(
        [node], "g", inputs, [out],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("npudispatch", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), feeds


def _ort_with_bodies(model: onnx.ModelProto, feeds, level) -> np.ndarray:
    from npudispatch import opset

    m = ir.from_proto(model)
    opset.attach_functions(m)
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    proto = ir.to_proto(m).SerializeToString()
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_qdq_op_within_one_step_of_onnxruntime(name):
    """The fused kernel against onnxruntime running its function body (DQ -> op -> Q), with
    graph optimizations off (the QDQ semantics as written) and on (onnxruntime's own fusions)."""
    model, feeds = fused_model(name)
    got = harness.run_single(ir.from_proto(model), feeds).outputs["y"].astype(np.int64)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        want = _ort_with_bodies(model, feeds, level).astype(np.int64)
        assert got.shape == want.shape
        diff = np.abs(got - want)
        assert diff.max() <= 1, f"{name}: {diff.max()} steps off ({level})"
        assert (diff == 0).mean() > 0.97, f"{name}: only {(diff == 0).mean():.3f} exact"
    assert np.ptp(want) > 10, "test data must exercise the output range"
