"""MatMul, Gemm and npudispatch.MatMulBias with bf16 compute, on tiled constant weights.

Two kernels share this module:

* **const-weight matmul** (:class:`TiledMatMul` and its subclasses, also the base of MatMulNBits
  and QMatMul): the weight ``W[K, N]`` is formatted once into a tile image
  (:mod:`npudispatch.operators.weights`: 128 x 64 subvolumes, N-block major) and sits in the op's
  const region followed by "extra" parts (bias, quantization coefficients), each 4-byte aligned.
* **two-activation MatMul** (attention ``Q·K^T``, batched with broadcasting): both operands are
  streamed as they lie in their buffers.

Launch (overlay protocol, :mod:`npudispatch.overlay_abi`): params on col0 MM2S0; operands in stream
order — activations, the weight image, then each extra part. The weight image is **striped** over
up to :data:`MAX_WEIGHT_STRIPES` channels the way AMD's mladf GEMM does: stripe ``c`` gathers
N-blocks ``c, c+S, c+2S, ...`` with one n-d BD (d0/d1 walk one contiguous N-block column, d2 steps
``S`` columns), so the kernel receives the columns in :func:`weights.stripe_order`. The stripe
count depends only on the weight geometry (it is written into the params record), never on the
number of columns: when there are fewer operand channels than streams, the surplus streams chain
as extra BDs on the last channel. Outputs are split linearly over the S2MM channels.

Params record ``dims``: ``[variant, K, N, stripes, bias_rows]`` (variant 0 = const weights,
1 = two activations); payload = tensor table + ``[alpha]``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch.errors import DeviceError, PlanError
from npudispatch.operators import dma, records
from npudispatch.operators.base import (
    ArgKind,
    ArgSpec,
    Decline,
    OpConfig,
    Operator,
    ShapeConstraints,
    TensorSpec,
    const_array,
    node_config,
    round_up,
    tensor_spec,
)
from npudispatch.operators.dtypes import F32, FLOAT_DTYPES, store, to_compute
from npudispatch.operators.weights import (
    TileLayout,
    bf16_layout,
    decode_bf16,
    format_bf16,
)
from npudispatch.overlay_abi import (
    PARAMS_CHANNEL,
    ParamsRecord,
    operand_channels,
    output_channels,
)
from npudispatch.txn.registers import ShimChannel

MAX_WEIGHT_STRIPES = 5  # 4 columns give 7 operand channels: activation, 5 weight stripes, extras
WRAP_MAX = dma.MAX_WRAP
STEP_MAX = dma.MAX_STEP
N_GRANULE = 8  # output N is padded to whole 8-lane bf16 vectors

VARIANT_CONST, VARIANT_ACT = 0, 1


# ---------------------------------------------------------------------------------------------
# DMA planning: striped weight streams and the launch


def _split_words(words: int) -> tuple[int, int] | None:
    """``(n0, n1)`` with ``n0 · n1 == words`` and both within the 10-bit wrap (largest ``n0``)."""
    for n0 in range(min(words, WRAP_MAX), 0, -1):
        if words % n0 == 0 and words // n0 <= WRAP_MAX:
            return n0, words // n0
    return None


def weight_stripes(layout: TileLayout) -> int:
    """How many channels the weight image is striped over (1 = one linear stream).

    The largest ``S <= MAX_WEIGHT_STRIPES`` (and ``<= n_blocks``) whose gather pattern fits the BD
    fields: one N-block column of ``X`` words as ``d0 x d1`` wraps, and a d2 step of ``S·X``.
    """
    col_words = layout.column_bytes // 4
    if _split_words(col_words) is None:
        return 1
    best = 1
    for s in range(2, min(MAX_WEIGHT_STRIPES, layout.n_blocks) + 1):
        if s * col_words <= STEP_MAX:
            best = s
    return best


def weight_streams(argidx: int, offset: int, layout: TileLayout, stripes: int) -> list[dma.Stream]:
    """The weight image as ``stripes`` DMA streams (n-d gathers), in stream order."""
    col_bytes = layout.column_bytes
    if stripes == 1:
        return [dma.Stream(argidx, offset, layout.nbytes)]
    split = _split_words(col_bytes // 4)
    if split is None:
        raise PlanError(f"weight column of {col_bytes} B cannot be one d0 x d1 BD pattern")
    n0, n1 = split
    out = []
    for c in range(stripes):
        count = len(range(c, layout.n_blocks, stripes))
        start = offset + c * col_bytes
        if count == 1:
            out.append(dma.Stream(argidx, start, col_bytes))
        else:
            pattern = dma.Pattern(n0, 1, n1, n0, stripes * col_bytes // 4)
            out.append(dma.Stream(argidx, start, count * col_bytes, pattern))
    return out


def emit_launch(
    builder: Any,
    *,
    params: dma.Stream,
    operands: Sequence[dma.Stream],
    outputs: Sequence[dma.Stream],
    num_cols: int,
) -> dict[ShimChannel, list[tuple[dma.Stream, int, int]]]:
    """Append one overlay launch to ``builder``: every operand stream whole on its own channel.

    Stream ``i`` goes to operand channel ``min(i, channels - 1)`` — surplus streams chain as extra
    BDs on the last channel, so the concatenated operand stream keeps its order for any column
    count. Outputs are striped linearly by :func:`dma.stripe`. Receivers are queued first. Returns
    the per-channel pieces ``(stream, start, nbytes)``.
    """
    if num_cols < 1:
        raise PlanError(f"num_cols must be >= 1, got {num_cols}")
    runs = dma.stripe(list(outputs), output_channels(num_cols))
    runs[PARAMS_CHANNEL] = [dma.Piece(params, 0, params.nbytes)]
    chans = operand_channels(num_cols)
    for i, s in enumerate(x for x in operands if x.nbytes):
        runs.setdefault(chans[min(i, len(chans) - 1)], []).append(dma.Piece(s, 0, s.nbytes))
    dma.program(
        builder,
        runs,
        what="matmul launch",
        hint="use more columns (num_cols) for this operator",
    )
    return {chan: [(p.stream, p.start, p.nbytes) for p in pieces] for chan, pieces in runs.items()}


# ---------------------------------------------------------------------------------------------
# Shared helpers


def view(data: Any, spec: TensorSpec, what: str) -> np.ndarray:
    """Operand bytes as the typed, shaped tensor ``spec`` (DeviceError if the stream is short)."""
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if buf.size < spec.nbytes:
        raise DeviceError(f"{what}: stream has {buf.size} B, tensor needs {spec.nbytes}")
    return buf[: spec.nbytes].view(spec.dtype).reshape(spec.shape)


def fit(y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``y`` placed into zeros of ``shape`` (crop or zero-extend every axis; same rank)."""
    if y.shape == shape:
        return y
    out = np.zeros(shape, dtype=y.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(y.shape, shape))
    out[region] = y[region]
    return out


