"""The LRN models of onnx's own "light" model zoo (shipped inside the onnx package): AlexNet,
ZFNet-512 and Inception v1 have two LRN nodes each; with LRN on the NPU each model is one NPU
partition, one kernel call, no CPU segment (before, each LRN split the model into three calls).

The zoo's weights are ``ConstantOfShape`` fills, so every channel of a layer is the same and
the final softmax is uniform. The numbers are therefore checked on AlexNet's layers up to its second
LRN (conv, ReLU, LRN, max pool, conv, ReLU, LRN) with seeded random weights
(``test_onnx_light_models.with_random_weights``) and both LRN outputs as graph outputs, by the
rounding-aware onnxruntime check of ``npudispatch run --check``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_onnx_light_models import light_model, with_random_weights

from npudispatch import Session, compile_model
from npudispatch.dispatch.check import RoundingReference, check_outputs

LRN_MODELS = ["bvlc_alexnet", "zfnet512", "inception_v1"]


@pytest.mark.parametrize("name", LRN_MODELS)
def test_lrn_model_compiles_to_one_kernel_call(name: str) -> None:
    compiled = compile_model(light_model(name))
    assert compiled.report.unsupported == [], [
        (u.node, u.op_type, u.reason) for u in compiled.report.unsupported
    ]
    assert [p.kind for p in compiled.partitions] == ["npu"]
    assert compiled.kernel_calls_per_run == 1
    (npu,) = compiled.partitions
    assert sum(n.op_type == "LRN" for n in npu.nodes) == 2


def _through_last_lrn(path: Path, out: Path) -> list[str]:
    """``path`` cut after its last LRN (the fully connected layers dropped), the LRN outputs as
    graph outputs, saved to ``out``; returns those output names."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    nodes = list(model.graph.node)
    last = max(i for i, n in enumerate(nodes) if n.op_type == "LRN")
    del model.graph.node[last + 1 :]
    lrn_outputs = [n.output[0] for n in model.graph.node if n.op_type == "LRN"]
    typed = {v.name: v for v in model.graph.value_info}
    del model.graph.output[:]
    model.graph.output.extend(typed[name] for name in lrn_outputs)
    read = {name for n in model.graph.node for name in n.input}
    fills = [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    for fill in fills:  # the fills of the dropped layers' weights
        if fill.output[0] not in read:
            model.graph.node.remove(fill)
    read = {name for n in model.graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    inputs = [v for v in model.graph.input if v.name in read]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, out)
    return lrn_outputs


def test_alexnet_lrn_layers_with_random_weights_pass_the_rounding_aware_check(
    tmp_path: Path,
) -> None:
    cut = tmp_path / "alexnet_through_lrn.onnx"
    lrn_outputs = _through_last_lrn(light_model("bvlc_alexnet"), cut)
    path = tmp_path / "alexnet_through_lrn_random.onnx"
    onnx.save(with_random_weights(cut), path)
    saved = onnx.load(path)
    weights = {t.name for t in saved.graph.initializer}
    (feed,) = [v.name for v in saved.graph.input if v.name not in weights]
    # Pixel-like magnitudes (AlexNet takes mean-subtracted 0..255 images): with alpha 1e-4 the
    # LRNs then divide by 1.15 to 2.7 instead of ~1.001 for unit-scale data.
    x = 50 * np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    session = Session(path, cache=False)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {feed: x})))
    assert session.last_run_stats.kernel_calls == 1
    assert session.last_run_stats.cpu_segments == 0
    assert sorted(outputs) == sorted(lrn_outputs)
    verdicts = check_outputs(RoundingReference(path), {feed: x}, outputs)
    for name, verdict in verdicts.items():
        assert verdict.ok, f"{name}: {verdict.describe()}"
