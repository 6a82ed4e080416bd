"""Terminal padding: grouping, lcm round-up, constants, pins, and no leak through padded lanes.

Numerics run every NPU node on the emulator (operators' real kernels via the harness) and CPU
nodes on onnx.reference, moving data like the dispatcher: zero-pad on copy-in to a padded value,
crop to the real shape on copy-out. :func:`run_nodes` is reused by test_precision.py.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import ShapeInferencePass
from rw_helpers import model, run_ort

import npudispatch.operators  # noqa: F401  (registers the operators)
from npudispatch import graph
from npudispatch.operators import registry
from npudispatch.operators.base import ArgKind, OpConfig
from npudispatch.rewrites import PassManager
from npudispatch.rewrites.padding import (
    REAL_SHAPE_KEY,
    PadTerminalsPass,
    host_shape,
    pad_model,
    real_shape,
)
from npudispatch.rewrites.precision import tolerance_for
from npudispatch.testing import harness

RNG = np.random.default_rng(7)


# ---- execution helpers ----------------------------------------------------------------------


def _static(v: ir.Value) -> tuple[int, ...]:
    return tuple(int(d) for d in v.shape)


def fit(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-extend every axis of ``a`` to ``shape`` (the dispatcher's copy-in/out)."""
    out = np.zeros(shape, dtype=a.dtype)
    region = tuple(slice(0, min(s, t)) for s, t in zip(a.shape, shape))
    out[region] = a[region]
    return out


