"""CNN rewrites (npudispatch.rewrites.cnn): BatchNormalization / constant Mul, Add folded into Conv,
decomposed HardSigmoid / HardSwish, Conv + activation -> npudispatch.FusedConv. Each rule with
positive cases (checked numerically on onnxruntime before vs after) and negative cases; then
exporter-shaped ResNet and MobileNetV3 blocks through Session against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from onnx_ir.passes.common import RemoveUnusedNodesPass
from rw_helpers import ops, run_ort

from npudispatch import Session, compile_model
from npudispatch.rewrites.canonical import constants_last
from npudispatch.rewrites.cnn import conv_activation_rules, conv_fold_rules, hard_activation_rules

M = 6  # output channels of the test convolutions
X_SHAPE = [1, 3, 7, 9]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def build(nodes, inits: dict[str, np.ndarray], out_shape, opset: int = 17, x_shape=None, outs=None):
    """A shape-inferred ir.Model with input ``x`` and output ``y`` (plus ``outs`` names)."""
    x_shape = x_shape or X_SHAPE
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs or []]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        outputs,
        initializer=[nh.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("npudispatch", 1)]
    proto = helper.make_model(graph, opset_imports=imports, ir_version=8)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def conv_inits(seed: int = 0, bias: bool = True, c: int = 3, m: int = M) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    inits = {"w": (rng.standard_normal((m, c, 3, 3)) * 0.3).astype(np.float32)}
    if bias:
        inits["b"] = rng.standard_normal(m).astype(np.float32)
    return inits


def conv_node(bias: bool = True, out: str = "c", w: str = "w") -> onnx.NodeProto:
    return helper.make_node("Conv", ["x", w, "b"] if bias else ["x", w], [out], pads=[1, 1, 1, 1])


def scalars(**values: float) -> dict[str, np.ndarray]:
    return {k: np.array(v, np.float32) for k, v in values.items()}


def rewrite(m: ir.Model, *rule_sets) -> int:
    """Apply rule sets in order (constants last first, like the pipeline); number of rewrites."""
    total = 0
    for rules in rule_sets:
        constants_last(m.graph)
        total += rules.apply_to_model(m)
        RemoveUnusedNodesPass()(m)
    return total


def same_on_ort(before: ir.Model, after: ir.Model, rtol: float = 1e-4) -> None:
    x = _rng(9).standard_normal(X_SHAPE).astype(np.float32)
    want = run_ort(before, {"x": x})
    got = run_ort(after, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.abs(w).max())))


def both(*args, **kwargs) -> tuple[ir.Model, ir.Model]:
    return build(*args, **kwargs), build(*args, **kwargs)


# ---- BatchNormalization / Mul / Add folding -------------------------------------------------


def bn_inits(seed: int = 1) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    return {
        "s": rng.uniform(0.5, 2, M).astype(np.float32),
        "bb": rng.standard_normal(M).astype(np.float32),
        "mu": rng.standard_normal(M).astype(np.float32),
        "var": rng.uniform(0.5, 2, M).astype(np.float32),
    }


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm(bias):
    nodes = [
        conv_node(bias),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["y"], epsilon=1e-3),
    ]
    before, after = both(nodes, {**conv_inits(bias=bias), **bn_inits()}, [1, M, 7, 9])
    assert rewrite(after, conv_fold_rules()) == 1
    assert [o for o in ops(after) if o != "Constant"] == ["Conv"]
    same_on_ort(before, after)


@pytest.mark.parametrize(
    ("kind", "const", "reshape"),
    [
        ("Mul", np.linspace(0.5, 2, M).reshape(M, 1, 1), None),
        ("Mul", np.float32(1.7), None),
        ("Add", np.linspace(-1, 1, M).reshape(1, M, 1, 1), None),
        ("Add", np.linspace(-1, 1, M), [1, M, 1, 1]),  # paddle2onnx: bias [C] -> Reshape -> Add
        ("Mul", np.linspace(0.5, 2, M), [1, -1, 1, 1]),
    ],
    ids=["mul-channel", "mul-scalar", "add-channel", "add-reshaped", "mul-reshaped"],
)
def test_fold_constant_mul_add(kind, const, reshape):
    inits = {**conv_inits(), "k": np.asarray(const, np.float32)}
    nodes = [conv_node()]
    k = "k"
    if reshape is not None:
        inits["shape"] = np.asarray(reshape, np.int64)
        nodes.append(helper.make_node("Reshape", ["k", "shape"], ["kr"]))
        k = "kr"
    nodes.append(helper.make_node(kind, [k, "c"], ["y"]))  # constant first, as exporters do
    before, after = both(nodes, inits, [1, M, 7, 9])
    assert rewrite(after, conv_fold_rules()) == 1
    assert [o for o in ops(after) if o != "Constant"] == ["Conv"]
    same_on_ort(before, after)


def test_fold_chain_bn_mul_add():
    """Conv -> BN -> Mul -> Add (PP-OCRv4's reparameterised blocks) folds into one Conv."""
    nodes = [
        conv_node(),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["n"]),
        helper.make_node("Mul", ["n", "k1"], ["m"]),
        helper.make_node("Add", ["k2", "m"], ["y"]),
    ]
    inits = {**conv_inits(), **bn_inits(), **scalars(k1=0.8, k2=-0.3)}
    before, after = both(nodes, inits, [1, M, 7, 9])
    assert rewrite(after, conv_fold_rules()) == 3
    assert [o for o in ops(after) if o != "Constant"] == ["Conv"]
    same_on_ort(before, after)


