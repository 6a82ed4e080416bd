"""The CNN kernels' fast paths are bit-identical to their straightforward forms.

The conv kernel decodes each record once, takes 1x1 stride-1 windows as the tensor itself, pads
without np.pad, builds window views with one as_strided, gathers windows as bf16, applies the
fused activation in place (float64 where it always was) and rounds to bf16 with integer
arithmetic (``dtypes.round_bf16``); nearest Resize takes one axis at a time. These tests run a
CNN once with the kernels as they are and once with the plain forms they replaced (ml_dtypes
casts, np.pad, sliding_window_view, activation and affine through ``opset.conv_activation`` with
temporaries, one ``np.ix_`` gather) and require the same bits, then check the numbers against
onnxruntime so the fixture is not vacuous.
"""

from __future__ import annotations

import math
import sys

import ml_dtypes
import numpy as np
import onnx
import pytest
from corpus_util import MODELS_DIR
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from npudispatch import Session, compile_model
from npudispatch.operators import conv_kernel as conv_module
from npudispatch.operators import dtypes, records, resize_tables
from npudispatch.operators import window as window_module
from npudispatch.operators.base import _in_record_precision, round_up
from npudispatch.operators.conv import Conv
from npudispatch.operators.conv_kernel import K_LANES, activate
from npudispatch.operators.matmul import fit, view
from npudispatch.operators.window import Window, crop_real, zero_insert

BF16, F32 = dtypes.BF16, dtypes.F32
DETECTOR = MODELS_DIR / "ppocr_det.onnx"

# ---- the plain forms ---------------------------------------------------------------------------


def plain_to_compute(x: np.ndarray) -> np.ndarray:
    if dtypes.fp32_compute():
        return np.asarray(x, dtype=F32)
    return np.asarray(x).astype(BF16).astype(F32)


def plain_store(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtypes.fp32_compute():
        return np.asarray(x, dtype=F32).astype(dtype)
    return np.asarray(x, dtype=F32).astype(BF16).astype(dtype)


def plain_pad_spatial(x, begin, end, value=0.0):
    crop = tuple(
        slice(max(0, -b), n - max(0, -e) if e < 0 else None)
        for n, b, e in zip(x.shape[2:], begin, end)
    )
    x = x[(slice(None), slice(None), *crop)]
    widths = [(0, 0), (0, 0), *((max(0, b), max(0, e)) for b, e in zip(begin, end))]
    if not any(w for pair in widths for w in pair):
        return x
    return np.pad(x, widths, constant_values=value)


def plain_windows(xp, window, out):
    r = window.rank
    v = np.lib.stride_tricks.sliding_window_view(xp, window.effective, axis=tuple(range(2, 2 + r)))
    pick = tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, window.strides))
    taps = tuple(slice(None, None, d) for d in window.dilations)
    return v[(slice(None), slice(None), *pick, *taps)]


