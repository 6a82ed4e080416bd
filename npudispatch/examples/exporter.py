"""Exporter-style model builders: graphs shaped like ``torch.onnx.export`` output, for rewrite tests.

They reproduce what the fusions and the shape folder must cope with: ``/model/layers.0/mlp/...``
node names, ``Constant`` nodes for scalars, ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``
head splitting over a symbolic ``batch``/``sequence`` dim, decomposed RMSNorm
(Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul), ``x*Sigmoid(x)`` SiLU, erf GELU, MatMul + Add biases,
residual Adds and MatMul/Div/Add-mask/Softmax attention. float32, IR version 10.

Each builder returns an ``onnx.ModelProto`` (what an exporter writes) with inputs
``hidden_states [batch, sequence, hidden]`` and ``attention_mask`` (additive, float).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10


class _GraphBuilder:
    """Collects nodes/initializers with torch.onnx-like names (``/prefix/Op_3``, ``..._output_0``)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = rng
        self._counts: dict[str, int] = {}

    def op(self, scope: str, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        key = f"{scope}/{op_type}"
        k = self._counts.get(key, 0)
        self._counts[key] = k + 1
        name = f"{key}_{k}" if k else key
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0]

    def const(self, scope: str, value, dtype=np.float32) -> str:
        """A ``Constant`` node (torch exports scalars and shape pieces this way)."""
        arr = np.asarray(value, dtype=dtype)
        return self.op(scope, "Constant", [], value=numpy_helper.from_array(arr))

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.1) -> str:
        arr = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def ones_weight(self, name: str, n: int) -> str:
        arr = (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def dim(self, scope: str, x: str, axis: int) -> str:
        """``Unsqueeze(Gather(Shape(x), axis), [0])`` -> int64[1], the exporter's dynamic dim."""
        shape = self.op(scope, "Shape", [x])
        idx = self.const(scope, axis, np.int64)
        d = self.op(scope, "Gather", [shape, idx], axis=0)
        return self.op(scope, "Unsqueeze", [d, self.const(scope, [0], np.int64)])


def _split_heads(b: _GraphBuilder, scope: str, x: str, src: str, heads: int, head_dim: int) -> str:
    """[B, S, H] -> [B, heads, S, head_dim] via a runtime-computed Reshape target."""
    bdim, sdim = b.dim(scope, src, 0), b.dim(scope, src, 1)
    shape = b.op(
        scope,
        "Concat",
        [bdim, sdim, b.const(scope, [heads], np.int64), b.const(scope, [head_dim], np.int64)],
        axis=0,
    )
    return b.op(scope, "Transpose", [b.op(scope, "Reshape", [x, shape])], perm=[0, 2, 1, 3])


def _merge_heads(b: _GraphBuilder, scope: str, x: str, src: str, hidden: int) -> str:
    """[B, heads, S, head_dim] -> [B, S, H]."""
    t = b.op(scope, "Transpose", [x], perm=[0, 2, 1, 3])
    bdim, sdim = b.dim(scope, src, 0), b.dim(scope, src, 1)
    shape = b.op(scope, "Concat", [bdim, sdim, b.const(scope, [hidden], np.int64)], axis=0)
    return b.op(scope, "Reshape", [t, shape])


def _attention_core(
    b: _GraphBuilder, scope: str, q: str, k: str, v: str, mask: str, head_dim: int
) -> str:
    kt = b.op(scope, "Transpose", [k], perm=[0, 1, 3, 2])
    s = b.op(scope, "MatMul", [q, kt])
    s = b.op(scope, "Div", [s, b.const(scope, math.sqrt(head_dim))])
    s = b.op(scope, "Add", [s, mask])
    p = b.op(scope, "Softmax", [s], axis=-1)
    return b.op(scope, "MatMul", [p, v])


def _rms_norm(b: _GraphBuilder, scope: str, x: str, weight: str, eps: float, opset: int) -> str:
    x2 = b.op(scope, "Pow", [x, b.const(scope, 2.0)])
    if opset >= 18:
        ms = b.op(scope, "ReduceMean", [x2, b.const(scope, [-1], np.int64)], keepdims=1)
    else:
        ms = b.op(scope, "ReduceMean", [x2], axes=[-1], keepdims=1)
    d = b.op(scope, "Add", [ms, b.const(scope, eps)])
    r = b.op(scope, "Reciprocal", [b.op(scope, "Sqrt", [d])])
    n = b.op(scope, "Mul", [x, r])
    return b.op(scope, "Mul", [weight, n])


def _model(
    b: _GraphBuilder, name: str, hidden: int, out: str, mask_shape: list, opset: int, seq
) -> onnx.ModelProto:
    batch = "batch" if seq is None else 1
    s = "sequence" if seq is None else seq
    inputs = [
        helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [batch, s, hidden]),
        helper.make_tensor_value_info(
            "attention_mask",
            TensorProto.FLOAT,
            [batch if d == "B" else s if d == "S" else d for d in mask_shape],
        ),
    ]
    b.nodes.append(helper.make_node("Identity", [out], ["last_hidden_state"], name="/Identity"))
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, s, hidden])
    ]
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch"
    )
    model.ir_version = IR_VERSION
    return model