def emulate(node: ir.Node, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run one NPU node on the emulator; outputs at their full (padded) shape, raw lanes."""
    from npudispatch.emulator import KernelRegistry, VirtualNpu

    prep = harness.prepare(node, inputs)
    npu = VirtualNpu(
        [bytes(b) for b in prep.buffers],
        num_cols=prep.num_cols,
        kernels=KernelRegistry(registry.kernels()),
    )
    npu.run(prep.transaction)
    outs: list[np.ndarray] = [None] * len(node.outputs)  # type: ignore[list-item]
    for k, a in enumerate(prep.args):
        if a.kind == ArgKind.OUTPUT:
            spec = prep.cfg.outputs[a.index]
            start = prep.placement[k] + a.offset
            raw = npu.buffers[ArgKind.OUTPUT][start : start + spec.nbytes]
            outs[a.index] = np.frombuffer(bytes(raw), spec.dtype).reshape(spec.shape)
    return outs


def run_cpu_node(node: ir.Node, ins: list[np.ndarray | None]) -> list[np.ndarray]:
    """One node through onnx.reference (inputs/outputs at host shapes)."""
    xs = [ir.val(f"i{k}", v.dtype, host_shape(v)) for k, v in enumerate(node.inputs)]
    ys = [ir.val(f"o{k}", v.dtype, host_shape(v)) for k, v in enumerate(node.outputs)]
    clone = ir.node(
        node.op_type, xs, {k: a for k, a in node.attributes.items()}, domain=node.domain,
        outputs=ys,
    )  # fmt: skip
    g = ir.Graph(xs, ys, nodes=[clone], opset_imports={"": 18}, name="one")
    feeds = {f"i{k}": a for k, a in enumerate(ins)}
    return ReferenceEvaluator(ir.to_proto(ir.Model(g, ir_version=10))).run(None, feeds)


def run_nodes(m: ir.Model, feeds: dict[str, np.ndarray], *, raw: dict | None = None):
    """Evaluate ``m``: NPU nodes on the emulator, others on onnx.reference; outputs at host shape.

    ``raw`` (if given) receives every NPU-produced array at its padded shape, by value name.
    """
    env: dict[ir.Value, np.ndarray] = {}
    for v in m.graph.inputs:
        env[v] = np.asarray(feeds[v.name])
    for v in m.graph.initializers.values():
        env[v] = np.asarray(v.const_value.numpy())
    for node in m.graph:
        if isinstance(registry.match(node), OpConfig):
            ins = {
                v.name: fit(env[v], _static(v))
                for v in node.inputs
                if v is not None and v.const_value is None
            }
            outs = emulate(node, ins)
            if raw is not None:
                raw.update({v.name: a for v, a in zip(node.outputs, outs)})
        else:
            outs = run_cpu_node(node, [fit(env[v], host_shape(v)) for v in node.inputs])
        env.update(zip(node.outputs, outs))
    return [fit(env[v], host_shape(v)) for v in m.graph.outputs]


def prepared(text: str, opset_version: int = 18) -> ir.Model:
    m = model(text, opset_version)
    ShapeInferencePass()(m)
    return m


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.fixture(autouse=True)
def _data_independent_of_test_order(request):
    """Each test draws from its own seed, so pytest-xdist's distribution cannot change its data."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


def const(name: str, arr: np.ndarray) -> str:
    """Textual-ONNX initializer declaration."""
    dims = ",".join(map(str, arr.shape))
    vals = ",".join(repr(float(x)) for x in arr.reshape(-1))
    return f"float[{dims}] {name} = {{{vals}}}"


def check_equivalent(text: str, feeds: dict[str, np.ndarray], opset_version: int = 18):
    """Pad a copy; the padded model on the emulator equals the unpadded one on the emulator
    (bit-for-bit up to one bf16 rounding) and the float32 original under ORT within tolerance.
    Returns (padded model, report, raw padded arrays)."""
    original = prepared(text, opset_version)
    padded = prepared(text, opset_version)
    report = pad_model(padded)
    raw: dict[str, np.ndarray] = {}
    got = run_nodes(padded, feeds, raw=raw)
    base = run_nodes(original, feeds)
    ref = run_ort(original, feeds)
    policy = tolerance_for([n.op_type for n in original.graph])
    for g, b, r in zip(got, base, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, b, rtol=2**-7, atol=1e-6)
        # The policy's atol is relative to the output's scale (as `npudispatch run --check`).
        rms = float(np.sqrt(np.mean(np.square(r, dtype=np.float64)))) if r.size else 1.0
        policy.scaled(rms or 1.0).assert_close(g, r)
    return padded, report, raw


def assert_zero_padding(m: ir.Model, raw: dict[str, np.ndarray]) -> None:
    """Every padded NPU-produced array holds zeros outside its real shape."""
    checked = 0
    for node in m.graph:
        for v in node.outputs:
            real = real_shape(v)
            if real is None or v.name not in raw:
                continue
            mask = np.ones(_static(v), bool)
            mask[tuple(slice(0, r) for r in real)] = False
            assert not np.any(raw[v.name][mask]), f"padded lanes of {v.name} leaked"
            checked += 1
    assert checked, "no padded NPU output was checked"


# ---- structure ------------------------------------------------------------------------------

CHAIN = """
g (float[2,11] x) => (float[2,11] y) <{b}> {{
  s = Sigmoid(x)
  a = Add(s, b)
  y = Softmax<axis=-1>(a)
}}
"""


def test_chain_pads_to_lcm_and_records_real_shapes():
    m = prepared(CHAIN.format(b=const("b", floats(11))))
    report = pad_model(m)
    assert report.modified and not report.skipped
    (group,) = report.groups
    assert (group.real, group.multiple, group.target) == (11, 8, 16)
    x, y = m.graph.inputs[0], m.graph.outputs[0]
    for v in (x, y, *(n.outputs[0] for n in m.graph)):
        assert _static(v) == (2, 16)
        assert v.metadata_props[REAL_SHAPE_KEY] == "2,11"
        assert host_shape(v) == (2, 11)
    # The bias is a new zero-padded initializer; the old one is gone.
    (bias,) = m.graph.initializers.values()
    assert bias.name.startswith("b__pad") and _static(bias) == (16,)
    assert not np.any(bias.const_value.numpy()[11:])
    assert "b" not in m.graph.initializers


def test_idempotent_and_in_pass_manager():
    m = prepared(CHAIN.format(b=const("b", floats(11))))
    pm = PassManager([PadTerminalsPass()], fixpoint=True)
    assert pm(m).modified
    assert [r.modified for r in pm.records] == [True, False]  # second round changes nothing
    assert _static(m.graph.outputs[0]) == (2, 16)


def test_aligned_model_untouched():
    m = prepared(CHAIN.format(b=const("b", floats(16))).replace("11", "16"))
    assert not pad_model(m).modified
    assert all(REAL_SHAPE_KEY not in v.metadata_props for v in m.graph.inputs)


def test_shared_constant_padded_per_use():
    text = f"""
    g (float[2,11] x, float[2,16] z) => (float[2,11] y, float[2,16] w) <{const("b", floats(11))}, {
        const("c", floats(16))
    }> {{
      y = Add(x, b)
      bb = Mul(z, c)
      w = Sigmoid(bb)
    }}
    """
    m = prepared(text)
    pad_model(m)
    assert [v.name for v in m.graph.initializers.values()] == ["c", "b__pad_16"]


def test_cpu_border_is_pinned_and_cpu_nodes_untouched():
    # Atan has no NPU operator: its input and output keep the user's shapes.
    text = """
    g (float[2,11] x) => (float[2,11] y) {
      s = Sigmoid(x)
      t = Atan(s)
      y = Softmax<axis=-1>(t)
    }
    """
    m = prepared(text)
    report = pad_model(m)
    assert not report.modified
    assert {g.skipped is not None for g in report.groups} == {True}
    assert "Atan" in report.skipped[0].skipped
    assert all(_static(v) == (2, 11) for v in m.graph.inputs)


def test_cpu_node_only_pins_its_own_tensors():
    text = """
    g (float[2,11] x) => (float[2,11] y, float[2,11] c) {
      c = Atan(x)
      s = Sigmoid(c)
      y = Softmax<axis=-1>(s)
    }
    """
    m = prepared(text)
    report = pad_model(m)
    # c is read by Sigmoid but written by Atan (CPU): the whole tied chain stays unpadded.
    assert not report.modified and report.skipped
    cpu_op = next(n for n in m.graph if n.op_type == "Atan")
    assert _static(cpu_op.inputs[0]) == _static(cpu_op.outputs[0]) == (2, 11)


def test_per_partition_vs_whole_model():
    # Whole model: values a CPU node touches (t, c) are pinned. Extracted partitions: those are
    # the partition's copy-in/copy-out tensors and get padded; everything else agrees.
    text = """
    g (float[2,11] x) => (float[2,11] y) {
      s = Sigmoid(x)
      t = Softmax<axis=-1>(s)
      c = Atan(t)
      u = Sigmoid(c)
      y = Softmax<axis=-1>(u)
    }
    """
    whole = prepared(text)
    pad_model(whole)
    whole_shapes = {v.name: _static(v) for n in whole.graph for v in (*n.inputs, *n.outputs)}
    assert whole_shapes == {"x": (2, 11), "s": (2, 11), "t": (2, 11), "c": (2, 11),
                            "u": (2, 11), "y": (2, 11)}  # fmt: skip
    split = prepared(text)
    parts = [p for p in graph.partition(split, registry.support) if p.kind == "npu"]
    sub_shapes = {}
    for part in parts:
        sub = graph.extract(split, part)
        pad_model(sub)
        sub_shapes |= {v.name: _static(v) for n in sub.graph for v in (*n.inputs, *n.outputs)}
    assert sub_shapes == dict.fromkeys(["x", "s", "t", "c", "u", "y"], (2, 16))


def test_extracted_partition_pads_its_io():
    text = """
    g (float[3,13] x) => (float[3,13] y) {
      s = Sigmoid(x)
      y = Softmax<axis=-1>(s)
    }
    """
    m = prepared(text)
    sub = graph.extract(m, graph.partition(m, registry.support)[0])
    report = pad_model(sub)
    assert set(report.padded_values) == {"x", "s", "y"}
    assert _static(sub.graph.inputs[0]) == (3, 16) and real_shape(sub.graph.inputs[0]) == (3, 13)


def test_declining_node_is_pinned_and_retried():
    # Gemm with transA declines a padded A; padding must back off rather than break the node.
    w = floats(6, 5)
    text = f"""
    g (float[6,3] x) => (float[3,5] y) <{const("w", w)}> {{
      s = Sigmoid(x)
      y = Gemm<transA=1>(s, w)
    }}
    """
    m = prepared(text)
    report = pad_model(m)
    assert isinstance(registry.match(list(m.graph)[1]), OpConfig)
    assert _static(m.graph.inputs[0]) == (6, 3)  # not padded: Gemm pinned it
    assert report.retries >= 1 or report.skipped


# ---- numerics: padded lanes never leak ------------------------------------------------------


def test_softmax_over_padded_axis():
    x = floats(3, 11) * 3
    padded, _, raw = check_equivalent(CHAIN.format(b=const("b", floats(11))), {"x": x[:2]})
    assert_zero_padding(padded, raw)


@pytest.mark.parametrize("op", ["SimplifiedLayerNormalization", "LayerNormalization"])
def test_norm_over_padded_axis(op):
    scale, bias = floats(13), floats(13)
    inputs = "(a, scale, bias)" if op == "LayerNormalization" else "(a, scale)"
    text = f"""
    g (float[4,13] x) => (float[4,13] y) <{const("scale", scale)}, {const("bias", bias)}> {{
      a = Sigmoid(x)
      y = {op}<axis=-1, epsilon=0.00001>{inputs}
    }}
    """
    padded, report, raw = check_equivalent(text, {"x": floats(4, 13) * 2})
    assert report.groups[0].target == 16
    # The norm's scale and bias travel unpadded (the kernel zero-extends them).
    assert {v.name for v in padded.graph.initializers.values()} >= {"scale"}
    assert_zero_padding(padded, raw)


def test_elementwise_chain():
    text = f"""
    g (float[2,3,21] x, float[2,3,21] z) => (float[2,3,21] y) <{const("c", floats(21))}> {{
      a = Mul(x, z)
      b = Sub(a, c)
      d = Div(b, z)
      y = Sigmoid(d)
    }}
    """
    padded, report, raw = check_equivalent(
        text, {"x": floats(2, 3, 21), "z": floats(2, 3, 21) + 3.0}
    )
    assert report.groups[0].target == 24
    assert_zero_padding(padded, raw)  # Div's 0/0 in padded lanes must not survive


def test_matmul_padded_k_and_n():
    # Sigmoid pads K of the const-weight matmul's input to 24 (weight untouched: the op formats
    # it); that matmul pads N 13 -> 16, which the two-activation MatMul ties to K of z.
    w = floats(21, 13)
    text = f"""
    g (float[5,21] x, float[13,6] z) => (float[5,6] y) <{const("w", w)}> {{
      a = Sigmoid(x)
      h = MatMul(a, w)
      y = MatMul(h, z)
    }}
    """
    padded, _, raw = check_equivalent(text, {"x": floats(5, 21), "z": floats(13, 6)})
    shapes = {v.name: _static(v) for n in padded.graph for v in (*n.inputs, *n.outputs)}
    assert shapes == {"x": (5, 24), "a": (5, 24), "w": (21, 13), "h": (5, 16), "z": (16, 8),
                      "y": (5, 8)}  # fmt: skip
    assert real_shape(padded.graph.inputs[1]) == (13, 6)
    # K padding is zero in both operands of the two-activation MatMul (z: zero-filled copy-in).
    assert not np.any(raw["h"][:, 13:])
    assert_zero_padding(padded, raw)


SIGMOID_FEEDS_K = f"""
g (float[5,21] x, float[13,6] z) => (float[5,6] y) <{const("w", floats(21, 13))}> {{
  h = MatMul(x, w)
  s = Sigmoid(z)
  y = MatMul(h, s)
}}
"""


def test_operator_under_declaring_ties_backs_off(monkeypatch):
    # An operator whose granularity ties only its last axis but matches only identical in/out
    # shapes: padding K of s (axis 0) makes it decline, so the pass pins s and z and retries.
    from npudispatch.operators.activations import _Unary
    from npudispatch.operators.base import ShapeConstraints

    def last_axis_only(self, cfg):
        rank = len(cfg.outputs[0].shape)
        rule = (1,) * (rank - 1) + (8,)
        return ShapeConstraints((rule,), (rule,), ((("in", 0, rank - 1), ("out", 0, rank - 1)),))

    monkeypatch.setattr(_Unary, "granularity", last_axis_only)
    m = prepared(SIGMOID_FEEDS_K)
    report = pad_model(m)
    assert report.retries == 1 and "s" in report.pinned and "declines" in report.pinned["s"]
    assert all(isinstance(registry.match(n), OpConfig) for n in m.graph)
    assert not report.modified and len(report.skipped) == 2


def test_sigmoid_ties_every_axis_so_padded_k_needs_no_back_off():
    # Unary ops tie every input axis to the same output axis: K of s (axis 0) pads z too.
    feeds = {"x": floats(5, 21), "z": floats(13, 6)}
    m, report, raw = check_equivalent(SIGMOID_FEEDS_K, feeds)
    assert report.retries == 0 and not report.skipped
    assert report.padded_values["z"] == ((13, 6), (16, 8))
    assert report.padded_values["s"] == ((13, 6), (16, 8))
    assert report.padded_values["y"] == ((5, 6), (5, 8))
    assert_zero_padding(m, raw)


def test_cpu_border_numerics_and_graph_io_crop():
    text = """
    g (float[2,11] x, float[2,11] z) => (float[2,11] y, float[2,11] c) {
      s = Sigmoid(x)
      t = Softmax<axis=-1>(s)
      c = Atan(t)
      u = Sigmoid(z)
      y = Softmax<axis=-1>(u)
    }
    """
    _, report, _ = check_equivalent(text, {"x": floats(2, 11), "z": floats(2, 11)})
    assert set(report.padded_values) == {"z", "u", "y"}  # the chain through Atan is pinned
