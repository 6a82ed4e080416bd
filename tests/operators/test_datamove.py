"""Split, Concat, Slice: emulator vs numpy reference vs onnxruntime, DMA vs kernel mode, declines,
padding, and a QKV attention block that must compile into one NPU partition."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import BF16, assert_close, one_node_model, random, run_emu, run_ort

from npudispatch import Session, compile_model
from npudispatch.errors import UnsupportedOpError
from npudispatch.operators import registry
from npudispatch.operators.base import REAL_SHAPE_KEY, Decline, OpConfig
from npudispatch.operators.datamove import MODE_DMA, MODE_KERNEL, strided_window
from npudispatch.txn.ops import BlockWrite
from npudispatch.txn.shim import ShimBd

I64 = np.int64
BIG = np.iinfo(np.int64).max


def _ints(**arrays) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, I64) for k, v in arrays.items()}


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], mode: int):
    """Emulator == reference == onnxruntime, exactly (data movement does not round)."""
    res = run_emu(model, feeds)
    cfg = res.prepared.cfg
    assert cfg.operator.op_dims(cfg)[0] == mode
    node = res.prepared.node
    data = [
        feeds[v.name] if v.name in feeds else cfg.consts[i]
        for i, (v, spec) in enumerate(zip(node.inputs, cfg.inputs))
        if spec is not None
    ]
    ref = cfg.operator.reference(cfg, data)
    ort = run_ort(model, feeds)
    for j, value in enumerate(node.outputs):
        np.testing.assert_array_equal(res[value.name], ref[j])
        np.testing.assert_array_equal(np.asarray(res[value.name]).astype(np.float32), ort[j])
    return res


def _nd_bds(res) -> list[ShimBd]:
    bds = [
        ShimBd.decode(op.values)
        for op in res.prepared.transaction.ops
        if isinstance(op, BlockWrite)
    ]
    return [bd for bd in bds if bd.d0_wrap]


# ---- Split ---------------------------------------------------------------------------------


def split_model(shape, axis, sizes, dtype, *, n=None, opset=13, num_outputs=None):
    n = len(sizes) if sizes is not None else (num_outputs or n)
    dim = shape[axis]
    out_sizes = sizes or (
        [-(-dim // n)] * (n - 1) + [dim - -(-dim // n) * (n - 1)] if num_outputs else [dim // n] * n
    )
    outs = [
        (f"y{j}", dtype, [*shape[: axis % len(shape)], s, *shape[axis % len(shape) + 1 :]])
        for j, s in enumerate(out_sizes)
    ]
    inputs = [("x", dtype, shape)] + ([("split", I64, [len(sizes)])] if sizes else [])
    attrs = {"axis": axis} | ({"num_outputs": num_outputs} if num_outputs else {})
    inits = _ints(split=sizes) if sizes else {}
    return one_node_model("Split", inputs, outs, initializers=inits, opset=opset, **attrs)


@pytest.mark.parametrize(
    ("shape", "axis", "sizes", "num_outputs", "mode"),
    [
        ((4, 12), -1, None, None, MODE_DMA),  # equal parts: one 3-d gather
        ((1, 8, 192), -1, None, 3, MODE_DMA),  # the QKV split
        ((2, 3, 8), 1, [1, 2], None, MODE_KERNEL),  # unequal parts
        ((6, 5), 0, [2, 4], None, MODE_KERNEL),
        ((2, 10), 1, None, 3, MODE_KERNEL),  # num_outputs, last part smaller: 4, 4, 2
        ((3, 2000), 1, [1000, 1000], None, MODE_DMA),
        ((2, 4096), 1, [2048, 2048], None, MODE_KERNEL),  # run > 1023 words and 3 dims in use
        ((4, 2, 6), 0, None, None, MODE_DMA),  # leading axis: a linear read
    ],
)
def test_split_float32(shape, axis, sizes, num_outputs, mode):
    n = 2 if sizes is None and num_outputs is None else None
    model = split_model(
        shape,
        axis,
        sizes,
        np.float32,
        n=n,
        opset=18 if num_outputs else 13,
        num_outputs=num_outputs,
    )
    _check(model, {"x": random(shape, np.float32, 1)}, mode)


@pytest.mark.parametrize(
    ("dtype", "shape", "mode"),
    [
        (BF16, (4, 6), MODE_DMA),  # parts of 2 bf16 = one word
        (BF16, (4, 3), MODE_KERNEL),  # parts of one bf16: half a word
        (np.dtype(np.int8), (3, 12), MODE_DMA),
        (np.dtype(np.int32), (2, 3, 3), MODE_DMA),
    ],
)
def test_split_other_dtypes(dtype, shape, mode):
    model = split_model(shape, -1, None, BF16 if dtype == BF16 else np.float32, n=3)
    if dtype.kind == "i":  # ONNX_TYPE of opkit knows floats only: patch the elem types
        code = helper.np_dtype_to_tensor_dtype(dtype)
        for vi in [*model.graph.input, *model.graph.output]:
            vi.type.tensor_type.elem_type = code
        x = np.random.default_rng(2).integers(-100, 100, shape).astype(dtype)
        res = run_emu(model, {"x": x})
        assert res.prepared.cfg.operator.op_dims(res.prepared.cfg)[0] == mode
        for j, part in enumerate(np.split(x, 3, axis=-1)):
            np.testing.assert_array_equal(res[f"y{j}"], part)
        return
    _check(model, {"x": random(shape, dtype, 3)}, mode)


def test_split_gather_is_one_3d_bd():
    res = _check(
        split_model((4, 12), 1, None, np.float32, n=3), {"x": random((4, 12), np.float32)}, MODE_DMA
    )
    (bd,) = _nd_bds(res)
    assert (bd.d0_wrap, bd.d0_step, bd.d1_wrap, bd.d1_step, bd.d2_step) == (4, 1, 4, 12, 4)


# ---- Concat --------------------------------------------------------------------------------


def concat_model(shapes, axis, dtype, consts=None):
    consts = consts or {}
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    inputs = [(f"x{i}", dtype, s) for i, s in enumerate(shapes)]
    return one_node_model("Concat", inputs, [("y", dtype, out)], initializers=consts, axis=axis)


@pytest.mark.parametrize(
    ("shapes", "axis", "mode", "n_bds"),
    [
        ([(2, 3), (2, 5)], 1, MODE_DMA, 2),  # two scatter streams
        ([(2, 4), (2, 4), (2, 4)], -1, MODE_DMA, 1),  # equal parts: one 3-d scatter
        ([(2, 3), (2, 5), (2, 1)], 1, MODE_KERNEL, 0),  # 3 unequal inputs > 2 scatter channels
        ([(1, 3, 4), (2, 3, 4)], 0, MODE_DMA, 0),  # leading axis: linear writes at offsets
        ([(2, 1, 3), (2, 2, 3)], -2, MODE_DMA, 2),
    ],
)
def test_concat_float32(float_dtype, shapes, axis, mode, n_bds):
    model = concat_model(shapes, axis, float_dtype)
    feeds = {f"x{i}": random(s, float_dtype, 10 + i) for i, s in enumerate(shapes)}
    if float_dtype == BF16 and shapes[0] in ((2, 3), (2, 1, 3)):  # runs of half words
        mode, n_bds = MODE_KERNEL, 0
    res = _check(model, feeds, mode)
    assert len(_nd_bds(res)) == n_bds


def test_concat_with_a_constant_input():
    c = random((2, 4), np.float32, 5)
    model = concat_model([(2, 4), (3, 4)], 0, np.float32, consts={"x0": c})
    res = _check(model, {"x1": random((3, 4), np.float32, 6)}, MODE_DMA)
    assert 0 in res.prepared.cfg.consts


# ---- Slice ---------------------------------------------------------------------------------


def slice_model(shape, out, dtype, starts, ends, axes=None, steps=None):
    if steps is not None and axes is None:
        axes = list(range(len(starts)))
    ints = {"starts": starts, "ends": ends}
    ints |= ({"axes": axes} if axes is not None else {}) | ({"steps": steps} if steps else {})
    inputs = [("x", dtype, shape)] + [(k, I64, [len(v)]) for k, v in ints.items()]
    return one_node_model("Slice", inputs, [("y", dtype, out)], initializers=_ints(**ints))


def _as_graph_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with initializer ``name`` turned into a (non-constant) int64 graph input."""
    (k,) = [i for i, t in enumerate(model.graph.initializer) if t.name == name]
    dims = list(model.graph.initializer[k].dims)
    model.graph.initializer.pop(k)
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, dims))
    return model


