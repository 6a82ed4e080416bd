"""Float32 compute (``Session(..., bf16=False)``, CLI ``--fp32``) against onnxruntime.

Every launch of a model compiled with ``bf16=False`` carries ``FLAG_FP32_COMPUTE`` in its params
record: kernels take float32 operands and float32 weight images (q4 scales included), so results
agree with onnxruntime's float32 CPU kernels to float32 accuracy (differences are accumulation
order only), far inside the bf16 policy. Each case also checks that the op really ran on the NPU
and that the default bf16 compute of the same model is measurably further away (the switch is real).
"""

from __future__ import annotations

import numpy as np
import pytest
from opkit import one_node_model, random, run_ort
from test_attention import _gqa_case, _ort
from test_matmul_quant import nbits_model

from npudispatch import Session
from npudispatch.overlay_abi import FLAG_FP32_COMPUTE, HEADER_BYTES, ParamsRecord

F32 = np.dtype(np.float32)
RTOL = 1e-5


def _run(model, feeds, *, bf16: bool) -> tuple[Session, list[np.ndarray]]:
    sess = Session(model, bf16=bf16, cache=False)
    return sess, sess.run(None, feeds)


def _records(sess: Session) -> list[ParamsRecord]:
    out = []
    for prog in sess.compiled.programs.values():
        for off, size in prog.plan.params_regions.values():
            out.append(ParamsRecord.decode(prog.params_image[off : off + size]))
    return out


def _check(model, feeds, want: list[np.ndarray], *, bf16_gap: float = 1e-4) -> None:
    """``bf16=False`` within float32 tolerance of ``want``; default bf16 measurably further."""
    sess, got = _run(model, feeds, bf16=False)
    records = _records(sess)
    assert records and all(r.flags & FLAG_FP32_COMPUTE for r in records)
    for g, w in zip(got, want):
        scale = float(np.sqrt(np.mean(np.square(w)))) or 1.0
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * scale)
    bf16_sess, bf16_got = _run(model, feeds, bf16=True)
    assert not any(r.flags for r in _records(bf16_sess))
    worst = max(
        float(np.max(np.abs(g - w)) / (np.sqrt(np.mean(np.square(w))) or 1.0))
        for g, w in zip(bf16_got, want)
    )
    assert worst > bf16_gap, f"bf16 compute is as close as float32 ({worst:.2e}): no switch?"


def test_matmul_const_weight_and_two_activations():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 96)).astype(np.float32)
    model = one_node_model(
        "MatMul", [("A", F32, (3, 256)), ("B", F32, (256, 96))], [("Y", F32, (3, 96))],
        initializers={"B": w},
    )  # fmt: skip
    feeds = {"A": random((3, 256), F32, seed=1)}
    _check(model, feeds, run_ort(model, feeds))
    batched = one_node_model(
        "MatMul", [("A", F32, (2, 5, 64)), ("B", F32, (2, 64, 7))], [("Y", F32, (2, 5, 7))]
    )  # fmt: skip
    feeds = {"A": random((2, 5, 64), F32, seed=2), "B": random((2, 64, 7), F32, seed=3)}
    _check(batched, feeds, run_ort(batched, feeds))


@pytest.mark.parametrize(("zp", "bias"), [(True, False), (False, True)])
def test_matmul_nbits(zp, bias):
    model, _ = nbits_model((2, 3), 256, 80, 32, zp=zp, bias=bias)  # accuracy_level 0: exact
    feeds = {"A": random((2, 3, 256), F32, seed=4)}
    _check(model, feeds, run_ort(model, feeds))


def test_layer_norm_and_simplified_layer_norms():
    rng = np.random.default_rng(5)
    gamma = (1 + 0.1 * rng.standard_normal(48)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(48)).astype(np.float32)
    shape = (2, 5, 48)
    x = {"X": random(shape, F32, seed=6)}
    ln = one_node_model(
        "LayerNormalization", [("X", F32, shape), ("g", F32, (48,)), ("b", F32, (48,))],
        [("Y", F32, shape)], initializers={"g": gamma, "b": beta}, axis=-1, epsilon=1e-5,
        opset=17,
    )  # fmt: skip
    _check(ln, x, run_ort(ln, x))
    sln = one_node_model(
        "SimplifiedLayerNormalization", [("X", F32, shape), ("g", F32, (48,))],
        [("Y", F32, shape)], initializers={"g": gamma}, axis=-1, epsilon=1e-6, opset=17,
    )  # fmt: skip
    _check(sln, x, run_ort(sln, x))
    feeds = {"X": x["X"], "S": random(shape, F32, seed=7)}
    skip = one_node_model(
        "SkipSimplifiedLayerNormalization", [("X", F32, shape), ("S", F32, shape), ("g", F32, (48,))],
        [("Y", F32, shape)], domain="com.microsoft", initializers={"g": gamma}, epsilon=1e-6,
    )  # fmt: skip
    _check(skip, feeds, run_ort(skip, feeds))


def test_softmax():
    shape = (3, 4, 37)
    model = one_node_model("Softmax", [("X", F32, shape)], [("Y", F32, shape)], axis=-1)
    feeds = {"X": random(shape, F32, seed=8, scale=4.0)}
    _check(model, feeds, run_ort(model, feeds), bf16_gap=1e-3)


@pytest.mark.parametrize("past", [0, 5])
def test_group_query_attention(past):
    s = 1 if past else 7
    model, feeds = _gqa_case(
        s=s, past=past, present=past + s, seqlens=[past + s - 1], total=past + s
    )
    _check(model, feeds, _ort(model, feeds))


def test_default_records_keep_the_reserved_half_word_zero():
    """bf16 launches encode exactly as before the flags field existed (header word 6 is 0)."""
    rec = ParamsRecord(kernel_id=7, operand_bytes=[8], output_bytes=[4], dims=[1], payload=b"x")
    head = rec.encode()[:HEADER_BYTES]
    assert int.from_bytes(head[14:16], "little") == 0
    flagged = ParamsRecord(7, [8], [4], [1], b"x", flags=FLAG_FP32_COMPUTE)
    assert ParamsRecord.decode(flagged.encode()).flags == FLAG_FP32_COMPUTE
    assert flagged.encode()[16:] == rec.encode()[16:]
