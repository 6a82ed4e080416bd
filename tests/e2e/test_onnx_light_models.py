"""onnx's own "light" model zoo: classic CNNs that ship inside the onnx package.

``onnx/backend/test/data/light`` holds SqueezeNet, ResNet-50, ShuffleNet, DenseNet-121,
Inception v1/v2, AlexNet, ZFNet and VGG-19 as the model zoo exported them (Caffe2 and Caffe
converters, opset 9, IR 3: initializers doubling as graph inputs, ``Sum`` residuals, ``Dropout``,
weights reshaped or unsqueezed in the graph), with every weight replaced by a
``ConstantOfShape`` fill to keep the files small. Nobody here wrote them.

Each model must load, put every node on the NPU and run in ONE kernel call. The fills make every
output uniform, so the numbers are checked on a copy whose fills are replaced by seeded random
weights (He-scaled convolutions, positive batch-norm variances), judged by the rounding-aware
onnxruntime check that ``npudispatch run --check`` uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from npudispatch import Session
from npudispatch.dispatch.check import RoundingReference, check_outputs

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# VGG-19 (548 MB of float32 weights once the fills are materialized) is left out to keep the suite
# light; it compiles to one call like the others (README, "Models from other tools").
ONE_CALL_MODELS = ["squeezenet", "resnet50", "shufflenet", "densenet121", "inception_v2"]
CHECKED_MODELS = ["squeezenet", "resnet50", "densenet121"]
_VIEW_OPS = {"Unsqueeze", "Reshape", "Squeeze", "Flatten"}


def light_model(name: str) -> Path:
    path = LIGHT_DIR / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx install (onnx ships it in backend/test/data)")
    return path


def _input(model: onnx.ModelProto, seed: int) -> tuple[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    (feed,) = [v for v in model.graph.input if v.name not in initializers]
    shape = [d.dim_value for d in feed.type.tensor_type.shape.dim]
    return feed.name, np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _consumer(model: onnx.ModelProto, name: str) -> tuple[onnx.NodeProto, int]:
    """The first node reading ``name``, looking through view ops (DenseNet unsqueezes its
    batch-norm parameters), with the input slot it reads it at."""
    for node in model.graph.node:
        if name in node.input:
            if node.op_type in _VIEW_OPS and node.input[0] == name:
                return _consumer(model, node.output[0])
            return node, list(node.input).index(name)
    raise AssertionError(f"{name} has no reader")


def _random_weight(node: onnx.NodeProto, slot: int, shape: list[int], rng) -> np.ndarray:
    if node.op_type == "BatchNormalization":
        if slot in (1, 4):  # scale, variance: positive
            return rng.uniform(0.5, 1.5, shape)
        return rng.normal(0.0, 0.1, shape)
    if node.op_type in ("Conv", "Gemm") and slot == 1 and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if node.op_type == "Mul":
        return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0.0, 0.1, shape)


def with_random_weights(path: Path, seed: int = 0) -> onnx.ModelProto:
    """``path`` with each ``ConstantOfShape`` weight fill replaced by a seeded random initializer."""
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    fills = [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    for fill in fills:
        shape = [int(d) for d in shapes[fill.input[0]]]
        reader, slot = _consumer(model, fill.output[0])
        weight = _random_weight(reader, slot, shape, rng).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(weight, fill.output[0]))
        model.graph.node.remove(fill)
    return model


@pytest.mark.parametrize("name", ONE_CALL_MODELS)
def test_light_model_runs_whole_on_the_npu(name):
    path = light_model(name)
    model = onnx.load(path)
    feed, x = _input(model, seed=1)
    sess = Session(path)
    (y,) = sess.run(None, {feed: x})
    compiled = sess.compiled
    assert compiled.report.unsupported == [], [
        (u.node, u.op_type, u.reason) for u in compiled.report.unsupported
    ]
    assert compiled.npu_node_fraction == 1.0
    assert sess.last_run_stats.kernel_calls == 1
    assert np.isfinite(y).all()


@pytest.mark.parametrize("name", CHECKED_MODELS)
def test_light_model_with_random_weights_passes_the_rounding_aware_check(name, tmp_path):
    path = tmp_path / f"{name}_random.onnx"
    onnx.save(with_random_weights(light_model(name)), path)
    feed, x = _input(onnx.load(path), seed=2)
    sess = Session(path)
    (y,) = sess.run(None, {feed: x})
    assert sess.last_run_stats.kernel_calls == 1
    output = sess.get_outputs()[0].name
    (verdict,) = check_outputs(RoundingReference(path), {feed: x}, {output: y}).values()
    assert verdict.ok, verdict.describe()


def test_every_weight_one_percent_off_fails_the_check(tmp_path):
    """The deep-graph rms rule (half a probe run's rms) still refuses a systematic error."""
    good = with_random_weights(light_model("squeezenet"))
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    for t in bad.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
    onnx.save(good, tmp_path / "good.onnx")
    onnx.save(bad, tmp_path / "bad.onnx")
    feed, x = _input(good, seed=3)
    sess = Session(tmp_path / "bad.onnx")
    (y,) = sess.run(None, {feed: x})
    output = sess.get_outputs()[0].name
    reference = RoundingReference(tmp_path / "good.onnx")
    (verdict,) = check_outputs(reference, {feed: x}, {output: y}).values()
    assert not verdict.ok, verdict.describe()


def test_a_half_percent_weight_error_in_a_shallow_graph_fails_the_check():
    """The deep-graph rule must not cover shallow graphs: one MatMul whose weight is 0.5 % off
    (a probe run moves its output by ~1 ulp, below DEEP_SPREAD_ULPS) still fails on its rms."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 128)) / 16).astype(np.float32)
    x = rng.standard_normal((64, 256)).astype(np.float32)

    def matmul(weight: np.ndarray) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 128])],
            [numpy_helper.from_array(weight, "w")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    (y,) = Session(matmul(w * np.float32(1.005)), cache=False).run(None, {"x": x})
    (verdict,) = check_outputs(RoundingReference(matmul(w)), {"x": x}, {"y": y}).values()
    assert not verdict.ok and verdict.rms_vs_probes is None, verdict.describe()
