"""CNN activations (Clip, HardSigmoid, HardSwish, LeakyRelu, PRelu, Elu, Selu), inference
BatchNormalization and spatial data movement (Pad, DepthToSpace, SpaceToDepth): emulator vs the
numpy reference vs onnxruntime over odd shapes, every mode and the opset variants; declines; and
small CNN graphs through ``npudispatch.Session`` with terminal padding and bf16."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import BF16, assert_close, one_node_model, random, run_emu, run_ort

import npudispatch
from npudispatch.operators import registry
from npudispatch.operators.base import REAL_SHAPE_KEY, Decline, OpConfig
from npudispatch.rewrites.precision import tolerance_for

I64 = np.int64
ODD_SHAPES = [(1, 3, 5, 7), (2, 5, 3), (13,)]


def _exact(shape, dtype, seed, scale=3.0):
    """bf16-representable data, so a float32 run compares what the kernel computes."""
    return random(shape, BF16, seed, scale).astype(dtype)


def _ref(res, *inputs):
    cfg = res.prepared.cfg
    return cfg.operator.reference(cfg, list(inputs))


def _match(model: onnx.ModelProto) -> OpConfig | Decline:
    (node,) = list(ir.from_proto(model).graph)
    return registry.match(node)


def _declines(model: onnx.ModelProto, text: str) -> None:
    got = _match(model)
    assert isinstance(got, Decline), got
    assert text in got.reason, got.reason


def _check(model, feeds, *, exact=False):
    """Emulator == reference (exact for moves, bf16 tolerance otherwise) and ~= onnxruntime."""
    res = run_emu(model, feeds)
    node = res.prepared.node
    data = [feeds[v.name] for v in node.inputs if v is not None and v.name in feeds]
    want = run_ort(model, feeds)[0]
    got = res[node.outputs[0].name]
    if exact:
        np.testing.assert_array_equal(got, _ref(res, *data)[0])
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want)
    else:
        assert_close(got, _ref(res, *data)[0])
        assert_close(got, want)
    return res


# ---- lane-local activations ----------------------------------------------------------------

ACTIVATIONS = [
    ("HardSigmoid", {}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
    ("HardSwish", {}),
    ("LeakyRelu", {}),
    ("LeakyRelu", {"alpha": 0.25}),
    ("Elu", {}),
    ("Elu", {"alpha": 0.4}),
    ("Selu", {}),
    ("Selu", {"alpha": 1.5, "gamma": 2.0}),
]


@pytest.mark.parametrize(("op", "attrs"), ACTIVATIONS, ids=lambda a: str(a))
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_activation_matches_reference_and_ort(op, attrs, shape, float_dtype):
    model = one_node_model(op, [("x", float_dtype, shape)], [("y", float_dtype, shape)], **attrs)
    res = _check(model, {"x": _exact(shape, float_dtype, len(op))})
    cfg = res.prepared.cfg
    assert cfg.operator.op_floats(cfg) == [
        float(np.float32(attrs.get(k, v))) if k in attrs else v
        for k, v in getattr(cfg.operator, "ATTRS", {}).items()
    ]
    assert [a.kind.name for a in res.prepared.args] == ["INPUT", "OUTPUT", "PARAMS"]


def test_activations_are_distinct_and_not_identity():
    x = np.linspace(-4.0, 4.0, 24, dtype=np.float32).reshape(2, 12)
    outs = {}
    for op, attrs in ACTIVATIONS:
        m = one_node_model(op, [("x", np.float32, x.shape)], [("y", np.float32, x.shape)], **attrs)
        outs[(op, str(attrs))] = run_emu(m, {"x": x})["y"].tobytes()
    assert len(set(outs.values())) == len(outs)
    assert x.tobytes() not in outs.values()


def test_activation_declines_unknown_attribute():
    model = one_node_model(
        "LeakyRelu", [("x", np.float32, (2, 8))], [("y", np.float32, (2, 8))], beta=1.0
    )
    _declines(model, "unsupported attribute(s) ['beta']")


# ---- Clip: attributes (opset 6) vs inputs (opset 11+) --------------------------------------


def _clip_model(shape, dtype, opset, lo=None, hi=None, **attrs):
    inits, ins = {}, [("x", dtype, shape)]
    for name, v in (("lo", lo), ("hi", hi)):
        if v is None:
            ins.append(None)
        else:
            inits[name] = np.asarray(v, dtype)
            ins.append((name, dtype, ()))
    while ins and ins[-1] is None:
        ins.pop()
    return one_node_model(
        "Clip", ins, [("y", dtype, shape)], initializers=inits, opset=opset, **attrs
    )


@pytest.mark.parametrize(
    ("opset", "lo", "hi", "attrs", "want"),
    [
        (6, None, None, {"min": -1.0, "max": 2.5}, [-1.0, 2.5]),
        (6, None, None, {"min": 0.5}, [0.5, float(np.finfo(np.float32).max)]),
        (6, None, None, {}, [-float(np.finfo(np.float32).max), float(np.finfo(np.float32).max)]),
        (11, 0.0, 6.0, {}, [0.0, 6.0]),
        (13, -0.5, None, {}, [-0.5, np.inf]),
        (13, None, 1.25, {}, [-np.inf, 1.25]),
        (13, None, None, {}, [-np.inf, np.inf]),
        (13, 2.0, -1.0, {}, [2.0, -1.0]),  # min > max: everything becomes max
    ],
)
def test_clip_opset_variants(opset, lo, hi, attrs, want, float_dtype):
    shape = (2, 3, 9)
    model = _clip_model(shape, float_dtype, opset, lo, hi, **attrs)
    if opset >= 11 and lo is None and hi is not None:  # an absent min is an empty input name
        model.graph.node[0].input[1] = ""
    res = _check(model, {"x": _exact(shape, float_dtype, 5)})
    cfg = res.prepared.cfg
    assert cfg.operator.op_floats(cfg) == want
    assert [a.kind.name for a in res.prepared.args] == ["INPUT", "OUTPUT", "PARAMS"]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32])
@pytest.mark.parametrize(("lo", "hi"), [(3, 100), (None, 7), (20, 5)])
def test_clip_integer_data_is_exact(dtype, lo, hi):
    shape = (3, 11)
    x = np.random.default_rng(4).integers(0, 120, shape).astype(dtype)
    t = _onnx_type(dtype)
    inits = [
        numpy_helper.from_array(np.asarray(v, dtype), k)
        for k, v in (("lo", lo), ("hi", hi))
        if v is not None
    ]
    node = helper.make_node("Clip", ["x", "" if lo is None else "lo", "hi"], ["y"], name="clip_i")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", t, list(shape))],
        [helper.make_tensor_value_info("y", t, list(shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    got = run_emu(model, {"x": x})["y"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"x": x})
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)


def test_clip_declines():
    _declines(
        one_node_model(
            "Clip",
            [("x", np.float32, (4,)), ("lo", np.float32, ())],
            [("y", np.float32, (4,))],
            opset=13,
        ),
        "min 'lo' is not a constant",
    )
    _declines(_clip_model((4,), np.float32, 13, np.zeros(2), None), "bounds are scalars")
    _declines(_clip_model((4,), np.float32, 13, 0.0, None, min=1.0), "has no attributes")
    no_opset = _clip_model((4,), np.float32, 13, 0.0, 6.0)
    del no_opset.opset_import[:]
    _declines(no_opset, "declares no opset version")


# ---- PRelu ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "slope_shape"),
    [((1, 5, 3, 7), (5, 1, 1)), ((2, 3, 5), (1,)), ((2, 3, 9), (9,)), ((3, 11), (3, 11))],
)
@pytest.mark.parametrize("const", [True, False], ids=["const", "streamed"])
def test_prelu_broadcast_slope(shape, slope_shape, const, float_dtype):
    slope = np.random.default_rng(2).uniform(0.05, 0.5, slope_shape).astype(float_dtype)
    model = one_node_model(
        "PRelu",
        [("x", float_dtype, shape), ("s", float_dtype, slope_shape)],
        [("y", float_dtype, shape)],
        initializers={"s": slope} if const else {},
    )
    x = _exact(shape, float_dtype, 3)
    feeds = {"x": x} if const else {"x": x, "s": slope}
    res = run_emu(model, feeds)
    assert (1 in res.prepared.cfg.consts) == const
    assert_close(res["y"], _ref(res, x, slope)[0])
    assert_close(res["y"], run_ort(model, feeds)[0])
    neg = x.astype(np.float32) < 0
    assert np.any(neg) and not np.allclose(res["y"][neg], x[neg])  # the slope really applies


def test_prelu_declines_slope_that_widens_x():
    model = one_node_model(
        "PRelu",
        [("x", np.float32, (1, 4)), ("s", np.float32, (3, 4))],
        [("y", np.float32, (3, 4))],
        initializers={"s": np.full((3, 4), 0.1, np.float32)},
    )
    _declines(model, "does not broadcast to X")


# ---- BatchNormalization --------------------------------------------------------------------


def _bn_model(shape, dtype, opset=15, *, epsilon=1e-5, seed=0, **attrs):
    c = shape[1]
    rng = np.random.default_rng(seed)
    stats = {
        "scale": rng.uniform(0.5, 2.0, c),
        "bias": rng.standard_normal(c),
        "mean": rng.standard_normal(c) * 2.0,
        "var": rng.uniform(0.2, 3.0, c),
    }
    stats = {k: v.astype(dtype) for k, v in stats.items()}
    model = one_node_model(
        "BatchNormalization",
        [("x", dtype, shape), *((k, dtype, (c,)) for k in stats)],
        [("y", dtype, shape)],
        initializers=stats,
        opset=opset,
        epsilon=epsilon,
        **attrs,
    )
    return model, stats


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 5, 9), (3, 7), (1, 2, 3, 4, 5)])
@pytest.mark.parametrize("opset", [9, 15])
def test_batchnorm_inference(shape, opset, float_dtype):
    model, _ = _bn_model(shape, float_dtype, opset, epsilon=1e-3)
    x = _exact(shape, float_dtype, 7)
    res = run_emu(model, {"x": x})
    cfg = res.prepared.cfg
    assert sorted(cfg.consts) == [1, 2]  # folded multiplier and offset, float32
    assert all(cfg.consts[i].dtype == np.float32 for i in (1, 2))
    assert_close(res["y"], _ref(res, x)[0])
    assert_close(res["y"], run_ort(model, {"x": x})[0])


def test_batchnorm_declines():
    model, _ = _bn_model((1, 3, 4, 4), np.float32, 15, training_mode=1)
    _declines(model, "training_mode=1")
    model, _ = _bn_model((1, 3, 4, 4), np.float32, 7, spatial=0)
    _declines(model, "spatial=0")
    streamed = one_node_model(
        "BatchNormalization",
        [("x", np.float32, (1, 3, 4)), *((k, np.float32, (3,)) for k in "sbmv")],
        [("y", np.float32, (1, 3, 4))],
        initializers={k: np.ones(3, np.float32) for k in "sbv"},
    )
    _declines(streamed, "mean 'm' is not a constant")
    model, _ = _bn_model((1, 3, 4, 4), np.float32, 15)
    model.graph.output.extend([helper.make_tensor_value_info("rm", TensorProto.FLOAT, [3])])
    model.graph.node[0].output.append("rm")
    _declines(model, "2 outputs")


# ---- Pad -----------------------------------------------------------------------------------


def _pad_model(shape, out, pads, mode, dtype, *, opset, value=None, axes=None):
    """Pad-11+ with pads / constant_value / axes as initializers (Pad-2 uses attributes)."""
    if opset < 11:
        attrs = {"pads": pads, "mode": mode}
        if value is not None:
            attrs["value"] = float(value)
        return one_node_model(
            "Pad", [("x", dtype, shape)], [("y", dtype, out)], opset=opset, **attrs
        )
    x = helper.make_tensor_value_info("x", _onnx_type(dtype), list(shape))
    y = helper.make_tensor_value_info("y", _onnx_type(dtype), list(out))
    inits = [numpy_helper.from_array(np.asarray(pads, I64), "pads")]
    names = ["x", "pads"]
    if value is not None or axes is not None:
        names.append("cv" if value is not None else "")
        if value is not None:
            inits.append(numpy_helper.from_array(np.asarray(value).astype(dtype), "cv"))
    if axes is not None:
        names.append("axes")
        inits.append(numpy_helper.from_array(np.asarray(axes, I64), "axes"))
    node = helper.make_node("Pad", names, ["y"], name="pad_0", mode=mode)
    graph = helper.make_graph([node], "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _onnx_type(dtype):
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _padded_shape(shape, pads, axes=None):
    axes = list(range(len(shape))) if axes is None else axes
    out = list(shape)
    for k, a in enumerate(axes):
        out[a] += pads[k] + pads[k + len(axes)]
    return tuple(out)


PAD_CASES = [
    ([0, 1, 2, 3, 0, 2, 1, 0], None),
    ([0, 0, 1, 2, 0, 0, 3, 1], None),
    ([2, 3, 1, 2], [2, 3]),
    ([1, 4], [-1]),
]


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize(("pads", "axes"), PAD_CASES)
def test_pad_modes_opset19(mode, pads, axes, float_dtype):
    shape = (2, 3, 5, 7)
    value = 1.5 if mode == "constant" else None
    model = _pad_model(
        shape,
        _padded_shape(shape, pads, [a % 4 for a in axes] if axes else None),
        pads,
        mode,
        float_dtype,
        opset=19,
        value=value,
        axes=axes,
    )
    _check(model, {"x": random(shape, float_dtype, 11)}, exact=True)


@pytest.mark.parametrize("opset", [2, 11, 13, 18])
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_opset_variants(opset, mode):
    shape, pads = (1, 2, 4, 5), [0, 0, 2, 1, 0, 1, 3, 3]
    value = -2.0 if mode == "constant" else None
    model = _pad_model(
        shape, _padded_shape(shape, pads), pads, mode, np.float32, opset=opset, value=value
    )
    res = _check(model, {"x": random(shape, np.float32, 12)}, exact=True)
    assert res.prepared.cfg.operator.op_floats(res.prepared.cfg) == [value or 0.0]


def test_pad_negative_pads_crop_and_integer_data():
    shape, pads = (3, 6, 5), [0, -2, 1, 0, 1, -3]
    x = np.arange(np.prod(shape), dtype=np.int32).reshape(shape) - 40
    model = _pad_model(
        shape, _padded_shape(shape, pads), pads, "constant", np.int32, opset=13, value=7
    )
    res = run_emu(model, {"x": x})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"x": x})
    np.testing.assert_array_equal(res["y"], want)
    np.testing.assert_array_equal(res["y"], _ref(res, x)[0])


def test_pad_declines():
    shape = (1, 1, 3, 4)
    _declines(
        _pad_model(shape, (1, 1, 3, 14), [0, 0, 0, 5, 0, 0, 0, 5], "reflect", np.float32, opset=19),
        "reach past the edge",
    )
    _declines(
        _pad_model(shape, (1, 1, 3, 3), [0, 0, 0, -1, 0, 0, 0, 0], "edge", np.float32, opset=19),
        "negative pads with mode 'edge'",
    )
    _declines(
        _pad_model(shape, (1, 1, 3, 6), [0, 0, 0, 1, 0, 0, 0, 1], "wrap", np.float32, opset=18),
        "wrap: opset 19",
    )
    runtime = one_node_model(
        "Pad",
        [("x", np.float32, shape), ("pads", np.float32, (8,))],
        [("y", np.float32, shape)],
        opset=13,
    )
    runtime.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    _declines(runtime, "pads 'pads' is not a constant")
    i64 = _pad_model((2, 3), (2, 5), [0, 1, 0, 1], "constant", np.int64, opset=13)
    _declines(i64, "int64 data is shape arithmetic")


# ---- DepthToSpace / SpaceToDepth -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
@pytest.mark.parametrize(
    ("shape", "block"), [((2, 12, 3, 5), 2), ((1, 27, 2, 3), 3), ((1, 4, 3, 3), 1)]
)
def test_depth_to_space(mode, shape, block, float_dtype):
    n, c, h, w = shape
    out = (n, c // block**2, h * block, w * block)
    model = one_node_model(
        "DepthToSpace",
        [("x", float_dtype, shape)],
        [("y", float_dtype, out)],
        blocksize=block,
        mode=mode,
    )
    _check(model, {"x": random(shape, float_dtype, 13)}, exact=True)


@pytest.mark.parametrize(("shape", "block"), [((2, 3, 6, 9), 3), ((1, 5, 4, 2), 2)])
@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_space_to_depth(shape, block, mode, float_dtype):
    """DCR (every opset) and CRD (the ``mode`` attribute of opset 28); DepthToSpace in the same
    mode undoes it."""
    n, c, h, w = shape
    out = (n, c * block**2, h // block, w // block)
    attrs = {"mode": mode, "opset": 28} if mode == "CRD" else {}
    model = one_node_model(
        "SpaceToDepth",
        [("x", float_dtype, shape)],
        [("y", float_dtype, out)],
        blocksize=block,
        **attrs,
    )
    x = random(shape, float_dtype, 14)
    res = _check(model, {"x": x}, exact=True)
    back = one_node_model(
        "DepthToSpace",
        [("x", float_dtype, out)],
        [("y", float_dtype, shape)],
        blocksize=block,
        mode=mode,
    )
    np.testing.assert_array_equal(run_emu(back, {"x": res["y"]})["y"], x)


def test_block_moves_decline():
    _declines(
        one_node_model(
            "DepthToSpace",
            [("x", np.float32, (1, 6, 2, 2))],
            [("y", np.float32, (1, 1, 4, 4))],
            blocksize=2,
        ),
        "not a multiple of blocksize² 4",
    )
    _declines(
        one_node_model(
            "SpaceToDepth",
            [("x", np.float32, (1, 2, 5, 4))],
            [("y", np.float32, (1, 8, 2, 2))],
            blocksize=2,
        ),
        "not a multiple of blocksize 2",
    )
    _declines(
        one_node_model(
            "DepthToSpace",
            [("x", np.float32, (4, 4, 4))],
            [("y", np.float32, (4, 4, 4))],
            blocksize=2,
        ),
        "only NCHW",
    )


# ---- small CNN graphs through the Session --------------------------------------------------


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


def cnn_tail(c: int = 5, h: int = 7, w: int = 7) -> onnx.ModelProto:
    """BN -> HardSwish -> reflect Pad -> PRelu -> Clip(0, 6) -> SpaceToDepth -> HardSigmoid ->
    DepthToSpace(CRD) -> LeakyRelu, with odd W so terminal padding pads the last axis."""
    rng = np.random.default_rng(5)
    inits = {
        "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "bias": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64),
        "slope": rng.uniform(0.1, 0.3, (c, 1, 1)).astype(np.float32),
        "zero": np.array(0.0, np.float32),
        "six": np.array(6.0, np.float32),
    }
    n = helper.make_node
    nodes = [
        n("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["bn"]),
        n("HardSwish", ["bn"], ["hs"]),
        n("Pad", ["hs", "pads"], ["pad"], mode="reflect"),
        n("PRelu", ["pad", "slope"], ["pr"]),
        n("Clip", ["pr", "zero", "six"], ["clip"]),
        n("SpaceToDepth", ["clip"], ["s2d"], blocksize=3),
        n("HardSigmoid", ["s2d"], ["hsig"], alpha=0.3),
        n("DepthToSpace", ["hsig"], ["d2s"], blocksize=3, mode="CRD"),
        n("LeakyRelu", ["d2s"], ["y"], alpha=0.1),
    ]
    return _graph(nodes, {"x": [1, c, h, w]}, {"y": [1, c, h + 2, w + 2]}, inits)


def test_cnn_tail_runs_as_one_npu_call_with_padding():
    model = cnn_tail()
    compiled = npudispatch.compile_model(model)
    assert [p.kind for p in compiled.partitions] == ["npu"], compiled.report.unsupported
    session = npudispatch.Session(compiled, fallback=None)
    x = np.random.default_rng(6).standard_normal((1, 5, 7, 7)).astype(np.float32) * 3
    (y,) = session.run(None, {"x": x})
    assert session.last_run_stats.kernel_calls == 1
    (want,) = run_ort(model, {"x": x})
    tol = tolerance_for([n.op_type for n in model.graph.node])
    tol.scaled(float(np.sqrt(np.mean(want**2)))).assert_close(y, want, "cnn tail")
    bn = next(n for n in compiled.model.graph if n.op_type == "BatchNormalization").outputs[0]
    assert bn.metadata_props.get(REAL_SHAPE_KEY) == "1,5,7,7" and list(bn.shape) == [1, 5, 7, 8]


def test_pad_reads_only_real_lanes_after_a_padded_producer():
    """Elu's output is padded 7 -> 8 on W; Elu(0) lanes are zero there, but an edge Pad that
    read them would repeat a zero column instead of the real last column."""
    pads = np.array([0, 0, 0, 2, 0, 0, 0, 3], I64)
    nodes = [
        helper.make_node("Elu", ["x"], ["e"]),
        helper.make_node("Pad", ["e", "pads"], ["p"], mode="edge"),
        helper.make_node("Selu", ["p"], ["y"]),
    ]
    model = _graph(nodes, {"x": [1, 2, 3, 7]}, {"y": [1, 2, 3, 12]}, {"pads": pads})
    session = npudispatch.Session(model, fallback=None)
    x = np.random.default_rng(7).standard_normal((1, 2, 3, 7)).astype(np.float32) + 1.0
    (y,) = session.run(None, {"x": x})
    assert_close(y, run_ort(model, {"x": x})[0])
    e = next(n for n in session.compiled.model.graph if n.op_type == "Elu").outputs[0]
    assert list(e.shape) == [1, 2, 3, 8]
    assert np.all(y[..., -3:] == y[..., -4:-3])  # the real last column repeated


def test_clip6_and_upgraded_clip13_agree():
    """The same network at opset 6 (attribute bounds) and 13 (input bounds) gives one result."""
    x = np.random.default_rng(8).standard_normal((2, 3, 9)).astype(np.float32) * 4
    old = _clip_model((2, 3, 9), np.float32, 6, min=-1.0, max=2.0)
    new = _clip_model((2, 3, 9), np.float32, 13, -1.0, 2.0)
    got_old = npudispatch.Session(old, fallback=None).run(None, {"x": x})[0]
    got_new = npudispatch.Session(new, fallback=None).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got_old, got_new)
    assert_close(got_new, np.clip(x, -1.0, 2.0))


def test_pad2_and_pad18_agree_through_the_session():
    """Pad-2 (attributes) and Pad-18 (inputs with axes) of one padding give one result."""
    shape = (1, 3, 5, 6)
    x = (
        np.random.default_rng(9)
        .standard_normal(shape)
        .astype(np.float32)
        .astype(BF16)
        .astype(np.float32)
    )  # bf16 NPU: exact
    results = []
    for opset, pads, axes in [(2, [0, 0, 2, 1, 0, 0, 1, 3], None), (18, [2, 1, 1, 3], [2, 3])]:
        model = _pad_model(
            shape, (1, 3, 8, 10), pads, "reflect", np.float32, opset=opset, axes=axes
        )
        session = npudispatch.Session(model, fallback=None)
        (y,) = session.run(None, {"x": x})
        assert session.last_run_stats.kernel_calls == 1
        np.testing.assert_array_equal(y, run_ort(model, {"x": x})[0])
        results.append(y)
    np.testing.assert_array_equal(*results)


def test_channel_padded_by_conv_flows_through_bn_prelu_and_resize():
    """Conv pads its 5 output channels to 8; Relu keeps the BatchNormalization from folding into
    it, so BN sees padded channels (its folded constants are zero-extended), PRelu's [5, 1, 1]
    slope is zero-padded with them and Resize reads only the real ones."""
    rng = np.random.default_rng(10)
    c = 5
    inits = {
        "w": (rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "bias": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "slope": rng.uniform(0.1, 0.3, (c, 1, 1)).astype(np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        n("Relu", ["conv"], ["relu"]),
        n("BatchNormalization", ["relu", "scale", "bias", "mean", "var"], ["bn"]),
        n("PRelu", ["bn", "slope"], ["pr"]),
        n("Resize", ["pr", "", "scales"], ["y"], mode="linear"),
    ]
    model = _graph(nodes, {"x": [1, 3, 6, 7]}, {"y": [1, c, 12, 14]}, inits)
    session = npudispatch.Session(model, fallback=None)
    x = rng.standard_normal((1, 3, 6, 7)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    assert session.last_run_stats.kernel_calls == 1
    graph = session.compiled.model.graph
    assert {"BatchNormalization", "PRelu", "Resize"} <= {node.op_type for node in graph}
    bn_in = next(node for node in graph if node.op_type == "BatchNormalization").inputs[0]
    assert bn_in.shape[1] == 8 and bn_in.metadata_props.get(REAL_SHAPE_KEY, "").startswith("1,5,")
    (want,) = run_ort(model, {"x": x})
    tol = tolerance_for([node.op_type for node in model.graph.node], k=27)
    tol.scaled(float(np.sqrt(np.mean(want**2)))).assert_close(y, want, "conv/bn/prelu/resize")
