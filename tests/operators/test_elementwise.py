"""Add/Sub/Mul/Div on the emulator vs the numpy reference and onnxruntime (bf16 tolerances: opkit)."""

from __future__ import annotations

import numpy as np
import pytest
from opkit import BF16, assert_close, one_node_model, random, reference, run_emu, run_ort

SHAPES = [
    ((1, 11008), (1, 11008)),  # llama2 MLP Mul
    ((3, 1, 37), (1, 1, 37)),  # broadcast [1,1,N] with [M,1,N], N not a tile multiple
    ((1, 1, 37), (3, 1, 37)),
    ((5, 7), ()),  # scalar
    ((1,), (4, 3, 1)),  # rank change, size-1 axes
    ((2, 3, 4, 5), (3, 1, 5)),
]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize(("sa", "sb"), SHAPES)
def test_binary_matches_reference_and_ort(op, sa, sb, float_dtype):
    out = np.broadcast_shapes(sa, sb)
    model = one_node_model(
        op, [("a", float_dtype, sa), ("b", float_dtype, sb)], [("y", float_dtype, out)]
    )
    feeds = {"a": random(sa, float_dtype, 1), "b": random(sb, float_dtype, 2)}
    if op == "Div":  # keep the divisor away from 0 so the relative tolerance is meaningful
        feeds["b"] = (np.abs(feeds["b"].astype(np.float32)) + 0.5).astype(float_dtype)
    res = run_emu(model, feeds)
    y = res["y"]
    assert y.dtype == float_dtype and y.shape == out
    assert_close(y, reference(res, feeds)[0])
    assert_close(y, run_ort(model, feeds)[0])


def test_constant_operand_goes_to_const_region(float_dtype):
    bias = random((1, 1, 24), float_dtype, 5)
    model = one_node_model(
        "Add",
        [("a", float_dtype, (4, 1, 24)), ("bias", float_dtype, (1, 1, 24))],
        [("y", float_dtype, (4, 1, 24))],
        initializers={"bias": bias},
    )
    feeds = {"a": random((4, 1, 24), float_dtype, 6)}
    res = run_emu(model, feeds)
    kinds = [a.kind.name for a in res.prepared.args]
    assert kinds == ["INPUT", "CONST", "OUTPUT", "PARAMS"]
    assert_close(res["y"], run_ort(model, feeds)[0])


def test_llama2_mul_stripes_over_all_output_channels():
    model = one_node_model(
        "Mul", [("a", BF16, (1, 11008)), ("b", BF16, (1, 11008))], [("y", BF16, (1, 11008))]
    )
    feeds = {"a": random((1, 11008), BF16, 1), "b": random((1, 11008), BF16, 2)}
    res = run_emu(model, feeds)
    s2mm = {str(c): n for c, n in res.stats.bytes_by_channel.items() if "S2MM" in str(c)}
    assert sorted(s2mm.values()) == [2752] * 8  # 22,016 B over 8 channels, like AMD's silu/elwmul
    assert_close(res["y"], run_ort(model, feeds)[0])
