"""The float32 middle step of the quantized fused ops (:mod:`npudispatch.operators.qdq_fused`):
each wrapped op's math on dequantized operands, computed as onnxruntime's float32 CPU kernels
order it where that decides a rounding boundary (BatchNormalization's ``x * a + b``).

``fn(dequantized inputs, dims, floats) -> result``; ``dims`` and ``floats`` are the stage's
record fields (:func:`npudispatch.operators.qdq_fused.stage_dims`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from npudispatch.operators.conv import format_weights
from npudispatch.operators.conv_kernel import conv_core
from npudispatch.operators.dtypes import F32
from npudispatch.operators.pool import pool
from npudispatch.operators.unary import erf, softplus
from npudispatch.operators.window import Window

__all__ = ["FLOAT_OPS", "STAGE_FLOATS", "float_op"]


def _binary(ufunc: np.ufunc) -> Callable:
    def fn(xs, dims, floats):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return ufunc(xs[0], xs[1])

    return fn


def _unary(f: Callable[[np.ndarray], np.ndarray]) -> Callable:
    def fn(xs, dims, floats):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return f(xs[0])

    return fn


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (F32.type(1) / (F32.type(1) + np.exp(-x))).astype(F32)


def _softmax(xs, dims, floats):
    """Opset-13 Softmax along one axis, float32."""
    x, axis = xs[0], dims[0]
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True, dtype=F32)


def _reduce_mean(xs, dims, floats):
    keepdims, axes = dims[0], tuple(dims[1:])
    return np.mean(xs[0], axis=axes, keepdims=bool(keepdims), dtype=F32)


def _layer_norm(xs, dims, floats):
    x, scale, bias = xs
    axes = tuple(range(dims[0], x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True, dtype=F32)
    d = x - mean
    var = np.mean(d * d, axis=axes, keepdims=True, dtype=F32)
    return d / np.sqrt(var + F32.type(floats[0])) * scale + bias


def _conv(xs, dims, floats):
    """Conv with bias in float32: dims ``[group, r, *kernel, *strides, *dilations, *pads_begin,
    *pads_end]``; the window gather and per-group matmul of the Conv operator, without bf16,
    then the bias added per output channel."""
    x, w, b = xs
    group, r = dims[0], dims[1]
    k, st, dl, pb, pe = (tuple(dims[2 + i * r : 2 + (i + 1) * r]) for i in range(5))
    m = w.shape[0]
    weights = w.reshape(group, m // group, -1)
    y = conv_core(x, weights, Window(k, st, dl, pb, pe), (1,) * r)
    return y + b.reshape((1, m) + (1,) * r)


def _conv_transpose(xs, dims, floats):
    """ConvTranspose with bias in float32 as the Conv operator computes it: the stride-1
    convolution of the zero-inserted input with the flipped, channel-swapped weight; dims
    ``[group, r, *kernel, *dilations, *pads_begin, *pads_end, *upsample]`` of that convolution."""
    x, w, b = xs
    group, r = dims[0], dims[1]
    k, dl, pb, pe, up = (tuple(dims[2 + i * r : 2 + (i + 1) * r]) for i in range(5))
    weights = format_weights(w, group, transpose=True, fp32=True)[
        ..., : w.shape[0] // group * math.prod(k)
    ]
    y = conv_core(x, weights, Window(k, (1,) * r, dl, pb, pe), up)
    return y + b.reshape((1, -1) + (1,) * r)


def _gemm(xs, dims, floats):
    a, b, c = xs
    trans_a, trans_b = dims
    alpha, beta = (F32.type(f) for f in floats)
    y = np.matmul(a.T if trans_a else a, b.T if trans_b else b)
    return alpha * y + beta * c


def _batch_norm(xs, dims, floats):
    """Inference BatchNormalization in onnxruntime's float32 order: per channel
    ``a = scale / sqrt(var + eps)`` (as ``1 / sqrt`` times scale) and ``b = B - mean * a``,
    then ``x * a + b``. The textbook ``(x - mean) * a + B`` rounds differently and put ~0.1 %
    of A16W8 elements one step away from onnxruntime's QDQ run."""
    x, scale, bias, mean, var = xs
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = F32.type(1) / np.sqrt(var + F32.type(floats[0]))
    a = inv * scale
    b = bias - mean * a
    return x * a.reshape(shape) + b.reshape(shape)


def _pool(xs, dims, floats):
    """dims ``[kind, ceil_mode, count_include_pad, r, *kernel, *strides, *dilations,
    *pads_begin, *pads_end]`` (kinds of :mod:`.pool`)."""
    kind, ceil, include, r = dims[:4]
    k, st, dl, pb, pe = (tuple(dims[4 + i * r : 4 + (i + 1) * r]) for i in range(5))
    return pool(xs[0], kind, Window(k, st, dl, pb, pe), bool(ceil), bool(include))


def _global_average_pool(xs, dims, floats):
    x = xs[0]
    return np.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True, dtype=F32)


def _hard_sigmoid(xs, dims, floats):
    alpha, beta = (F32.type(f) for f in floats)
    return np.clip(alpha * xs[0] + beta, F32.type(0), F32.type(1))


def _hard_swish(xs, dims, floats):
    x = xs[0]
    return x * np.clip(x * F32.type(1 / 6) + F32.type(0.5), F32.type(0), F32.type(1))


def _leaky_relu(xs, dims, floats):
    x = xs[0]
    return np.where(x >= 0, x, F32.type(floats[0]) * x)


#: The float32 math of each wrapped op: ``fn(dequantized inputs, dims, floats) -> result``.
FLOAT_OPS: dict[str, Callable] = {
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
    "Pow": _binary(np.power),
    "MatMul": lambda xs, d, f: np.matmul(xs[0], xs[1]),
    "Identity": _unary(lambda x: x),
    "Sigmoid": _unary(_sigmoid),
    "Tanh": _unary(np.tanh),
    "Relu": _unary(lambda x: np.maximum(x, F32.type(0))),
    "Erf": _unary(lambda x: erf(x).astype(F32)),
    "Exp": _unary(np.exp),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(lambda x: F32.type(1) / x),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Softplus": _unary(lambda x: softplus(x).astype(F32)),
    "Softmax": _softmax,
    "Transpose": lambda xs, d, f: np.transpose(xs[0], d),
    "ReduceMean": _reduce_mean,
    "LayerNormalization": _layer_norm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "BatchNormalization": _batch_norm,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "LeakyRelu": _leaky_relu,
}

#: Record floats each op reads (attribute values), in this order.
STAGE_FLOATS: dict[str, tuple[tuple[str, float], ...]] = {
    "LayerNormalization": (("epsilon", 1e-5),),
    "Gemm": (("alpha", 1.0), ("beta", 1.0)),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
    "LeakyRelu": (("alpha", 0.01),),
    "BatchNormalization": (("epsilon", 1e-5),),
}


def float_op(inner: str, xs: list[np.ndarray], dims: list[int], floats: list[float]) -> np.ndarray:
    """``inner`` computed in float32 on dequantized operands (the fused kernels' middle step)."""
    return np.asarray(FLOAT_OPS[inner]([np.asarray(x, F32) for x in xs], dims, floats), F32)