def test_fold_negative_cases():
    # BatchNormalization in training mode (running statistics outputs requested)
    nodes = [
        conv_node(),
        helper.make_node(
            "BatchNormalization", ["c", "s", "bb", "mu", "var"], ["y", "rm", "rv"],
            training_mode=1,
        ),
    ]  # fmt: skip
    m = build(nodes, {**conv_inits(), **bn_inits()}, [1, M, 7, 9], outs=["rm", "rv"])
    assert rewrite(m, conv_fold_rules()) == 0
    # the Conv result is read twice (folding would change the other reader's value)
    nodes = [conv_node(), helper.make_node("Mul", ["c", "k"], ["y"]),
             helper.make_node("Relu", ["c"], ["r"])]  # fmt: skip
    m = build(nodes, {**conv_inits(), **scalars(k=2.0)}, [1, M, 7, 9], outs=["r"])
    assert rewrite(m, conv_fold_rules()) == 0
    # a constant that varies over a spatial axis is not per output channel
    nodes = [conv_node(), helper.make_node("Add", ["c", "k"], ["y"])]
    spatial = np.ones((1, 1, 7, 1), np.float32)
    assert rewrite(build(nodes, {**conv_inits(), "k": spatial}, [1, M, 7, 9]),
                   conv_fold_rules()) == 0  # fmt: skip
    # a runtime (non-constant) weight
    nodes = [helper.make_node("Relu", ["x"], ["wr"]), helper.make_node("Conv", ["x", "w2"], ["c"]),
             helper.make_node("Mul", ["c", "k"], ["y"])]  # fmt: skip
    proto_w = build(nodes, {"w2": np.ones((M, 3, 1, 1), np.float32), **scalars(k=2.0)},
                    [1, M, 7, 9])  # fmt: skip
    w2 = proto_w.graph.initializers.pop("w2")
    w2.const_value = None
    proto_w.graph.inputs.append(w2)
    assert rewrite(proto_w, conv_fold_rules()) == 0


# ---- decomposed HardSigmoid / HardSwish -----------------------------------------------------


def _relu6_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Add", [x, "three"], [f"{out}_a"]),
        helper.make_node("Clip", [f"{out}_a", "zero", "six"], [out]),
    ]


RELU6_INITS = scalars(three=3.0, zero=0.0, six=6.0, sixth=1.0 / 6.0)


@pytest.mark.parametrize("divide", [True, False])
def test_hard_sigmoid_forms(divide):
    nodes = [*_relu6_nodes("x", "r6"),
             helper.make_node("Div", ["r6", "six"], ["y"]) if divide else
             helper.make_node("Mul", ["sixth", "r6"], ["y"])]  # fmt: skip
    before, after = both(nodes, RELU6_INITS, X_SHAPE)
    assert rewrite(after, hard_activation_rules()) == 1
    assert ops(after) == ["HardSigmoid"]
    same_on_ort(before, after)


@pytest.mark.parametrize("opset", [12, 17])
@pytest.mark.parametrize("form", ["div", "mul", "mul-hsig"])
def test_hard_swish_forms(form, opset):
    if form == "mul-hsig":
        nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1.0 / 6.0),
                 helper.make_node("Mul", ["h", "x"], ["y"])]  # fmt: skip
    else:
        nodes = [*_relu6_nodes("x", "r6"), helper.make_node("Mul", ["x", "r6"], ["p"]),
                 helper.make_node("Div", ["p", "six"], ["y"]) if form == "div" else
                 helper.make_node("Mul", ["p", "sixth"], ["y"])]  # fmt: skip
    before, after = both(nodes, RELU6_INITS, X_SHAPE, opset=opset)
    n = rewrite(after, hard_activation_rules())
    if opset >= 14:
        assert n == 1 and ops(after) == ["HardSwish"]
    elif form == "mul-hsig":  # already the opset-12 spelling of HardSwish: nothing to do
        assert n == 0
    else:
        assert n == 1 and ops(after) == ["HardSigmoid", "Mul"]
    same_on_ort(before, after)


