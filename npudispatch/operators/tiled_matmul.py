"""The matmul framework: tiled constant weights, striped weight streams, the shared kernel.

The operators built on it are in :mod:`npudispatch.operators.matmul` (MatMul, Gemm, MatMulBias),
:mod:`~npudispatch.operators.matmul_nbits` and :mod:`~npudispatch.operators.qmatmul`. Two
kernels:

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
    round_up,
    tensor_spec,
)
from npudispatch.operators.dtypes import FLOAT_DTYPES, fp32_compute, mac_operand, store
from npudispatch.operators.weights import (
    TileLayout,
    bf16_layout,
    decode_bf16,
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


def _check_float(spec: TensorSpec, what: str) -> None:
    """Raise a Decline unless ``spec`` is float32 or bfloat16."""
    if spec.dtype not in FLOAT_DTYPES:
        raise Decline(f"{what} has dtype {spec.dtype}; NPU matmul takes float32 or bfloat16")


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
        """Tile layout of the weight image (float32 elements in float32 compute)."""
        return bf16_layout(cfg.extra["K"], cfg.extra["N"], fp32=cfg.fp32_compute)

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

    def format_consts(self, cfg: OpConfig) -> bytes | memoryview:
        """Weight image then extra parts, each padded to 4 bytes.

        The weights are held once: a weight image that is the only part (no bias) and a whole
        number of words is returned as a read-only view of itself; otherwise the parts are packed
        once and the cached parts become views of the packed bytes.
        """
        parts = self._parts(cfg)
        if len(parts) == 1 and parts[0].size % 4 == 0:
            return memoryview(parts[0]).toreadonly()
        packed = records.pack_consts(parts)
        views, offset = [], 0
        for part in parts:
            views.append(np.frombuffer(packed, dtype=np.uint8, count=part.size, offset=offset))
            offset += round_up(part.size)
        cfg.extra["const_parts"] = views
        return packed

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
        """bf16 (or float32 compute) matmul on the decoded weight image, × alpha, + bias part."""
        k, n, bias_rows, floats = t.k, t.n, t.bias_rows, t.floats
        a = t.acts[0]
        a = a[..., :k] if not self.trans_a(t.dims) else a[:k, ...].T
        w = decode_bf16(t.parts[0], k, n, t.stripes, fp32=fp32_compute())[:k, :n]
        acc = mac_operand(a) @ w
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
# Matching helpers: each returns what it checked or raises a Decline (use them inside ``match``).


def match_activation(node: ir.Node, index: int, what: str) -> TensorSpec:
    """Spec of a float activation input (raises a Decline if constant, missing or not float)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    spec = Decline.check(tensor_spec(value, what))
    if const_array(value) is not None:
        raise Decline(f"{what} '{value.name}' is constant: fold the op on the CPU instead")
    _check_float(spec, what)
    return spec


def match_weight(node: ir.Node, index: int, what: str) -> tuple[TensorSpec, np.ndarray]:
    """Spec and array of a constant float 2-d weight (raises a Decline otherwise)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    spec = Decline.check(tensor_spec(value, what))
    arr = const_array(value)
    if arr is None:
        raise Decline(f"{what} '{value.name}' is not a constant initializer")
    if arr.ndim != 2:
        raise Decline(f"{what} '{value.name}' has rank {arr.ndim}; constant weights must be 2-d")
    _check_float(spec, what)
    return spec, arr


def output_spec(node: ir.Node, dtype: np.dtype) -> TensorSpec:
    """Spec of output 0, checked to be ``dtype`` (raises a Decline otherwise)."""
    spec = Decline.check(tensor_spec(node.outputs[0], "output"))
    if spec.dtype != dtype:
        raise Decline(f"output dtype {spec.dtype} differs from the activation dtype {dtype}")
    return spec


def attr_value(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value