@pytest.mark.parametrize(
    ("shape", "out", "starts", "ends", "axes", "steps", "mode"),
    [
        ((6, 8), (4, 6), [1, 2], [5, 8], None, None, MODE_DMA),
        ((4, 10), (4, 3), [-3], [BIG], [-1], None, MODE_DMA),  # negative start, clamped end
        ((5, 7), (5, 4), [0], [100], [1], [2], MODE_DMA),  # strided d0
        ((5, 7), (5, 7), [-1], [-BIG], [0], [-1], MODE_KERNEL),  # reversed
        ((5, 7), (3, 7), [10], [-10], [0], [-2], MODE_KERNEL),  # clamped both ends, step -2
        ((2, 3, 4, 5), (2, 2, 4, 3), [1, 1], [3, 4], [1, 3], None, MODE_DMA),  # axes 1+2 merge
        ((2, 3, 4, 5), (2, 2, 2, 3), [1, 1, 1], [3, 3, 4], [1, 2, 3], None, MODE_KERNEL),  # 4 dims
        ((2, 3, 4, 5), (2, 3, 2, 5), [1], [3], [2], None, MODE_DMA),
        ((3, 4000), (3, 3000), [500], [3500], [1], None, MODE_DMA),  # run folded into 2 dims
    ],
)
def test_slice_float32(shape, out, starts, ends, axes, steps, mode):
    model = slice_model(shape, out, np.float32, starts, ends, axes, steps)
    _check(model, {"x": random(shape, np.float32, 7)}, mode)


