"""DD's golden graphs (docs/architecture.md §6) adapted to standard ONNX ops at small sizes.

Every builder returns a checked ``onnx.ModelProto`` (ir_version 10, opset 20) with float32 IO so
onnxruntime can run it as the reference; weights are seeded random initializers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT
OPSET = 20


class Builder:
    """Tiny graph builder: inputs, outputs, weights, nodes."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def inp(self, name: str, shape: Sequence[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, F32, list(shape)))
        return name

    def out(self, name: str, shape: Sequence[int]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, F32, list(shape)))
        return name

    def weight(self, name: str, shape: Sequence[int], scale: float | None = None) -> str:
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        w = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, ins: Sequence[str], outs: Sequence[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, list(ins), list(outs), name=name, **attrs))

    def silu(self, x: str, y: str, name: str) -> None:
        self.node("Sigmoid", [x], [f"{name}_sig"], f"{name}_sigmoid")
        self.node("Mul", [x, f"{name}_sig"], [y], f"{name}_mul")

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model


H, INTER = 64, 160  # hidden / intermediate sizes of the MLP ladder (INTER not a multiple of 64)


def g6_silu(n: int = 1100) -> onnx.ModelProto:
    b = Builder()
    b.inp("X", [1, 1, n])
    b.silu("X", b.out("Y", [1, 1, n]), "silu")
    return b.model("g6_silu")


def g7_elwmul(n: int = 1100) -> onnx.ModelProto:
    b = Builder()
    b.node("Mul", [b.inp("X", [1, 1, n]), b.inp("Y", [1, 1, n])], [b.out("Z", [1, 1, n])], "elwmul")
    return b.model("g7_elwmul")


def g8_mmulsilu(m: int = 2) -> onnx.ModelProto:
    b = Builder(8)
    b.node("MatMul", [b.inp("X", [1, m, H]), b.weight("W1", [H, INTER])], ["Y0"], "gate_proj")
    b.silu("Y0", b.out("Z0", [1, m, INTER]), "silu")
    return b.model("g8_mmulsilu")


def g9_mmmm(m: int = 2) -> onnx.ModelProto:
    b = Builder(9)
    b.node("MatMul", [b.inp("X", [1, m, H]), b.weight("W1", [H, INTER])], ["Y0"], "gate_proj")
    b.node("MatMul", ["Y0", b.weight("W2", [INTER, H])], [b.out("Z0", [1, m, H])], "down_proj")
    return b.model("g9_mmmm")


def _mlp4of5(b: Builder, m: int) -> None:
    x = b.inp("X", [1, m, H])
    b.node("MatMul", [x, b.weight("W1", [H, INTER])], ["Y0"], "gate_proj")
    b.node("MatMul", [x, b.weight("W2", [H, INTER])], ["Y1"], "up_proj")
    b.silu("Y0", "Z0", "silu")


def g10_mlp4of5(m: int = 2) -> onnx.ModelProto:
    b = Builder(10)
    _mlp4of5(b, m)
    b.node("Mul", ["Z0", "Y1"], [b.out("A", [1, m, INTER])], "elwmul")
    return b.model("g10_mlp4of5")


def g11_mlp(m: int = 2) -> onnx.ModelProto:
    b = Builder(11)
    _mlp4of5(b, m)
    b.node("Mul", ["Z0", "Y1"], ["A"], "elwmul")
    b.node("MatMul", ["A", b.weight("W3", [INTER, H])], [b.out("C", [1, m, H])], "down_proj")
    return b.model("g11_mlp")


def g3_parallel(m: int = 4) -> onnx.ModelProto:
    b = Builder(3)
    b.node(
        "MatMul",
        [b.inp("XA", [1, m, H]), b.weight("WA", [H, INTER])],
        [b.out("YA", [1, m, INTER])],
        "mula",
    )
    b.node(
        "MatMul",
        [b.inp("XB", [1, m, H]), b.weight("WB", [H, INTER])],
        [b.out("YB", [1, m, INTER])],
        "mulb",
    )
    return b.model("g3_parallel")


def g12_parallel_shared_input(m: int = 2) -> onnx.ModelProto:
    b = Builder(12)
    x = b.inp("X", [1, m, H])
    b.node("MatMul", [x, b.weight("W0", [H, INTER])], [b.out("Y0", [1, m, INTER])], "mmul0")
    b.node("MatMul", [x, b.weight("W1", [H, INTER])], [b.out("Y1", [1, m, INTER])], "mmul1")
    return b.model("g12_parallel")


