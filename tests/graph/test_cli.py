"""``npudispatch inspect`` and ``npudispatch example``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphmodels import const, make_model, vi
from onnx import helper

from npudispatch.cli import main


def exporter_style_attention_head() -> onnx.ModelProto:
    """What torch.onnx writes for ``(x @ W + b).view(b, s, 4, 16).transpose(1, 2).softmax(-1)``:
    unnamed nodes, Constant nodes, a Shape/Gather/Unsqueeze/Concat chain feeding Reshape and
    symbolic batch/sequence dims."""
    rng = np.random.default_rng(0)

    def constant(out: str, value) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [out], value=const(out, np.asarray(value, np.int64))
        )

    nodes = [
        helper.make_node("Shape", ["x"], ["/Shape_output_0"]),
        constant("/Constant_output_0", 0),
        helper.make_node(
            "Gather", ["/Shape_output_0", "/Constant_output_0"], ["/Gather_output_0"], axis=0
        ),
        constant("/Constant_1_output_0", 1),
        helper.make_node(
            "Gather", ["/Shape_output_0", "/Constant_1_output_0"], ["/Gather_1_output_0"], axis=0
        ),
        constant("/Constant_2_output_0", [0]),
        helper.make_node(
            "Unsqueeze", ["/Gather_output_0", "/Constant_2_output_0"], ["/Unsqueeze_output_0"]
        ),
        helper.make_node(
            "Unsqueeze", ["/Gather_1_output_0", "/Constant_2_output_0"], ["/Unsqueeze_1_output_0"]
        ),
        constant("/Constant_3_output_0", [4, 16]),
        helper.make_node(
            "Concat",
            ["/Unsqueeze_output_0", "/Unsqueeze_1_output_0", "/Constant_3_output_0"],
            ["/Concat_output_0"],
            axis=0,
        ),
        helper.make_node("MatMul", ["x", "proj.weight"], ["/proj/MatMul_output_0"]),
        helper.make_node("Add", ["/proj/MatMul_output_0", "proj.bias"], ["/proj/Add_output_0"]),
        helper.make_node(
            "Reshape", ["/proj/Add_output_0", "/Concat_output_0"], ["/Reshape_output_0"]
        ),
        helper.make_node(
            "Transpose", ["/Reshape_output_0"], ["/Transpose_output_0"], perm=[0, 2, 1, 3]
        ),
        helper.make_node("Softmax", ["/Transpose_output_0"], ["probs"], axis=-1),
    ]
    return make_model(
        nodes,
        [vi("x", ["batch", "sequence", 64])],
        [vi("probs", ["batch", 4, "sequence", 16])],
        [
            const("proj.weight", rng.standard_normal((64, 64)).astype(np.float32)),
            const("proj.bias", rng.standard_normal(64).astype(np.float32)),
        ],
        opset=17,
    )


@pytest.fixture
def exported(tmp_path):
    path = tmp_path / "head.onnx"
    onnx.save(exporter_style_attention_head(), path)
    return path


def test_inspect_json_has_stable_keys(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    assert main(["example", "llama2-mlp-small", "-o", str(path)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["nodes", "op_types", "partitions", "unsupported"]
    assert doc["op_types"] == {"Mul": 2, "Sigmoid": 1, "com.microsoft::MatMulNBits": 3}
    assert doc["nodes"][0] == "/mlp/gate_proj/MatMulNBits"
    assert [list(p) for p in doc["partitions"]] == [
        ["kind", "nodes", "inputs", "outputs", "quantization"]
    ]
    assert list(doc["partitions"][0]["quantization"]) == [
        "activation_dtypes", "weight_dtypes", "conversions"
    ]  # fmt: skip
    assert doc["partitions"][0]["inputs"] == ["X"] and doc["unsupported"] == []


def test_inspect_exporter_style_model_needs_dims(exported, capsys):
    assert main(["inspect", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and "--dims batch=" in err


def test_inspect_exporter_style_model_report(exported, capsys):
    assert main(["inspect", str(exported), "--dims", "batch=2,sequence=8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["nodes"]) == 11 and len(set(doc["nodes"])) == 11  # 4 Constants lifted
    assert "Shape_/Shape_output_0" in doc["nodes"]
    kinds = [(p["kind"], len(p["nodes"])) for p in doc["partitions"]]
    assert kinds == [("cpu", 6), ("npu", 5)]
    npu = doc["partitions"][1]
    assert npu["inputs"] == ["x", "/Concat_output_0"] and npu["outputs"] == ["probs"]
    reasons = {u["node"]: u["reason"] for u in doc["unsupported"]}
    assert reasons["Shape_/Shape_output_0"].startswith("op type Shape")  # operator library reason
    assert "INT64" in reasons["Unsqueeze_/Unsqueeze_output_0"]


def test_inspect_text_is_aligned(exported, capsys):
    assert main(["inspect", str(exported), "--dims", "batch=1", "--dims", "sequence=4"]) == 0
    out = capsys.readouterr().out
    for section in ("op types:", "order:", "partitions:", "unsupported (6 nodes):"):
        assert section in out
    order = out.split("order:\n")[1].split("\n\n")[0].splitlines()
    header = order[0]
    column = header.index("node")
    assert all(len(line) > column and line[column - 2 : column] == "  " for line in order[1:])
    assert "FLOAT[1, 4, 4, 16]" in out


def test_example_list_and_save(tmp_path, capsys):
    assert main(["example", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "G11" in listing and "llama2-mlp-small" in listing
    path = tmp_path / "out" / "g8.onnx"
    assert main(["example", "G8", "-o", str(path), "--external-data"]) == 0
    assert (path.parent / "g8.onnx.data").stat().st_size > 45_000_000
    assert path.stat().st_size < 100_000
    assert main(["inspect", str(path), "--json"]) == 0
    assert main(["example", "nope", "-o", str(path)]) == 2
    assert main(["example", "G1"]) == 2
