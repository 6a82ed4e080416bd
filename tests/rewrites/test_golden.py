"""Golden graphs: snapshots of rewritten exporter layers and DD graphs G1-G20, numerics, partitions.

Snapshots live in tests/rewrites/snapshots/; regenerate with ``NPUD_UPDATE_SNAPSHOTS=1``.
Numerical tolerance (original vs rewritten, both on onnxruntime float32): 1e-4 absolute — the fused
RMSNorm / SkipRMSNorm / Gelu kernels reorder float32 operations.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rw_helpers import check_snapshot, ops, run_ort, snapshot_text

from npudispatch import graph
from npudispatch.examples.exporter import bert_encoder_layer, llama_decoder_layer
from npudispatch.examples.golden import GOLDEN
from npudispatch.opset import DOMAIN
from npudispatch.rewrites import default_pipeline
from npudispatch.rewrites.padding import host_shape
from npudispatch.rewrites.precision import BOUNDARY_KEY
from npudispatch.rewrites.support import npu_support

DIMS = {"batch": 1, "sequence": 8}
BUILDERS = {"llama_decoder_layer": llama_decoder_layer, "bert_encoder_layer": bert_encoder_layer}


def rewritten(proto: onnx.ModelProto, dims=DIMS, **options) -> ir.Model:
    m = graph.load(proto, dims=dims)
    default_pipeline(**options)(m)
    return m


def feeds(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask_shape = (1, 1, 8, 8) if name.startswith("llama") else (1, 1, 1, 8)
    return {
        "hidden_states": rng.standard_normal((1, 8, 64)).astype(np.float32),
        "attention_mask": np.where(rng.random(mask_shape) < 0.25, -1e4, 0.0).astype(np.float32),
    }


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_exporter_layer_snapshot_and_numerics(name):
    """The fusions alone (no padding, float32 storage): the rewritten model is still a float32
    ONNX model onnxruntime runs, equal to the original within float32 reordering error."""
    proto = BUILDERS[name]()
    m = rewritten(proto, pad=False, bf16=False)
    check_snapshot(name, snapshot_text(m))
    f = feeds(name)
    ref = run_ort(ir.from_proto(proto), f)[0]
    np.testing.assert_allclose(run_ort(m, f)[0], ref, atol=1e-4)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_exporter_layer_default_pipeline_snapshot(name):
    """The default pipeline adds terminal padding and bf16 storage. Its numerics are checked
    through Session (tests/e2e): padded and bf16 graphs are not runnable as plain ONNX."""
    m = rewritten(BUILDERS[name]())
    check_snapshot(f"{name}_pad_bf16", snapshot_text(m))
    casts = [n for n in m.graph if n.op_type == "Cast"]
    assert casts and all(n.metadata_props.get(BOUNDARY_KEY) == "boundary" for n in casts)
    # The user-facing signature is unchanged: float32 inputs/outputs at their declared shapes.
    assert all(v.dtype == ir.DataType.FLOAT for v in [*m.graph.inputs, *m.graph.outputs])
    assert [host_shape(v) for v in m.graph.outputs] == [(1, 8, 64)]


def test_llama_fusions_present():
    m = rewritten(llama_decoder_layer())
    o = ops(m)
    assert o.count("SimplifiedLayerNormalization") == 1
    assert o.count("com.microsoft.SkipSimplifiedLayerNormalization") == 1
    assert o.count(f"{DOMAIN}.Silu") == 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Sigmoid", "Shape", "Gather", "Concat"} & set(o)


def test_bert_fusions_present():
    o = ops(rewritten(bert_encoder_layer()))
    assert o.count(f"{DOMAIN}.MatMulBias") == 6
    assert o.count(f"{DOMAIN}.Gelu") == 1
    assert "Erf" not in o


def _npu_ops(m: ir.Model, support) -> set[str]:
    return {n.op_type for p in graph.partition(m, support) if p.kind == "npu" for n in p.nodes}


def test_llama_mlp_and_norms_land_on_npu():
    """With the real operator library's support query, the MLP and both norms are NPU work."""
    m = rewritten(llama_decoder_layer())
    expected = {"Silu", "MatMul", "Mul", "SimplifiedLayerNormalization"}
    expected.add("SkipSimplifiedLayerNormalization")
    assert expected <= _npu_ops(m, npu_support)


def test_llama_mlp_lands_on_npu_with_default_support():
    m = rewritten(llama_decoder_layer())
    assert "Silu" in _npu_ops(m, graph.default_support)


@pytest.mark.parametrize("gname", sorted(GOLDEN))
def test_dd_golden_graphs_through_the_pipeline(gname):
    m = graph.load(GOLDEN[gname]())
    before = snapshot_text(m)
    default_pipeline()(m)
    text = snapshot_text(m)
    check_snapshot(f"dd_{gname.lower()}", text)
    if "Identity(" in before:
        # Like DD's remove_identity_ops: the Identity chain goes, the fused ops and outputs stay.
        kept = [line for line in before.splitlines() if "Identity(" not in line]
        assert [line.split("(")[0] for line in text.splitlines()] == [
            line.split("(")[0] for line in kept
        ]
        assert "Identity(" not in text
    else:
        # DD graphs are already fused vendor ops: only view marks may differ.
        assert text.replace("  [view]", "") == before