def plain_conv_core(x, weights, window, upsample):
    n, c = x.shape[:2]
    g, mg, _ = weights.shape
    cg = c // g
    xp = plain_pad_spatial(zero_insert(x, upsample), window.pads_begin, window.pads_end)
    zero = Window(window.kernel, window.strides, window.dilations, (0,) * window.rank,
                  (0,) * window.rank)  # fmt: skip
    out = zero.output_size(xp.shape[2:])
    patches = plain_windows(xp, window, out)
    r = window.rank
    taps = math.prod(window.kernel)
    order = (0, 1, *range(2 + r, 2 + 2 * r), *range(2, 2 + r))
    inner = math.prod(out[1:])
    rows = max(1, conv_module.PATCH_BLOCK_ELEMENTS // max(1, n * c * taps * inner))
    y = np.empty((n, g, mg, out[0], inner), dtype=np.float32)
    for start in range(0, out[0], rows):
        cols = patches[:, :, start : start + rows].transpose(order).reshape(n, g, cg * taps, -1)
        y[:, :, :, start : start + rows] = np.matmul(weights, cols).reshape(n, g, mg, -1, inner)
    return y.reshape(n, g * mg, *out)


def plain_conv_kernel(self, record, operands):
    table = records.decode_table(record.payload)
    floats = records.decode_floats(record.payload, table)
    x_spec = table.inputs[0][1]
    d = list(record.dims)
    r, g, mg, cg = d[1:5]
    window = Window.from_dims(r, d[5 : 5 + 5 * r])
    upsample = d[5 + 5 * r : 5 + 6 * r]
    code = d[5 + 6 * r]
    kg = cg * math.prod(window.kernel)
    elem = dtypes.weight_dtype(dtypes.fp32_compute())
    img_bytes = g * mg * round_up(kg, K_LANES) * elem.itemsize
    const = np.frombuffer(memoryview(operands[1]).cast("B"), dtype=np.uint8)
    weights = const[:img_bytes].view(elem).reshape(g, mg, -1)[..., :kg].astype(F32)
    off = round_up(img_bytes)
    bias = const[off : off + g * mg * 4].view("<f4")
    x = crop_real(view(operands[0], x_spec, "conv input X"), x_spec.real_shape)
    y = plain_conv_core(plain_to_compute(x), weights, window, upsample)
    y = y + bias.reshape(1, -1, *(1,) * r)
    y = activate(y, code, *floats[:2])
    if floats[2:4] != [1.0, 0.0]:
        y = y * floats[2] + floats[3]
    out = table.outputs[0]
    result = [fit(plain_store(y, out.dtype), out.shape)]
    return [np.frombuffer(a.tobytes(), np.uint8) for a in
            records.pack_outputs(result, table.outputs, record.output_bytes)]  # fmt: skip


def plain_gather(x, tables, dtype):
    """resize_tables._gather before nearest became one take per axis."""
    if not tables or tables[0].weight is None:
        index = [np.arange(n) for n in x.shape]
        for t in tables:
            index[t.axis] = t.index[:, 0]
        return x[np.ix_(*index)]
    return fast_gather(x, tables, dtype)


fast_gather = resize_tables._gather


def use_plain_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel module's to_compute/store/pad_spatial/windows, the conv kernel and the nearest
    resize gather -> plain."""
    swaps = {
        dtypes.to_compute: plain_to_compute,
        dtypes.store: plain_store,
        window_module.pad_spatial: plain_pad_spatial,
        window_module.windows: plain_windows,
    }
    for name, module in list(sys.modules.items()):
        if not name.startswith("npudispatch.operators"):
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and value in swaps:
                monkeypatch.setattr(module, attr, swaps[value])
    monkeypatch.setattr(resize_tables, "_gather", plain_gather)
    # Wrapped like every operator's kernel: the record's flags select the compute precision.
    monkeypatch.setattr(Conv, "kernel", _in_record_precision(plain_conv_kernel))


def run_both(proto: onnx.ModelProto, feeds: dict, monkeypatch, **session_kw):
    (fast,) = Session(proto, cache=False, **session_kw).run(None, feeds)
    with monkeypatch.context() as m:
        use_plain_forms(m)
        (plain,) = Session(proto, cache=False, **session_kw).run(None, feeds)
    return fast, plain


# ---- fixtures -------------------------------------------------------------------------------


def small_cnn() -> onnx.ModelProto:
    """Odd sizes and padded channels: strided 3x3 + HardSwish, depthwise 5x5 + Relu, a
    squeeze-excitation gate (GlobalAveragePool, 1x1 + HardSigmoid), a plain 1x1, a 2x2 stride-2
    ConvTranspose and pooling windows with pads."""
    rng = np.random.default_rng(5)

    def w(*shape: int) -> np.ndarray:
        fan = math.prod(shape[1:])
        return (rng.standard_normal(shape) * 1.5 / math.sqrt(fan)).astype(np.float32)

    inits = {
        "w1": w(12, 6, 3, 3), "b1": w(12, 1)[:, 0],
        "w2": w(12, 1, 5, 5), "b2": w(12, 1)[:, 0],
        "w3": w(4, 12, 1, 1), "b3": w(4, 1)[:, 0],
        "w4": w(12, 4, 1, 1), "b4": w(12, 1)[:, 0],
        "w5": w(10, 12, 1, 1),
        "w6": w(10, 5, 2, 2), "b6": w(5, 1)[:, 0],
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSwish", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[2, 2, 2, 2], group=12),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"]),
        helper.make_node("Conv", ["p", "w3", "b3"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "w4", "b4"], ["s2"]),
        helper.make_node("HardSigmoid", ["s2"], ["gate"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["a2", "gate"], ["se"]),
        helper.make_node("Conv", ["se", "w5"], ["c5"]),
        helper.make_node("ConvTranspose", ["c5", "w6", "b6"], ["t"], strides=[2, 2]),
        helper.make_node("MaxPool", ["t"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node(
            "AveragePool",
            ["m"],
            ["y"],
            kernel_shape=[3, 2],
            strides=[2, 1],
            pads=[1, 0, 1, 1],
            count_include_pad=0,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 21, 19])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[nh.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ---- tests ----------------------------------------------------------------------------------


def test_round_bf16_equals_ml_dtypes_on_every_class_of_float32() -> None:
    """Every bf16 high half with low halves at 0, just below / at / above the tie, and the top;
    NaNs of every kind become ml_dtypes' quiet NaN (the full 2**32 sweep was run once offline)."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bits = (high[:, None] | low[None, :]).reshape(-1)
    x = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
        want = x.astype(BF16).astype(F32).view(np.uint32)
        want_bf16 = x.astype(BF16).view(np.uint16)
    np.testing.assert_array_equal(dtypes.round_bf16(x).view(np.uint32), want)
    np.testing.assert_array_equal(dtypes.store(x, BF16).view(np.uint16), want_bf16)
    strided = x.reshape(-1, 6)[:, ::2]  # a non-contiguous operand, as crop_real hands kernels
    np.testing.assert_array_equal(
        dtypes.to_compute(strided).view(np.uint32), want.reshape(-1, 6)[:, ::2]
    )
    assert np.isnan(dtypes.round_bf16(np.array([np.nan], F32)))[0]


def test_widen_equals_ml_dtypes_for_every_bf16() -> None:
    b = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        dtypes.widen(b).view(np.uint32), b.astype(np.float32).view(np.uint32)
    )
    strided = b.reshape(16, 64, 64).transpose(2, 0, 1)[:, ::3, 1::2]  # as gathered windows are
    wide = dtypes.widen(strided)
    assert wide.flags.c_contiguous and wide.shape == strided.shape
    np.testing.assert_array_equal(wide.view(np.uint32), strided.astype(np.float32).view(np.uint32))


