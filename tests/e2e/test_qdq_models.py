"""Quantized models as users make them, end to end: onnxruntime ``quantize_static`` (QDQ format,
A8W8 = uint8 activations / int8 per-channel weights, A16W8 = uint16 activations) over the
exporter-style Llama decoder and BERT encoder layers, calibrated on seeded random data; plus
hand-built corner cases (int16, zero points at the range ends, saturation).

Targets (issue 13): no more kernel calls than the float model, >= 90 % of nodes on the NPU, and
results within one quantization step of onnxruntime's unfused QDQ run. Every quantized op is
within one step (tests/operators/test_quantize.py); A8W8 models are bit-exact, while at A16W8 a
one-step difference inside the model can carry further (a residual stream, a softmax of a
requantized logit), measured 2 output steps at most: ``run --check``'s step rule allows one step
plus what its perturbed reference runs show such a difference carries (1-3 steps at A16W8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from corpus_util import MODELS_DIR
from onnx import numpy_helper

import npudispatch
from npudispatch.dispatch.check import RoundingReference, check_outputs
from npudispatch.dispatch.quant_check import QuantizedOutputCheck
from npudispatch.examples import build_example

quantization = pytest.importorskip("onnxruntime.quantization")

LAYERS = ("llama-decoder-layer", "bert-encoder-layer")
RECIPES = {"a8w8": "QUInt8", "a16w8": "QUInt16"}


class _RandomReader(quantization.CalibrationDataReader):
    """A few seeded random batches (zero additive attention mask)."""

    def __init__(self, model: onnx.ModelProto, batches: int = 3, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._feeds = iter([feeds_for(model, rng) for _ in range(batches)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def feeds_for(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name == "attention_mask":
            feeds[vi.name] = np.zeros(shape, np.float32)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def quantize(
    float_path: Path, q_path: Path, model: onnx.ModelProto, activation: str, batches: int = 3
) -> None:
    """``quantize_static`` as users run it: QDQ format, ``activation`` (a ``QuantType`` name)
    activations, int8 weights per channel, calibrated on seeded random batches."""
    quantization.quantize_static(
        str(float_path),
        str(q_path),
        _RandomReader(model, batches=batches),
        quant_format=quantization.QuantFormat.QDQ,
        activation_type=getattr(quantization.QuantType, activation),
        weight_type=quantization.QuantType.QInt8,
        per_channel=True,
    )


@pytest.fixture(scope="session")
def qdq_fixtures(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """``(layer, recipe) -> (float model, quantized model)``, quantized once per session."""
    folder = tmp_path_factory.mktemp("qdq")
    out = {}
    for layer in LAYERS:
        float_path = folder / f"{layer}.onnx"
        model = build_example(layer, symbolic=False)
        onnx.save(model, float_path)
        for recipe, act in RECIPES.items():
            q_path = folder / f"{layer}-{recipe}.onnx"
            quantize(float_path, q_path, model, act)
            out[(layer, recipe)] = (float_path, q_path)
    return out


def output_step(model: onnx.ModelProto) -> float:
    """Scale of the DequantizeLinear that produces the (first) graph output."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer[model.graph.output[0].name]
    while node.op_type != "DequantizeLinear":
        node = producer[node.input[0]]
    return float(inits[node.input[1]])


def ort_run(path: Path, feeds, level) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[
        0
    ]


CASES = [(layer, recipe) for layer in LAYERS for recipe in RECIPES]


