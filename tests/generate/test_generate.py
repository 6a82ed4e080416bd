"""The Qwen2 genai folders in ../shared/models: one NPU partition per phase, resident programs
sharing one weight image, a KV cache that stays on the device, the generate loop and its errors.

Correctness of the logits is checked against onnxruntime on the same model (teacher forcing);
onnxruntime-genai parity lives in test_genai_parity.py (optional extra).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from corpus_util import MODELS_DIR

from npudispatch import compile_model
from npudispatch.errors import ModelError
from npudispatch.generate import Generator, SearchOptions
from npudispatch.generate.config import GenaiConfig
from npudispatch.rewrites.support import npu_support

FOLDERS = ["qwen2_tiny_int4", "qwen2_tiny_fp32"]
PROMPT = [1, 17, 200, 33, 5, 99, 150, 7]
pytestmark = pytest.mark.skipif(
    not (MODELS_DIR / FOLDERS[0]).is_dir(),
    reason="needs the Qwen2 genai folders in ../shared/models beside the checkout",
)


@pytest.fixture(scope="module", params=FOLDERS)
def gen(request) -> Generator:
    return Generator(MODELS_DIR / request.param, max_length=48, prefill_length=12)


def ort_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Next-token logits of every position from onnxruntime (one prompt, empty past)."""
    cfg = GenaiConfig.from_dir(model_dir)
    sess = ort.InferenceSession(str(cfg.model_path), providers=["CPUExecutionProvider"])
    feeds = {
        cfg.input_ids: np.asarray([ids], np.int64),
        cfg.attention_mask: np.ones((1, len(ids)), np.int64),
    }
    for name in cfg.past_names():
        feeds[name] = np.zeros((1, cfg.kv_heads, 0, cfg.head_size), np.float32)
    return sess.run([cfg.logits], feeds)[0][0]


def test_each_phase_is_one_npu_partition(gen):
    for phase in gen.phases.values():
        compiled = phase.compiled
        assert compiled.npu_node_fraction >= 0.95, compiled.report.unsupported
        assert compiled.kernel_calls_per_run == 1
        assert compiled.labels == ["npu0"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_plain_decoder_step_keeps_every_supported_node_on_the_npu(folder):
    """The folder as onnxruntime-genai runs it (growing cache, 15 past tokens)."""
    dims = {"batch_size": 1, "sequence_length": 1, "total_sequence_length": 16}
    dims |= {"past_sequence_length": 15, "kv_cache_dim": 32}
    compiled = compile_model(MODELS_DIR / folder / "model.onnx", dims=dims)
    assert compiled.npu_node_fraction >= 0.95
    assert compiled.kernel_calls_per_run == 1
    cut = [
        n.name
        for p in compiled.partitions
        if p.kind == "cpu"
        for n in p.nodes
        if not npu_support(n)
    ]
    assert cut == [], f"supported nodes cut out of the NPU: {cut}"


def test_programs_share_one_weight_image_and_the_cache(gen):
    pre, dec = gen.prefill.programs[0], gen.decode.programs[0]
    assert pre.const_image == dec.const_image
    assert gen.device.const_bytes == len(pre.const_image)
    cache = set(gen.prefill.cache_names)
    assert len(cache) == 2 * gen.config.num_layers
    for b in pre.inputs:
        if b.name in cache:
            twin = next(x for x in dec.inputs if x.name == b.name)
            assert (b.buffer, b.offset, b.nbytes) == (twin.buffer, twin.offset, twin.nbytes)
    # present KV is gone from the outputs: it lives in the past buffer
    assert [b.name for b in dec.outputs] == [gen.config.logits]


def test_teacher_forced_logits_follow_onnxruntime(gen):
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(0, gen.config.vocab_size, 33)]  # odd, > prefill
    want = ort_logits(gen.config.model_dir, ids)
    got = gen.teacher_forced_logits(ids)
    agree = float(np.mean(want.argmax(-1) == got.argmax(-1)))
    # bf16 activations against float32 onnxruntime on random weights (std 0.25, near-tied
    # logits; both sides quantize the int4 folder's matmul inputs to int8, accuracy_level=4):
    # measured 91 % (int4) and 97 % (fp32); the 95 % target of the onnxruntime-genai comparison
    # is tracked in test_genai_parity.py (docs/numerics.md 1.4)
    assert agree >= 0.85, agree
    rms = float(np.sqrt(np.mean(want**2)))
    assert float(np.sqrt(np.mean((got - want) ** 2))) < 0.1 * rms


def test_prompt_padding_never_changes_results(gen):
    """An odd prompt in a padded prefill gives the logits of the same prompt in decode steps."""
    ids = PROMPT[:7]
    prefilled = gen.teacher_forced_logits(ids)
    rows = [gen._prefill(ids[:1])[0][0]]
    rows += [gen._decode(t, pos)[0] for pos, t in enumerate(ids[1:], start=1)]
    np.testing.assert_allclose(
        np.stack(rows), prefilled, rtol=0, atol=0.05 * np.abs(prefilled).max()
    )