@pytest.mark.parametrize(
    ("shape", "out", "starts", "ends", "mode"),
    [((4, 8), (4, 4), [0, 2], [4, 6], MODE_DMA), ((4, 7), (4, 3), [0, 1], [4, 4], MODE_KERNEL)],
)
def test_slice_bf16(shape, out, starts, ends, mode):
    model = slice_model(shape, out, BF16, starts, ends)
    _check(model, {"x": random(shape, BF16, 8)}, mode)


def test_slice_window_is_one_strided_bd():
    res = _check(
        slice_model((6, 8), (4, 6), np.float32, [1, 2], [5, 8]),
        {"x": random((6, 8), np.float32)},
        MODE_DMA,
    )
    (bd,) = _nd_bds(res)
    assert (bd.d0_wrap, bd.d0_step, bd.d1_wrap, bd.d1_step) == (6, 1, 0, 8)
    assert bd.length_words == 24


def test_strided_window_limits():
    assert strided_window(0, [(4, 1)], 4).pattern is None  # linear
    assert strided_window(1, [(4, 1)], 2) is None  # offset of half a word
    assert strided_window(0, [(2, 2), (3, 1)], 4).pattern is not None
    assert strided_window(0, [(2, 100), (2, 7), (2, 2), (1009, 1)], 4) is None  # 4 dims
    assert strided_window(0, [(2, 2000), (1009, 1)], 4).pattern is not None
    assert strided_window(0, [(2, 1 << 21), (4, 1)], 4) is None  # step over 20 bits


# ---- declines ------------------------------------------------------------------------------


def _match(model: onnx.ModelProto) -> OpConfig | Decline:
    (node,) = ir.from_proto(model).graph
    return registry.match(node)