def g4_identity(m: int = 4) -> onnx.ModelProto:
    """DD's identity chain: id1, id2, mul1, id3, id4, mul2, id5, id6 (shared weight)."""
    b = Builder(4)
    b.inp("X", [1, m, H])
    w = b.weight("W0", [H, H])
    b.node("Identity", ["X"], ["id1_out"], "id1")
    b.node("Identity", ["id1_out"], ["id2_out"], "id2")
    b.node("MatMul", ["id2_out", w], ["mul1_out"], "mul1")
    b.node("Identity", ["mul1_out"], ["id3_out"], "id3")
    b.node("Identity", ["id3_out"], ["id4_out"], "id4")
    b.node("MatMul", ["id4_out", w], ["mul2_out"], "mul2")
    b.node("Identity", ["mul2_out"], ["id5_out"], "id5")
    b.node("Identity", ["id5_out"], [b.out("Y", [1, m, H])], "id6")
    return b.model("g4_identity")


def g4_views(m: int = 4) -> onnx.ModelProto:
    """G4 with real layout views: Reshape / Unsqueeze / Squeeze / Flatten between the MatMuls."""
    b = Builder(41)
    b.inp("X", [1, m, H])
    b.const("shape2d", np.array([m, H], np.int64))
    b.const("shape3d", np.array([1, m, H], np.int64))
    b.const("axes0", np.array([0], np.int64))
    b.node("Reshape", ["X", "shape2d"], ["x2"], "reshape_in")
    b.node("MatMul", ["x2", b.weight("W0", [H, H])], ["m1"], "mul1")
    b.node("Unsqueeze", ["m1", "axes0"], ["m1u"], "unsq")
    b.node("Sigmoid", ["m1u"], ["s"], "sig")
    b.node("Squeeze", ["s", "axes0"], ["s2"], "sq")
    b.node("MatMul", ["s2", b.weight("W1", [H, H])], ["m2"], "mul2")
    b.node("Reshape", ["m2", "shape3d"], [b.out("Y", [1, m, H])], "reshape_out")
    return b.model("g4_views")


def g14_mixed(m: int = 4) -> onnx.ModelProto:
    """NPU, CPU (an op without NPU operator), NPU."""
    b = Builder(14)
    b.node("MatMul", [b.inp("X", [1, m, H]), b.weight("W0", [H, H])], ["Y1"], "matmul1")
    b.node("MatMul", ["Y1", b.weight("W1", [H, H])], ["Y2"], "matmul2")
    b.node("Atan", ["Y2"], ["T"], "cpu_atan")
    b.node("MatMul", ["T", b.weight("W2", [H, H])], [b.out("Y3", [1, m, H])], "matmul3")
    return b.model("g14_mixed")


def g15_fork(n: int = 32) -> onnx.ModelProto:
    """square(X) -> Y0; cube = Y0 * X -> Y; square(Y0) -> Y1 (two outputs)."""
    b = Builder(15)
    x = b.inp("X", [1, 1, n])
    b.node("Mul", [x, x], ["Y0"], "sq1")
    b.node("Mul", ["Y0", x], [b.out("Y", [1, 1, n])], "cube1")
    b.node("Mul", ["Y0", "Y0"], [b.out("Y1", [1, 1, n])], "sq2")
    return b.model("g15_fork")


GOLDEN = {
    "G3": g3_parallel,
    "G4": g4_identity,
    "G4-views": g4_views,
    "G6": g6_silu,
    "G7": g7_elwmul,
    "G8": g8_mmulsilu,
    "G9": g9_mmmm,
    "G10": g10_mlp4of5,
    "G11": g11_mlp,
    "G12": g12_parallel_shared_input,
    "G14": g14_mixed,
    "G15": g15_fork,
}


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 normal inputs for every graph input."""
    rng = np.random.default_rng(seed)
    return {
        vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for vi in model.graph.input
    }


def onnxruntime_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference outputs by name."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 2e-2, atol: float = 2e-2):
    """bf16 compute tolerance (tests/operators/opkit.py rule, doubled for op chains)."""
    e = np.asarray(expected, np.float64)
    scale = atol * max(1.0, float(np.abs(e).max()) if e.size else 1.0)
    np.testing.assert_allclose(np.asarray(actual, np.float64), e, rtol=rtol, atol=scale)