def test_generate_greedy_bytes_per_step_do_not_grow(gen):
    result = gen.generate(PROMPT, max_new_tokens=12, show_progress=False)
    assert len(result.new_tokens) == 12 and result.stop_reason == "max_new_tokens"
    assert set(result.kernel_calls_per_step) == {1}
    assert len(set(result.bytes_per_step)) == 1  # the same bytes at step 1 and step 11
    kv_bytes = sum(
        b.nbytes for b in gen.decode.programs[0].inputs if b.name in gen.decode.cache_names
    )
    assert result.bytes_per_step[0] < kv_bytes / 4
    assert result.tokens_per_second > 0
    # greedy continues what teacher forcing predicts
    logits = gen.teacher_forced_logits(result.tokens[:-1])
    assert result.new_tokens == [int(t) for t in logits[len(PROMPT) - 1 :].argmax(-1)]


def test_sampling_is_seeded_and_stops_at_eos_and_max_length(gen):
    opts = SearchOptions(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=3)
    a = gen.generate(PROMPT, max_new_tokens=6, options=opts, show_progress=False)
    b = gen.generate(PROMPT, max_new_tokens=6, options=opts, show_progress=False)
    assert a.tokens == b.tokens
    greedy = gen.generate(PROMPT, max_new_tokens=3, show_progress=False)
    stopper = dataclasses.replace(gen.config, eos_token_ids=(greedy.new_tokens[1],))
    saved, gen.config = gen.config, stopper
    try:
        stopped = gen.generate(PROMPT, show_progress=False)
    finally:
        gen.config = saved
    assert stopped.stop_reason == "eos" and stopped.new_tokens == greedy.new_tokens[:2]
    full = gen.generate(PROMPT, show_progress=False)
    if full.stop_reason != "eos":
        assert full.stop_reason == "max_length" and len(full.tokens) == gen.max_length


def test_prompt_longer_than_the_context_is_refused(gen):
    with pytest.raises(ModelError, match="context holds 48"):
        gen.generate([1] * 48)


def test_missing_genai_config(tmp_path):
    with pytest.raises(ModelError, match=r"genai_config\.json is missing"):
        Generator(tmp_path)


def _config_copy(tmp_path: Path, edit) -> Path:
    src = MODELS_DIR / FOLDERS[0]
    raw = json.loads((src / "genai_config.json").read_text())
    raw["model"]["decoder"]["filename"] = str(src / "model.onnx")  # absolute: no copy of weights
    edit(raw)
    (tmp_path / "genai_config.json").write_text(json.dumps(raw))
    return tmp_path


def test_model_not_following_genai_naming(tmp_path):
    def rename(raw):
        raw["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.k"

    with pytest.raises(ModelError, match="do not follow the genai naming"):
        Generator(_config_copy(tmp_path, rename))


def test_kv_cache_shape_mismatch(tmp_path):
    def heads(raw):
        raw["model"]["decoder"]["num_key_value_heads"] = 3

    with pytest.raises(ModelError, match=r"KV cache input 'past_key_values\.0\.key' has shape"):
        Generator(_config_copy(tmp_path, heads))


def test_cli_generate_json():
    out = subprocess.run(
        [sys.executable, "-m", "npudispatch.cli", "generate", str(MODELS_DIR / FOLDERS[0]),
         "--prompt-ids", "1,17,200", "--max-new-tokens", "3", "--max-length", "24",
         "--prefill-length", "8", "--precision", "mixed", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    doc = json.loads(out.stdout)
    assert doc["tokens"][:3] == [1, 17, 200] and len(doc["new_tokens"]) == 3
    assert doc["kernel_calls_per_decode_step"] == [1, 1]
    assert doc["precision"] == "mixed"
    bad = subprocess.run(
        [sys.executable, "-m", "npudispatch.cli", "generate", str(MODELS_DIR / FOLDERS[0]),
         "--prompt-ids", "1,x"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr


def test_cli_run_of_a_decoder_with_random_inputs(capsys):
    """`npudispatch run model.onnx` with only its dims bound: the random attention_mask is all
    ones (a random one counts positions the model does not have and the attention refuses it),
    and the decoder step passes --check in one kernel call."""
    from npudispatch.cli import main

    dims = {"batch_size": 1, "sequence_length": 4, "past_sequence_length": 6,
            "total_sequence_length": 10, "kv_cache_dim": 32}  # fmt: skip
    args = [a for k, v in dims.items() for a in ("--dim", f"{k}={v}")]
    model = str(MODELS_DIR / FOLDERS[0] / "model.onnx")
    assert main(["run", model, *args, "--check", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["kernel_calls"] == 1 and doc["cpu_segments"] == 0
