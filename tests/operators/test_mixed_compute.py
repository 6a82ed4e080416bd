"""Mixed compute (``precision="mixed"``, CLI ``--precision mixed``) against onnxruntime.

Mixed compute keeps float32 storage and rounds only the operands of multiply-accumulate kernels
(matmul A/B, convolution X/W, attention operands) to bf16. Each reference here is onnxruntime on
the same graph with ``Cast(bf16) -> Cast(float)`` written by hand on exactly those operands, so the
NPU must agree to float32 accumulation order; the default bf16 compute (which also rounds norms,
residual adds and every stored tensor) must be measurably further away, so the switch is real.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opkit import random
from test_fp32_compute import _records
from test_matmul_quant import model_of, nbits_model

from npudispatch import OptionError, Session
from npudispatch.cli import main
from npudispatch.errors import DeviceHang
from npudispatch.operators import dtypes
from npudispatch.overlay_abi import (
    FLAG_FP32_COMPUTE,
    FLAG_MIXED_COMPUTE,
    HEADER_BYTES,
    ParamsRecord,
    record_size,
)

F32 = np.dtype(np.float32)
RTOL = 2e-5  # float32 accumulation order and libm (exp, sigmoid), relative to the rms


def _bf16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _rounded(name: str) -> list[onnx.NodeProto]:
    """``name`` rounded to bf16 as ``name__r`` (two Casts: what a bf16 MAC operand holds)."""
    return [
        helper.make_node("Cast", [name], [f"{name}__b"], to=TensorProto.BFLOAT16),
        helper.make_node("Cast", [f"{name}__b"], [f"{name}__r"], to=TensorProto.FLOAT),
    ]


def _run_unoptimized(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime without graph optimizations: its default level folds the Cast round trips."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.sqrt(np.mean(np.square(want))))


def _mixed_vs(model, reference, feeds, *, bf16_gap: float) -> None:
    """Mixed compute within float32 order of ``reference``; bf16 compute ``bf16_gap`` away."""
    sess = Session(model, precision="mixed", cache=False)
    records = _records(sess)
    assert records and all(r.flags == FLAG_MIXED_COMPUTE for r in records)
    assert sess.compiled.kernel_calls_per_run == 1
    want = _run_unoptimized(reference, feeds)
    for got, w in zip(sess.run(None, feeds), want):
        assert _rel(got, w) < RTOL, _rel(got, w)
    bf16 = Session(model, cache=False).run(None, feeds)
    worst = max(_rel(g, w) for g, w in zip(bf16, want))
    assert worst > bf16_gap, f"bf16 compute is as close as mixed ({worst:.2e}): no switch?"


def test_transformer_block_rounds_only_the_matmul_operands():
    """MatMul -> residual Add -> SimplifiedLayerNormalization -> x·sigmoid(x) -> Softmax: only
    the MatMul's A and W are rounded; the residual stream, the norm and the rest stay float32."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32) / 8
    gamma = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    shape = (2, 5, 64)

    def block(x: str, weight: str, pre: list[onnx.NodeProto]) -> onnx.ModelProto:
        nodes = [
            *pre,
            helper.make_node("MatMul", [x, weight], ["h"]),
            helper.make_node("Add", ["h", "X"], ["r"]),
            helper.make_node("SimplifiedLayerNormalization", ["r", "g"], ["n"], epsilon=1e-6),
            helper.make_node("Sigmoid", ["n"], ["s"]),
            helper.make_node("Mul", ["n", "s"], ["a"]),
            helper.make_node("Softmax", ["a"], ["Y"], axis=-1),
        ]
        inits = {weight: w if weight == "W" else _bf16(w), "g": gamma}
        return model_of(nodes, [("X", F32, shape)], [("Y", F32, shape)], inits)

    feeds = {"X": random(shape, F32, seed=1)}
    _mixed_vs(block("X", "W", []), block("X__r", "Wr", _rounded("X")), feeds, bf16_gap=1e-3)


