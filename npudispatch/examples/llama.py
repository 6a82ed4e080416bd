"""A standard-ONNX llama2 MLP with 4-bit ``com.microsoft.MatMulNBits`` weights (runs in onnxruntime).

``Y = down(silu(gate(X)) * up(X))`` with SiLU written as exporters write it (``x * Sigmoid(x)``).

MatMulNBits layout (onnxruntime contrib op, domain ``com.microsoft`` version 1), for a weight
``W[K, N]`` quantised in blocks of ``block_size`` along K, ``n_blocks = ceil(K / block_size)``:

* ``B``: uint8 ``[N, n_blocks, block_size / 2]``, two 4-bit codes per byte, low nibble first;
* ``scales``: float32 ``[N * n_blocks]``;
* ``zero_points`` (optional): uint8 ``[N * ceil(n_blocks / 2)]``, two 4-bit zero points per byte
  along the blocks of one row, low nibble first; absent means 8;
* attributes ``K``, ``N``, ``bits`` (4), ``block_size``; ``W[k, n] = (code - zp) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "IR_VERSION",
    "OPSET",
    "QuantizedWeight",
    "dequantize",
    "llama2_mlp",
    "llama2_mlp_small",
    "random_quantized_weight",
]

IR_VERSION = 10
OPSET = 21


@dataclass(frozen=True)
class QuantizedWeight:
    """A ``W[K, N]`` weight in MatMulNBits form (see the module docstring)."""

    k: int
    n: int
    block_size: int
    b: np.ndarray  # uint8 [N, n_blocks, block_size // 2]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks / 2)] or None (= 8)

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes along the last axis, low nibble first (odd lengths padded with 0)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), codes.dtype)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return codes[..., :count]


def random_quantized_weight(
    rng: np.random.Generator,
    k: int,
    n: int,
    block_size: int = 128,
    zero_points: bool = True,
) -> QuantizedWeight:
    """Seeded random 4-bit weight: codes uniform in [0, 16), scales ~ 1/sqrt(K) keep outputs O(1)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    n_blocks = -(-k // block_size)
    codes = rng.integers(0, 16, size=(n, n_blocks, block_size), dtype=np.uint8)
    codes[:, -1, k - (n_blocks - 1) * block_size :] = 0  # padding past K
    scale = np.float32(0.5 / np.sqrt(k))
    scales = (rng.uniform(0.5, 1.5, size=n * n_blocks) * scale).astype(np.float32)
    zp = None
    if zero_points:
        zp_codes = rng.integers(6, 10, size=(n, n_blocks), dtype=np.uint8)
        zp = _pack_nibbles(zp_codes).reshape(-1)
    return QuantizedWeight(k, n, block_size, _pack_nibbles(codes), scales, zp)


def dequantize(w: QuantizedWeight) -> np.ndarray:
    """The float32 ``W[K, N]`` that MatMulNBits multiplies by (numpy reference)."""
    codes = _unpack_nibbles(w.b, w.block_size).astype(np.float32)  # [N, nb, bs]
    if w.zero_points is None:
        zp = np.full((w.n, w.n_blocks), 8.0, np.float32)
    else:
        zp = _unpack_nibbles(w.zero_points.reshape(w.n, -1), w.n_blocks).astype(np.float32)
    scales = w.scales.reshape(w.n, w.n_blocks)
    full = (codes - zp[..., None]) * scales[..., None]
    return full.reshape(w.n, -1)[:, : w.k].T.copy()


def _matmul_nbits(
    name: str, x: str, y: str, w: QuantizedWeight, inits: list[onnx.TensorProto]
) -> onnx.NodeProto:
    inputs = [x, f"{name}.qweight", f"{name}.scales"]
    inits.append(numpy_helper.from_array(w.b, inputs[1]))
    inits.append(numpy_helper.from_array(w.scales, inputs[2]))
    if w.zero_points is not None:
        inputs.append(f"{name}.qzeros")
        inits.append(numpy_helper.from_array(w.zero_points, inputs[3]))
    return helper.make_node(
        "MatMulNBits",
        inputs,
        [y],
        name=f"/mlp/{name}/MatMulNBits",
        domain="com.microsoft",
        K=w.k,
        N=w.n,
        bits=4,
        block_size=w.block_size,
    )


def llama2_mlp(
    *,
    hidden: int = 4096,
    intermediate: int = 11008,
    m: int = 1,
    block_size: int = 128,
    zero_points: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """llama2 MLP ``X float32[1, m, hidden] -> Y float32[1, m, hidden]`` with 4-bit weights.

    Nodes: gate/up ``MatMulNBits``, ``Sigmoid`` + ``Mul`` (SiLU), ``Mul``, down ``MatMulNBits``.
    IR version 10, opsets ai.onnx 21 and com.microsoft 1; MatMulNBits outputs carry value_info
    (onnx shape inference does not know contrib ops).
    """
    rng = np.random.default_rng(seed)
    gate = random_quantized_weight(rng, hidden, intermediate, block_size, zero_points)
    up = random_quantized_weight(rng, hidden, intermediate, block_size, zero_points)
    down = random_quantized_weight(rng, intermediate, hidden, block_size, zero_points)
    inits: list[onnx.TensorProto] = []
    g, u = "/mlp/gate_proj/output_0", "/mlp/up_proj/output_0"
    sig, silu, act = "/mlp/act_fn/Sigmoid_output_0", "/mlp/act_fn/Mul_output_0", "/mlp/Mul_output_0"
    nodes = [
        _matmul_nbits("gate_proj", "X", g, gate, inits),
        _matmul_nbits("up_proj", "X", u, up, inits),
        helper.make_node("Sigmoid", [g], [sig], name="/mlp/act_fn/Sigmoid"),
        helper.make_node("Mul", [g, sig], [silu], name="/mlp/act_fn/Mul"),
        helper.make_node("Mul", [silu, u], [act], name="/mlp/Mul"),
        _matmul_nbits("down_proj", act, "Y", down, inits),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "llama2_mlp",
        [helper.make_tensor_value_info("X", f32, [1, m, hidden])],
        [helper.make_tensor_value_info("Y", f32, [1, m, hidden])],
        inits,
        value_info=[helper.make_tensor_value_info(v, f32, [1, m, intermediate]) for v in (g, u)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="npudispatch-examples",
    )
    model.ir_version = IR_VERSION
    return model


def llama2_mlp_small(**kw) -> onnx.ModelProto:
    """A small llama2 MLP for tests: hidden 256, intermediate 512, m 2, block size 32."""
    params = {"hidden": 256, "intermediate": 512, "m": 2, "block_size": 32} | kw
    return llama2_mlp(**params)
