"""MatMul, Gemm and npudispatch.MatMulBias with bf16 compute, on tiled constant weights.

The framework they share with MatMulNBits and QMatMul (weight tiling and striping, the launch, the
kernel, the matching helpers) is :mod:`npudispatch.operators.tiled_matmul`; its public names are
re-exported here for the modules that import them from ``operators.matmul``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    ShapeConstraints,
    TensorSpec,
    const_array,
    node_config,
    tensor_spec,
)
from npudispatch.operators.dtypes import F32, mac_operand
from npudispatch.operators.tiled_matmul import (
    MAX_WEIGHT_STRIPES,
    N_GRANULE,
    STEP_MAX,
    VARIANT_ACT,
    VARIANT_CONST,
    WRAP_MAX,
    TiledMatMul,
    TiledOperands,
    _check_float,
    attr_value,
    bias_part,
    emit_launch,
    fit,
    match_activation,
    match_weight,
    output_spec,
    real_dim,
    view,
    weight_streams,
    weight_stripes,
)
from npudispatch.operators.weights import TileLayout, bf16_layout, format_bf16

# ---------------------------------------------------------------------------------------------
# Operators


class MatMul(TiledMatMul):
    """ONNX MatMul: constant 2-d B (tiled bf16 weights) or two activations (batched, broadcast)."""

    op_type = "MatMul"
    kernel_id = 100

    def match(self, node: ir.Node) -> OpConfig | Decline:
        """Float32/bf16 A; B constant 2-d, or an activation of the same dtype."""
        a = match_activation(node, 0, "input A")
        b_val = node.inputs[1] if len(node.inputs) > 1 else None
        b = Decline.check(tensor_spec(b_val, "input B"))
        out = output_spec(node, a.dtype)
        b_arr = const_array(b_val)
        if b_arr is None:
            if b.dtype != a.dtype:
                return Decline(
                    f"A is {a.dtype} but B is {b.dtype}: both activations need one dtype"
                )
            if len(a.shape) < 2 or len(b.shape) < 2:
                return Decline("two-activation MatMul needs rank >= 2 operands")
            extra = {"variant": VARIANT_ACT, "K": real_dim(a, -1), "N": real_dim(b, -1)}
            return node_config(self, node, [a, b], [out], attrs={}, extra=extra)
        _check_float(b, "input B")
        if b_arr.ndim != 2:
            return Decline(f"constant B has rank {b_arr.ndim}; only 2-d constant weights are tiled")
        k, n = b_arr.shape
        if real_dim(a, -1) != k:
            return Decline(f"A's last axis is {real_dim(a, -1)} but B has K={k}")
        extra = {"variant": VARIANT_CONST, "K": k, "N": n}
        return node_config(self, node, [a, b], [out], consts={1: b_arr}, attrs={}, extra=extra)

    def layout(self, cfg: OpConfig) -> TileLayout:
        """bf16 tiles of B (float32 in float32 compute)."""
        return bf16_layout(cfg.extra["K"], cfg.extra["N"], fp32=cfg.fp32_compute)

    def stripes(self, cfg: OpConfig) -> int:
        """No weight image in the two-activation variant."""
        return 1 if cfg.extra["variant"] == VARIANT_ACT else super().stripes(cfg)

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """bf16 weight image (nothing for two activations)."""
        if cfg.extra["variant"] == VARIANT_ACT:
            return []
        return [format_bf16(cfg.consts[1], fp32=cfg.fp32_compute)]

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """``[variant, K, N, stripes, 0]``."""
        return [cfg.extra["variant"], cfg.extra["K"], cfg.extra["N"], self.stripes(cfg), 0]

    def compute_tiled(self, t: TiledOperands) -> list[np.ndarray]:
        """Const weights: the tiled kernel; two activations: batched bf16 ``np.matmul``."""
        if t.dims[0] != VARIANT_ACT:
            return super().compute_tiled(t)
        a_spec = t.table.inputs[0][1]
        assert a_spec is not None
        k = real_dim(a_spec, -1)  # padded K lanes are zeros in both operands; crop anyway
        a, b = t.acts[0][..., :k], t.acts[1][..., :k, :]
        return t.store_output(np.matmul(mac_operand(a), mac_operand(b)))

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """``A @ B`` in float32."""
        y = np.matmul(np.asarray(inputs[0], F32), np.asarray(inputs[1], F32))
        return [y.astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Two activations: K tied between A and B, N tied between B and Y; else the default."""
        if cfg.extra["variant"] != VARIANT_ACT:
            return super().granularity(cfg)
        ra, rb, ry = (len(s.shape) for s in (cfg.inputs[0], cfg.inputs[1], cfg.outputs[0]))  # type: ignore[union-attr]
        return ShapeConstraints(
            inputs=((1,) * ra, (*(1,) * (rb - 1), N_GRANULE)),
            outputs=((*(1,) * (ry - 1), N_GRANULE),),
            tied=(
                (("in", 0, ra - 1), ("in", 1, rb - 2)),
                (("in", 1, rb - 1), ("out", 0, ry - 1)),
            ),
        )