def real_dim(spec: TensorSpec, axis: int) -> int:
    """Real (unpadded) size of ``axis`` of ``spec``."""
    return spec.logical_shape[axis]


def _check_float(spec: TensorSpec, what: str) -> Decline | None:
    if spec.dtype not in FLOAT_DTYPES:
        return Decline(f"{what} has dtype {spec.dtype}; NPU matmul takes float32 or bfloat16")
    return None


@dataclass(frozen=True)
class TiledOperands:
    """One launch of a const-weight matmul kernel, decoded: what :meth:`TiledMatMul.compute_tiled`
    works from.

    ``acts``: activation tensors by node input index; ``parts``: the const parts as uint8 (weight
    image first); ``dims``: the record dims ``[variant, K, N, stripes, bias_rows, *op-specific]``,
    whose first five are also unpacked into the fields below; ``floats``: the record floats.
    """

    table: records.Table
    acts: dict[int, np.ndarray]
    parts: list[np.ndarray]
    dims: list[int]
    floats: list[float]
    k: int
    n: int
    stripes: int
    bias_rows: int  # rows of the float32 bias part, 0 = no bias

    @property
    def out(self) -> TensorSpec:
        """Spec of output 0."""
        return self.table.outputs[0]

    def store_output(self, y: np.ndarray) -> list[np.ndarray]:
        """Float result ``y`` fitted to output 0's padded shape, rounded to its dtype."""
        return [store(fit(y, self.out.shape), self.out.dtype)]