def llama_decoder_layer(
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 172,
    seq: int = 8,
    *,
    symbolic: bool = True,
    opset: int = 18,
    eps: float = 1e-6,
    seed: int = 0,
) -> onnx.ModelProto:
    """One Llama decoder layer (RMSNorm, MHA without RoPE, SiLU-gated MLP, two residual Adds).

    With ``symbolic`` the batch and sequence dims are ``"batch"``/``"sequence"`` (bind them, e.g.
    to ``{"batch": 1, "sequence": seq}``); otherwise they are ``1`` and ``seq``. ``opset`` 17 puts
    ReduceMean axes in an attribute, 18 in an input.
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not a multiple of heads={heads}")
    hd = hidden // heads
    b = _GraphBuilder(np.random.default_rng(seed))
    p = "/model/layers.0"
    x = "hidden_states"
    n1 = _rms_norm(
        b,
        f"{p}/input_layernorm",
        x,
        b.ones_weight("model.layers.0.input_layernorm.weight", hidden),
        eps,
        opset,
    )
    at = f"{p}/self_attn"
    q, k, v = (
        b.op(f"{at}/{n}_proj", "MatMul", [n1, b.weight(f"onnx::MatMul_{i}", (hidden, hidden))])
        for i, n in enumerate("qkv")
    )
    q, k, v = (_split_heads(b, at, t, x, heads, hd) for t in (q, k, v))
    ctx = _attention_core(b, at, q, k, v, "attention_mask", hd)
    ctx = _merge_heads(b, at, ctx, x, hidden)
    o = b.op(f"{at}/o_proj", "MatMul", [ctx, b.weight("onnx::MatMul_3", (hidden, hidden))])
    h1 = b.op(p, "Add", [x, o])
    n2 = _rms_norm(
        b,
        f"{p}/post_attention_layernorm",
        h1,
        b.ones_weight("model.layers.0.post_attention_layernorm.weight", hidden),
        eps,
        opset,
    )
    mlp = f"{p}/mlp"
    gate = b.op(
        f"{mlp}/gate_proj", "MatMul", [n2, b.weight("onnx::MatMul_4", (hidden, intermediate))]
    )
    up = b.op(f"{mlp}/up_proj", "MatMul", [n2, b.weight("onnx::MatMul_5", (hidden, intermediate))])
    silu = b.op(f"{mlp}/act_fn", "Mul", [gate, b.op(f"{mlp}/act_fn", "Sigmoid", [gate])])
    prod = b.op(mlp, "Mul", [silu, up])
    down = b.op(
        f"{mlp}/down_proj", "MatMul", [prod, b.weight("onnx::MatMul_6", (intermediate, hidden))]
    )
    out = b.op(p, "Add", [h1, down])
    return _model(
        b, "main_graph", hidden, out, ["B", 1, "S", "S"], opset, None if symbolic else seq
    )


def bert_encoder_layer(
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 256,
    seq: int = 8,
    *,
    symbolic: bool = True,
    opset: int = 17,
    eps: float = 1e-12,
    seed: int = 0,
) -> onnx.ModelProto:
    """One BERT encoder layer (biased projections, erf GELU, post-LayerNormalization residuals).

    Dims as in :func:`llama_decoder_layer`; ``attention_mask`` is ``[batch, 1, 1, sequence]``.
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not a multiple of heads={heads}")
    hd = hidden // heads
    b = _GraphBuilder(np.random.default_rng(seed))
    p = "/bert/encoder/layer.0"
    x = "hidden_states"

    def linear(scope: str, inp: str, k: int, n: int, wname: str) -> str:
        mm = b.op(scope, "MatMul", [inp, b.weight(f"onnx::MatMul_{wname}", (k, n))])
        return b.op(scope, "Add", [b.weight(f"{wname}.bias", (n,)), mm])

    at = f"{p}/attention/self"
    q, k, v = (linear(f"{at}/{n}", x, hidden, hidden, f"l0.{n}") for n in ("query", "key", "value"))
    q, k, v = (_split_heads(b, at, t, x, heads, hd) for t in (q, k, v))
    ctx = _merge_heads(b, at, _attention_core(b, at, q, k, v, "attention_mask", hd), x, hidden)
    dense = linear(f"{p}/attention/output/dense", ctx, hidden, hidden, "l0.attn_out")
    h1 = b.op(f"{p}/attention/output", "Add", [dense, x])
    h1 = b.op(
        f"{p}/attention/output/LayerNorm",
        "LayerNormalization",
        [h1, b.ones_weight("l0.ln1.weight", hidden), b.weight("l0.ln1.bias", (hidden,))],
        axis=-1,
        epsilon=eps,
    )
    ff = linear(f"{p}/intermediate/dense", h1, hidden, intermediate, "l0.ff1")
    g = f"{p}/intermediate/intermediate_act_fn"
    e = b.op(g, "Erf", [b.op(g, "Div", [ff, b.const(g, 1.4142135381698608)])])
    gelu = b.op(
        g, "Mul", [b.op(g, "Mul", [ff, b.op(g, "Add", [e, b.const(g, 1.0)])]), b.const(g, 0.5)]
    )
    ff2 = linear(f"{p}/output/dense", gelu, intermediate, hidden, "l0.ff2")
    h2 = b.op(f"{p}/output", "Add", [ff2, h1])
    out = b.op(
        f"{p}/output/LayerNorm",
        "LayerNormalization",
        [h2, b.ones_weight("l0.ln2.weight", hidden), b.weight("l0.ln2.bias", (hidden,))],
        axis=-1,
        epsilon=eps,
    )
    return _model(b, "main_graph", hidden, out, ["B", 1, 1, "S"], opset, None if symbolic else seq)


__all__ = ["bert_encoder_layer", "llama_decoder_layer"]
