"""Why a whole quantized model is judged in "one step plus what a step carries", not one step.

An A16W8 model (uint16 activations) computes every op in float32 between a DequantizeLinear and a
QuantizeLinear. A value right at a rounding boundary of the 16-bit grid lands one step either way
depending on the order of the float32 sums, and a later op carries that step on. onnxruntime
itself shows it: the same model with the K axis of every MatMul permuted (the weight's rows and
the activation's columns together: the same mathematics, another summation order) differs from
the original by up to 2 output steps on onnxruntime alone. npudispatch (whose kernels sum in
their own order) stays within that same 0-2 steps of onnxruntime's unoptimized run, and every
single op is within one step (tests/e2e/test_qdq_models.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from test_qdq_models import feeds_for, ort_run, output_step, qdq_fixtures  # noqa: F401

import npudispatch

SEEDS = range(1, 7)


def k_permuted(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, int]:
    """``model`` with the K axis of every MatMul on a dequantized constant weight permuted."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    rng = np.random.default_rng(seed)
    gathers = []
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        weight = inits[dq.input[0]]
        array = numpy_helper.to_array(weight)
        perm = rng.permutation(array.shape[0])
        weight.CopyFrom(numpy_helper.from_array(array[perm], weight.name))
        name = f"k_perm_{len(gathers)}"
        graph.initializer.append(numpy_helper.from_array(perm.astype(np.int64), name))
        permuted = f"{node.input[0]}__{name}"
        gathers.append(
            (node, helper.make_node("Gather", [node.input[0], name], [permuted], axis=-1))
        )
        node.input[0] = permuted
    for node, gather in gathers:
        graph.node.insert(list(graph.node).index(node), gather)
    return out, len(gathers)


@pytest.mark.parametrize("layer", ["llama-decoder-layer", "bert-encoder-layer"])
def test_onnxruntime_against_itself_differs_by_up_to_two_steps_as_we_do(
    qdq_fixtures,  # noqa: F811
    layer,
    tmp_path,
):
    _, q_path = qdq_fixtures[(layer, "a16w8")]
    model = onnx.load(q_path)
    step = output_step(model)
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = npudispatch.Session(str(q_path))
    itself, ours = [], []
    for seed in SEEDS:
        permuted, count = k_permuted(model, 100 + seed)
        assert count >= 6  # every projection of the layer
        path = tmp_path / f"permuted_{seed}.onnx"
        onnx.save(permuted, path)
        feeds = feeds_for(model, np.random.default_rng(seed))
        want = ort_run(q_path, feeds, plain)
        itself.append(float(np.abs(ort_run(path, feeds, plain) - want).max() / step))
        (got,) = sess.run(None, feeds)
        ours.append(float(np.abs(got - want).max() / step))
    # onnxruntime, reordering its own sums, reaches 2 steps; we never go beyond that.
    assert max(itself) >= 2 - 1e-3, itself
    assert max(ours) <= max(itself) + 1e-3, (ours, itself)
