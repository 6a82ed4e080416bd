"""Resize (opset 10..19) and Upsample (opset 7, 9) vs onnxruntime: every coordinate mode, every
nearest mode, linear and cubic, scales or sizes, axes and aspect-ratio policies, odd shapes,
up- and downsampling; declines; padded lanes through the Session (the real PP-OCR detector,
whose six Resize nodes this operator takes, is covered by tests/e2e/test_ppocr.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import BF16, assert_close, random, run_emu, run_ort

import npudispatch
from npudispatch.operators import registry
from npudispatch.operators.base import REAL_SHAPE_KEY, Decline
from npudispatch.operators.resize import METHODS


def resize_model(
    shape,
    out,
    *,
    scales=None,
    sizes=None,
    opset=19,
    dtype=np.float32,
    op="Resize",
    roi=False,
    **attrs,
) -> onnx.ModelProto:
    """A one-node Resize/Upsample with constant scales/sizes (``roi=True``: an empty roi input,
    as opset 11 requires and PyTorch exports; a sequence: that roi)."""
    inits, names = [], ["x", "", "", ""]
    if roi is not False:
        given = np.zeros(0) if roi is True else roi
        inits.append(numpy_helper.from_array(np.asarray(given, np.float32), "roi"))
        names[1] = "roi"
    if scales is not None or roi is True:  # opset 11: an empty scales tensor with sizes
        given = np.zeros(0) if scales is None else scales
        inits.append(numpy_helper.from_array(np.asarray(given, np.float32), "scales"))
        names[2] = "scales"
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.asarray(sizes, np.int64), "sizes"))
        names[3] = "sizes"
    if op == "Upsample" or opset == 10:
        names = (
            ["x", "scales"]
            if scales is not None and not (op == "Upsample" and opset < 9)
            else ["x"]
        )
        if op == "Upsample" and opset < 9:
            inits, attrs = [], {**attrs, "scales": [float(s) for s in scales]}
    while names[-1] == "":
        names.pop()
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node(op, names, ["y"], name=f"{op.lower()}_0", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", t, list(shape))],
        [helper.make_tensor_value_info("y", t, list(out))],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def scaled(shape, scales):
    """Output shape for constant scales: float32 product, truncated (onnxruntime)."""
    return tuple(int(np.float32(s) * np.float32(d)) for s, d in zip(scales, shape))


def _exact(shape, dtype, seed):
    return random(shape, BF16, seed, 3.0).astype(dtype)


def check(model, x, method):
    """Emulator vs onnxruntime (exact for nearest) and vs the numpy reference."""
    res = run_emu(model, {"x": x})
    got = res["y"]
    want = run_ort(model, {"x": x})[0]
    cfg = res.prepared.cfg
    ref = cfg.operator.reference(cfg, [x])[0]
    if method == "nearest":
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want)
        np.testing.assert_array_equal(got, ref)
    else:
        assert_close(got, want)
        assert_close(got, ref)
    return res


SCALES = [(1, 1, 2.0, 1.5), (1, 1, 0.6, 0.45), (1, 1, 1.7, 0.8), (1, 1, 3.0, 3.0)]
COORDS = [
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
]


@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scales", SCALES, ids=str)
def test_resize_coordinate_modes(coord, method, scales):
    x = _exact((1, 2, 5, 7), np.float32, 3)
    model = resize_model(
        x.shape,
        scaled(x.shape, scales),
        scales=scales,
        mode=method,
        coordinate_transformation_mode=coord,
    )
    res = check(model, x, method)
    tables = res.prepared.cfg.extra["tables"]
    assert [t.axis for t in tables] == [2, 3]  # N and C are left alone
    assert all(t.index.shape[1] == {"nearest": 1, "linear": 2, "cubic": 4}[method] for t in tables)


@pytest.mark.parametrize(
    "nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
)
@pytest.mark.parametrize("coord", [*COORDS, "tf_half_pixel_for_nn"])
@pytest.mark.parametrize("scales", SCALES, ids=str)
def test_resize_nearest_modes(nearest_mode, coord, scales):
    x = _exact((2, 3, 5, 7), np.float32, 4)
    model = resize_model(
        x.shape,
        scaled(x.shape, scales),
        scales=scales,
        opset=13 if coord == "tf_half_pixel_for_nn" else 19,
        mode="nearest",
        coordinate_transformation_mode=coord,
        nearest_mode=nearest_mode,
    )
    check(model, x, "nearest")


@pytest.mark.parametrize("method", ["nearest", "linear"])
def test_resize_bf16_and_other_ranks(method, float_dtype):
    for shape, scales in [((3, 5), (2.0, 1.4)), ((2, 4, 6), (1.0, 0.5, 1.5))]:
        x = _exact(shape, float_dtype, 5)
        model = resize_model(
            shape, scaled(shape, scales), scales=scales, dtype=float_dtype, mode=method
        )
        check(model, x, method)


def test_resize_cubic_parameters():
    x = _exact((1, 1, 6, 5), np.float32, 6)
    for attrs in (
        {"cubic_coeff_a": -0.5},
        {"exclude_outside": 1},
        {"exclude_outside": 1, "cubic_coeff_a": -0.6},
    ):
        for scales in [(1, 1, 1.8, 2.2), (1, 1, 0.5, 0.7)]:
            model = resize_model(
                x.shape, scaled(x.shape, scales), scales=scales, mode="cubic", **attrs
            )
            check(model, x, "cubic")


@pytest.mark.parametrize("method", METHODS)
def test_resize_sizes_axes_and_aspect_policies(method):
    x = _exact((1, 3, 6, 9), np.float32, 7)
    cases = [
        ({"sizes": [1, 3, 11, 4]}, (1, 3, 11, 4), 13, {}),
        ({"sizes": [10, 13]}, (1, 3, 10, 13), 18, {"axes": [2, 3]}),
        ({"sizes": [5]}, (1, 3, 6, 5), 18, {"axes": [-1]}),
        ({"scales": [2.5]}, (1, 3, 15, 9), 18, {"axes": [2]}),
        (
            {"sizes": [12, 12]},
            (1, 3, 8, 12),
            18,
            {"axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
        ),
        (
            {"sizes": [12, 12]},
            (1, 3, 12, 18),
            18,
            {"axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"},
        ),
    ]
    for given, out, opset, attrs in cases:
        model = resize_model(x.shape, out, opset=opset, mode=method, **given, **attrs)
        check(model, x, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("roi", "axes", "out", "opset"),
    [
        ([0, 0, 0.2, 0.1, 1, 1, 0.8, 0.7], None, (1, 2, 7, 5), 13),
        ([0, 0, -0.3, 0.4, 1, 1, 1.2, 1.5], None, (1, 2, 9, 8), 13),  # partly outside: extrapolate
        ([0.6, -0.2, 1.3, 0.9], [3, 2], (1, 2, 6, 10), 18),
    ],
)
def test_resize_tf_crop_and_resize(method, roi, axes, out, opset):
    x = _exact((1, 2, 5, 7), np.float32, 15)
    sizes = list(out) if axes is None else [out[a] for a in axes]
    attrs = {"axes": axes} if axes is not None else {}
    model = resize_model(
        x.shape,
        out,
        sizes=sizes,
        roi=roi,
        opset=opset,
        mode=method,
        coordinate_transformation_mode="tf_crop_and_resize",
        extrapolation_value=-7.5,
        **attrs,
    )
    res = check(model, x, method)
    outside = [t.outside for t in res.prepared.cfg.extra["tables"]]
    assert all(o is not None for o in outside)
    if min(roi) < 0 or max(roi) > 1:
        assert np.any(res["y"] == -7.5)  # extrapolated positions really exist


def test_resize_opset11_empty_roi_with_sizes_as_pytorch_exports():
    x = _exact((1, 4, 5, 7), np.float32, 8)
    model = resize_model(
        x.shape,
        (1, 4, 10, 14),
        sizes=[1, 4, 10, 14],
        opset=11,
        roi=True,
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )
    check(model, x, "nearest")
    model = resize_model(
        x.shape,
        (1, 4, 9, 9),
        sizes=[1, 4, 9, 9],
        opset=11,
        roi=True,
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
    )
    check(model, x, "linear")


@pytest.mark.parametrize("method", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [(1, 1, 2.0, 3.0), (1, 1, 0.5, 0.7), (1, 1, 1.5, 2.5)], ids=str)
def test_resize_opset10(method, scales):
    """Resize-10: asymmetric coordinates; nearest rounds up when downsampling, truncates else."""
    x = _exact((1, 2, 5, 7), np.float32, 9)
    model = resize_model(x.shape, scaled(x.shape, scales), scales=scales, opset=10, mode=method)
    check(model, x, method)


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("method", ["nearest", "linear"])
def test_upsample(opset, method):
    x = _exact((1, 2, 3, 5), np.float32, 10)
    scales = (1, 1, 2.0, 1.5)
    model = resize_model(
        x.shape, scaled(x.shape, scales), scales=scales, op="Upsample", opset=opset, mode=method
    )
    res = check(model, x, method)
    resize10 = resize_model(x.shape, scaled(x.shape, scales), scales=scales, opset=10, mode=method)
    np.testing.assert_array_equal(res["y"], run_emu(resize10, {"x": x})["y"])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32])
def test_resize_nearest_moves_integer_data(dtype):
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).astype(dtype)
    model = resize_model(x.shape, (2, 3, 8, 7), sizes=[2, 3, 8, 7], opset=13, dtype=dtype)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = run_emu(model, {"x": x})["y"]
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, sess.run(None, {"x": x})[0])


def _decline(model) -> str:
    (node,) = list(ir.from_proto(model).graph)
    got = registry.match(node)
    assert isinstance(got, Decline), got
    return got.reason


def test_resize_declines_with_reasons():
    shape = (1, 1, 4, 4)
    assert "tf_crop_and_resize needs a constant, non-empty roi" in _decline(
        resize_model(
            shape,
            (1, 1, 8, 8),
            scales=(1, 1, 2, 2),
            coordinate_transformation_mode="tf_crop_and_resize",
        )
    )
    assert "antialias=1" in _decline(
        resize_model(shape, (1, 1, 2, 2), scales=(1, 1, 0.5, 0.5), mode="linear", antialias=1)
    )
    assert "exactly one of scales and sizes" in _decline(
        resize_model(shape, (1, 1, 8, 8), scales=(1, 1, 2, 2), sizes=[1, 1, 8, 8])
    )
    assert "output is (1, 1, 7, 8)" in _decline(
        resize_model(shape, (1, 1, 7, 8), scales=(1, 1, 2, 2))
    )
    assert "deprecated since opset 10" in _decline(
        resize_model(shape, (1, 1, 8, 8), scales=(1, 1, 2, 2), op="Upsample", opset=10)
    )
    assert "tf_half_pixel_for_nn" in _decline(
        resize_model(
            shape,
            (1, 1, 8, 8),
            scales=(1, 1, 2, 2),
            opset=13,
            mode="linear",
            coordinate_transformation_mode="tf_half_pixel_for_nn",
        )
    )
    integer = resize_model(shape, (1, 1, 8, 8), scales=(1, 1, 2, 2), dtype=np.int32, mode="linear")
    assert "linear interpolation of int32 data" in _decline(integer)
    runtime = resize_model(shape, (1, 1, 8, 8), scales=(1, 1, 2, 2))
    runtime.graph.input.append(helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4]))
    del runtime.graph.initializer[:]
    assert "scales 'scales' is not a constant" in _decline(runtime)
    bad_upsample = resize_model(shape, (1, 1, 2, 4), scales=(1, 1, 0.5, 1), op="Upsample", opset=9)
    assert "must be >= 1" in _decline(bad_upsample)


# ---- through the Session: padding and bf16 -------------------------------------------------


def _graph(nodes, inputs, outputs, inits, opset=19) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, f, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(k, f, s) for k, s in outputs.items()],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(
    ("mode", "attrs"),
    [
        ("linear", {"coordinate_transformation_mode": "half_pixel"}),
        ("cubic", {"coordinate_transformation_mode": "align_corners"}),
        ("nearest", {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"}),
    ],
)
def test_resize_between_padded_ops_reads_real_lanes_only(mode, attrs):
    """HardSigmoid pads W 7 -> 8 (its padded lane would be beta = 0.5 before zeroing, 0 after);
    a Resize that read it would pull it into the right edge. The result matches onnxruntime."""
    nodes = [
        helper.make_node("HardSigmoid", ["x"], ["h"], alpha=0.3),
        helper.make_node("Resize", ["h", "", "scales"], ["r"], mode=mode, **attrs),
        helper.make_node("Selu", ["r"], ["y"]),
    ]
    inits = {"scales": np.array([1, 1, 1.5, 2.0], np.float32)}
    model = _graph(nodes, {"x": [1, 3, 5, 7]}, {"y": [1, 3, 7, 14]}, inits)
    session = npudispatch.Session(model, fallback=None)
    x = np.random.default_rng(11).standard_normal((1, 3, 5, 7)).astype(np.float32) * 2 + 1
    (y,) = session.run(None, {"x": x})
    assert session.last_run_stats.kernel_calls == 1
    assert_close(y, run_ort(model, {"x": x})[0], rtol=2e-2, scale=2e-2)
    h = next(n for n in session.compiled.model.graph if n.op_type == "HardSigmoid").outputs[0]
    assert h.metadata_props.get(REAL_SHAPE_KEY) == "1,3,5,7" and list(h.shape) == [1, 3, 5, 8]


def test_fpn_style_upsample_add_is_one_npu_call():
    """PP-OCR's DB neck: nearest 2x Resize (asymmetric, floor) of a coarse map added to a fine one."""
    nodes = [
        helper.make_node(
            "Resize",
            ["c", "roi", "scales"],
            ["up"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        helper.make_node("Add", ["up", "f"], ["y"]),
    ]
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}
    model = _graph(
        nodes, {"c": [1, 6, 5, 5], "f": [1, 6, 10, 10]}, {"y": [1, 6, 10, 10]}, inits, 12
    )
    compiled = npudispatch.compile_model(model)
    assert [p.kind for p in compiled.partitions] == ["npu"], compiled.report.unsupported
    session = npudispatch.Session(compiled, fallback=None)
    rng = np.random.default_rng(12)
    feeds = {
        "c": rng.standard_normal((1, 6, 5, 5)).astype(np.float32),
        "f": rng.standard_normal((1, 6, 10, 10)).astype(np.float32),
    }
    (y,) = session.run(None, feeds)
    assert session.last_run_stats.kernel_calls == 1
    assert_close(y, run_ort(model, feeds)[0])


def test_upsample9_and_resize13_through_the_session():
    """Upsample-9 and the Resize-13 it maps to (asymmetric, floor) give one result."""
    x = (
        np.random.default_rng(13)
        .standard_normal((1, 4, 5, 7))
        .astype(np.float32)
        .astype(BF16)
        .astype(np.float32)
    )  # bf16 NPU: exact
    scales = np.array([1, 1, 2, 3], np.float32)
    up = _graph(
        [helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest")],
        {"x": [1, 4, 5, 7]},
        {"y": [1, 4, 10, 21]},
        {"scales": scales},
        opset=9,
    )
    rs = _graph(
        [
            helper.make_node(
                "Resize",
                ["x", "", "scales"],
                ["y"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        ],
        {"x": [1, 4, 5, 7]},
        {"y": [1, 4, 10, 21]},
        {"scales": scales},
        opset=13,
    )
    outs = []
    for model in (up, rs):
        session = npudispatch.Session(model, fallback=None)
        (y,) = session.run(None, {"x": x})
        assert session.last_run_stats.kernel_calls == 1
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], run_ort(up, {"x": x})[0])
