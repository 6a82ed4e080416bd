"""Token parity with onnxruntime-genai itself (in the ``dev`` extra; ``genai`` for users).

References are computed here with onnxruntime-genai on the shared Qwen2 folders (greedy,
``max_length`` = prompt + new tokens); our side runs the resident prefill/decode programs.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from corpus_util import MODELS_DIR

from npudispatch.generate import Generator
from npudispatch.generate.config import GenaiConfig

og = pytest.importorskip(
    "onnxruntime_genai",
    reason="onnxruntime-genai is not installed: pip install -e '.[dev]' (or '.[genai]')",
)

FOLDERS = ["qwen2_tiny_int4", "qwen2_tiny_fp32"]
PROMPT = [1, 17, 200, 33, 5, 99, 150, 7]
pytestmark = pytest.mark.skipif(
    not (MODELS_DIR / FOLDERS[0]).is_dir(),
    reason="needs the Qwen2 genai folders in ../shared/models beside the checkout",
)


def genai_greedy(folder: str, max_length: int) -> list[int]:
    """onnxruntime-genai's greedy sequence (``folder``: a name in ../shared/models or a path)."""
    model = og.Model(str(MODELS_DIR / folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(PROMPT, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]


def genai_teacher_forced(folder: str, seq: list[int]) -> np.ndarray:
    """onnxruntime-genai's next-token logits at every position of ``seq`` (one prompt append)."""
    model = og.Model(str(MODELS_DIR / folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(seq) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(seq, np.int32))
    logits = np.asarray(gen.get_output("logits"))
    return logits.reshape(-1, logits.shape[-1])[-len(seq) :]


@pytest.fixture(scope="module", params=FOLDERS)
def folder(request) -> str:
    return request.param


def _fp32_tokens(folder: str | Path) -> list[int]:
    gen = Generator(MODELS_DIR / folder, bf16=False, max_length=len(PROMPT) + 32, prefill_length=8)
    return gen.generate(PROMPT, max_new_tokens=32, show_progress=False).tokens


@pytest.mark.parametrize("name", FOLDERS)
def test_fp32_greedy_reproduces_genai_tokens(name):
    """Float32 compute (--fp32): 32 greedy tokens identical to onnxruntime-genai's. The int4
    folder's MatMulNBits say ``accuracy_level=4``: both sides quantize the activations to int8
    per block (numerics.md §1.3)."""
    assert _fp32_tokens(name) == genai_greedy(name, len(PROMPT) + 32)


def test_fp32_greedy_follows_accuracy_level_0_too(tmp_path):
    """The int4 folder rewritten to ``accuracy_level=0`` (both sides dequantize the weights
    exactly instead of quantizing A): tokens still identical to onnxruntime-genai's, and not the
    ``accuracy_level=4`` tokens, so the attribute is really followed."""
    import onnx

    src = MODELS_DIR / "qwen2_tiny_int4"
    model = onnx.load(src / "model.onnx", load_external_data=False)
    levels = [a for n in model.graph.node for a in n.attribute if a.name == "accuracy_level"]
    assert levels and any(a.i == 4 for a in levels)  # the folder does use the int8 path
    for attr in levels:
        attr.i = 0
    for f in src.iterdir():
        if f.name != "model.onnx":
            shutil.copy(f, tmp_path / f.name)
    onnx.save(model, tmp_path / "model.onnx")
    exact = _fp32_tokens(tmp_path)
    assert exact == genai_greedy(str(tmp_path), len(PROMPT) + 32)
    assert exact != _fp32_tokens("qwen2_tiny_int4")


@functools.cache
def _teacher_forced(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(genai's, our bf16) next-token logits over 64 positions of genai's greedy text."""
    seq = genai_greedy(folder, 65)[:64]
    want = genai_teacher_forced(folder, seq)
    gen = Generator(MODELS_DIR / folder, max_length=72, prefill_length=16)
    return want, gen.teacher_forced_logits(seq)


def _agreement(folder: str) -> tuple[float, float]:
    want, got = _teacher_forced(folder)
    agree = float(np.mean(want.argmax(-1) == got.argmax(-1)))
    rel_rms = float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))
    return agree, rel_rms


def test_bf16_teacher_forced_agreement_measured(folder):
    """What holds today over 64 positions of genai's own greedy text: >= 85 % top-1 and logits
    within 10 % RMS (measured 92.2 % / 93.8 % for int4 / fp32; relative RMS 7.4 % / 5.3 %). The
    floor leaves room for near ties reshuffling under any change of rounding (89.1 to 92.2 % here
    for equally accurate variants, docs/numerics.md 1.4); the sharp check is the next test."""
    agree, rel_rms = _agreement(folder)
    assert agree >= 0.85, agree
    assert rel_rms < 0.1, rel_rms


def test_bf16_disagreements_are_near_ties(folder):
    """Every top-1 disagreement is a near tie in genai's own logits: genai's preference for its
    token over ours is below 20 % of the logit RMS (measured at most 0.50 of 3.5; the median
    top-1/top-2 margin is 0.92): bf16 noise, not a wrong computation (docs/numerics.md 1.4)."""
    want, got = _teacher_forced(folder)
    rows = np.nonzero(want.argmax(-1) != got.argmax(-1))[0]
    ours, theirs = got.argmax(-1)[rows], want.argmax(-1)[rows]
    preference = want[rows, theirs] - want[rows, ours]
    assert np.all(preference < 0.2 * np.sqrt(np.mean(want**2))), dict(zip(rows, preference))


@functools.cache
def _sequences(folder: str) -> list[list[int]]:
    """512 teacher-forced positions: genai's greedy text and 7 seeded random id sequences."""
    rng = np.random.default_rng(0)
    vocab = GenaiConfig.from_dir(MODELS_DIR / folder).vocab_size
    return [genai_greedy(folder, 65)[:64]] + [
        [int(t) for t in rng.integers(3, vocab, 64)] for _ in range(7)
    ]


@functools.cache
def _agreement_512(folder: str, precision: str) -> tuple[float, float]:
    """(top-1 agreement, mean logit relative RMS) with genai over :func:`_sequences`."""
    gen = Generator(MODELS_DIR / folder, max_length=72, prefill_length=16, precision=precision)
    agree, rms = [], []
    for seq in _sequences(folder):
        want, got = genai_teacher_forced(folder, seq), gen.teacher_forced_logits(seq)
        agree.append(np.mean(want.argmax(-1) == got.argmax(-1)))
        rms.append(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))
    return float(np.mean(agree)), float(np.mean(rms))


def test_mixed_compute_is_closer_to_genai_over_512_positions(folder):
    """Mixed compute (bf16 operands for matmuls and attention only, float32 elsewhere, bf16 KV
    cache) against the default bf16 compute, over 512 positions (docs/numerics.md 1.5). Measured:
    int4 95.9 % / 3.4 % RMS (bf16: 91.2 % / 7.3 %), fp32 94.7 % / 3.2 % (bf16: 93.0 % / 4.5 %)."""
    mixed, mixed_rms = _agreement_512(folder, "mixed")
    bf16, bf16_rms = _agreement_512(folder, "bf16")
    assert mixed >= 0.94 and mixed >= bf16 + 0.01, (mixed, bf16)
    assert mixed_rms < 0.8 * bf16_rms and mixed_rms < 0.04, (mixed_rms, bf16_rms)


def test_mixed_compute_keeps_the_cache_bf16():
    gen = Generator(MODELS_DIR / FOLDERS[0], max_length=24, prefill_length=8, precision="mixed")
    for phase in gen.phases.values():
        graph = phase.compiled.model.graph
        kinds = {v.name: v.dtype for v in graph.inputs if v.name in phase.cache_names}
        assert kinds and set(kinds.values()) == {ir.DataType.BFLOAT16}, kinds
    assert gen.precision == "mixed"


@pytest.mark.xfail(
    strict=False,
    reason="beyond what bf16 multiply-accumulate reaches on these random-weight models "
    "(docs/numerics.md 1.4-1.5): over these 64 positions bf16 compute agrees on 92.2 % (int4) "
    "and 93.8 % (fp32); even mixed compute, which rounds only MAC operands, on 93.8 % / 92.2 %",
)
def test_bf16_teacher_forced_top1_target(folder):
    agree, _ = _agreement(folder)
    assert agree >= 0.95, agree
