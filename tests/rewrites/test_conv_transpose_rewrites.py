"""ConvTranspose in the CNN rewrites: BatchNormalization and constant Mul/Add folded into it, an
activation (and a scalar affine after it) fused into ``npudispatch.FusedConvTranspose``; each rule
against onnxruntime with negative cases, and the fused op through Session, judged by the
rounding-aware check (PP-OCRv4's DB head: ConvTranspose -> Add -> BN -> Relu -> ConvTranspose ->
Add -> Sigmoid)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper
from rw_helpers import ops, run_ort, run_reference
from test_cnn_rewrites import (
    ACT_NODES,
    RELU6_INITS,
    M,
    _rng,
    _with_npud_opset,
    bn_inits,
    both,
    build,
    rewrite,
    scalars,
)

from npudispatch import Session
from npudispatch.dispatch.check import RoundingReference, check_outputs
from npudispatch.rewrites.cnn import conv_activation_rules, conv_fold_rules

# ---- the same folding into ConvTranspose ------------------------------------------------------

CT_IN = [1, 4, 5, 7]  # ConvTranspose input: 4 channels, odd spatial size


def convt_case(group: int, bias: bool, seed: int = 3):
    """ConvTranspose of ``[1, 2·group, 5, 7]`` (``CT_IN`` for one or two groups) to M channels:
    kernel 3x2, strides 2, asymmetric pads, output_padding; output ``[1, M, 11, 13]``."""
    rng = _rng(seed)
    c = 4 if group < 3 else 2 * group
    inits = {"wt": (rng.standard_normal((c, M // group, 3, 2)) * 0.3).astype(np.float32)}
    if bias:
        inits["bt"] = rng.standard_normal(M).astype(np.float32)
    node = helper.make_node(
        "ConvTranspose", ["x", "wt", "bt"] if bias else ["x", "wt"], ["c"], group=group,
        strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 0],
    )  # fmt: skip
    return node, inits, [1, M, 11, 13], [1, c, 5, 7]


def same_on_ort_ct(before: ir.Model, after: ir.Model, x_shape) -> None:
    x = _rng(9).standard_normal(x_shape).astype(np.float32)
    for g, w in zip(run_ort(after, {"x": x}), run_ort(before, {"x": x})):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())))


@pytest.mark.parametrize(("group", "bias"), [(1, True), (1, False), (2, True), (3, False)])
def test_fold_batchnorm_into_conv_transpose(group, bias):
    node, inits, out, x_shape = convt_case(group, bias)
    bn = helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["y"], epsilon=1e-3)
    before, after = both([node, bn], {**inits, **bn_inits()}, out, x_shape=x_shape)
    assert rewrite(after, conv_fold_rules()) == 1
    assert [o for o in ops(after) if o != "Constant"] == ["ConvTranspose"]
    same_on_ort_ct(before, after, x_shape)


@pytest.mark.parametrize(
    ("kind", "const", "reshape", "group"),
    [
        ("Mul", np.linspace(0.5, 2, M).reshape(M, 1, 1), None, 2),
        ("Mul", np.float32(1.7), None, 1),
        ("Add", np.linspace(-1, 1, M), [1, M, 1, 1], 1),  # PP-OCRv4's ConvTranspose bias
        ("Add", np.linspace(-1, 1, M).reshape(1, M, 1, 1), None, 3),
    ],
    ids=["mul-channel-g2", "mul-scalar", "add-reshaped", "add-channel-g3"],
)
def test_fold_constant_mul_add_into_conv_transpose(kind, const, reshape, group):
    node, inits, out, x_shape = convt_case(group, bias=group == 1)
    inits = {**inits, "k": np.asarray(const, np.float32)}
    nodes, k = [node], "k"
    if reshape is not None:
        inits["shape"] = np.asarray(reshape, np.int64)
        nodes.append(helper.make_node("Reshape", ["k", "shape"], ["kr"]))
        k = "kr"
    nodes.append(helper.make_node(kind, ["c", k], ["y"]))
    before, after = both(nodes, inits, out, x_shape=x_shape)
    assert rewrite(after, conv_fold_rules()) == 1
    assert [o for o in ops(after) if o != "Constant"] == ["ConvTranspose"]
    same_on_ort_ct(before, after, x_shape)


def test_fold_into_conv_transpose_negative_cases():
    node, inits, out, _ = convt_case(1, bias=True)
    # a constant that varies over a spatial axis is not per output channel
    spatial = np.ones((1, 1, 11, 1), np.float32)
    m = build([node, helper.make_node("Add", ["c", "k"], ["y"])], {**inits, "k": spatial}, out,
              x_shape=CT_IN)  # fmt: skip
    assert rewrite(m, conv_fold_rules()) == 0
    # the ConvTranspose result is read twice
    nodes = [
        node,
        helper.make_node("Mul", ["c", "k"], ["y"]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    m = build(nodes, {**inits, **scalars(k=2.0)}, out, x_shape=CT_IN, outs=["r"])
    assert rewrite(m, conv_fold_rules()) == 0
    # a BatchNormalization whose statistics do not have one value per output channel
    bad = {k: v[:1] for k, v in bn_inits().items()}
    bn = helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["y"])
    m = build([node, bn], {**inits, **bad}, out, x_shape=CT_IN)
    assert rewrite(m, conv_fold_rules()) == 0
    # a runtime (non-constant) weight
    m = build([node, helper.make_node("Mul", ["c", "k"], ["y"])], {**inits, **scalars(k=2.0)},
              out, x_shape=CT_IN)  # fmt: skip
    wt = m.graph.initializers.pop("wt")
    wt.const_value = None
    m.graph.inputs.append(wt)
    assert rewrite(m, conv_fold_rules()) == 0


# ---- activation fusion -----------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", sorted(ACT_NODES))
def test_conv_transpose_activation_fusion(act, bias):
    node, inits, out, x_shape = convt_case(2, bias)
    built = both([node, *ACT_NODES[act]()], {**inits, **RELU6_INITS}, out, x_shape=x_shape)
    before, after = (_with_npud_opset(m) for m in built)
    assert rewrite(after, conv_activation_rules()) == 1
    assert [o for o in ops(after) if o != "Constant"] == ["npudispatch.FusedConvTranspose"]
    (fused,) = [n for n in after.graph if n.op_type == "FusedConvTranspose"]
    assert fused.attributes["activation"].value == act.split("-")[0]
    assert list(fused.attributes["output_padding"].value) == [1, 0]
    same_on_ort_ct(before, after, x_shape)
    x = _rng(9).standard_normal(x_shape).astype(np.float32)  # the OpRun agrees too
    np.testing.assert_allclose(
        run_reference(after, {"x": x})[0], run_ort(before, {"x": x})[0], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kind", ["MulAdd", "Mul", "Add"])
def test_scalar_affine_after_fused_conv_transpose(kind):
    node, inits, out, x_shape = convt_case(1, True)
    nodes = [node, helper.make_node("Relu", ["c"], ["a"])]
    if kind == "MulAdd":
        nodes += [helper.make_node("Mul", ["k1", "a"], ["m"]),
                  helper.make_node("Add", ["m", "k2"], ["y"])]  # fmt: skip
    else:
        nodes.append(helper.make_node(kind, ["a", "k1" if kind == "Mul" else "k2"], ["y"]))
    inits = {**inits, **scalars(k1=0.7, k2=-0.4)}
    before, after = both(nodes, inits, out, x_shape=x_shape)
    rewrite(after, conv_activation_rules())
    assert [o for o in ops(after) if o != "Constant"] == ["npudispatch.FusedConvTranspose"]
    (fused,) = [n for n in after.graph if n.op_type == "FusedConvTranspose"]
    assert fused.attributes["post_scale"].value == pytest.approx(0.7 if "Mul" in kind else 1.0)
    assert fused.attributes["post_shift"].value == pytest.approx(-0.4 if "Add" in kind else 0.0)
    same_on_ort_ct(before, after, x_shape)


def test_conv_transpose_activation_negative_cases():
    node, inits, out, x_shape = convt_case(1, True)
    # the ConvTranspose output is also a graph output
    m = build([node, helper.make_node("Relu", ["c"], ["y"])], inits, out, x_shape=x_shape,
              outs=["c"])  # fmt: skip
    assert rewrite(m, conv_activation_rules()) == 0
    # Clip with a runtime bound
    nodes = [node, helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0),
             helper.make_node("Clip", ["c", "zero", "hi"], ["y"])]  # fmt: skip
    m = build(nodes, {**inits, **RELU6_INITS}, out, x_shape=x_shape)
    assert rewrite(m, conv_activation_rules()) == 0
    # an activation with no fused form (Tanh)
    m = build([node, helper.make_node("Tanh", ["c"], ["y"])], inits, out, x_shape=x_shape)
    assert rewrite(m, conv_activation_rules()) == 0
    # a runtime (non-constant) weight
    m = build([node, helper.make_node("Relu", ["c"], ["y"])], inits, out, x_shape=x_shape)
    wt = m.graph.initializers.pop("wt")
    wt.const_value = None
    m.graph.inputs.append(wt)
    assert rewrite(m, conv_activation_rules()) == 0


# ---- through Session ---------------------------------------------------------------------------


def db_head(c: int = 8, hw: tuple[int, int] = (9, 11), seed: int = 5):
    """PP-OCRv4's DB head as paddle2onnx writes it: ConvTranspose -> Add(Reshape(bias)) -> BN ->
    Relu -> ConvTranspose -> Add(Reshape(bias)) -> Sigmoid, stride 2 twice, no ConvTranspose bias
    inputs."""
    rng = _rng(seed)
    inits = {
        "w1": (rng.standard_normal((c, c // 2, 2, 2)) * 0.4).astype(np.float32),
        "b1": rng.standard_normal(c // 2).astype(np.float32) * 0.1,
        "w2": (rng.standard_normal((c // 2, 1, 2, 2)) * 0.4).astype(np.float32),
        "b2": np.array([-2.0], np.float32),
        "shape": np.array([1, -1, 1, 1], np.int64),
        "s": rng.uniform(0.5, 2, c // 2).astype(np.float32),
        "bb": rng.standard_normal(c // 2).astype(np.float32) * 0.1,
        "mu": rng.standard_normal(c // 2).astype(np.float32) * 0.1,
        "var": rng.uniform(0.5, 2, c // 2).astype(np.float32),
    }
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w1"], ["t1"], strides=[2, 2]),
        helper.make_node("Reshape", ["b1", "shape"], ["b1r"]),
        helper.make_node("Add", ["t1", "b1r"], ["a1"]),
        helper.make_node("BatchNormalization", ["a1", "s", "bb", "mu", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "w2"], ["t2"], strides=[2, 2]),
        helper.make_node("Reshape", ["b2", "shape"], ["b2r"]),
        helper.make_node("Add", ["t2", "b2r"], ["a2"]),
        helper.make_node("Sigmoid", ["a2"], ["y"]),
    ]
    out = [1, 1, 4 * hw[0], 4 * hw[1]]
    return ir.to_proto(build(nodes, inits, out, x_shape=[1, c, *hw], opset=12)), [1, c, *hw]


@pytest.mark.parametrize("bf16", [True, False])
def test_db_head_fuses_and_passes_the_check(bf16):
    proto, x_shape = db_head()
    sess = Session(proto, bf16=bf16, cache=False)
    graph = sess.compiled.model.graph
    kinds = [n.op_type for n in graph if n.op_type not in ("Cast", "Constant")]
    assert kinds == ["FusedConvTranspose", "FusedConvTranspose"], kinds
    assert [n.attributes["activation"].value for n in graph if n.op_type.startswith("Fused")] == [
        "Relu",
        "Sigmoid",
    ]
    assert sess.compiled.kernel_calls_per_run == 1
    x = _rng(7).standard_normal(x_shape).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    reference = RoundingReference(proto, bf16=bf16)
    (want,) = run_ort(ir.from_proto(proto), {"x": x})
    (verdict,) = check_outputs(reference, {"x": x}, {"y": y}, {"y": want}).values()
    assert verdict.ok, verdict.describe()
    np.testing.assert_allclose(y, want, rtol=3e-2 if bf16 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("act", sorted(ACT_NODES))
def test_fused_conv_transpose_on_the_npu(act):
    """Each activation after a grouped, strided ConvTranspose with asymmetric pads and
    output_padding runs as one FusedConvTranspose launch within the rounding-aware check."""
    node, inits, out, x_shape = convt_case(2, True)
    model = build([node, *ACT_NODES[act]()], {**inits, **RELU6_INITS}, out, x_shape=x_shape)
    proto = ir.to_proto(_with_npud_opset(model))
    sess = Session(proto, cache=False)
    fused = [n for n in sess.compiled.model.graph if n.op_type == "FusedConvTranspose"]
    assert len(fused) == 1 and sess.compiled.npu_node_fraction == 1.0
    x = _rng(8).standard_normal(x_shape).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    (verdict,) = check_outputs(RoundingReference(proto), {"x": x}, {"y": y}).values()
    assert verdict.ok, verdict.describe()
