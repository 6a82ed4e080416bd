"""Conv, ConvTranspose and npudispatch.FusedConv on the emulator vs onnxruntime (and the operator's
onnx.reference-based reference), over odd shapes, and through Session with terminal padding.

Tolerance: the bf16 rule of ``opkit`` (inputs and weights rounded to bf16, float32 accumulation).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from opkit import assert_close, one_node_model, random, reference, run_emu, run_ort

from npudispatch import Session, compile_model, opset
from npudispatch.operators import registry
from npudispatch.operators.base import Decline
from npudispatch.operators.conv import format_weights
from npudispatch.operators.conv_kernel import K_LANES

F32 = np.dtype(np.float32)


def conv_model(op, x_shape, w_shape, y_shape, dtype=F32, bias=True, seed=1, **attrs):
    w = random(w_shape, F32, seed=seed, scale=0.3).astype(dtype)
    inits = {"W": w}
    ins = [("X", dtype, x_shape), ("W", dtype, w_shape)]
    if bias:
        m = y_shape[1]
        inits["B"] = random((m,), F32, seed=seed + 1).astype(dtype)
        ins.append(("B", dtype, (m,)))
    return one_node_model(op, ins, [("Y", dtype, y_shape)], initializers=inits, **attrs)


def check(model, x_shape, dtype=F32, seed=0):
    x = random(x_shape, dtype, seed=seed)
    res = run_emu(model, {"X": x})
    y = res.outputs["Y"]
    expected = run_ort(model, {"X": x})[0]
    assert y.shape == expected.shape and y.dtype == dtype
    assert_close(y, expected)
    ref = reference(res, {"X": x})[0]
    assert_close(ref, expected, rtol=1e-4, scale=1e-4 if dtype == F32 else 1e-2)
    return res


CONV_CASES = {
    # name: (x_shape, w_shape, y_shape, attrs)
    "3x3-pad1": ((1, 3, 11, 13), (5, 3, 3, 3), (1, 5, 11, 13), {"pads": [1, 1, 1, 1]}),
    "1x1": ((2, 7, 5, 9), (11, 7, 1, 1), (2, 11, 5, 9), {}),
    "7x7-stride2": ((1, 3, 19, 23), (9, 3, 7, 7), (1, 9, 9, 11), {"strides": [2, 2],
                                                                  "pads": [3, 3, 2, 2]}),
    "stride-gt-kernel": ((1, 4, 13, 11), (6, 4, 2, 2), (1, 6, 4, 4), {"strides": [3, 3]}),
    "dilation-asym-pads": ((2, 6, 11, 13), (4, 3, 2, 3), (2, 4, 4, 4),
                           {"group": 2, "strides": [3, 3], "dilations": [2, 1],
                            "pads": [0, 1, 2, 0]}),
    "depthwise": ((1, 9, 10, 7), (9, 1, 3, 3), (1, 9, 10, 7), {"group": 9,
                                                               "pads": [1, 1, 1, 1]}),
    "depthwise-multiplier": ((1, 5, 9, 10), (15, 1, 5, 5), (1, 15, 5, 5),
                             {"group": 5, "strides": [2, 2], "pads": [2, 2, 2, 2]}),
    "groups-3": ((1, 9, 6, 7), (12, 3, 3, 1), (1, 12, 4, 7), {"group": 3}),
    "same-upper": ((1, 4, 9, 10), (8, 1, 3, 3), (1, 8, 9, 10), {"group": 4,
                                                                "auto_pad": "SAME_UPPER"}),
    "same-lower-stride": ((1, 4, 9, 10), (8, 2, 4, 4), (1, 8, 5, 5),
                          {"group": 2, "auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "valid": ((1, 3, 9, 10), (2, 3, 4, 3), (1, 2, 6, 8), {"auto_pad": "VALID"}),
    "conv1d": ((2, 3, 17), (5, 3, 7), (2, 5, 11), {}),
    "conv3d": ((1, 2, 5, 6, 7), (3, 2, 3, 3, 3), (1, 3, 4, 5, 6), {"pads": [1, 0, 0, 0, 1, 1],
                                                                   "strides": [1, 1, 1]}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_onnxruntime(case):
    x_shape, w_shape, y_shape, attrs = CONV_CASES[case]
    check(conv_model("Conv", x_shape, w_shape, y_shape, **attrs), x_shape)


@pytest.mark.parametrize(
    ("w_shape", "y_shape", "attrs"),
    [
        ((4, 3, 3, 3), (1, 4, 6, 6), {"auto_pad": "SAME_UPPER", "strides": [2, 2],
                                       "dilations": [2, 2]}),
        ((4, 3, 3, 2), (1, 4, 11, 12), {"auto_pad": "SAME_LOWER", "dilations": [3, 2]}),
    ],
)  # fmt: skip
def test_same_padding_with_dilation_matches_onnx_reference(w_shape, y_shape, attrs):
    """onnxruntime refuses auto_pad SAME with dilations; the ONNX spec (and onnx.reference)
    pads for the dilated kernel."""
    from onnx.reference import ReferenceEvaluator

    model = conv_model("Conv", (1, 3, 11, 12), w_shape, y_shape, **attrs)
    x = random((1, 3, 11, 12), F32)
    assert_close(run_emu(model, {"X": x})["Y"], ReferenceEvaluator(model).run(None, {"X": x})[0])


@pytest.mark.parametrize("case", ["7x7-stride2", "conv3d", "conv1d", "depthwise-multiplier"])
def test_patches_gathered_in_row_blocks(case, monkeypatch):
    """Large feature maps gather their patches a block of output rows at a time: same result."""
    import npudispatch.operators.conv_kernel as conv_module

    monkeypatch.setattr(conv_module, "PATCH_BLOCK_ELEMENTS", 700)  # a few rows per block
    x_shape, w_shape, y_shape, attrs = CONV_CASES[case]
    check(conv_model("Conv", x_shape, w_shape, y_shape, **attrs), x_shape)


def test_conv_without_bias_and_bf16(float_dtype):
    model = conv_model("Conv", (1, 5, 8, 9), (6, 5, 3, 3), (1, 6, 6, 7), float_dtype, bias=False)
    check(model, (1, 5, 8, 9), float_dtype)


TRANSPOSE_CASES = {
    "stride2-k2": ((1, 8, 5, 6), (8, 3, 2, 2), (1, 3, 10, 12), {"strides": [2, 2]}),
    "groups": ((1, 4, 5, 6), (4, 3, 2, 2), (1, 6, 10, 12), {"group": 2, "strides": [2, 2]}),
    "pads-output-padding": ((1, 4, 5, 6), (4, 3, 3, 3), (1, 3, 10, 14),
                            {"strides": [2, 2], "pads": [1, 0, 1, 0], "output_padding": [1, 1]}),
    "output-shape": ((1, 4, 5, 6), (4, 3, 3, 3), (1, 3, 10, 12),
                     {"strides": [2, 2], "output_shape": [10, 12]}),
    "same-upper": ((1, 4, 5, 6), (4, 3, 3, 3), (1, 3, 10, 12),
                   {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same-lower": ((1, 4, 5, 6), (4, 3, 3, 3), (1, 3, 10, 12),
                   {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "dilations": ((1, 4, 5, 6), (4, 3, 3, 2), (1, 3, 12, 8),
                  {"strides": [2, 1], "dilations": [2, 3], "pads": [1, 0, 0, 1]}),
    "1d-stride3": ((2, 4, 7), (4, 2, 3), (2, 2, 18), {"strides": [3], "pads": [1, 2]}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TRANSPOSE_CASES))
def test_conv_transpose_matches_onnxruntime(case):
    x_shape, w_shape, y_shape, attrs = TRANSPOSE_CASES[case]
    check(conv_model("ConvTranspose", x_shape, w_shape, y_shape, **attrs), x_shape)


def test_weight_image_layout():
    """[G, Mg, Kp] bf16, column c*R + t, zero tail: the documented layout, checked by hand."""
    w = np.arange(6 * 2 * 3 * 1, dtype=np.float32).reshape(6, 2, 3, 1)  # M=6, Cg=2, G=2
    image = format_weights(w, group=2, transpose=False)
    assert image.shape == (2, 3, K_LANES) and image.dtype.name == "bfloat16"
    assert float(image[1, 2, 1 * 3 + 2]) == w[1 * 3 + 2, 1, 2, 0]
    assert not image[..., 6:].astype(np.float32).any()
    wt = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)  # C=4, Mg=3, G=2
    timage = format_weights(wt, group=2, transpose=True)
    # output channel g*Mg + m reads input channel g*Cg + c at the flipped tap
    g, m, c, ky, kx = 1, 2, 1, 0, 1
    assert float(timage[g, m, c * 4 + ky * 2 + kx]) == wt[g * 2 + c, m, 1 - ky, 1 - kx]


# ---- FusedConv ------------------------------------------------------------------------------

ACTS = {
    "Relu": {},
    "Clip": {"alpha": 0.0, "beta": 6.0},
    "HardSigmoid": {"alpha": 0.2, "beta": 0.5},
    "HardSwish": {},
    "Sigmoid": {},
    "Silu": {},
    "LeakyRelu": {"alpha": 0.1},
}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_fused_conv_matches_its_function_body_on_onnxruntime(act):
    x_shape, w_shape, y_shape = (1, 6, 9, 11), (10, 3, 3, 3), (1, 10, 5, 6)
    model = conv_model(
        "FusedConv", x_shape, w_shape, y_shape, domain=opset.DOMAIN, group=2, strides=[2, 2],
        pads=[1, 1, 1, 1], activation=act, **ACTS[act],
    )  # fmt: skip
    ir_model = ir.from_proto(model)
    opset.attach_functions(ir_model)
    check(ir.to_proto(ir_model), x_shape, seed=3)


@pytest.mark.parametrize("opset_version", [12, 17])
@pytest.mark.parametrize("act", ["Clip", "HardSwish"])
def test_fused_conv_post_affine(act, opset_version):
    """post_scale / post_shift after the activation, against the function body on onnxruntime."""
    x_shape, w_shape, y_shape = (1, 4, 7, 6), (6, 4, 3, 3), (1, 6, 7, 6)
    model = conv_model(
        "FusedConv", x_shape, w_shape, y_shape, domain=opset.DOMAIN, opset=opset_version,
        pads=[1, 1, 1, 1], activation=act, post_scale=-1.5, post_shift=0.25, **ACTS[act],
    )  # fmt: skip
    ir_model = ir.from_proto(model)
    opset.attach_functions(ir_model)
    node = next(iter(ir_model.graph))
    assert node.overload == opset.fused_conv_overload(act, True, opset_version)
    check(ir.to_proto(ir_model), x_shape, seed=4)


def test_fused_conv_clip_body_before_opset_15():
    """CastLike is opset 15: an opset-12 model (PP-OCR) gets the Clip body without it."""
    x_shape, w_shape, y_shape = (1, 3, 6, 7), (4, 3, 3, 3), (1, 4, 4, 5)
    model = conv_model(
        "FusedConv", x_shape, w_shape, y_shape, domain=opset.DOMAIN, opset=12,
        activation="Clip", alpha=0.0, beta=6.0,
    )  # fmt: skip
    ir_model = ir.from_proto(model)
    opset.attach_functions(ir_model)
    assert next(iter(ir_model.graph)).overload == opset.CLIP_PRE_CASTLIKE
    check(ir.to_proto(ir_model), x_shape, seed=3)


# ---- declines -------------------------------------------------------------------------------


def _match(model: onnx.ModelProto):
    return registry.match(next(iter(ir.from_proto(model).graph)))


def test_runtime_weight_declines_with_reason():
    model = one_node_model(
        "Conv", [("X", F32, (1, 3, 5, 5)), ("W", F32, (2, 3, 3, 3))], [("Y", F32, (1, 2, 3, 3))]
    )
    got = _match(model)
    assert isinstance(got, Decline) and "not a constant initializer" in got.reason


@pytest.mark.parametrize(
    ("attrs", "why"),
    [
        ({"auto_pad": "WRONG"}, "auto_pad 'WRONG'"),
        ({"kernel_shape": [2, 2]}, "kernel_shape [2, 2] differs"),
        ({"group": 2}, "group=2 does not fit"),
        ({"pads": [1, 1]}, "pads has 2 values"),
    ],
)
def test_bad_attributes_decline_with_reason(attrs, why):
    model = conv_model("Conv", (1, 3, 5, 5), (2, 3, 3, 3), (1, 2, 3, 3), **attrs)
    got = _match(model)
    assert isinstance(got, Decline) and why in got.reason, got


@pytest.mark.parametrize(
    ("attrs", "why"),
    [
        ({"strides": [2, 2], "output_padding": [2, 0]}, "output_padding [2, 0] must be <"),
        ({"output_shape": [20, 20]}, "larger than the full output"),
        ({"group": 3}, "group=3 does not fit"),
    ],
)
def test_conv_transpose_bad_attributes_decline(attrs, why):
    model = conv_model("ConvTranspose", (1, 4, 5, 6), (4, 3, 3, 3), (1, 3, 7, 8), **attrs)
    got = _match(model)
    assert isinstance(got, Decline) and why in got.reason, got


def test_wrong_declared_output_shape_declines():
    model = conv_model("Conv", (1, 3, 5, 5), (2, 3, 3, 3), (1, 2, 4, 4))
    got = _match(model)
    assert isinstance(got, Decline) and "is not the computed (1, 2, 3, 3)" in got.reason


def test_unsupported_conv_runs_on_cpu_through_session():
    """A Conv with a runtime weight declines and Session runs it on onnxruntime, correctly."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 6, 6])
    w = helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 3, 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 4, 4])
    graph = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"])], "g", [x, w], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    feeds = {"X": random((1, 3, 6, 6), F32), "W": random((4, 3, 3, 3), F32, seed=1)}
    sess = Session(model)
    (out,) = sess.run(None, feeds)
    np.testing.assert_allclose(out, run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert sess.last_run_stats.kernel_calls == 0
    assert [u.op_type for u in sess.compiled.report.unsupported] == ["Conv"]


# ---- through Session: padding, chains -------------------------------------------------------


def _chain_model():
    """Conv(3->5, 3x3) -> Relu -> Conv(5->6, 1x1) -> MaxPool: odd channels and widths that the
    padding pass rounds up (Relu's last axis, Conv's output channels)."""
    rng = np.random.default_rng(4)
    w1 = (rng.standard_normal((5, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = rng.standard_normal(5).astype(np.float32)
    w2 = (rng.standard_normal((6, 5, 1, 1)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("MaxPool", ["c2"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 11, 13])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5, 6])],
        initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_conv_chain_through_session_is_one_kernel_call_with_padding():
    model = _chain_model()
    compiled = compile_model(model)
    assert [p.kind for p in compiled.partitions] == ["npu"]
    assert compiled.kernel_calls_per_run == 1
    rewritten = compiled.model
    padded = {v.name: v.metadata_props.get("npudispatch.real_shape") for v in
              (n.outputs[0] for n in rewritten.graph)}  # fmt: skip
    assert any(p is not None for p in padded.values()), "the padding pass padded nothing"
    x = random((1, 3, 11, 13), F32)
    sess = Session(model)
    (y,) = sess.run(None, {"x": x})
    expected = run_ort(model, {"x": x})[0]
    assert y.shape == expected.shape
    assert_close(y, expected, rtol=3e-2, scale=3e-2)
    assert sess.last_run_stats.kernel_calls == 1
