"""Helpers for operator tests: one-node ONNX models, onnxruntime and emulator runs, tolerances.

bf16 tolerance rule: bf16 keeps 8 significant bits (relative step 2^-8 ≈ 0.4 %). A kernel rounds
its inputs and its result to bf16, so a result may be ~2 ulps off plus error propagated through the
math (a norm or softmax sums many rounded terms). We use ``rtol = 1e-2`` and ``atol = 1e-2 ×
max(1, max|reference|)`` (scaled for magnitude) everywhere unless a test says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from npudispatch.testing import harness

BF16 = np.dtype(ml_dtypes.bfloat16)
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, BF16: TensorProto.BFLOAT16}


def one_node_model(
    op_type: str,
    inputs: Sequence[tuple[str, np.dtype, Sequence[int]] | None],
    outputs: Sequence[tuple[str, np.dtype, Sequence[int]]],
    *,
    domain: str = "",
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 20,
    **attrs: Any,
) -> onnx.ModelProto:
    """A checked one-node model (ir_version 10); initializers named like inputs become consts."""
    initializers = initializers or {}
    node = helper.make_node(
        op_type,
        [i[0] if i else "" for i in inputs],
        [o[0] for o in outputs],
        domain=domain,
        name=f"{op_type.lower()}_0",
        **attrs,
    )
    graph_inputs = [
        helper.make_tensor_value_info(n, ONNX_TYPE[np.dtype(d)], list(s))
        for n, d, s in (i for i in inputs if i)
        if n not in initializers
    ]
    inits = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    graph_outputs = [
        helper.make_tensor_value_info(n, ONNX_TYPE[np.dtype(d)], list(s)) for n, d, s in outputs
    ]
    graph = helper.make_graph([node], "g", graph_inputs, graph_outputs, initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def to_float32_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Same model with every bf16 tensor type turned into float (ORT CPU lacks most bf16 kernels)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.BFLOAT16:
            arr = onnx.numpy_helper.to_array(t).astype(np.float32)
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    for node in m.graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.BFLOAT16:
                a.i = TensorProto.FLOAT
    return m


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run on onnxruntime CPU in float32 (bf16 inputs are widened exactly)."""
    m = to_float32_model(model)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: np.asarray(v).astype(np.float32) for k, v in feeds.items()})


def run_emu(model: onnx.ModelProto, feeds: dict[str, np.ndarray], num_cols: int = 4):
    """Run the model's single node on the emulator through the harness."""
    return harness.run_single(ir.from_proto(model), feeds, num_cols=num_cols)


def reference(result, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The operator's numpy reference on the node's inputs (consts from the config)."""
    cfg = result.prepared.cfg
    node = result.prepared.node
    ins = [
        None if v is None else (cfg.consts[i] if i in cfg.consts else feeds[v.name])
        for i, v in enumerate(node.inputs)
    ]
    return cfg.operator.reference(cfg, ins)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-2, scale: float = 1e-2):
    """bf16 tolerance (module docstring): rtol plus atol scaled by the reference magnitude."""
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    atol = scale * max(1.0, float(np.nanmax(np.abs(e))) if e.size else 1.0)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def random(shape: Sequence[int], dtype: np.dtype, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    """Deterministic normal data in ``dtype``."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
