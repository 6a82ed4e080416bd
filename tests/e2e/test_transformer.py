"""A small transformer block (attention + MLP + RMSNorms) and the quantized llama2 MLP."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from e2e_models import assert_close, onnxruntime_run

from npudispatch import Session
from npudispatch.examples import build_example
from npudispatch.examples.exporter import bert_encoder_layer, llama_decoder_layer


def causal_mask(seq: int) -> np.ndarray:
    mask = np.triu(np.full((seq, seq), -1e4, np.float32), k=1)
    return mask[None, None]


def bind(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    """The model with symbolic dims replaced, for onnxruntime's reference run."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in [*model.graph.input, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in dims:
                d.dim_value = dims[d.dim_param]
    return model


def test_llama_decoder_layer_with_cpu_fallback():
    seq = 8
    model = llama_decoder_layer(hidden=64, heads=4, intermediate=96, seq=seq)
    dims = {"batch": 1, "sequence": seq}
    session = Session(model, dims=dims)
    rng = np.random.default_rng(0)
    feeds = {
        "hidden_states": rng.standard_normal((1, seq, 64)).astype(np.float32),
        "attention_mask": causal_mask(seq),
    }
    feeds = {a.name: feeds[a.name] for a in session.get_inputs()}
    (out,) = session.run(None, feeds)
    ref = onnxruntime_run(bind(model, dims), feeds)
    assert_close(out, next(iter(ref.values())), rtol=5e-2, atol=5e-2)
    compiled = session.compiled
    assert compiled.npu_node_fraction > 0.5
    kinds = [p.kind for p in compiled.partitions]
    assert kinds.count("npu") == session.last_run_stats.kernel_calls >= 1
    if "cpu" in kinds:
        assert compiled.report.unsupported  # every CPU node has a reason
        assert session.last_run_stats.cpu_segments == kinds.count("cpu")


def test_bert_layer_runs():
    model = bert_encoder_layer(hidden=64, heads=4, intermediate=128, seq=8)
    dims = {"batch": 1, "sequence": 8}
    session = Session(model, dims=dims)
    rng = np.random.default_rng(1)
    feeds = {
        "hidden_states": rng.standard_normal((1, 8, 64)).astype(np.float32),
        "attention_mask": np.zeros((1, 1, 1, 8), np.float32),
    }
    (out,) = session.run(None, feeds)
    ref = onnxruntime_run(bind(model, dims), feeds)
    assert_close(out, next(iter(ref.values())), rtol=5e-2, atol=5e-2)
    assert session.last_run_stats.kernel_calls >= 1


def test_llama2_mlp_small_matmulnbits():
    model = build_example("llama2-mlp-small")
    session = Session(model)
    x = np.random.default_rng(2).standard_normal((1, 2, 256)).astype(np.float32)
    (y,) = session.run(None, {"X": x})
    ref = onnxruntime_run(model, {"X": x})
    assert_close(y, ref["Y"], rtol=5e-2, atol=5e-2)
    assert session.last_run_stats.kernel_calls == len(session.programs) == 1
    assert [p.kind for p in session.compiled.partitions] == ["npu"]


@pytest.mark.slow
def test_llama2_mlp_full_size_scratch_reaches_lower_bound():
    """docs/architecture.md §6: DD needs 401,408 B of scratch on the llama2 MLP, the bound is 393,216 B."""
    from npudispatch import compile_model

    compiled = compile_model(build_example("llama2-mlp"))  # bf16 + padding: the defaults
    assert [p.kind for p in compiled.partitions] == ["npu"]
    (program,) = compiled.programs.values()
    plan = program.plan
    assert plan.scratch_intermediate_bytes == plan.scratch_lower_bound_bytes
    assert plan.scratch_lower_bound_bytes < plan.dd_no_reuse_bytes
    assert {pl.dtype for n, pl in plan.placements.items() if pl.buffer.name == "SCRATCH"} == {
        "bfloat16"
    }
    (fp32,) = compile_model(build_example("llama2-mlp"), bf16=False).programs.values()
    assert fp32.plan.scratch_intermediate_bytes == fp32.plan.scratch_lower_bound_bytes
    assert plan.scratch_intermediate_bytes * 2 == fp32.plan.scratch_intermediate_bytes
