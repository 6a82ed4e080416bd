"""Models as other tools export them: run-time shape arithmetic, stale symbolic value_info, dims
sharing a name, external data from any working directory, custom-domain ops without value_info.

Each fixture reproduces one habit of exporters (torch.onnx, paddle2onnx, the onnxruntime-genai
builder) in a few nodes; every result is compared with onnxruntime running the original file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import npudispatch
from npudispatch import graph
from npudispatch.cli import main as cli_main
from npudispatch.errors import ModelError
from npudispatch.graph import shapes

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def detector_like() -> onnx.ModelProto:
    """x[N,3,?,?] (two dims named '?'): a Reshape target computed by Shape -> Gather -> Concat,
    a Range / Expand / ConstantOfShape sized by input dims, and value_info holding the exporter's
    symbolic expressions."""
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i01"], ["nc"], name="g01", axis=0),
        helper.make_node("Gather", ["s", "i2"], ["h"], name="g2", axis=0),
        helper.make_node("Gather", ["s", "i3"], ["w"], name="g3", axis=0),
        helper.make_node("Mul", ["h", "w"], ["hw"], name="hw"),
        helper.make_node("Concat", ["nc", "hw"], ["target"], name="target", axis=0),
        # Range(0, W) as floats, broadcast over the image by an Expand to Shape(y).
        helper.make_node("Squeeze", ["w"], ["w0"], name="w_scalar"),
        helper.make_node("Range", ["zero", "w0", "one"], ["ramp_i"], name="range"),
        helper.make_node("Cast", ["ramp_i"], ["ramp"], name="cast", to=F32),
        helper.make_node("Expand", ["ramp", "s"], ["ramp_full"], name="expand"),
        helper.make_node("ConstantOfShape", ["s"], ["ones"], name="ones",
                         value=helper.make_tensor("v", F32, [1], [0.05])),
        helper.make_node("Mul", ["ramp_full", "ones"], ["ramp_half"], name="scale"),
        helper.make_node("Add", ["y", "ramp_half"], ["z"], name="add"),
        helper.make_node("Reshape", ["z", "target"], ["flat"], name="reshape"),
        helper.make_node("Softmax", ["flat"], ["out"], name="softmax", axis=-1),
    ]  # fmt: skip
    inits = [
        _i64("i01", [0, 1]),
        _i64("i2", [2]),
        _i64("i3", [3]),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
    ]
    g = helper.make_graph(
        nodes,
        "detector_like",
        [helper.make_tensor_value_info("x", F32, ["N", 3, "?", "?"])],
        [helper.make_tensor_value_info("out", F32, ["N", 3, "?*?"])],
        inits,
        value_info=[
            helper.make_tensor_value_info("y", F32, ["N", 3, "floor(floor(?/2 - 1/2)/2) + 1", "?"]),
            helper.make_tensor_value_info("z", F32, ["N", 3, "?", "Add_dim_2"]),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _ort(path_or_proto, feeds):
    """onnxruntime on the original model (a path is read with its external data inlined:
    onnxruntime itself refuses a Reshape target stored externally)."""
    proto = onnx.load(path_or_proto) if isinstance(path_or_proto, str) else path_or_proto
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_runtime_shape_arithmetic_folds_once_inputs_are_bound():
    model = graph.load(detector_like(), input_shapes={"x": (1, 3, 20, 36)})
    assert all(shapes.is_static(v) for n in model.graph for v in n.outputs)
    assert model.graph.outputs[0].shape == [1, 3, 720]
    assert shapes.data_dependent_values(model.graph) == []
    # Compilation folds the shape arithmetic itself away.
    compiled = npudispatch.compile_model(detector_like(), input_shapes={"x": (1, 3, 20, 36)})
    ops = {n.op_type for n in compiled.model.graph}
    assert not ops & {"Shape", "Gather", "Concat", "Range", "Squeeze"}, ops


def test_two_dims_named_alike_need_whole_shapes_and_all_unbound_dims_are_listed():
    with pytest.raises(ModelError) as err:
        graph.load(detector_like())
    text = str(err.value)
    assert "3 input dim(s)" in text and "'N'" in text and "'?'" in text
    assert "--shape x=Nx3xNxN" in text


def test_detector_like_session_matches_onnxruntime():
    x = np.random.default_rng(0).standard_normal((1, 3, 20, 36)).astype(np.float32)
    sess = npudispatch.Session(detector_like(), input_shapes={"x": x.shape})
    (got,) = sess.run(None, {"x": x})
    (want,) = _ort(detector_like(), {"x": x})
    # Softmax of logits up to ~5 computed from bf16 inputs: a few percent relative at most.
    np.testing.assert_allclose(got, want, rtol=0.04, atol=1e-5)
    assert sess.last_run_stats.kernel_calls == 1


def test_data_dependent_shape_stays_on_cpu_and_names_its_producer():
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("Cast", ["nz"], ["nzf"], name="cast", to=F32),
        helper.make_node("Neg", ["nzf"], ["out"], name="neg"),
    ]
    g = helper.make_graph(
        nodes, "dd", [helper.make_tensor_value_info("x", F32, [4, 5])],
        [helper.make_tensor_value_info("out", F32, None)],
    )  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    model = graph.load(proto)
    open_values = {v.name: n.name for v, n in shapes.data_dependent_values(model.graph)}
    assert open_values == {"nz": "nonzero", "nzf": "nonzero", "out": "nonzero"}
    compiled = npudispatch.compile_model(proto)
    reasons = {u.name: u.reason for u in compiled.report.unsupported}
    assert "run time" in reasons["neg"] and "'nzf'" in reasons["neg"]
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    x[x < 0] = 0
    (got,) = npudispatch.Session(proto).run(None, {"x": x})
    np.testing.assert_array_equal(got, _ort(proto, {"x": x})[0])


# ---- external data --------------------------------------------------------------------------


def mlp_with_cpu_op(seed: int = 0) -> onnx.ModelProto:
    """MatMul -> Atan (no NPU operator: a CPU segment) -> MatMul, Reshape to a constant target."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Atan", ["h"], ["a"], name="atan"),
        helper.make_node("MatMul", ["a", "w2"], ["m"], name="mm2"),
        helper.make_node("Reshape", ["m", "target"], ["out"], name="reshape"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) / 4, "w1"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32) / 4, "w2"),
        _i64("target", [2, 2, 8]),
    ]
    g = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", F32, [4, 16])],
        [helper.make_tensor_value_info("out", F32, [2, 2, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.fixture
def external_model(tmp_path, monkeypatch) -> Path:
    """The MLP saved with every tensor in model.onnx.data, and the cwd moved elsewhere."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(
        mlp_with_cpu_op(), path, save_as_external_data=True, all_tensors_to_one_file=True,
        location="model.onnx.data", size_threshold=0,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return path


def test_external_data_session_runs_from_another_working_directory(external_model):
    assert Path.cwd() != external_model.parent
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    sess = npudispatch.Session(str(external_model))
    (got,) = sess.run(None, {"x": x})
    assert sess.last_run_stats.cpu_segments == 1  # Atan
    (want,) = _ort(str(external_model), {"x": x})
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)


def test_external_weights_reach_a_cpu_segment_from_another_working_directory(external_model):
    # Only the second MatMul may run on the NPU: the first one's weights go to onnxruntime.
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    sess = npudispatch.Session(str(external_model), fallback="onnxruntime", bf16=False)
    cpu = npudispatch.compile_model(str(external_model), supported={"Reshape"})
    assert [p.kind for p in cpu.partitions] == ["cpu"]
    only_cpu = npudispatch.Session(cpu)
    (want,) = _ort(str(external_model), {"x": x})
    np.testing.assert_allclose(only_cpu.run(None, {"x": x})[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=0.05, atol=0.05)


def test_external_data_cli_inspect_and_run_check(external_model, capsys):
    assert cli_main(["inspect", str(external_model)]) == 0
    assert "reshape" in capsys.readouterr().out.lower()
    assert cli_main(["run", str(external_model), "--check"]) == 0
    assert "ok" in capsys.readouterr().out


# ---- custom-domain ops without value_info ----------------------------------------------------


def matmul_nbits_model(k: int = 64, n: int = 24, block: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    blocks = k // block
    nodes = [
        helper.make_node(
            "MatMulNBits", ["a", "b", "scales"], ["y"], name="mmnb", domain="com.microsoft",
            K=k, N=n, bits=4, block_size=block,
        ),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]  # fmt: skip
    inits = [
        numpy_helper.from_array(
            rng.integers(0, 256, (n, blocks, block // 2)).astype(np.uint8), "b"
        ),
        numpy_helper.from_array((rng.random(n * blocks) * 0.1).astype(np.float32), "scales"),
    ]
    g = helper.make_graph(
        nodes, "nbits", [helper.make_tensor_value_info("a", F32, ["batch", 3, k])],
        [helper.make_tensor_value_info("out", F32, None)], inits,
    )  # fmt: skip
    model = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return model


def test_matmul_nbits_without_value_info_runs_check_from_another_directory(tmp_path, monkeypatch):
    path = tmp_path / "nbits.onnx"
    onnx.save(matmul_nbits_model(), path)
    monkeypatch.chdir(tmp_path.parent)
    model = graph.load(str(path), dims={"batch": 2})
    assert model.graph.node("mmnb").outputs[0].shape == [2, 3, 24]
    assert cli_main(["run", str(path), "--dims", "batch=2", "--check"]) == 0


CUSTOM_OPS = {
    # op: (inputs as (name, dtype, shape), attributes, extra constant inputs)
    "SkipSimplifiedLayerNormalization": (
        [("x", F32, [2, 5, 16]), ("skip", F32, [2, 5, 16]), ("gamma", F32, [16])],
        {"epsilon": 1e-6}, 4,
    ),
    "SkipLayerNormalization": (
        [("x", F32, [2, 5, 16]), ("skip", F32, [2, 5, 16]), ("gamma", F32, [16]),
         ("beta", F32, [16])], {"epsilon": 1e-6}, 4,
    ),
    "FastGelu": ([("x", F32, [2, 5, 16]), ("bias", F32, [16])], {}, 1),
    "BiasGelu": ([("x", F32, [2, 5, 16]), ("bias", F32, [16])], {}, 1),
    "QuickGelu": ([("x", F32, [2, 5, 16])], {"alpha": 1.702}, 1),
    "RotaryEmbedding": (
        [("x", F32, [1, 5, 32]), ("pos", I64, [1, 5]), ("cos", F32, [16, 4]),
         ("sin", F32, [16, 4])], {"num_heads": 4}, 1,
    ),
    "MultiHeadAttention": (
        [("q", F32, [2, 5, 16]), ("k", F32, [2, 7, 16]), ("v", F32, [2, 7, 16])],
        {"num_heads": 2}, 1,
    ),
    "GroupQueryAttention": (
        [("q", F32, [1, 3, 32]), ("k", F32, [1, 3, 16]), ("v", F32, [1, 3, 16]),
         ("past_k", F32, [1, 2, 4, 8]), ("past_v", F32, [1, 2, 4, 8]),
         ("seqlens_k", TensorProto.INT32, [1]), ("total", TensorProto.INT32, [])],
        {"num_heads": 4, "kv_num_heads": 2}, 3,
    ),
    "QuantizeLinear": (
        [("x", F32, [4, 8]), ("scale", F32, []), ("zp", TensorProto.UINT8, [])], {}, 1,
    ),
    "DequantizeLinear": (
        [("x", TensorProto.UINT8, [4, 8]), ("scale", F32, []), ("zp", TensorProto.UINT8, [])],
        {}, 1,
    ),
}  # fmt: skip


def _feed(name: str, dtype: int, shape: list[int], rng) -> np.ndarray:
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    if name == "seqlens_k":
        return np.array([6], np.int32)  # past 4 + new 3, minus one
    if name == "total":
        return np.array(7, np.int32)
    if name == "pos":
        return np.arange(5, dtype=np.int64)[None]
    if name == "scale":
        return np.array(0.05, np.float32)
    if np.issubdtype(np_type, np.integer):
        return rng.integers(0, 200, shape).astype(np_type)
    return rng.standard_normal(shape).astype(np_type)


@pytest.mark.parametrize("op", sorted(CUSTOM_OPS))
def test_custom_domain_op_types_match_what_onnxruntime_computes(op):
    inputs, attrs, n_out = CUSTOM_OPS[op]
    outputs = [f"out{i}" for i in range(n_out)]
    if op.startswith("Skip"):
        outputs = ["out0", "", "", "out3"]
    node = helper.make_node(op, [i[0] for i in inputs], outputs, domain="com.microsoft", **attrs)
    rng = np.random.default_rng(0)
    feeds = {n: _feed(n, t, s, rng) for n, t, s in inputs}
    # GQA's total_sequence_length is a value that sizes the present KV: in exported decoders it
    # is computed from the attention mask's shape, i.e. a constant once shapes are bound.
    constants = {"total"} if op == "GroupQueryAttention" else set()
    g = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs if n not in constants],
        [helper.make_empty_tensor_value_info(o) for o in outputs if o],
        [numpy_helper.from_array(feeds.pop(n), n) for n in sorted(constants)],
    )  # fmt: skip
    proto = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    proto.ir_version = 10
    model = graph.load(proto)
    inferred = {v.name: (v.dtype.numpy(), list(v.shape)) for v in model.graph.outputs}
    actual = _ort(proto, feeds)
    names = [o for o in outputs if o]
    assert inferred == {n: (a.dtype, list(a.shape)) for n, a in zip(names, actual)}


def test_detector_like_cli_compiles_and_runs_check_from_another_directory(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "models" / "det.onnx"
    path.parent.mkdir()
    onnx.save(detector_like(), path)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["compile", str(path), "--shape", "x=1x3x16x24", "-o", "out"]) == 0
    assert (tmp_path / "out" / "report.json").is_file()
    capsys.readouterr()
    assert cli_main(["run", str(path), "--shape", "x=1x3x16x24", "--check"]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("outputs", "inits", "needle"),
    [
        ([["x"], ["y"]], [], "'x', which is already a graph input"),
        ([["y"], ["y"]], [], "'y', which is already the output of node 'n0'"),
        ([["w"], ["y"]], [numpy_helper.from_array(np.ones(2, np.float32), "w")], "initializer"),
    ],
)
def test_second_producer_of_a_tensor_is_a_model_error(outputs, inits, needle):
    nodes = [
        helper.make_node("Relu", ["x"], outputs[0], name="n0"),
        helper.make_node("Neg", ["x"], outputs[1], name="n1"),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F32, [2])],
        [helper.make_tensor_value_info("y", F32, [2])], inits,
    )  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="exactly one producer") as err:
        graph.load(proto)
    assert needle in str(err.value)


def test_custom_op_inference_leaves_no_file_in_the_working_directory(tmp_path, monkeypatch):
    # onnxruntime's symbolic inference saves sym_shape_infer_temp.onnx in the working directory
    # when a shape stays unknown; loading must not litter the user's folder.
    monkeypatch.chdir(tmp_path)
    node = helper.make_node("Mystery", ["x"], ["y"], name="mystery", domain="com.microsoft")
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", F32, [3])],
        [helper.make_tensor_value_info("y", F32, [3])],
    )  # fmt: skip
    proto = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    graph.load(proto)  # y keeps its declared type
    assert list(tmp_path.iterdir()) == []
