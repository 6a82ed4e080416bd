"""Framework: registry/declines, params record, striping, padding, and harness negative tests."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto
from opkit import BF16, one_node_model, random, run_emu

from npudispatch.errors import DeviceError, DeviceHang, UnsupportedOpError
from npudispatch.operators import dma, registry
from npudispatch.operators.base import REAL_SHAPE_KEY, ArgKind, Decline, OpConfig
from npudispatch.overlay_abi import ParamsRecord, operand_channels
from npudispatch.testing import harness
from npudispatch.txn.rebase import ArgRange, rebase


def _node(model):
    return ir.from_proto(model).graph[0]


def _decline(model) -> str:
    result = registry.match(_node(model))
    assert isinstance(result, Decline)
    assert registry.support(_node(model)) == result.reason
    return result.reason


def test_support_accepts_known_op():
    m = one_node_model("Sigmoid", [("x", np.float32, (2, 3))], [("y", np.float32, (2, 3))])
    assert registry.support(_node(m)) is None
    assert isinstance(registry.match(_node(m)), OpConfig)


def test_decline_reasons():
    f32 = np.float32
    unknown = one_node_model("Atan", [("x", f32, (2,))], [("y", f32, (2,))])
    assert "Atan" in _decline(unknown) and "no NPU operator" in _decline(unknown)
    m = one_node_model("Sigmoid", [("x", f32, (2,))], [("y", f32, (2,))])
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT32
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT32
    assert "dtype int32 not supported" in _decline(m)
    sym = one_node_model("Sigmoid", [("x", f32, ("N", 4))], [("y", f32, ("N", 4))])
    assert "symbolic shape" in _decline(sym)
    gelu = one_node_model("Gelu", [("x", f32, (2,))], [("y", f32, (2,))], approximate="fast")
    assert "approximate='fast'" in _decline(gelu)
    both = one_node_model(
        "Add",
        [("a", f32, (2,)), ("b", f32, (2,))],
        [("y", f32, (2,))],
        initializers={"a": np.ones(2, f32), "b": np.ones(2, f32)},
    )
    assert "both inputs are constant" in _decline(both)
    cast = one_node_model("Cast", [("x", f32, (2,))], [("y", f32, (2,))], to=TensorProto.INT8)
    assert "INT8" in _decline(cast)
    bad = one_node_model("Add", [("a", f32, (2, 3)), ("b", f32, (4,))], [("y", f32, (2, 3))])
    assert "do not broadcast" in _decline(bad)
    mixed = one_node_model("Add", [("a", f32, (2,)), ("b", BF16, (2,))], [("y", f32, (2,))])
    assert "mixed dtypes" in _decline(mixed)
    axis = one_node_model("Softmax", [("x", f32, (2, 3))], [("y", f32, (2, 3))], axis=2)
    assert "axis 2 out of range" in _decline(axis)


def test_harness_raises_unsupported():
    m = one_node_model("Atan", [("x", np.float32, (2,))], [("y", np.float32, (2,))])
    with pytest.raises(UnsupportedOpError, match="Atan"):
        harness.run_single(m, {"x": np.ones(2, np.float32)})


def test_kernel_ids_unique_and_registered():
    ops = registry.operators()
    ids = [type(op).kernel_id for op in ops]
    assert len(ids) == len(set(ids))
    mine = [type(op).kernel_id for op in ops if "matmul" not in type(op).__module__]
    # Framework families use 1..99; reductions the range 130..139 (matmul family: 100..129);
    # newer families each take the next free hundred (200 and up).
    assert len(mine) >= 14 and all(1 <= i <= 99 or 130 <= i <= 139 or i >= 200 for i in mine)
    assert set(registry.kernels()) == set(ids)

    class Clash(type(ops[0])):
        kernel_id = ids[1]

    with pytest.raises(ValueError, match="already used"):
        registry.register(Clash)


def test_params_record_describes_launch():
    m = one_node_model(
        "Add", [("a", BF16, (3, 1, 5)), ("b", BF16, (1, 1, 5))], [("y", BF16, (3, 1, 5))]
    )
    cfg = registry.match(_node(m))
    rec = ParamsRecord.decode(cfg.operator.params(cfg))
    assert rec.kernel_id == 1
    assert rec.operand_bytes == [32, 12]  # 30 B and 10 B rounded to whole words
    assert rec.output_bytes == [32]
    kinds = [(a.kind, a.local_argidx) for a in cfg.operator.buffers(cfg)]
    assert kinds == [
        (ArgKind.INPUT, 0),
        (ArgKind.INPUT, 1),
        (ArgKind.OUTPUT, 2),
        (ArgKind.PARAMS, 3),
    ]


def test_stripe_keeps_stream_order_and_word_alignment():
    streams = [dma.Stream(0, 0, 22016), dma.Stream(1, 64, 1000)]
    chans = operand_channels(4)
    runs = dma.stripe(streams, chans)
    assert list(runs) == chans[: len(runs)]  # channel order, no gaps
    pieces = [p for ch in runs.values() for p in ch]
    assert sum(p.nbytes for p in pieces) == 23016
    assert all(p.nbytes % 4 == 0 for p in pieces)
    # concatenating the pieces in channel order reproduces stream 0 then stream 1
    pos = {0: 0, 1: 0}
    for p in pieces:
        assert p.start == pos[p.stream.argidx]
        pos[p.stream.argidx] += p.nbytes


def test_small_stream_uses_one_channel():
    assert len(dma.stripe([dma.Stream(0, 0, 64)], operand_channels(4))) == 1


def _silu_model(shape=(1, 256)):
    return one_node_model("Silu", [("x", BF16, shape)], [("y", BF16, shape)], domain="npudispatch")


def test_corrupt_params_record_hangs():
    x = random((1, 256), BF16, 1)
    prep = harness.prepare(_silu_model(), {"x": x})
    k = next(i for i, a in enumerate(prep.args) if a.kind == ArgKind.PARAMS)
    prep.buffers[ArgKind.PARAMS][prep.placement[k]] ^= 0xFF  # break the magic
    with pytest.raises(DeviceHang, match="magic"):
        harness.execute(prep)


def test_wrong_operand_count_in_record_hangs():
    x = random((1, 256), BF16, 1)
    prep = harness.prepare(_silu_model(), {"x": x})
    cfg = prep.cfg
    rec = cfg.operator.params_record(cfg)
    rec.operand_bytes = [rec.operand_bytes[0] - 4]  # the DMA still sends the full input
    k = next(i for i, a in enumerate(prep.args) if a.kind == ArgKind.PARAMS)
    raw = rec.encode()
    prep.buffers[ArgKind.PARAMS][prep.placement[k] : prep.placement[k] + len(raw)] = raw
    with pytest.raises(DeviceError, match="surplus operand bytes"):
        harness.execute(prep)


def test_wrong_input_offset_gives_wrong_answer():
    """Rebasing the input 64 B off reads other bytes: the harness must not pass vacuously."""
    x = random((1, 256), BF16, 2)
    good = harness.run_single(_silu_model(), {"x": x})["y"]
    prep = harness.prepare(_silu_model(), {"x": x})
    prep.buffers[ArgKind.INPUT].extend(bytes(64))  # room so the shifted read stays in bounds
    cfg = prep.cfg
    ranges = [
        ArgRange(
            a.local_argidx,
            a.offset,
            a.nbytes,
            int(a.kind),
            prep.placement[k] + (64 if a.kind == ArgKind.INPUT else 0),
        )
        for k, a in enumerate(prep.args)
    ]
    prep.transaction = rebase(cfg.operator.transaction(cfg, prep.num_cols), ranges)
    bad = harness.execute(prep)["y"]
    assert not np.array_equal(good, bad)


def test_out_of_bounds_offset_faults():
    prep = harness.prepare(_silu_model(), {"x": random((1, 256), BF16, 3)})
    cfg = prep.cfg
    ranges = [
        ArgRange(
            a.local_argidx,
            a.offset,
            a.nbytes,
            int(a.kind),
            prep.placement[k] + (4096 if a.kind == ArgKind.OUTPUT else 0),
        )
        for k, a in enumerate(prep.args)
    ]
    prep.transaction = rebase(cfg.operator.transaction(cfg, prep.num_cols), ranges)
    with pytest.raises(DeviceError):
        harness.execute(prep)


def _padded(model, real: dict[str, tuple[int, ...]]):
    m = ir.from_proto(model)
    node = m.graph[0]
    for v in [*node.inputs, *node.outputs]:
        if v is not None and v.name in real:
            v.metadata_props[REAL_SHAPE_KEY] = ",".join(map(str, real[v.name]))
    return node


def test_softmax_over_padded_axis_uses_real_length():
    x = random((2, 13), np.float32, 4)
    model = one_node_model("Softmax", [("x", np.float32, (2, 16))], [("y", np.float32, (2, 16))])
    node = _padded(model, {"x": (2, 13), "y": (2, 13)})
    res = harness.run_single(node, {"x": x})  # harness zero-pads x to (2, 16)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(res["y"], e / e.sum(-1, keepdims=True), atol=1e-2)
    cfg = res.prepared.cfg
    rec = cfg.operator.params_record(cfg)
    xpad = np.pad(x, ((0, 0), (0, 3)))
    (out,) = cfg.operator.kernel(rec, [np.frombuffer(xpad.tobytes(), np.uint8)])
    y = out.view(np.float32).reshape(2, 16)
    assert not y[:, 13:].any()  # padded lanes stay zero
    np.testing.assert_allclose(y[:, :13], res["y"])


def test_rms_norm_over_padded_axis_uses_real_length():
    x = random((3, 10), np.float32, 5)
    scale = random((10,), np.float32, 6)
    model = one_node_model(
        "SimplifiedLayerNormalization",
        [("x", np.float32, (3, 16)), ("scale", np.float32, (10,))],
        [("y", np.float32, (3, 16))],
        initializers={"scale": scale},
        epsilon=1e-6,
    )
    node = _padded(model, {"x": (3, 10), "y": (3, 10)})
    res = harness.run_single(node, {"x": x})
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(res["y"], want, rtol=2e-2, atol=2e-2)


def test_sigmoid_padded_lanes_are_zero():
    model = one_node_model("Sigmoid", [("x", np.float32, (1, 8))], [("y", np.float32, (1, 8))])
    node = _padded(model, {"x": (1, 5), "y": (1, 5)})
    cfg = registry.match(node)
    rec = cfg.operator.params_record(cfg)
    (out,) = cfg.operator.kernel(rec, [np.zeros(32, np.uint8)])
    y = out.view(np.float32)
    assert np.all(y[:5] == 0.5) and not y[5:].any()


def test_granularity_ties_last_axes():
    m = one_node_model(
        "Add",
        [("a", np.float32, (3, 1, 37)), ("b", np.float32, (1, 1, 37))],
        [("y", np.float32, (3, 1, 37))],
    )
    cfg = registry.match(_node(m))
    g = cfg.operator.granularity(cfg)
    assert g.inputs == ((1, 1, 8), (1, 1, 8)) and g.outputs == ((1, 1, 8),)
    # Axis 0 is broadcast in b only, axis 1 everywhere (not tied), axis 2 nowhere.
    assert g.tied == (
        (("in", 0, 0), ("out", 0, 0)),
        (("in", 0, 2), ("in", 1, 2), ("out", 0, 2)),
    )


def test_granularity_ties_every_axis_of_same_shape_ops():
    """Unary ops, Softmax, Cast: each input axis tied to the same output axis; Transpose: to the
    permuted one (their match requires exactly those shapes)."""
    x = [("x", np.float32, (2, 3, 5))]
    cases = {
        ("Sigmoid", ()): ((0, 0), (1, 1), (2, 2)),
        ("Softmax", (("axis", -1),)): ((0, 0), (1, 1), (2, 2)),
        ("Cast", (("to", 16),)): ((0, 0), (1, 1), (2, 2)),
        ("Transpose", (("perm", (2, 0, 1)),)): ((2, 0), (0, 1), (1, 2)),
    }
    for (op, attrs), pairs in cases.items():
        shape = (5, 2, 3) if op == "Transpose" else (2, 3, 5)
        dtype = BF16 if op == "Cast" else np.float32
        m = one_node_model(op, x, [("y", dtype, shape)], **dict(attrs))
        cfg = registry.match(_node(m))
        assert not isinstance(cfg, Decline), (op, cfg)
        g = cfg.operator.granularity(cfg)
        assert g.tied == tuple((("in", 0, i), ("out", 0, o)) for i, o in pairs), op


def test_one_column_partition_runs():
    x = random((1, 11008), BF16, 7)
    res = run_emu(_silu_model((1, 11008)), {"x": x}, num_cols=1)
    assert res.stats.kernel_launches == 1
    assert {str(c) for c in res.stats.bytes_by_channel} == {
        "col 0 MM2S0",
        "col 0 MM2S1",
        "col 0 S2MM0",
        "col 0 S2MM1",
    }
