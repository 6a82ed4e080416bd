"""Exporter-style builders: valid ONNX, runnable, torch.onnx-shaped (symbolic dims, shape chains)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rw_helpers import run_ort

from npudispatch.examples.exporter import bert_encoder_layer, llama_decoder_layer


@pytest.mark.parametrize("build", [llama_decoder_layer, bert_encoder_layer])
def test_builders_are_valid_exporter_shaped_models(build):
    proto = build()
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 10
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "sequence"]
    op_types = [n.op_type for n in proto.graph.node]
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Softmax"} <= set(op_types)
    assert all(n.name.startswith("/") for n in proto.graph.node)


@pytest.mark.parametrize("batch,seq", [(1, 8), (2, 5)])
def test_symbolic_llama_runs_for_any_batch_and_sequence(batch, seq):
    rng = np.random.default_rng(0)
    feeds = {
        "hidden_states": rng.standard_normal((batch, seq, 64)).astype(np.float32),
        "attention_mask": np.zeros((batch, 1, seq, seq), np.float32),
    }
    out = run_ort(ir.from_proto(llama_decoder_layer()), feeds)[0]
    assert out.shape == (batch, seq, 64) and np.isfinite(out).all()


def test_opset_17_uses_reduce_mean_axes_attribute():
    proto = llama_decoder_layer(opset=17)
    rm = [n for n in proto.graph.node if n.op_type == "ReduceMean"]
    assert rm and all(len(n.input) == 1 and n.attribute[0].name == "axes" for n in rm)
    with pytest.raises(ValueError, match="heads"):
        llama_decoder_layer(hidden=64, heads=5)