@pytest.mark.parametrize(("layer", "recipe"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_quantized_layer_partitions_like_its_float_version(qdq_fixtures, layer, recipe):
    float_path, q_path = qdq_fixtures[(layer, recipe)]
    quant = npudispatch.compile_model(q_path)
    reference = npudispatch.compile_model(float_path)
    assert quant.kernel_calls_per_run <= reference.kernel_calls_per_run
    assert quant.npu_node_fraction >= 0.9, [u.reason for u in quant.report.unsupported]
    fused = [n.op_type for n in quant.model.graph if n.domain == "npudispatch"]
    assert "QMatMul" in fused and any(op.startswith("QDQ") for op in fused)


def step_verdict(path: Path, feeds: dict, got: np.ndarray):
    """``run --check``'s verdict on the (quantized) first output."""
    reference = RoundingReference(str(path))
    name = reference.outputs[0]
    verdict = check_outputs(reference, feeds, {name: got})[name]
    assert isinstance(verdict, QuantizedOutputCheck), "the output must be checked in steps"
    return verdict


@pytest.mark.parametrize(("layer", "recipe"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_quantized_layer_matches_onnxruntime(qdq_fixtures, layer, recipe):
    _, q_path = qdq_fixtures[(layer, recipe)]
    model = onnx.load(q_path)
    step = output_step(model)
    for seed in (1, 5):
        feeds = feeds_for(model, np.random.default_rng(seed))
        plain = ort_run(q_path, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        sess = npudispatch.Session(str(q_path))
        (got,) = sess.run(None, feeds)
        assert sess.last_run_stats.kernel_calls == 1
        ours = np.abs(got - plain) / step
        # Every op is within one step of onnxruntime's QDQ execution; the layer output too, on
        # >= 95 % of elements, and run --check's step rule holds: one step per element plus
        # what a one-step difference inside the layer is measured to carry to the output.
        assert (ours <= 1 + 1e-3).mean() >= 0.95, f"{(ours > 1 + 1e-3).mean():.3f} beyond 1 step"
        verdict = step_verdict(q_path, feeds, got)
        assert verdict.ok, verdict.describe()
        assert ours.max() <= 1 + verdict.propagated_steps + 1e-3, verdict.describe()
        if recipe == "a8w8":  # nothing flips at 8 bits: bit-exact, strict one-step rule
            assert ours.max() == 0 and verdict.propagated_steps == 0, verdict.describe()


# ---- hand-built corner cases --------------------------------------------------------------------


def _model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 21]>\n' + text)


def test_int16_zero_points_at_range_ends_and_saturation(tmp_path):
    """int16 and uint8 activations with zero points at both ends of their types, inputs far
    outside the representable range: results equal onnxruntime's exactly (saturation) or within
    one step (the fused Add)."""
    model = _model(
        """
        g (float[4,64] x, float[4,64] y) => (float[4,64] out, float[4,64] sat) <
            float s16 = {0.001}, int16 zlo = {-32768}, int16 zhi = {32767},
            float s8 = {0.05}, uint8 z0 = {0}, uint8 z255 = {255}, float so = {0.002},
            int16 zo = {0}> {
            qx = QuantizeLinear (x, s16, zlo)
            dx = DequantizeLinear (qx, s16, zlo)
            qy = QuantizeLinear (y, s16, zhi)
            dy = DequantizeLinear (qy, s16, zhi)
            a = Add (dx, dy)
            qa = QuantizeLinear (a, so, zo)
            out = DequantizeLinear (qa, so, zo)
            q8 = QuantizeLinear (x, s8, z0)
            d8 = DequantizeLinear (q8, s8, z0)
            q8b = QuantizeLinear (y, s8, z255)
            d8b = DequantizeLinear (q8b, s8, z255)
            sat = Add (d8, d8b)
        }"""
    )
    path = tmp_path / "corner.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    feeds = {k: rng.uniform(-100, 100, (4, 64)).astype(np.float32) for k in ("x", "y")}
    want = ort_run(path, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = npudispatch.Session(str(path))
    got, sat = sess.run(None, feeds)
    assert np.abs(got - want).max() <= 0.002 * (1 + 1e-3)
    assert (np.abs(want) >= 65.5).any(), "the int16 output must saturate somewhere"
    want_sat = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[
        1
    ]
    # d8 is in [0, 12.75], d8b in [-12.75, 0]: the float Add of two exact values runs in bf16.
    np.testing.assert_allclose(sat, want_sat, atol=12.75 * 2**-8)
    compiled = sess.compiled
    assert compiled.npu_node_fraction == 1.0 and compiled.kernel_calls_per_run == 1


# ---- Conv with bias, Gemm in both weight layouts, MatMul: what quantize_static emits ----------


def small_cnn() -> onnx.ModelProto:
    """Conv+bias -> Relu -> strided Conv+bias -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    (B [K, N], transB=0, bias) -> Relu -> Gemm (B [N, K], transB=1, no bias) -> MatMul: every
    weight form quantize_static emits for these ops (per channel: Conv and transB=1 Gemm along
    axis 0, transB=0 Gemm and MatMul along axis 1; biases int32 with scale x_scale * w_scale)."""
    rng = np.random.default_rng(3)

    def w(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    inits = {"w1": w(8, 3, 3, 3), "b1": w(8), "w2": w(8, 8, 3, 3, s=0.15), "b2": w(8),
             "w3": w(8, 16), "c3": w(16), "w4": w(10, 16, s=0.2), "w5": w(10, 6)}  # fmt: skip
    make = onnx.helper.make_node
    nodes = [
        make("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        make("Relu", ["c1"], ["r1"]),
        make("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        make("Relu", ["c2"], ["r2"]),
        make("GlobalAveragePool", ["r2"], ["p"]),
        make("Flatten", ["p"], ["f"]),
        make("Gemm", ["f", "w3", "c3"], ["g3"]),
        make("Relu", ["g3"], ["r3"]),
        make("Gemm", ["r3", "w4"], ["g4"], transB=1),
        make("MatMul", ["g4", "w5"], ["y"]),
    ]
    f32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        nodes, "cnn",
        [onnx.helper.make_tensor_value_info("x", f32, [2, 3, 16, 16])],
        [onnx.helper.make_tensor_value_info("y", f32, [2, 6])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


# Signed activations as symmetric recipes (AMD Quark's int8/int16) emit them.
ALL_RECIPES = RECIPES | {"s8w8": "QInt8", "s16w8": "QInt16"}


@pytest.mark.parametrize("recipe", list(ALL_RECIPES))
def test_conv_bias_and_gemm_forms_fuse_and_match_onnxruntime(tmp_path, recipe):
    """quantize_static's Conv with an int32 bias DQ, Gemm with transB=0 (weight per channel
    along axis 1, transposed at compile time) and bias, Gemm transB=1 without bias (an exact
    zero bias) and MatMul: all become quantized NPU ops, one kernel call, bit-exact here."""
    model = small_cnn()
    float_path, q_path = tmp_path / "cnn.onnx", tmp_path / f"cnn-{recipe}.onnx"
    onnx.save(model, float_path)
    quantize(float_path, q_path, model, ALL_RECIPES[recipe])
    q_model = onnx.load(q_path)
    assert sum(len(n.input) == 3 for n in q_model.graph.node if n.op_type == "Conv") == 2
    quant = npudispatch.compile_model(q_path)
    fused = [n.op_type for n in quant.model.graph if n.domain == "npudispatch"]
    assert sorted(fused).count("QDQConv") == 2 and fused.count("QDQGemm") == 2, fused
    assert "QMatMul" in fused
    assert not {"Conv", "Gemm", "MatMul"} & {n.op_type for n in quant.model.graph}
    assert quant.kernel_calls_per_run <= npudispatch.compile_model(float_path).kernel_calls_per_run
    assert quant.npu_node_fraction >= 0.9
    feeds = feeds_for(q_model, np.random.default_rng(5))
    want = ort_run(q_path, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    (got,) = npudispatch.Session(str(q_path)).run(None, feeds)
    assert np.abs(got - want).max() <= output_step(q_model) * (1 + 1e-3)
    assert np.ptp(want) > 50 * output_step(q_model), "the data must exercise the output range"


@pytest.mark.parametrize(("group", "bias", "recipe"), [(1, True, "a8w8"), (2, False, "a16w8")])
def test_conv_transpose_weight_quantized_along_axis_1_fuses(tmp_path, group, bias, recipe):
    """quantize_static quantizes a ConvTranspose weight [C, M/G, k, k] per output channel along
    axis 1 (and leaves the bias float): QDQConvTranspose takes that axis; bit-exact here."""
    rng = np.random.default_rng(group)
    inits = {"w": (rng.standard_normal((4, 6 // group, 3, 3)) * 0.3).astype(np.float32)}
    if bias:
        inits["b"] = (rng.standard_normal(6) * 0.3).astype(np.float32)
    node = onnx.helper.make_node(
        "ConvTranspose", ["x", *inits], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
        output_padding=[1, 1], group=group,
    )  # fmt: skip
    f32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [node], "ct",
        [onnx.helper.make_tensor_value_info("x", f32, [1, 4, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", f32, [1, 6, 10, 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    float_path, q_path = tmp_path / "ct.onnx", tmp_path / f"ct-{recipe}.onnx"
    onnx.save(model, float_path)
    quantize(float_path, q_path, model, RECIPES[recipe])
    q_model = onnx.load(q_path)
    w_dq = next(n for n in q_model.graph.node if n.op_type == "DequantizeLinear" and
                any(a.name == "axis" and a.i == 1 for a in n.attribute))  # fmt: skip
    assert w_dq is not None
    quant = npudispatch.compile_model(q_path)
    assert [n.op_type for n in quant.model.graph if n.domain == "npudispatch"] == [
        "QDQConvTranspose"
    ]
    assert quant.kernel_calls_per_run == 1 and quant.npu_node_fraction == 1.0
    feeds = feeds_for(q_model, np.random.default_rng(5))
    want = ort_run(q_path, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    (got,) = npudispatch.Session(str(q_path)).run(None, feeds)
    assert np.abs(got - want).max() <= output_step(q_model) * (1 + 1e-3)
    assert np.ptp(want) > 50 * output_step(q_model)
    verdict = step_verdict(q_path, feeds, got)
    assert verdict.ok, verdict.describe()


@pytest.mark.parametrize("recipe", ["s8w8", "s16w8"])
def test_signed_activation_layer_fuses_every_matmul(qdq_fixtures, tmp_path, recipe):
    """int8/int16 activations: the weight MatMuls become QMatMul too (they stayed float,
    83 steps off at int16), and the layer is bit-exact with onnxruntime's unfused run."""
    float_path, _ = qdq_fixtures[("llama-decoder-layer", "a8w8")]
    q_path = tmp_path / f"llama-{recipe}.onnx"
    quantize(float_path, q_path, onnx.load(float_path), ALL_RECIPES[recipe])
    quant = npudispatch.compile_model(q_path)
    fused = [n.op_type for n in quant.model.graph if n.domain == "npudispatch"]
    assert fused.count("QMatMul") == 7 and "MatMul" not in {n.op_type for n in quant.model.graph}
    assert quant.kernel_calls_per_run == 1 and quant.npu_node_fraction >= 0.9
    model = onnx.load(q_path)
    feeds = feeds_for(model, np.random.default_rng(5))
    want = ort_run(q_path, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    (got,) = npudispatch.Session(str(q_path)).run(None, feeds)
    assert np.abs(got - want).max() <= output_step(model) * (1 + 1e-3)


# ---- a quantized CNN: the shared PP-OCR text-direction classifier ---------------------------------

PPOCR_CLS = MODELS_DIR / "ppocr_cls.onnx"


@pytest.fixture(scope="session")
def ppocr_qdq(tmp_path_factory) -> dict:
    """PP-OCR cls with a fixed input shape, float and quantized A8W8 / A16W8 (1 batch each),
    and the float model's kernel calls per run."""
    if not PPOCR_CLS.exists():
        pytest.skip(f"{PPOCR_CLS} is absent (the shared models folder beside the checkout)")
    folder = tmp_path_factory.mktemp("ppocr")
    model = onnx.load(PPOCR_CLS)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 3, 48, 192)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    for dim, value in zip(model.graph.output[0].type.tensor_type.shape.dim, (1, 2)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    paths: dict = {"float": folder / "cls.onnx"}
    onnx.save(model, paths["float"])
    for recipe, act in RECIPES.items():
        paths[recipe] = folder / f"cls-{recipe}.onnx"
        quantize(paths["float"], paths[recipe], model, act, batches=1)
    paths["float_calls"] = npudispatch.compile_model(paths["float"]).kernel_calls_per_run
    return paths


@pytest.mark.slow
def test_quantized_cnn_partitions_like_its_float_version(ppocr_qdq):
    """Both recipes in one test: one worker quantizes the CNN once (the fixture is per worker)."""
    for recipe in RECIPES:
        quant = npudispatch.compile_model(ppocr_qdq[recipe])
        assert quant.kernel_calls_per_run <= ppocr_qdq["float_calls"], recipe
        assert quant.npu_node_fraction >= 0.9, [u.reason for u in quant.report.unsupported]
        fused = {n.op_type for n in quant.model.graph if n.domain == "npudispatch"}
        assert {"QDQAdd", "QDQMul"} <= fused, recipe
        assert "QDQConv" in fused, recipe
        assert "QDQBatchNormalization" in fused, recipe  # opset 11 (A8W8) too
    # Every op is within one step of onnxruntime's unfused run (BatchNormalization computed in
    # its order, bit-exact); Conv's float32 summation order flips ~0.01 % of A16W8 elements by
    # one step, and 53 layers deep such a flip propagates: A8W8 (opset 11) bit-exact, A16W8
    # measured 2 output steps (of 65536), bound 2.
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 3, 48, 192)).astype(np.float32)}
    for recipe, bound in (("a8w8", 1), ("a16w8", 2)):
        model = onnx.load(ppocr_qdq[recipe])
        want = ort_run(ppocr_qdq[recipe], feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        (got,) = npudispatch.Session(str(ppocr_qdq[recipe])).run(None, feeds)
        assert np.abs(got - want).max() <= bound * output_step(model) * (1 + 1e-3), recipe
        verdict = step_verdict(ppocr_qdq[recipe], feeds, got)  # run --check
        assert verdict.ok, f"{recipe}: {verdict.describe()}"
        if recipe == "a8w8":
            assert verdict.worst_steps == 0 and verdict.propagated_steps == 0, verdict.describe()