def test_declines_name_the_problem():
    dyn_split = _as_graph_input(split_model((4, 6), 1, [3, 3], np.float32), "split")
    assert "'split' is not a constant" in _match(dyn_split).reason
    uneven = split_model((4, 5), 1, None, np.float32, n=2)
    assert "does not split into 2 equal parts" in _match(uneven).reason
    all_const = concat_model(
        [(2, 2), (2, 2)],
        0,
        np.float32,
        {"x0": np.ones((2, 2), np.float32), "x1": np.ones((2, 2), np.float32)},
    )
    assert "every input is constant" in _match(all_const).reason
    ints = concat_model([(2,), (3,)], 0, np.float32)
    for vi in [*ints.graph.input, *ints.graph.output]:
        vi.type.tensor_type.elem_type = TensorProto.INT64
    assert "shape arithmetic" in _match(ints).reason
    dyn_slice = _as_graph_input(slice_model((4, 8), (4, 4), np.float32, [0, 2], [4, 6]), "starts")
    assert "starts 'starts' is not a constant" in _match(dyn_slice).reason
    empty = slice_model((4, 8), (4, 0), np.float32, [5], [5], [1])
    assert "empty" in _match(empty).reason
    sym = concat_model([(2, 3), (2, 5)], 1, np.float32)
    sym.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert "symbolic shape" in _match(sym).reason


# ---- padding and whole models --------------------------------------------------------------


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, f, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, f, s) for n, s in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _cfg(compiled, op_type: str) -> OpConfig:
    (node,) = [n for n in compiled.model.graph if n.op_type == op_type]
    cfg = registry.match(node)
    assert isinstance(cfg, OpConfig), cfg
    return cfg


def test_padded_axes_stay_exact_through_the_padding_pass():
    """Add pads the last axis 12 -> 16 (LANES): Split must cut real lanes (kernel mode), the Concat
    after it is padded off-axis only and keeps its DMA scatter, the Slice reads a window of the
    padded layout."""
    rng = np.random.default_rng(4)
    inits = {
        "b": rng.standard_normal((5, 12)).astype(np.float32),
        "sizes": np.array([4, 8], I64),
        **_ints(starts=[2], ends=[10], axes=[1]),
    }
    nodes = [
        helper.make_node("Add", ["x", "b"], ["h"]),
        helper.make_node("Split", ["h", "sizes"], ["p", "q"], axis=1),
        helper.make_node("Concat", ["h", "z"], ["c"], axis=0),
        helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["s"]),
        helper.make_node("Add", ["c", "c"], ["y"]),
    ]
    model = _model(
        nodes,
        [("x", [5, 12]), ("z", [2, 12])],
        [("p", [5, 4]), ("q", [5, 8]), ("y", [7, 12]), ("s", [5, 8])],
        inits,
    )
    feeds = {
        "x": rng.standard_normal((5, 12)).astype(np.float32),
        "z": rng.standard_normal((2, 12)).astype(np.float32),
    }
    session = Session(model, fallback=None)
    outs = session.run(None, feeds)
    for got, want in zip(outs, run_ort(model, feeds)):
        assert_close(got, want)
    compiled = session.compiled
    h = next(n for n in compiled.model.graph if n.op_type == "Split").inputs[0]
    assert h.metadata_props.get(REAL_SHAPE_KEY) == "5,12" and list(h.shape) == [5, 16]
    assert _cfg(compiled, "Split").operator.op_dims(_cfg(compiled, "Split"))[0] == MODE_KERNEL
    concat = _cfg(compiled, "Concat")
    assert concat.outputs[0].shape == (7, 16) and concat.operator.op_dims(concat)[0] == MODE_DMA
    sl = _cfg(compiled, "Slice")
    assert sl.inputs[0].shape == (5, 16) and sl.operator.op_dims(sl)[0] == MODE_DMA
    assert len(compiled.programs) == 1