def test_small_cnn_bits_unchanged_and_close_to_onnxruntime(monkeypatch) -> None:
    import onnxruntime as ort

    proto = small_cnn()
    compiled = compile_model(proto)
    kinds = {n.op_type for n in compiled.model.graph}
    assert {"FusedConv", "Conv", "ConvTranspose", "MaxPool", "AveragePool"} <= kinds, kinds
    assert compiled.kernel_calls_per_run == 1
    x = np.random.default_rng(8).standard_normal((1, 6, 21, 19)).astype(np.float32)
    fast, plain = run_both(proto, {"x": x}, monkeypatch)
    assert fast.shape == plain.shape
    np.testing.assert_array_equal(fast.view(np.uint32), plain.view(np.uint32))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"x": x})
    scale = float(np.sqrt(np.mean(want**2)))
    np.testing.assert_allclose(fast, want, rtol=5e-2, atol=5e-2 * scale)


@pytest.mark.skipif(not DETECTOR.exists(), reason=f"{DETECTOR} not found (../shared/models)")
def test_ppocr_detector_bits_unchanged(monkeypatch) -> None:
    """The real detector (62 convolutions, depthwise, HardSwish/HardSigmoid/Relu fusions,
    ConvTranspose, nearest Resize) at 1x3x64x64: same bits with the fast and the plain forms."""
    x = np.random.default_rng(9).standard_normal((1, 3, 64, 64)).astype(np.float32)
    fast, plain = run_both(
        onnx.load(DETECTOR), {"x": x}, monkeypatch, input_shapes={"x": (1, 3, 64, 64)}
    )
    np.testing.assert_array_equal(fast.view(np.uint32), plain.view(np.uint32))
