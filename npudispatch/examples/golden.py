"""DD's golden graphs G1-G20 (docs/architecture.md §6), rebuilt with onnx.helper.

These are DD-form models: vendor ops in the ``amd.com`` / ``com.amd`` domains (or, where DD wrote
none, the default domain), attribute names and tensor names as in DD's ``tests/cpp/*/model.py``.
They exercise loading, ordering and partitioning; they are not meant for onnxruntime. Where DD's
spec shows no domain for a quantised ``MatMul``/``LayerNorm``/``MatMulAddGelu`` (whose input list
does not match the ONNX schema) the ``com.amd`` domain is used so the model stays valid.

Weights are seeded random integers (W uint8 in [0, 32), qdq int64 in [0, 32)), with DD's shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["DD_GOLDEN_KEY", "GOLDEN", "GOLDEN_PURPOSE", "IR_VERSION", "is_dd_golden"]

#: Model metadata key marking DD's golden graphs (value: :data:`GOLDEN_PURPOSE`).
DD_GOLDEN_KEY = "npudispatch.dd_golden"
GOLDEN_PURPOSE = (
    "DynamicDispatch's own test graphs, with DD's vendor ops (amd.com / com.amd): npudispatch "
    "uses them to check plan and meta fidelity (inspect, plan, compile); no NPU operator of ours "
    "takes those ops, so they compile to 0 % NPU, and onnxruntime cannot run them either"
)


def is_dd_golden(model: onnx.ModelProto) -> bool:
    """True for a model built by one of the :data:`GOLDEN` builders."""
    return any(p.key == DD_GOLDEN_KEY for p in model.metadata_props)


IR_VERSION = 10
U8, U16, I32, I64, F32, BF16 = (
    TensorProto.UINT8,
    TensorProto.UINT16,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.FLOAT,
    TensorProto.BFLOAT16,
)
_NP = {
    U8: np.uint8,
    U16: np.uint16,
    I32: np.int32,
    I64: np.int64,
    F32: np.float32,
    BF16: ml_dtypes.bfloat16,
}
AMD = "amd.com"
COM_AMD = "com.amd"


class _Builder:
    """Collects inputs, outputs, value_info and seeded initializers of one golden graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.proto = onnx.ModelProto(producer_name="npudispatch-golden", ir_version=IR_VERSION)
        self.graph = self.proto.graph
        self.nodes: list[onnx.NodeProto] = []

    def inp(self, name: str, dtype: int, shape: Sequence[int]) -> None:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def out(self, name: str, dtype: int, shape: Sequence[int]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def vi(self, name: str, dtype: int, shape: Sequence[int]) -> None:
        self.value_info.append(helper.make_tensor_value_info(name, dtype, shape))

    def init(self, name: str, array: np.ndarray) -> None:
        # Written straight into the graph proto: the MLP weights are 45 MB each, and every
        # intermediate TensorProto would cost another copy.
        tensor = self.graph.initializer.add()
        tensor.CopyFrom(numpy_helper.from_array(array[:0].reshape(0), name))
        tensor.dims[:] = array.shape
        tensor.raw_data = np.ascontiguousarray(array).tobytes()

    def weights(self, name: str, shape: Sequence[int]) -> None:
        # Random bytes masked to [0, 32): ~10x faster than integers() for the 45 MB MLP weights.
        raw = np.frombuffer(self.rng.bytes(int(np.prod(shape))), np.uint8) & np.uint8(31)
        self.init(name, raw.reshape(tuple(shape)))

    def qdq(self, name: str, n: int) -> None:
        self.init(name, self.rng.integers(0, 32, size=n, dtype=np.int64))

    def floats(self, name: str, shape: Sequence[int], dtype: int = F32) -> None:
        values = self.rng.uniform(-0.05, 0.05, size=tuple(shape)).astype(np.float32)
        self.init(name, values.astype(_NP[dtype]))

    def node(self, op: str, ins: Sequence[str], outs: Sequence[str], name: str, **kw) -> None:
        self.nodes.append(helper.make_node(op, list(ins), list(outs), name=name, **kw))

    def model(self, name: str, domains: Sequence[str]) -> onnx.ModelProto:
        graph = self.graph
        graph.name = name
        graph.node.extend(self.nodes)
        graph.input.extend(self.inputs)
        graph.output.extend(self.outputs)
        graph.value_info.extend(self.value_info)
        opsets = [helper.make_opsetid("", 19)] + [helper.make_opsetid(d, 1) for d in domains]
        self.proto.opset_import.extend(opsets)
        helper.set_model_props(self.proto, {DD_GOLDEN_KEY: GOLDEN_PURPOSE})
        return self.proto


def _npu_qdq_params() -> np.ndarray:
    params = np.zeros(16, np.int32)
    params[[2, 4, 5, 7]] = [10, 32, 64, 13]
    return params


# ------------------------------------------------------------------------------------- G1-G5


def g1(*, act: int = U16, m: int = 128, seed: int = 0) -> onnx.ModelProto:
    """G1 single_matmul a16w8: ``mul1: MatMul(X, W0, qdq, qdq_params) -> Y``."""
    b = _Builder(seed)
    b.inp("X", act, [1, m, 768])
    b.out("Y", act, [1, m, 1152])
    b.weights("W0", [768, 1152])
    b.qdq("qdq", 1152)
    b.init("qdq_params", _npu_qdq_params())
    b.node(
        "MatMul",
        ["X", "W0", "qdq", "qdq_params"],
        ["Y"],
        "mul1",
        domain=COM_AMD,
        input_shape=[1, m, 768],
    )
    return b.model("single_matmul", [COM_AMD])


def g2(*, seed: int = 0) -> onnx.ModelProto:
    """G2 single_matmul a8w8: G1 with uint8 activations and M = 512."""
    return g1(act=U8, m=512, seed=seed)


def g3(*, seed: int = 0) -> onnx.ModelProto:
    """G3 parallel_matmul: two independent a8w8 MatMuls ``mula`` and ``mulb``."""
    b = _Builder(seed)
    for s in ("a", "b"):
        b.inp(f"X{s.upper()}", U8, [1, 512, 768])
        b.out(f"Y{s.upper()}", U8, [1, 512, 1152])
    for s in ("a", "b"):
        b.weights(f"W{s.upper()}0", [768, 1152])
        b.qdq(f"qdq{s}", 1152)
        b.init(f"qdq{s}_params", _npu_qdq_params())
    for s in ("a", "b"):
        u = s.upper()
        b.node(
            "MatMul",
            [f"X{u}", f"W{u}0", f"qdq{s}", f"qdq{s}_params"],
            [f"Y{u}"],
            f"mul{s}",
            domain=COM_AMD,
            input_shape=[1, 512, 768],
        )
    return b.model("parallel_matmul", [COM_AMD])


def g4(*, seed: int = 0) -> onnx.ModelProto:
    """G4 identity a16w8: Identity ops around two MatMuls sharing W0/qdq/qdq_params."""
    b = _Builder(seed)
    shape = [1, 128, 768]
    b.inp("X", U16, shape)
    b.out("Y", U16, shape)
    chain = ["id1", "id2", "mul1", "id3", "id4", "mul2", "id5", "id6"]
    for name in chain[:-1]:
        b.vi(f"{name}_out", U16, shape)
    b.weights("W0", [768, 768])
    b.qdq("qdq", 768)
    b.init("qdq_params", _npu_qdq_params())
    prev = "X"
    for name in chain:
        out = "Y" if name == "id6" else f"{name}_out"
        if name.startswith("mul"):
            b.node(
                "MatMul",
                [prev, "W0", "qdq", "qdq_params"],
                [out],
                name,
                domain=COM_AMD,
                input_shape=shape,
            )
        else:
            b.node("Identity", [prev], [out], name)
        prev = out
    return b.model("identity", [COM_AMD])


def g5(*, act: int = U16, m: int = 128, seed: int = 0) -> onnx.ModelProto:
    """G5 single_add a16w8: ``add1: Add[com.amd](X, W, QDQ) -> Y:bf16`` (a8w8: act=UINT8, m=512)."""
    b = _Builder(seed)
    b.inp("X", act, [1, m, 768])
    b.inp("W", act, [1, m, 768])
    b.out("Y", BF16, [1, m, 768])
    qdq = np.zeros(16, np.int32)
    qdq[:4] = [14979, 4451, 14674, 1000]
    b.init("QDQ", qdq)
    b.node("Add", ["X", "W", "QDQ"], ["Y"], "add1", domain=COM_AMD)
    return b.model("single_add", [COM_AMD])


# ------------------------------------------------------------------------- G6-G13: MLP ladder


def g6(*, seed: int = 0) -> onnx.ModelProto:
    """G6 silu: ``X:bf16[1,1,11008] -> SILU[amd.com] -> Y``."""
    b = _Builder(seed)
    b.inp("X", BF16, [1, 1, 11008])
    b.out("Y", BF16, [1, 1, 11008])
    b.node("SILU", ["X"], ["Y"], "silu", domain=AMD)
    return b.model("silu", [AMD])


def g7(*, seed: int = 0) -> onnx.ModelProto:
    """G7 elwmul: ``ELWMUL[amd.com](X, Y) -> Z`` on bf16[1,1,11008]."""
    b = _Builder(seed)
    b.inp("X", BF16, [1, 1, 11008])
    b.inp("Y", BF16, [1, 1, 11008])
    b.out("Z", BF16, [1, 1, 11008])
    b.node("ELWMUL", ["X", "Y"], ["Z"], "elwmul", domain=AMD)
    return b.model("elwmul", [AMD])


def _mladf(
    b: _Builder,
    name: str,
    prefix: str,
    x: str,
    y: str,
    k: int,
    n: int,
    *,
    domain: str = AMD,
    suffix: str = "",
) -> None:
    """Add a MladfMatMul node with its weights/bias/scales/zeros (group size 128)."""
    names = [f"{prefix}weights{suffix}", f"{prefix}bias{suffix}"]
    names += [f"{prefix}scales{suffix}", f"{prefix}zeros{suffix}"]
    groups = k * n // 128
    b.weights(names[0], [k, n])
    b.floats(names[1], [1, n])
    b.floats(names[2], [1, groups])
    b.init(names[3], b.rng.integers(0, 16, size=(1, groups), dtype=np.uint8))
    b.node("MladfMatMul", [x, *names], [y], name, domain=domain, group_size=128)


def g8(*, seed: int = 0) -> onnx.ModelProto:
    """G8 mmulsilu: ``gate_proj: MladfMatMul(X) -> Y0``, ``silu: SILU(Y0) -> Z0``."""
    b = _Builder(seed)
    b.inp("X", BF16, [1, 1, 4096])
    b.out("Z0", BF16, [1, 1, 11008])
    b.vi("Y0", BF16, [1, 1, 11008])
    _mladf(b, "gate_proj", "mul1_", "X", "Y0", 4096, 11008)
    b.node("SILU", ["Y0"], ["Z0"], "silu", domain=AMD)
    return b.model("mmulsilu", [AMD])


def g9(*, seed: int = 0) -> onnx.ModelProto:
    """G9 mmmm: ``gate_proj`` then ``down_proj`` (11008 -> 4096)."""
    b = _Builder(seed)
    b.inp("X", BF16, [1, 1, 4096])
    b.out("Z0", BF16, [1, 1, 4096])
    b.vi("Y0", BF16, [1, 1, 11008])
    _mladf(b, "gate_proj", "mul1_", "X", "Y0", 4096, 11008)
    _mladf(b, "down_proj", "mul2_", "Y0", "Z0", 11008, 4096)
    return b.model("mmmm", [AMD])


def _mlp4of5(b: _Builder) -> None:
    b.inp("X", BF16, [1, 1, 4096])
    for name in ("Y0", "Y1", "Z0"):
        b.vi(name, BF16, [1, 1, 11008])
    _mladf(b, "gate_proj", "mul1_", "X", "Y0", 4096, 11008)
    _mladf(b, "up_proj", "mul2_", "X", "Y1", 4096, 11008)
    b.node("SILU", ["Y0"], ["Z0"], "silu", domain=AMD)
    b.node("ELWMUL", ["Z0", "Y1"], ["A"], "elwmul", domain=AMD)


def g10(*, seed: int = 0) -> onnx.ModelProto:
    """G10 mlp4of5: gate/up MladfMatMul, SILU, ELWMUL -> ``A``."""
    b = _Builder(seed)
    _mlp4of5(b)
    b.out("A", BF16, [1, 1, 11008])
    return b.model("mlp4of5", [AMD])


def g11(*, seed: int = 0) -> onnx.ModelProto:
    """G11 llama2 MLP: G10 + ``down_proj: MladfMatMul(A) -> C:bf16[1,1,4096]``."""
    b = _Builder(seed)
    _mlp4of5(b)
    b.vi("A", BF16, [1, 1, 11008])
    _mladf(b, "down_proj", "mul3_", "A", "C", 11008, 4096)
    b.out("C", BF16, [1, 1, 4096])
    return b.model("mlp", [AMD])


def g12(*, seed: int = 0) -> onnx.ModelProto:
    """G12 parallel_mladfmatmulbias: ``mmul0``/``mmul1`` MladfMatMul (default domain) on one X."""
    b = _Builder(seed)
    b.inp("X", BF16, [1, 1, 4096])
    for i in (0, 1):
        b.out(f"Y{i}", BF16, [1, 1, 11008])
    for i in (0, 1):
        _mladf(b, f"mmul{i}", "", "X", f"Y{i}", 4096, 11008, domain="", suffix=str(i))
    return b.model("parallel_mladfmatmulbias", [])


def g13(*, tile: bool = False, seed: int = 0) -> onnx.ModelProto:
    """G13 single_mladfmatmulbias: 11008 -> 4096 (``tile=True``: X[1,4096,4096] -> Y[1,4096,11008])."""
    b = _Builder(seed)
    m, k, n = (4096, 4096, 11008) if tile else (1, 11008, 4096)
    b.inp("X", BF16, [1, m, k])
    b.out("Y", BF16, [1, m, n])
    _mladf(b, "mladfmatmulbias", "", "X", "Y", k, n, domain="")
    return b.model("single_mladfmatmulbias", [])


# ------------------------------------------------------------------------------------ G14-G20


def g14(*, seed: int = 0) -> onnx.ModelProto:
    """G14 matmul_cpu: two NPU MatMuls then ``matmul3: MatMul_CPU`` (identity weights)."""
    b = _Builder(seed)
    shape = [1, 128, 768]
    b.inp("X", U16, shape)
    b.out("Y3", U16, shape)
    b.vi("Y1", U16, shape)
    b.vi("Y2", U16, shape)
    for i, w in enumerate(("W0", "W1", "W2")):
        b.init(w, np.eye(768, dtype=np.uint8))
        b.qdq("qdq" if i == 0 else f"qdq{i}", 768)
    params = np.zeros(16, np.int32)
    params[5] = 32
    b.init("qdq_params", params)
    for i, (op, w, q) in enumerate(
        [("MatMul", "W0", "qdq"), ("MatMul", "W1", "qdq1"), ("MatMul_CPU", "W2", "qdq2")]
    ):
        src = "X" if i == 0 else f"Y{i}"
        b.node(
            op,
            [src, w, q, "qdq_params"],
            [f"Y{i + 1}"],
            f"matmul{i + 1}",
            domain=COM_AMD,
            input_shape=shape,
        )
    return b.model("matmul_cpu", [COM_AMD])


def g15(*, seed: int = 0) -> onnx.ModelProto:
    """G15 pm_swap case 3: ``sq1: square(X) -> Y0`` forks into ``cube1`` and ``sq2``."""
    b = _Builder(seed)
    b.inp("X", I32, [1, 1, 32])
    b.out("Y", I32, [1, 1, 32])
    b.out("Y1", I32, [1, 1, 32])
    b.vi("Y0", I32, [1, 1, 32])
    b.node("square", ["X"], ["Y0"], "sq1", domain=COM_AMD)
    b.node("cube", ["Y0"], ["Y"], "cube1", domain=COM_AMD)
    b.node("square", ["Y0"], ["Y1"], "sq2", domain=COM_AMD)
    return b.model("pm_swap", [COM_AMD])


def g16(*, seed: int = 0) -> onnx.ModelProto:
    """G16 flat_mlp: one ``FlatMLP[com.amd]`` with packed-int4 gate/up weights."""
    b = _Builder(seed)
    b.inp("ifm", BF16, [1, 1, 3072])
    b.out("ofm", BF16, [1, 1, 8192])
    ins = ["ifm"]
    for p in ("gate", "up"):
        b.weights(f"{p}_wts", [8192, 24, 64])
        b.floats(f"{p}_scale", [196608])
        b.init(f"{p}_zp", b.rng.integers(0, 256, size=98304, dtype=np.uint8))
        b.floats(f"{p}_bias", [8192])
        ins += [f"{p}_wts", f"{p}_scale", f"{p}_zp", f"{p}_bias"]
    b.node(
        "FlatMLP",
        ins,
        ["ofm"],
        "flat_mlp",
        domain=COM_AMD,
        input_shape=[1, 3072, 8192],
        group_size=128,
        in_dtypes=["bfloat16", "uint8", "float", "uint8", "float"] * 2,
        out_dtypes=["bfloat16"],
    )
    return b.model("flat_mlp", [COM_AMD])


def g17(*, seed: int = 0) -> onnx.ModelProto:
    """G17 single_mladfrmsnorm: ``MLADFRMSNORM[amd.com](X:bf16[2048,4096], Y:bf16[4096]) -> Z``."""
    b = _Builder(seed)
    b.inp("X", BF16, [2048, 4096])
    b.out("Z", BF16, [2048, 4096])
    b.floats("Y", [4096], BF16)
    b.node("MLADFRMSNORM", ["X", "Y"], ["Z"], "rmsnorm", domain=AMD)
    return b.model("single_mladfrmsnorm", [AMD])


_G18 = {
    "bmm1": ("BMM1", [("X", [32, 2048, 128]), ("Y", [32, 128, 2048])], [32, 2048, 2048]),
    "bmm2": ("BMM2", [("X", [32, 2048, 2048]), ("Y", [32, 2048, 128])], [32, 2048, 128]),
    "maskedsoftmax": (
        "MASKEDSOFTMAX",
        [("X", [32, 2048, 2048]), ("mask", [1, 2048, 2048])],
        [32, 2048, 2048],
    ),
    "mharope": (
        "MLADFMHAROPE",
        [("X", [32, 4096, 128]), ("trig", [2, 4096, 128])],
        [32, 4096, 128],
    ),
    "add": ("MLADFADD", [("X", [1, 4096, 4096]), ("Y", [1, 4096, 4096])], [1, 4096, 4096]),
}


def g18(block: str = "bmm1", *, seed: int = 0) -> onnx.ModelProto:
    """G18 attention blocks, one single-op bf16 graph each: ``block`` in bmm1, bmm2,
    maskedsoftmax, mharope, add (the MHA RoPE cos/sin table ``trig`` is an initializer)."""
    if block not in _G18:
        raise KeyError(f"G18 block {block!r} unknown; choose one of {sorted(_G18)}")
    op, operands, out_shape = _G18[block]
    b = _Builder(seed)
    names = []
    for name, shape in operands:
        if name == "trig":
            b.floats(name, shape, BF16)
        else:
            b.inp(name, BF16, shape)
        names.append(name)
    b.out("Z", BF16, out_shape)
    b.node(op, names, ["Z"], block, domain=AMD)
    return b.model(f"g18_{block}", [AMD])


def g19(*, seed: int = 0) -> onnx.ModelProto:
    """G19 single_lrn a16w8: ``LayerNorm[com.amd](input, gamma, beta, QDQ) -> out:uint16``."""
    b = _Builder(seed)
    b.inp("input", BF16, [1, 128, 768])
    b.out("out", U16, [1, 128, 768])
    b.init("gamma", b.rng.integers(0, 32, size=768, dtype=np.uint16))
    b.init("beta", b.rng.integers(0, 32, size=768, dtype=np.uint16))
    b.init("QDQ", _npu_qdq_params())
    b.node(
        "LayerNorm",
        ["input", "gamma", "beta", "QDQ"],
        ["out"],
        "lrn",
        domain=COM_AMD,
        input_shape=[1, 128, 768],
    )
    return b.model("single_lrn", [COM_AMD])


def g20(*, seed: int = 0) -> onnx.ModelProto:
    """G20 single_matmuladdgelu a16w8: ``MatMulAddGelu[com.amd] -> Y:uint16[1,128,3072]``."""
    b = _Builder(seed)
    b.inp("X", U16, [1, 128, 768])
    b.out("Y", U16, [1, 128, 3072])
    b.weights("weights", [768, 3072])
    b.qdq("qdq", 3072)
    b.init("qdq_params", _npu_qdq_params())
    b.init("gelu_qdq_params", _npu_qdq_params())
    b.node(
        "MatMulAddGelu",
        ["X", "weights", "qdq", "qdq_params", "gelu_qdq_params"],
        ["Y"],
        "matmuladdgelu",
        domain=COM_AMD,
        input_shape=[1, 128, 768],
    )
    return b.model("single_matmuladdgelu", [COM_AMD])


def _g18_block(block: str) -> Callable[..., onnx.ModelProto]:
    def build(*, seed: int = 0) -> onnx.ModelProto:
        return g18(block, seed=seed)

    build.__doc__ = f"G18 {block}: {_G18[block][0]}[amd.com] single-op graph."
    return build


#: Registry of the golden graphs (G18 split into its five single-op graphs).
GOLDEN: dict[str, Callable[..., onnx.ModelProto]] = {
    "G1": g1,
    "G2": g2,
    "G3": g3,
    "G4": g4,
    "G5": g5,
    "G6": g6,
    "G7": g7,
    "G8": g8,
    "G9": g9,
    "G10": g10,
    "G11": g11,
    "G12": g12,
    "G13": g13,
    "G14": g14,
    "G15": g15,
    "G16": g16,
    "G17": g17,
    **{f"G18-{block}": _g18_block(block) for block in _G18},
    "G19": g19,
    "G20": g20,
}