def test_conv_rounds_input_and_weight_not_bias():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) / 6
    b = rng.standard_normal(16).astype(np.float32)
    x_shape, y_shape = (1, 8, 12, 12), (1, 16, 12, 12)

    def conv(x: str, pre: list[onnx.NodeProto], weight: np.ndarray) -> onnx.ModelProto:
        nodes = [
            *pre,
            helper.make_node("Conv", [x, "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["Y"]),
        ]
        return model_of(nodes, [("X", F32, x_shape)], [("Y", F32, y_shape)], {"W": weight, "B": b})

    feeds = {"X": random(x_shape, F32, seed=3)}
    _mixed_vs(conv("X", [], w), conv("X__r", _rounded("X"), _bf16(w)), feeds, bf16_gap=1e-3)


def test_matmul_nbits_int8_path_quantizes_the_float32_activation():
    """``accuracy_level=4``: the NPU quantizes the float32 A to int8 blocks itself, so mixed
    compute is onnxruntime's own MatMulNBits (float32 scales) to accumulation order."""
    model, _ = nbits_model((3,), 256, 80, 32, accuracy_level=4)
    _mixed_vs(model, model, {"A": random((3, 256), F32, seed=4)}, bf16_gap=1e-3)


def test_matmul_nbits_dequantizing_path_rounds_a_only():
    """``accuracy_level=0``: bf16 A times the exact ``(code - zp) · scale`` (the scale multiplies
    the accumulator, not a MAC operand)."""
    model, _ = nbits_model((3,), 256, 80, 32, bias=True)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    node = reference.graph.node[0]
    node.input[0] = "A__r"
    reference.graph.node.insert(0, _rounded("A")[1])
    reference.graph.node.insert(0, _rounded("A")[0])
    _mixed_vs(model, reference, {"A": random((3, 256), F32, seed=5)}, bf16_gap=1e-3)


def test_kernel_entry_and_exit_rules():
    x = np.asarray([1 + 2**-12, -3.0000002, 1e-3 + 2**-20], np.float32)
    with dtypes.launch_precision("mixed"):
        assert np.array_equal(dtypes.to_compute(x), x)  # vector operands stay float32
        assert np.array_equal(dtypes.mac_operand(x), _bf16(x))
        assert np.array_equal(dtypes.store(x, F32), x)
        assert dtypes.store(x, dtypes.BF16).dtype == dtypes.BF16  # a bf16 tensor is bf16
        assert dtypes.bf16_operands(mac=True) and not dtypes.bf16_operands(mac=False)
        assert not dtypes.fp32_compute()
    with dtypes.launch_precision("bf16"):
        assert np.array_equal(dtypes.to_compute(x), _bf16(x))
        assert np.array_equal(dtypes.store(x, F32), _bf16(x))
        assert dtypes.bf16_operands(mac=False)
    with dtypes.launch_precision("fp32"):
        assert np.array_equal(dtypes.mac_operand(x), x)
        assert not dtypes.bf16_operands(mac=True)


def test_record_flags_name_one_known_mode():
    rec = ParamsRecord(7, [8], [4], [1], b"x", flags=FLAG_MIXED_COMPUTE)
    assert ParamsRecord.decode(rec.encode()).flags == FLAG_MIXED_COMPUTE
    for bad in (FLAG_MIXED_COMPUTE | FLAG_FP32_COMPUTE, 0x4):
        head = bytearray(rec.encode()[:HEADER_BYTES])
        head[14:16] = bad.to_bytes(2, "little")
        with pytest.raises(DeviceHang, match="re-compile"):
            record_size(bytes(head))


def test_precision_options_are_checked():
    model, _ = nbits_model((3,), 64, 16, 32)
    with pytest.raises(OptionError, match="bf16, mixed, fp32"):
        Session(model, precision="fp16", cache=False)
    with pytest.raises(OptionError, match="bf16=False"):
        Session(model, bf16=False, precision="mixed", cache=False)


def test_compile_cache_keeps_precisions_apart(tmp_path):
    model, _ = nbits_model((3,), 64, 16, 32)
    feeds = {"A": random((3, 64), F32, seed=6)}
    for precision in ("mixed", "bf16", "mixed"):
        sess = Session(model, precision=precision, cache=tmp_path)
        sess.run(None, feeds)
        flags = {r.flags for r in _records(sess)}
        assert flags == {FLAG_MIXED_COMPUTE if precision == "mixed" else 0}
    assert [e.source for e in sess.compile_log] == ["disk cache"]


def test_cli_precision_flag(tmp_path, capsys):
    model, _ = nbits_model((3,), 256, 80, 32, accuracy_level=4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["run", str(path), "--precision", "mixed", "--check"]) == 0
    assert "where mixed compute rounds" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", str(path), "--precision", "mixed", "--fp32"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_check_fails_a_wrong_mixed_result(tmp_path):
    """The mixed reference is sharp: a 2**-7 relative error in the NPU's output fails it."""
    from npudispatch.dispatch.check import RoundingReference, check_outputs

    model, _ = nbits_model((3,), 256, 80, 32, bias=True)
    feeds = {"A": random((3, 256), F32, seed=7)}
    (y,) = Session(model, precision="mixed", cache=False).run(None, feeds)
    reference = RoundingReference(model, precision="mixed")
    assert check_outputs(reference, feeds, {"Y": y})["Y"].ok
    assert not check_outputs(reference, feeds, {"Y": y * np.float32(1 + 2**-7)})["Y"].ok
    assert reference.jitter_shapes  # probe runs move the rounded A


def test_weights_are_bf16_images_and_q4_scales_float32():
    """Mixed compute formats float weights as bf16 (MAC operands) and q4 scales as float32 (they
    scale the accumulator): the const image is the bf16 one for a MatMul and larger for q4."""
    w = numpy_helper.from_array(np.ones((64, 32), np.float32), "W")
    mm = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 64])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 32])], [w],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )  # fmt: skip
    nbits, _ = nbits_model((3,), 256, 80, 32)

    def const_bytes(model, precision):
        sess = Session(model, precision=precision, cache=False)
        return sum(len(p.const_image) for p in sess.compiled.programs.values())

    assert const_bytes(mm, "mixed") == const_bytes(mm, "bf16") < const_bytes(mm, "fp32")
    assert const_bytes(nbits, "bf16") < const_bytes(nbits, "mixed") == const_bytes(nbits, "fp32")