class MatMulBias(TiledMatMul):
    """npudispatch.MatMulBias(A, B, bias) = A @ B + bias; B [K, N] and bias [N] constant."""

    domain = "npudispatch"
    op_type = "MatMulBias"
    kernel_id = 102

    def match(self, node: ir.Node) -> OpConfig | Decline:
        """Float A, constant 2-d B, constant bias of N elements."""
        a = match_activation(node, 0, "input A")
        b_spec, b_arr = match_weight(node, 1, "weight B")
        k, n = b_arr.shape
        bias_val = node.inputs[2] if len(node.inputs) > 2 else None
        bias = const_array(bias_val)
        if bias is None:
            return Decline("bias is missing or not a constant initializer")
        if bias.size != n:
            return Decline(f"bias has {bias.size} elements, expected N={n}")
        if real_dim(a, -1) != k:
            return Decline(f"A's last axis is {real_dim(a, -1)} but B has K={k}")
        out = output_spec(node, a.dtype)
        bias_spec = Decline.check(tensor_spec(bias_val, "bias"))
        return node_config(
            self, node, [a, b_spec, bias_spec], [out], consts={1: b_arr, 2: bias.reshape(-1)},
            attrs={}, extra={"K": k, "N": n, "bias_rows": 1},
        )  # fmt: skip

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """bf16 weight image, float32 bias."""
        w = format_bf16(cfg.consts[1], fp32=cfg.fp32_compute)
        return [w, bias_part(cfg.consts[2], cfg.extra["N"])]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """``A @ B + bias`` in float32."""
        a, b, bias = (np.asarray(x, F32) for x in inputs)
        return [(np.matmul(a, b) + bias).astype(cfg.outputs[0].dtype)]


class Gemm(TiledMatMul):
    """ONNX Gemm: ``alpha · A' @ B' + beta · C`` with constant B (and C), transA/transB."""

    op_type = "Gemm"
    kernel_id = 101

    def match(self, node: ir.Node) -> OpConfig | Decline:
        """2-d float A, constant B; optional constant C broadcastable to [M, N]."""
        a = match_activation(node, 0, "input A")
        if len(a.shape) != 2:
            return Decline(f"Gemm input A must be 2-d, got shape {a.shape}")
        b_spec, b_arr = match_weight(node, 1, "weight B")
        trans_a, trans_b = int(attr_value(node, "transA", 0)), int(attr_value(node, "transB", 0))
        alpha, beta = float(attr_value(node, "alpha", 1.0)), float(attr_value(node, "beta", 1.0))
        if trans_a and a.real_shape is not None and a.real_shape != a.shape:
            return Decline("transA with a padded input A is not supported")
        m, k_a = a.logical_shape[::-1] if trans_a else a.logical_shape
        k, n = b_arr.shape[::-1] if trans_b else b_arr.shape
        if k_a != k:
            return Decline(f"A' has K={k_a} but B' has K={k}")
        inputs: list[TensorSpec | None] = [a, b_spec]
        consts: dict[int, np.ndarray] = {1: b_arr}
        c_val = node.inputs[2] if len(node.inputs) > 2 else None
        bias_rows = 0
        if c_val is not None:
            c = const_array(c_val)
            c_spec = tensor_spec(c_val, "input C")
            if c is None or isinstance(c_spec, Decline):
                return Decline("input C must be a constant initializer")
            try:
                np.broadcast_shapes(c.shape, (m, n))
            except ValueError:
                return Decline(f"input C of shape {c.shape} does not broadcast to [{m}, {n}]")
            bias_rows = 1 if c.ndim < 2 or c.shape[0] == 1 else m
            inputs.append(c_spec)
            consts[2] = c
        out = output_spec(node, a.dtype)
        attrs = {"alpha": alpha, "beta": beta, "transA": trans_a, "transB": trans_b}
        extra = {"K": k, "N": n, "M": m, "alpha": alpha, "bias_rows": bias_rows}
        return node_config(self, node, inputs, [out], consts=consts, attrs=attrs, extra=extra)

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """bf16 image of B', then ``beta · C`` as float32 ``[rows, Np]`` if C is given."""
        parts = [
            format_bf16(cfg.consts[1], n_major=bool(cfg.attrs["transB"]), fp32=cfg.fp32_compute)
        ]
        rows = cfg.extra["bias_rows"]
        if rows:
            n, m = cfg.extra["N"], cfg.extra["M"]
            c = np.broadcast_to(np.asarray(cfg.consts[2], F32), (m, n))[:rows]
            parts.append(bias_part(np.float32(cfg.attrs["beta"]) * c, n, rows))
        return parts

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """``[0, K, N, stripes, bias_rows, transA]``."""
        return [*super().op_dims(cfg), int(cfg.attrs["transA"])]

    def trans_a(self, dims: list[int]) -> bool:
        """dims[5] = transA."""
        return bool(dims[5])

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """ONNX Gemm in float32."""
        a = np.asarray(inputs[0], F32)
        b = np.asarray(inputs[1], F32)
        a = a.T if cfg.attrs["transA"] else a
        b = b.T if cfg.attrs["transB"] else b
        y = np.float32(cfg.attrs["alpha"]) * (a @ b)
        if len(inputs) > 2 and inputs[2] is not None:
            y = y + np.float32(cfg.attrs["beta"]) * np.asarray(inputs[2], F32)
        return [y.astype(cfg.outputs[0].dtype)]


__all__ = [
    "MAX_WEIGHT_STRIPES",
    "N_GRANULE",
    "STEP_MAX",
    "VARIANT_ACT",
    "VARIANT_CONST",
    "WRAP_MAX",
    "Gemm",
    "MatMul",
    "MatMulBias",
    "TiledMatMul",
    "TiledOperands",
    "attr_value",
    "bias_part",
    "emit_launch",
    "fit",
    "match_activation",
    "match_weight",
    "output_spec",
    "real_dim",
    "view",
    "weight_streams",
    "weight_stripes",
]