class TiledMatMul(Operator):
    """Base of the const-weight matmul family: tiled weights + extra const parts, striped DMA.

    Subclasses implement :meth:`layout`, :meth:`const_parts` (weight image first) and
    :meth:`compute_tiled`; :meth:`match` fills ``cfg.extra`` with at least ``K``, ``N``.
    """

    # ---- geometry / consts ------------------------------------------------------------------
    def layout(self, cfg: OpConfig) -> TileLayout:
        """Tile layout of the weight image."""
        return bf16_layout(cfg.extra["K"], cfg.extra["N"])

    def stripes(self, cfg: OpConfig) -> int:
        """Weight stripe count (depends on the weight geometry only)."""
        return weight_stripes(self.layout(cfg))

    @abstractmethod
    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """The const region as uint8 parts, weight image first (each becomes one operand)."""

    def _parts(self, cfg: OpConfig) -> list[np.ndarray]:
        # Formatting can take a while for big weights: do it once per config.
        if "const_parts" not in cfg.extra:
            cfg.extra["const_parts"] = [
                np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in self.const_parts(cfg)
            ]
        return cfg.extra["const_parts"]

    def format_consts(self, cfg: OpConfig) -> bytes:
        """Weight image then extra parts, each padded to 4 bytes."""
        return records.pack_consts(self._parts(cfg))

    def part_offsets(self, cfg: OpConfig) -> list[tuple[int, int]]:
        """``(offset, padded nbytes)`` of each const part inside the region."""
        out, off = [], 0
        for p in self._parts(cfg):
            size = round_up(p.size)
            out.append((off, size))
            off += size
        return out

    def const_region_bytes(self, cfg: OpConfig) -> int:
        """The parts' padded sizes (no need to concatenate the weight image)."""
        return sum(size for _, size in self.part_offsets(cfg))

    # ---- record / transaction ---------------------------------------------------------------
    def operand_streams(self, cfg: OpConfig, args: Sequence[ArgSpec]) -> list[dma.Stream]:
        """Operand streams in order: activations, striped weight image, extra parts."""
        streams = [
            dma.Stream(a.local_argidx, a.offset, a.nbytes) for a in args if a.kind == ArgKind.INPUT
        ]
        const = next((a for a in args if a.kind == ArgKind.CONST), None)
        if const is not None:
            offsets = self.part_offsets(cfg)
            streams += weight_streams(
                const.local_argidx, const.offset, self.layout(cfg), self.stripes(cfg)
            )
            streams += [
                dma.Stream(const.local_argidx, const.offset + off, size)
                for off, size in offsets[1:]
            ]
        return streams

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """``[variant, K, N, stripes, bias_rows]``."""
        return [
            VARIANT_CONST,
            cfg.extra["K"],
            cfg.extra["N"],
            self.stripes(cfg),
            cfg.extra.get("bias_rows", 0),
        ]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        """``[alpha]``."""
        return [float(cfg.extra.get("alpha", 1.0))]

    def params_record(self, cfg: OpConfig) -> ParamsRecord:
        """Header with one operand per activation, the weight image and each extra part."""
        io = self.io_buffers(cfg)
        return self.build_record(
            cfg,
            operand_bytes=[a.nbytes for a in io if a.kind == ArgKind.INPUT]
            + [size for _, size in self.part_offsets(cfg)],
            output_bytes=[a.nbytes for a in io if a.kind == ArgKind.OUTPUT],
        )

    def transaction(self, cfg: OpConfig, num_cols: int = 4):  # -> Transaction
        """Params, activations, striped weights, extras; outputs on S2MM (see module doc)."""
        from npudispatch.txn.builder import TxnBuilder

        args = self.buffers(cfg)
        params = next(a for a in args if a.kind == ArgKind.PARAMS)
        builder = TxnBuilder(num_cols=num_cols)
        emit_launch(
            builder,
            params=dma.Stream(params.local_argidx, params.offset, params.nbytes),
            operands=self.operand_streams(cfg, args),
            outputs=[
                dma.Stream(a.local_argidx, a.offset, a.nbytes)
                for a in args
                if a.kind == ArgKind.OUTPUT
            ],
            num_cols=num_cols,
        )
        return builder.build()

    # ---- kernel -----------------------------------------------------------------------------
    def kernel(self, record: ParamsRecord, operands: Sequence[Any]) -> list[np.ndarray]:
        """Decode activations and const parts from the streams, run :meth:`compute_tiled`."""
        table = records.decode_table(record.payload)
        floats = records.decode_floats(record.payload, table)
        act_specs = [
            (i, s) for i, (src, s) in enumerate(table.inputs) if src == records.SRC_OPERAND
        ]
        if len(operands) != len(record.operand_bytes):
            raise DeviceError(
                f"kernel got {len(operands)} operands, record has {len(record.operand_bytes)}"
            )
        acts = {
            i: view(operands[k], s, f"{self.op_type} input {i}")  # type: ignore[arg-type]
            for k, (i, s) in enumerate(act_specs)
        }
        parts = [
            np.frombuffer(memoryview(p).cast("B"), dtype=np.uint8)
            for p in operands[len(act_specs) :]
        ]
        dims = list(record.dims)
        _, k, n, stripes, bias_rows = dims[:5]
        t = TiledOperands(table, acts, parts, dims, floats, k, n, stripes, bias_rows)
        outs = self.compute_tiled(t)
        return records.pack_outputs(outs, table.outputs, record.output_bytes)

    def compute_tiled(self, t: TiledOperands) -> list[np.ndarray]:
        """bf16 matmul on the decoded bf16 weight image, × alpha, + bias part (if any)."""
        k, n, bias_rows, floats = t.k, t.n, t.bias_rows, t.floats
        a = t.acts[0]
        a = a[..., :k] if not self.trans_a(t.dims) else a[:k, ...].T
        w = decode_bf16(t.parts[0], k, n, t.stripes)[:k, :n]
        acc = to_compute(a) @ w
        acc = acc * np.float32(floats[0]) if floats and floats[0] != 1.0 else acc
        if bias_rows:
            bias = t.parts[1][: bias_rows * _ceil(n) * 4].view("<f4").reshape(bias_rows, _ceil(n))
            if bias_rows == 1:
                acc = acc + bias[0, :n]
            else:  # per-row C (Gemm): padded rows of A get no bias
                acc[..., :bias_rows, :] += bias[:, :n]
        return t.store_output(acc)

    def trans_a(self, dims: list[int]) -> bool:
        """Whether the activation arrives transposed (Gemm ``transA``)."""
        return False

    # ---- granularity ------------------------------------------------------------------------
    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Activation: any shape; output: last axis a multiple of 8 (whole bf16 vectors)."""
        return ShapeConstraints(
            inputs=tuple(
                None if s is None or i in cfg.consts else (1,) * len(s.shape)
                for i, s in enumerate(cfg.inputs)
            ),
            outputs=tuple((*(1,) * (len(s.shape) - 1), N_GRANULE) for s in cfg.outputs),
        )


def _ceil(n: int) -> int:
    """N padded to the tile grid (bias parts are stored that wide)."""
    return bf16_layout(1, n).np_


def bias_part(bias: np.ndarray, n: int, rows: int = 1) -> np.ndarray:
    """Bias as float32 ``[rows, Np]`` (zero-padded): the const part the kernels add."""
    out = np.zeros((rows, _ceil(n)), dtype=np.float32)
    out[:, :n] = np.broadcast_to(np.asarray(bias, dtype=np.float32), (rows, n))
    return out


# ---------------------------------------------------------------------------------------------
# Matching helpers


def match_activation(node: ir.Node, index: int, what: str) -> TensorSpec | Decline:
    """Spec of a float activation input (Decline if constant, missing or not float)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    spec = tensor_spec(value, what)
    if isinstance(spec, Decline):
        return spec
    if const_array(value) is not None:
        return Decline(f"{what} '{value.name}' is constant: fold the op on the CPU instead")
    bad = _check_float(spec, what)
    return spec if bad is None else bad


