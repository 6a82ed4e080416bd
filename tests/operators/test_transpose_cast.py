"""Transpose (DMA gather and kernel paths) and Cast float32 <-> bfloat16."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto
from opkit import BF16, one_node_model, random, run_emu, run_ort


@pytest.mark.parametrize(
    ("shape", "perm", "gathered"),
    [
        ((5, 7), [1, 0], True),
        ((2, 3, 9), [0, 2, 1], True),
        ((2, 3, 4), [2, 0, 1], False),
        ((1, 2000), [1, 0], False),  # wrap > 1023: kernel path
    ],
)
def test_transpose_float32(shape, perm, gathered):
    out = tuple(shape[p] for p in perm)
    model = one_node_model(
        "Transpose", [("x", np.float32, shape)], [("y", np.float32, out)], perm=perm
    )
    feeds = {"x": random(shape, np.float32, 17)}
    res = run_emu(model, feeds)
    assert (res.prepared.cfg.extra["gather"] is not None) == gathered
    np.testing.assert_array_equal(res["y"], run_ort(model, feeds)[0])


@pytest.mark.parametrize(("shape", "perm"), [((5, 7), [1, 0]), ((2, 3, 4), [1, 2, 0])])
def test_transpose_bf16_in_kernel(shape, perm):
    out = tuple(shape[p] for p in perm)
    model = one_node_model("Transpose", [("x", BF16, shape)], [("y", BF16, out)], perm=perm)
    x = random(shape, BF16, 18)
    res = run_emu(model, {"x": x})
    assert res.prepared.cfg.extra["gather"] is None
    np.testing.assert_array_equal(res["y"], np.transpose(x, perm))


def test_gather_uses_an_nd_bd():
    model = one_node_model(
        "Transpose", [("x", np.float32, (5, 7))], [("y", np.float32, (7, 5))], perm=[1, 0]
    )
    res = run_emu(model, {"x": random((5, 7), np.float32, 19)})
    from npudispatch.txn.ops import BlockWrite
    from npudispatch.txn.shim import ShimBd

    bds = [
        ShimBd.decode(op.values)
        for op in res.prepared.transaction.ops
        if isinstance(op, BlockWrite)
    ]
    assert any(bd.d0_wrap == 5 and bd.d0_step == 7 and bd.d1_wrap == 7 for bd in bds)


@pytest.mark.parametrize("shape", [(1, 11008), (3, 5), (7,)])
def test_cast_round_trip(shape):
    x = random(shape, np.float32, 20)
    to_bf16 = one_node_model(
        "Cast", [("x", np.float32, shape)], [("y", BF16, shape)], to=TensorProto.BFLOAT16
    )
    y = run_emu(to_bf16, {"x": x})["y"]
    assert y.dtype == BF16
    np.testing.assert_array_equal(y, x.astype(ml_dtypes.bfloat16))  # round to nearest even
    back = one_node_model(
        "Cast", [("x", BF16, shape)], [("y", np.float32, shape)], to=TensorProto.FLOAT
    )
    z = run_emu(back, {"x": y})["y"]
    np.testing.assert_array_equal(z, y.astype(np.float32))
