"""A hand-built one-layer decoder in the onnxruntime-genai builder's layout (embedding Gather,
int64 mask arithmetic, RMSNorm, packed-QKV GroupQueryAttention with rotary, skip-RMSNorm with
omitted outputs, lm head): one NPU partition, and the resident generator against onnxruntime.
Runs without ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from npudispatch import compile_model
from npudispatch.generate import Generator

V, D, N, G, H = 50, 64, 4, 2, 16
F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def tiny_decoder(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    inv = 1.0 / (10000 ** (np.arange(H // 2) / (H // 2)))
    ang = np.arange(64)[:, None] * inv[None]
    inits = {
        "embed": w(V, D, scale=1.0),
        "g1": (1 + w(D, scale=0.1)),
        "g2": (1 + w(D, scale=0.1)),
        "g3": (1 + w(D, scale=0.1)),
        "wqkv": w(D, (N + 2 * G) * H),
        "wo": w(N * H, D),
        "wlm": w(D, V),
        "cos": np.cos(ang).astype(np.float32),
        "sin": np.sin(ang).astype(np.float32),
        "axes1": np.asarray([1], np.int64),
        "one": np.asarray([1], np.int64),
        "one_scalar": np.asarray(1, np.int64),
    }
    ms = "com.microsoft"
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="embed"),
        helper.make_node("ReduceSum", ["attention_mask", "axes1"], ["msum"], keepdims=0),
        helper.make_node("Sub", ["msum", "one"], ["msub"]),
        helper.make_node("Cast", ["msub"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mshape"]),
        helper.make_node("Gather", ["mshape", "one_scalar"], ["mtotal"], axis=0),
        helper.make_node("Cast", ["mtotal"], ["total_len"], to=TensorProto.INT32),
        helper.make_node("SimplifiedLayerNormalization", ["x", "g1"], ["h"], epsilon=1e-6),
        helper.make_node("MatMul", ["h", "wqkv"], ["qkv"]),
        helper.make_node(
            "GroupQueryAttention",
            [
                "qkv",
                "",
                "",
                "past_key_values.0.key",
                "past_key_values.0.value",
                "seqlens_k",
                "total_len",
                "cos",
                "sin",
            ],
            ["attn", "present.0.key", "present.0.value"],
            domain=ms,
            num_heads=N,
            kv_num_heads=G,
            do_rotary=1,
            scale=1 / np.sqrt(H),
        ),
        helper.make_node("MatMul", ["attn", "wo"], ["o"]),
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            ["o", "x", "g2"],
            ["y", "", "", "resid"],
            domain=ms,
            epsilon=1e-6,
        ),
        helper.make_node("SimplifiedLayerNormalization", ["y", "g3"], ["y2"], epsilon=1e-6),
        helper.make_node("MatMul", ["y2", "wlm"], ["logits"]),
    ]
    kv = ["batch_size", G, "past_sequence_length", H]
    present = ["batch_size", G, "total_sequence_length", H]
    graph = helper.make_graph(
        nodes,
        "tiny_decoder",
        [
            helper.make_tensor_value_info("input_ids", I64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(
                "attention_mask", I64, ["batch_size", "total_sequence_length"]
            ),
            helper.make_tensor_value_info("past_key_values.0.key", F32, kv),
            helper.make_tensor_value_info("past_key_values.0.value", F32, kv),
        ],
        [
            helper.make_tensor_value_info("logits", F32, ["batch_size", "sequence_length", V]),
            helper.make_tensor_value_info("present.0.key", F32, present),
            helper.make_tensor_value_info("present.0.value", F32, present),
        ],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(ms, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def genai_folder(root: Path, max_length: int = 24) -> Path:
    onnx.save(tiny_decoder(), root / "model.onnx")
    config = {
        "model": {
            "bos_token_id": 1,
            "context_length": max_length,
            "decoder": {
                "filename": "model.onnx",
                "head_size": H,
                "hidden_size": D,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": N,
                "num_hidden_layers": 1,
                "num_key_value_heads": G,
            },
            "eos_token_id": [2],
            "pad_token_id": 2,
            "type": "qwen2",
            "vocab_size": V,
        },
        "search": {"max_length": max_length, "do_sample": False},
    }
    (root / "genai_config.json").write_text(json.dumps(config))
    return root


def ort_logits(path: Path, ids: list[int]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.asarray([ids], np.int64)}
    feeds["attention_mask"] = np.ones((1, len(ids)), np.int64)
    for kv in ("key", "value"):
        feeds[f"past_key_values.0.{kv}"] = np.zeros((1, G, 0, H), np.float32)
    return sess.run(["logits"], feeds)[0][0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return genai_folder(tmp_path_factory.mktemp("tiny_genai"))


def test_decoder_step_is_one_npu_partition(folder):
    dims = {"batch_size": 1, "sequence_length": 1, "total_sequence_length": 9}
    compiled = compile_model(folder / "model.onnx", dims=dims | {"past_sequence_length": 8})
    assert compiled.labels == ["npu0"], compiled.report.unsupported
    assert compiled.npu_node_fraction == 1.0


@pytest.mark.parametrize("bf16", [True, False])
def test_generator_matches_onnxruntime_teacher_forced(folder, bf16):
    gen = Generator(folder, max_length=16, prefill_length=5, bf16=bf16)
    ids = [1, 7, 33, 4, 12, 45, 9, 20, 3, 17, 28]  # 11 tokens: 5 by prefill, 6 by decode steps
    want = ort_logits(folder / "model.onnx", ids)
    got = gen.teacher_forced_logits(ids)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * scale)
    # an odd prompt shorter than the prefill gives the same rows as the full run
    short = gen.teacher_forced_logits(ids[:3])
    np.testing.assert_allclose(short, got[:3], rtol=0, atol=0.02 * scale)


def test_generate_stops_and_keeps_bytes_per_step_constant(folder):
    gen = Generator(folder, max_length=16, prefill_length=4)
    result = gen.generate([1, 7, 33], show_progress=False)
    assert result.stop_reason in ("eos", "max_length")
    if result.stop_reason == "max_length":
        assert len(result.tokens) == 16
    assert len(set(result.bytes_per_step)) <= 1
    assert set(result.kernel_calls_per_step) <= {1}


def test_resident_programs_on_fake_xrt_sync_only_what_a_step_needs(folder, tmp_path):
    """Both programs in one (fake) XRT hardware context: the fake device sees only synced bytes,
    so a cache that were not resident, or a missing input sync, would change the logits."""
    from npudispatch.operators import registry
    from npudispatch.testing import emulator_executor, install_fake_pyxrt, write_fake_xclbin

    ids = [1, 7, 33, 4, 12, 45, 9]
    reference = Generator(folder, max_length=16, prefill_length=4).teacher_forced_logits(ids)
    with install_fake_pyxrt(emulator_executor(registry.kernels())):
        xclbin = write_fake_xclbin(tmp_path / "fake.xclbin")
        gen = Generator(folder, max_length=16, prefill_length=4, backend="xrt", xclbin=xclbin)
        assert gen.device.name == "xrt"
        got = gen.teacher_forced_logits(ids)
        result = gen.generate(ids[:3], max_new_tokens=4, show_progress=False)
    np.testing.assert_array_equal(got, reference)
    assert len(set(result.bytes_per_step)) == 1 and set(result.kernel_calls_per_step) == {1}


def test_a_refused_kernel_operand_names_the_node_in_resident_programs(folder, monkeypatch):
    """A kernel refusing its operand values (overlay_abi.KernelOperandError) inside the resident
    prefill/decode programs is a ModelError naming the node, as through Session."""
    from npudispatch.errors import ModelError
    from npudispatch.operators import attention_math
    from npudispatch.overlay_abi import KernelOperandError

    gen = Generator(folder, max_length=16, prefill_length=4)

    def refuse(*args, **kwargs):
        raise KernelOperandError("seqlens_k [99] do not fit (injected)")

    monkeypatch.setattr(attention_math, "gqa", refuse)
    with pytest.raises(ModelError, match=r"node '.*' \(GroupQueryAttention\) refused its inputs"):
        gen.teacher_forced_logits([1, 7, 33])