def test_hard_activation_negative_cases():
    # x + 2 is not HardSigmoid's offset
    nodes = [helper.make_node("Add", ["x", "two"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
             helper.make_node("Div", ["r", "six"], ["y"])]  # fmt: skip
    assert rewrite(build(nodes, {**RELU6_INITS, **scalars(two=2.0)}, X_SHAPE),
                   hard_activation_rules()) == 0  # fmt: skip
    # PaddlePaddle's HardSigmoid (alpha 0.2) times x is not HardSwish
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=0.2),
             helper.make_node("Mul", ["x", "h"], ["y"])]  # fmt: skip
    assert rewrite(build(nodes, {}, X_SHAPE), hard_activation_rules()) == 0
    # x * Relu6(z + 3) / 6 with z != x
    nodes = [helper.make_node("Neg", ["x"], ["z"]), *_relu6_nodes("z", "r6"),
             helper.make_node("Mul", ["x", "r6"], ["p"]),
             helper.make_node("Div", ["p", "six"], ["y"])]  # fmt: skip
    m = build(nodes, RELU6_INITS, X_SHAPE)
    rewrite(m, hard_activation_rules())
    assert "HardSwish" not in ops(m)


# ---- Conv + activation ----------------------------------------------------------------------

ACT_NODES = {
    "Relu": lambda: [helper.make_node("Relu", ["c"], ["y"])],
    "Clip": lambda: [helper.make_node("Clip", ["c", "zero", "six"], ["y"])],
    "HardSigmoid": lambda: [helper.make_node("HardSigmoid", ["c"], ["y"], alpha=0.2)],
    "HardSwish": lambda: [helper.make_node("HardSwish", ["c"], ["y"])],
    "HardSwish-hsig": lambda: [helper.make_node("HardSigmoid", ["c"], ["h"], alpha=1 / 6),
                               helper.make_node("Mul", ["c", "h"], ["y"])],
    "Sigmoid": lambda: [helper.make_node("Sigmoid", ["c"], ["y"])],
    "Silu": lambda: [helper.make_node("Silu", ["c"], ["y"], domain="npudispatch")],
    "LeakyRelu": lambda: [helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.3)],
}  # fmt: skip


def _with_npud_opset(m: ir.Model) -> ir.Model:
    m.opset_imports["npudispatch"] = 1
    return m


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", sorted(ACT_NODES))
def test_conv_activation_fusion(act, bias):
    nodes = [conv_node(bias), *ACT_NODES[act]()]
    before, after = (_with_npud_opset(m) for m in both(nodes, {**conv_inits(bias=bias),
                                                             **RELU6_INITS}, [1, M, 7, 9]))  # fmt: skip
    assert rewrite(after, conv_activation_rules()) == 1
    fused = [n for n in after.graph if n.op_type == "FusedConv"]
    assert [o for o in ops(after) if o != "Constant"] == ["npudispatch.FusedConv"]
    assert fused[0].attributes["activation"].value == act.split("-")[0]
    assert list(fused[0].attributes["pads"].value) == [1, 1, 1, 1]
    same_on_ort(before, after)


def test_conv_activation_negative_cases():
    # the Conv output is also a graph output
    m = build([conv_node(), helper.make_node("Relu", ["c"], ["y"])], conv_inits(), [1, M, 7, 9],
              outs=["c"])  # fmt: skip
    assert rewrite(m, conv_activation_rules()) == 0
    # Clip with a runtime bound
    nodes = [conv_node(), helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0),
             helper.make_node("Clip", ["c", "zero", "hi"], ["y"])]  # fmt: skip
    assert rewrite(build(nodes, {**conv_inits(), **RELU6_INITS}, [1, M, 7, 9]),
                   conv_activation_rules()) == 0  # fmt: skip
    # an activation with no fused form (Tanh)
    m = build([conv_node(), helper.make_node("Tanh", ["c"], ["y"])], conv_inits(), [1, M, 7, 9])
    assert rewrite(m, conv_activation_rules()) == 0
    # HardSigmoid(alpha 0.2) times the Conv output is not HardSwish
    nodes = [conv_node(), helper.make_node("HardSigmoid", ["c"], ["h"], alpha=0.2),
             helper.make_node("Mul", ["c", "h"], ["y"])]  # fmt: skip
    m = build(nodes, conv_inits(), [1, M, 7, 9])
    rewrite(m, conv_activation_rules())
    assert "Mul" in ops(m)