def test_check_rounds_the_models_own_bf16_tensors():
    """An explicit ``Cast(to=bf16)`` rounds on the NPU in mixed compute too; the mixed reference
    rounds there as well (it used to widen the bf16 tensor and compare with unrounded values)."""
    from npudispatch.dispatch.check import RoundingReference, check_outputs

    nodes = [
        helper.make_node("Mul", ["X", "c"], ["m"]),
        helper.make_node("Cast", ["m"], ["b"], to=TensorProto.BFLOAT16),
        helper.make_node("Sigmoid", ["b"], ["s"]),
        helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["f", "X"], ["Y"]),
    ]
    shape = (4, 64)
    model = model_of(nodes, [("X", F32, shape)], [("Y", F32, shape)], {"c": np.float32(1.37)})
    feeds = {"X": random(shape, F32, seed=8)}
    (y,) = Session(model, precision="mixed", cache=False).run(None, feeds)
    verdict = check_outputs(RoundingReference(model, precision="mixed"), feeds, {"Y": y})["Y"]
    assert verdict.ok, verdict


def test_inspect_rewrite_shows_the_chosen_precision(tmp_path, capsys):
    """`inspect --rewrite` shows what `compile` partitions for that precision: bf16 storage
    inserts boundary casts, mixed compute keeps float32 storage and none."""
    import json

    model, _ = nbits_model((3,), 256, 80, 32)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    counts = {}
    for precision in ("bf16", "mixed"):
        assert main(["inspect", str(path), "--rewrite", "--precision", precision, "--json"]) == 0
        counts[precision] = json.loads(capsys.readouterr().out)["op_types"].get("Cast", 0)
    assert counts["bf16"] > 0 and counts["mixed"] == 0