def match_weight(node: ir.Node, index: int, what: str) -> tuple[TensorSpec, np.ndarray] | Decline:
    """Spec and array of a constant float 2-d weight."""
    value = node.inputs[index] if index < len(node.inputs) else None
    spec = tensor_spec(value, what)
    if isinstance(spec, Decline):
        return spec
    arr = const_array(value)
    if arr is None:
        return Decline(f"{what} '{value.name}' is not a constant initializer")
    if arr.ndim != 2:
        return Decline(f"{what} '{value.name}' has rank {arr.ndim}; constant weights must be 2-d")
    bad = _check_float(spec, what)
    return (spec, arr) if bad is None else bad


def output_spec(node: ir.Node, dtype: np.dtype) -> TensorSpec | Decline:
    """Spec of output 0, checked to be ``dtype``."""
    spec = tensor_spec(node.outputs[0], "output")
    if isinstance(spec, Decline):
        return spec
    if spec.dtype != dtype:
        return Decline(f"output dtype {spec.dtype} differs from the activation dtype {dtype}")
    return spec


def attr_value(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


# ---------------------------------------------------------------------------------------------
# Operators


class MatMul(TiledMatMul):
    """ONNX MatMul: constant 2-d B (tiled bf16 weights) or two activations (batched, broadcast)."""

    op_type = "MatMul"
    kernel_id = 100

    def match(self, node: ir.Node) -> OpConfig | Decline:
        """Float32/bf16 A; B constant 2-d, or an activation of the same dtype."""
        a = match_activation(node, 0, "input A")
        if isinstance(a, Decline):
            return a
        b_val = node.inputs[1] if len(node.inputs) > 1 else None
        b = tensor_spec(b_val, "input B")
        if isinstance(b, Decline):
            return b
        out = output_spec(node, a.dtype)
        if isinstance(out, Decline):
            return out
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
        if (bad := _check_float(b, "input B")) is not None:
            return bad
        if b_arr.ndim != 2:
            return Decline(f"constant B has rank {b_arr.ndim}; only 2-d constant weights are tiled")
        k, n = b_arr.shape
        if real_dim(a, -1) != k:
            return Decline(f"A's last axis is {real_dim(a, -1)} but B has K={k}")
        extra = {"variant": VARIANT_CONST, "K": k, "N": n}
        return node_config(self, node, [a, b], [out], consts={1: b_arr}, attrs={}, extra=extra)

    def layout(self, cfg: OpConfig) -> TileLayout:
        """bf16 tiles of B."""
        return bf16_layout(cfg.extra["K"], cfg.extra["N"])

    def stripes(self, cfg: OpConfig) -> int:
        """No weight image in the two-activation variant."""
        return 1 if cfg.extra["variant"] == VARIANT_ACT else super().stripes(cfg)

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """bf16 weight image (nothing for two activations)."""
        if cfg.extra["variant"] == VARIANT_ACT:
            return []
        return [format_bf16(cfg.consts[1])]

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
        return t.store_output(np.matmul(to_compute(a), to_compute(b)))

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
        if isinstance(a, Decline):
            return a
        wb = match_weight(node, 1, "weight B")
        if isinstance(wb, Decline):
            return wb
        b_spec, b_arr = wb
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
        if isinstance(out, Decline):
            return out
        bias_spec = tensor_spec(bias_val, "bias")
        if isinstance(bias_spec, Decline):
            return bias_spec
        return node_config(
            self, node, [a, b_spec, bias_spec], [out], consts={1: b_arr, 2: bias.reshape(-1)},
            attrs={}, extra={"K": k, "N": n, "bias_rows": 1},
        )  # fmt: skip

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """bf16 weight image, float32 bias."""
        return [format_bf16(cfg.consts[1]), bias_part(cfg.consts[2], cfg.extra["N"])]

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
        if isinstance(a, Decline):
            return a
        if len(a.shape) != 2:
            return Decline(f"Gemm input A must be 2-d, got shape {a.shape}")
        wb = match_weight(node, 1, "weight B")
        if isinstance(wb, Decline):
            return wb
        b_spec, b_arr = wb
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
        if isinstance(out, Decline):
            return out
        attrs = {"alpha": alpha, "beta": beta, "transA": trans_a, "transB": trans_b}
        extra = {"K": k, "N": n, "M": m, "alpha": alpha, "bias_rows": bias_rows}
        return node_config(self, node, inputs, [out], consts=consts, attrs=attrs, extra=extra)

    def const_parts(self, cfg: OpConfig) -> list[np.ndarray]:
        """bf16 image of B', then ``beta · C`` as float32 ``[rows, Np]`` if C is given."""
        parts = [format_bf16(cfg.consts[1], n_major=bool(cfg.attrs["transB"]))]
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
    "Gemm",
    "MatMul",
    "MatMulBias",
    "TiledMatMul",
    "bias_part",
    "emit_launch",
    "weight_streams",
    "weight_stripes",
]
