"""Example builders: golden graphs match DD's spec; the llama2 MLP runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from npudispatch import graph
from npudispatch.examples import EXAMPLES, build_example, register
from npudispatch.examples.llama import dequantize, random_quantized_weight


def _types(model: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    infos = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    result = {
        i.name: (i.type.tensor_type.elem_type, [d.dim_value for d in i.type.tensor_type.shape.dim])
        for i in infos
    }
    result.update({t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer})
    return result


def test_registry_has_all_golden_graphs_and_the_mlp():
    for name in [f"G{i}" for i in range(1, 21) if i != 18]:
        assert name in EXAMPLES
    assert sum(name.startswith("G18-") for name in EXAMPLES) == 5
    assert {"llama2-mlp", "llama2-mlp-small"} <= set(EXAMPLES)
    with pytest.raises(KeyError, match="unknown example"):
        build_example("G99")
    with pytest.raises(KeyError, match="already registered"):
        register("G1", EXAMPLES["G1"])


def test_g11_matches_dd_spec(golden_protos):
    model = golden_protos["G11"]
    bf16, u8, f32 = TensorProto.BFLOAT16, TensorProto.UINT8, TensorProto.FLOAT
    types = _types(model)
    assert types["X"] == (bf16, [1, 1, 4096]) and types["C"] == (bf16, [1, 1, 4096])
    for name in ("Y0", "Y1", "Z0", "A"):
        assert types[name] == (bf16, [1, 1, 11008])
    assert types["mul3_weights"] == (u8, [11008, 4096])
    assert types["mul3_bias"] == (f32, [1, 4096])
    assert types["mul1_scales"] == (f32, [1, 352256]) and types["mul1_zeros"] == (u8, [1, 352256])
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 19), ("amd.com", 1)}
    nodes = {n.name: n for n in model.graph.node}
    assert [nodes[k].op_type for k in ("gate_proj", "up_proj", "silu", "elwmul", "down_proj")] == [
        "MladfMatMul",
        "MladfMatMul",
        "SILU",
        "ELWMUL",
        "MladfMatMul",
    ]
    assert all(n.domain == "amd.com" for n in nodes.values())
    assert onnx.helper.get_node_attr_value(nodes["down_proj"], "group_size") == 128
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "mul1_weights"))
    assert w.max() < 32 and w.std() > 0


def test_other_golden_specs(golden_protos):
    g16 = _types(golden_protos["G16"])
    assert g16["gate_wts"] == (TensorProto.UINT8, [8192, 24, 64])
    assert g16["up_scale"] == (TensorProto.FLOAT, [196608]) and g16["up_zp"][1] == [98304]
    g5 = golden_protos["G5"]
    qdq = numpy_helper.to_array(g5.graph.initializer[0])
    assert qdq.dtype == np.int32 and list(qdq[:5]) == [14979, 4451, 14674, 1000, 0]
    g1 = golden_protos["G1"]
    params = numpy_helper.to_array(next(t for t in g1.graph.initializer if t.name == "qdq_params"))
    assert [int(params[i]) for i in (2, 4, 5, 7)] == [10, 32, 64, 13] and params.sum() == 119
    g14 = golden_protos["G14"]
    w2 = numpy_helper.to_array(next(t for t in g14.graph.initializer if t.name == "W2"))
    np.testing.assert_array_equal(w2, np.eye(768, dtype=np.uint8))
    assert _types(golden_protos["G18-mharope"])["trig"] == (TensorProto.BFLOAT16, [2, 4096, 128])
    assert [n.domain for n in golden_protos["G12"].graph.node] == ["", ""]


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def matmul(node: onnx.NodeProto, a: np.ndarray) -> np.ndarray:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        from npudispatch.examples.llama import QuantizedWeight

        zp = inits[node.input[3]] if len(node.input) > 3 else None
        w = QuantizedWeight(
            attrs["K"],
            attrs["N"],
            attrs["block_size"],
            inits[node.input[1]],
            inits[node.input[2]],
            zp,
        )
        return a @ dequantize(w)

    nodes = {n.name.split("/")[2]: n for n in model.graph.node if "proj" in n.name}
    gate, up = matmul(nodes["gate_proj"], x), matmul(nodes["up_proj"], x)
    act = gate / (1 + np.exp(-gate)) * up
    return matmul(nodes["down_proj"], act)


@pytest.mark.parametrize(
    "kw",
    [{}, {"zero_points": False}, {"hidden": 80, "intermediate": 96, "block_size": 16, "m": 3}],
)
def test_llama2_mlp_small_runs_in_onnxruntime(kw):
    model = build_example("llama2-mlp-small", **kw)
    assert model.ir_version == 10
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 21), ("com.microsoft", 1)}
    onnx.checker.check_model(model)
    hidden = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    m = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = np.random.default_rng(7).standard_normal((1, m, hidden)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"X": x})
    expected = _reference(model, x)
    assert y.shape == (1, m, hidden)
    np.testing.assert_allclose(y, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # The standard-form MLP is one NPU partition under the default support set.
    loaded = graph.load(model)
    parts = graph.partition(loaded, graph.default_support)
    assert [p.kind for p in parts] == ["npu"] and len(parts[0].nodes) == 6
    sub = ir.to_proto(graph.extract(loaded, parts[0]))
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"X": x})[0], y)


def test_matmulnbits_layout():
    rng = np.random.default_rng(0)
    w = random_quantized_weight(rng, k=100, n=6, block_size=32)
    assert w.b.shape == (6, 4, 16) and w.b.dtype == np.uint8
    assert w.scales.shape == (24,) and w.zero_points.shape == (12,)
    full = dequantize(w)
    assert full.shape == (100, 6)
    # Low nibble first: code 0 of row 0 block 0 is the low nibble of the first byte.
    zp0 = int(w.zero_points[0] & 0x0F)
    assert full[0, 0] == pytest.approx((int(w.b[0, 0, 0] & 0x0F) - zp0) * w.scales[0])
    assert full[1, 0] == pytest.approx((int(w.b[0, 0, 0] >> 4) - zp0) * w.scales[0])