def qkv_block(seq: int = 8, hidden: int = 64, heads: int = 4) -> onnx.ModelProto:
    """torch.onnx.export-style attention: fused QKV MatMul -> Split -> Reshape -> Transpose ->
    MatMul -> scale -> Softmax -> MatMul -> Transpose -> Reshape -> output projection."""
    d = hidden // heads
    rng = np.random.default_rng(0)
    inits = {
        "w_qkv": (rng.standard_normal((hidden, 3 * hidden)) / np.sqrt(hidden)).astype(np.float32),
        "w_o": (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "heads_shape": np.array([1, seq, heads, d], I64),
        "out_shape": np.array([1, seq, hidden], I64),
        "scale": np.array(1 / np.sqrt(d), np.float32),
    }
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w_qkv"], ["qkv"], name="qkv_proj"),
        n("Split", ["qkv"], ["q", "k", "v"], axis=-1, num_outputs=3, name="qkv_split"),
        *(n("Reshape", [t, "heads_shape"], [f"{t}4"], name=f"reshape_{t}") for t in "qkv"),
        n("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qt", "kt"], ["scores"]),
        n("Mul", ["scores", "scale"], ["scaled"]),
        n("Softmax", ["scaled"], ["probs"], axis=-1),
        n("MatMul", ["probs", "vt"], ["ctx"]),
        n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "out_shape"], ["ctx2"]),
        n("MatMul", ["ctx2", "w_o"], ["y"], name="out_proj"),
    ]
    return _model(nodes, [("x", [1, seq, hidden])], [("y", [1, seq, hidden])], inits)


def test_qkv_block_is_one_npu_partition():
    model = qkv_block()
    compiled = compile_model(model)
    assert [p.kind for p in compiled.partitions] == ["npu"], compiled.report.unsupported
    assert _cfg(compiled, "Split").operator.op_dims(_cfg(compiled, "Split"))[0] == MODE_DMA
    session = Session(compiled, fallback=None)
    x = np.random.default_rng(1).standard_normal((1, 8, 64)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    assert session.last_run_stats.kernel_calls == 1
    assert_close(y, run_ort(model, {"x": x})[0], rtol=5e-2, scale=5e-2)


def test_unsupported_split_still_raises_clearly():
    model = split_model((4, 5), 1, None, np.float32, n=2)
    with pytest.raises(UnsupportedOpError, match="equal parts"):
        run_emu(model, {"x": random((4, 5), np.float32)})


def test_dma_mode_fits_a_one_column_launch():
    """The mode is fixed before the column count is known: 1 column must still have channels."""
    concat = concat_model([(2, 3), (2, 5)], 1, np.float32)
    feeds = {"x0": random((2, 3), np.float32, 1), "x1": random((2, 5), np.float32, 2)}
    np.testing.assert_array_equal(
        run_emu(concat, feeds, num_cols=1)["y"], np.concatenate(list(feeds.values()), axis=1)
    )
    split = split_model((4, 12), 1, None, np.float32, n=3)
    x = random((4, 12), np.float32, 3)
    res = run_emu(split, {"x": x}, num_cols=1)
    for j, part in enumerate(np.split(x, 3, axis=1)):
        np.testing.assert_array_equal(res[f"y{j}"], part)


def test_older_opsets_use_attributes():
    split = one_node_model(
        "Split",
        [("x", np.float32, (3, 7))],
        [("a", np.float32, (3, 2)), ("b", np.float32, (3, 5))],
        opset=11,
        axis=1,
        split=[2, 5],
    )
    _check(split, {"x": random((3, 7), np.float32, 4)}, MODE_KERNEL)
    sl = one_node_model(
        "Slice",
        [("x", np.float32, (6, 8))],
        [("y", np.float32, (6, 3))],
        opset=9,
        starts=[-4],
        ends=[-1],
        axes=[1],
    )
    _check(sl, {"x": random((6, 8), np.float32, 5)}, MODE_DMA)