@pytest.mark.parametrize("opset", [12, 17])
@pytest.mark.parametrize("kind", ["MulAdd", "Mul", "Add"])
def test_scalar_affine_after_fused_conv(kind, opset):
    """PP-OCRv4's learnable scalars after each HardSwish: a * act(conv) + b in the FusedConv."""
    nodes = [conv_node(), helper.make_node("HardSwish" if opset >= 14 else "Relu", ["c"], ["a"])]
    if kind == "MulAdd":
        nodes += [helper.make_node("Mul", ["k1", "a"], ["m"]),
                  helper.make_node("Add", ["m", "k2"], ["y"])]  # fmt: skip
    else:
        nodes.append(helper.make_node(kind, ["a", "k1" if kind == "Mul" else "k2"], ["y"]))
    inits = {**conv_inits(), "k1": np.array([0.7], np.float32), "k2": np.array([-0.4], np.float32)}
    before, after = both(nodes, inits, [1, M, 7, 9], opset=opset)
    rewrite(after, conv_activation_rules())
    fused = [n for n in after.graph if n.op_type == "FusedConv"]
    assert [o for o in ops(after) if o != "Constant"] == ["npudispatch.FusedConv"]
    attrs = fused[0].attributes
    assert attrs["post_scale"].value == pytest.approx(0.7 if "Mul" in kind else 1.0)
    assert attrs["post_shift"].value == pytest.approx(-0.4 if "Add" in kind else 0.0)
    same_on_ort(before, after)


def test_scalar_affine_negative_cases():
    # a per-channel scale is not a scalar affine (left for the elementwise Mul)
    nodes = [conv_node(), helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["y"])]  # fmt: skip
    m = build(nodes, {**conv_inits(), "k": np.ones((M, 1, 1), np.float32)}, [1, M, 7, 9])
    rewrite(m, conv_activation_rules())
    assert "Mul" in ops(m)
    # the activation output is also read elsewhere
    nodes = [
        conv_node(),
        helper.make_node("Relu", ["c"], ["a"]),
        helper.make_node("Mul", ["a", "k"], ["y"]),
        helper.make_node("Neg", ["a"], ["n"]),
    ]
    m = build(nodes, {**conv_inits(), **scalars(k=2.0)}, [1, M, 7, 9], outs=["n"])
    rewrite(m, conv_activation_rules())
    assert "Mul" in ops(m)
    # the Mul result is read by something besides the Add: the Add stays
    nodes = [
        conv_node(),
        helper.make_node("Relu", ["c"], ["a"]),
        helper.make_node("Mul", ["a", "k"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    before, after = both(nodes, {**conv_inits(), **scalars(k=2.0, t=1.0)}, [1, M, 7, 9],
                         outs=["m"])  # fmt: skip
    rewrite(after, conv_activation_rules())
    assert "Add" in ops(after)
    same_on_ort(before, after)


# ---- exporter-shaped blocks through Session -------------------------------------------------


def _conv_bn(name: str, x: str, c_in: int, c_out: int, k: int, rng, group: int = 1,
             stride: int = 1) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:  # fmt: skip
    """Conv (no bias) + BatchNormalization, as torch.onnx exports a training-style module."""
    w = rng.standard_normal((c_out, c_in // group, k, k)) * (1.5 / np.sqrt(c_in // group * k * k))
    inits = {
        f"{name}.w": w.astype(np.float32),
        f"{name}.s": rng.uniform(0.5, 1.5, c_out).astype(np.float32),
        f"{name}.b": (rng.standard_normal(c_out) * 0.1).astype(np.float32),
        f"{name}.m": (rng.standard_normal(c_out) * 0.1).astype(np.float32),
        f"{name}.v": rng.uniform(0.5, 1.5, c_out).astype(np.float32),
    }
    pad = k // 2
    nodes = [
        helper.make_node("Conv", [x, f"{name}.w"], [f"{name}.c"], pads=[pad] * 4, group=group,
                         strides=[stride, stride], kernel_shape=[k, k]),
        helper.make_node("BatchNormalization", [f"{name}.c", f"{name}.s", f"{name}.b",
                                                f"{name}.m", f"{name}.v"], [name]),
    ]  # fmt: skip
    return nodes, inits


def resnet_basic_block(c: int = 12, hw: tuple[int, int] = (13, 11)) -> onnx.ModelProto:
    rng = _rng(3)
    n1, i1 = _conv_bn("conv1", "x", c, c, 3, rng)
    n2, i2 = _conv_bn("conv2", "relu1", c, c, 3, rng)
    nodes = [*n1, helper.make_node("Relu", ["conv1"], ["relu1"]), *n2,
             helper.make_node("Add", ["conv2", "x"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["y"])]  # fmt: skip
    shape = [1, c, *hw]
    graph = helper.make_graph(
        nodes, "resnet_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[nh.from_array(v, k) for k, v in {**i1, **i2}.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mobilenetv3_block(c: int = 10, expand: int = 30, hw: tuple[int, int] = (13, 15)):
    """Inverted residual with squeeze-excitation (MobileNetV3 'bneck', 5x5 depthwise), exported
    at opset 13: HardSwish as x * Clip(x + 3, 0, 6) / 6 and HardSigmoid as Clip(x + 3, 0, 6) / 6."""
    rng = _rng(4)
    inits: dict[str, np.ndarray] = {**RELU6_INITS}
    nodes: list[onnx.NodeProto] = []

    def hswish(x: str, out: str) -> None:
        nodes.extend([*_relu6_nodes(x, f"{out}.r6"), helper.make_node("Mul", [x, f"{out}.r6"],
                      [f"{out}.p"]), helper.make_node("Div", [f"{out}.p", "six"], [out])])  # fmt: skip

    n, i = _conv_bn("expand", "x", c, expand, 1, rng)
    nodes += n
    inits |= i
    hswish("expand", "e_act")
    n, i = _conv_bn("dw", "e_act", expand, expand, 5, rng, group=expand)
    nodes += n
    inits |= i
    hswish("dw", "dw_act")
    squeeze = 8
    inits |= {
        "se1.w": (rng.standard_normal((squeeze, expand, 1, 1)) * 0.3).astype(np.float32),
        "se1.b": (rng.standard_normal(squeeze) * 0.1).astype(np.float32),
        "se2.w": (rng.standard_normal((expand, squeeze, 1, 1)) * 0.3).astype(np.float32),
        "se2.b": (rng.standard_normal(expand) * 0.1).astype(np.float32),
    }
    nodes += [
        helper.make_node("GlobalAveragePool", ["dw_act"], ["se.pool"]),
        helper.make_node("Conv", ["se.pool", "se1.w", "se1.b"], ["se1"]),
        helper.make_node("Relu", ["se1"], ["se1.r"]),
        helper.make_node("Conv", ["se1.r", "se2.w", "se2.b"], ["se2"]),
        *_relu6_nodes("se2", "se.r6"),
        helper.make_node("Div", ["se.r6", "six"], ["se.gate"]),
        helper.make_node("Mul", ["dw_act", "se.gate"], ["se.out"]),
    ]
    n, i = _conv_bn("project", "se.out", expand, c, 1, rng)
    nodes += n
    inits |= i
    nodes.append(helper.make_node("Add", ["project", "x"], ["y"]))
    shape = [1, c, *hw]
    graph = helper.make_graph(
        nodes, "mbv3_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[nh.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize(
    ("builder", "fused", "acts"),
    [
        (resnet_basic_block, 1, {"Relu"}),  # conv2 -> BN -> Add(identity) -> Relu: no fusion
        (mobilenetv3_block, 4, {"HardSwish", "Relu", "HardSigmoid"}),
    ],
    ids=["resnet-basic-block", "mobilenetv3-se-block"],
)
def test_block_through_session_matches_onnxruntime(builder, fused, acts):
    proto = builder()
    onnx.checker.check_model(proto)
    compiled = compile_model(proto)
    kinds = [p.kind for p in compiled.partitions]
    assert kinds == ["npu"], compiled.report.unsupported
    assert compiled.kernel_calls_per_run == 1 and compiled.npu_node_fraction == 1.0
    fused_nodes = [n for n in compiled.model.graph if n.op_type == "FusedConv"]
    assert len(fused_nodes) == fused
    assert {n.attributes["activation"].value for n in fused_nodes} == acts
    assert not any(n.op_type == "BatchNormalization" for n in compiled.model.graph)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = _rng(7).standard_normal(shape).astype(np.float32)
    sess = Session(proto)
    (y,) = sess.run(None, {"x": x})
    (want,) = run_ort(ir.from_proto(proto), {"x": x})
    assert sess.last_run_stats.kernel_calls == 1
    scale = float(np.sqrt(np.mean(want**2)))
    np.testing.assert_allclose(y, want, rtol=5e-2, atol=5e-2 * scale)
