"""Embedding lookup and the small integer arithmetic of decoder attention masks.

* ``Gather`` of a constant table along axis 0 by runtime indices (token embedding), two paths
  (:class:`GatherTable`): a **DMA gather** when the indices are an input of the NPU partition
  (``input_ids``): only the selected rows leave DDR, read by one buffer descriptor per index whose
  address the host patches from the index values before each run; a **row copy** when the indices
  are computed on the device: the kernel receives the whole table and copies the rows.
* ``ReduceSum``, ``Add``, ``Sub`` and ``Cast`` on int32/int64 tensors: what the onnxruntime-genai
  builder emits to turn ``attention_mask`` into ``seqlens_k`` (``ReduceSum(mask) - 1`` cast to
  int32). Running them on the NPU keeps the decoder in one partition, one kernel call.

Integer ops are exact; they are registered after the float operators of the same op types.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators import dma, records
from npudispatch.operators.base import (
    ArgKind,
    ArgSpec,
    Decline,
    OpConfig,
    Operator,
    RuntimePatch,
    ShapeConstraints,
    TensorSpec,
    check_node_kind,
    const_array,
    node_config,
    op_label,
    tensor_spec,
)
from npudispatch.operators.dma_gather import MAX_ROWS, gather_launch
from npudispatch.operators.dtypes import FLOAT_DTYPES, np_dtype
from npudispatch.operators.matmul import attr_value
from npudispatch.overlay_abi import ParamsRecord, round_up

INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def _specs(op: Operator, node: ir.Node, n_inputs: tuple[int, int]) -> OpConfig | Decline:
    """Exact static specs of inputs/outputs; initializer inputs become consts."""
    if (bad := check_node_kind(op, node)) is not None:
        return bad
    label = op_label(node)
    if not n_inputs[0] <= len(node.inputs) <= n_inputs[1]:
        return Decline(f"{label}: expects {n_inputs[0]}..{n_inputs[1]} inputs")
    specs, consts = [], {}
    for i, value in enumerate(node.inputs):
        if value is None:
            specs.append(None)
            continue
        spec = tensor_spec(value, f"{label} input {i}")
        if isinstance(spec, Decline):
            return spec
        specs.append(spec)
        if (arr := const_array(value)) is not None:
            consts[i] = arr
    outs = []
    for j, value in enumerate(node.outputs):
        spec = tensor_spec(value, f"{label} output {j}")
        if isinstance(spec, Decline):
            return spec
        outs.append(spec)
    return node_config(op, node, specs, outs, consts=consts)


def _exact(cfg: OpConfig) -> ShapeConstraints:
    return ShapeConstraints(tuple(None for _ in cfg.inputs), tuple(None for _ in cfg.outputs))


class GatherTable(Operator):
    """ONNX Gather, axis 0, constant table, int32/int64 indices (negative ones wrap).

    Which path a node takes is decided when its partition is planned (:meth:`bind_host_inputs`)
    and shown in the compile report (``gathers``):

    * ``"dma"``: the indices are an input of the NPU partition, written by the host (``input_ids``
      of a decoder). The table stays in the const buffer; the launch's operand is the selected
      rows only, one MM2S buffer descriptor of ``row_bytes`` per index, whose DDR_PATCH is a
      runtime patch site (:meth:`runtime_patches`): the host sets its offset to
      ``table + index * row_bytes`` before every run and rejects indices outside
      ``[-rows, rows)``. Needs word-multiple rows and at most ``dma_gather.MAX_ROWS`` indices.
    * ``"row copy"``: the indices are produced on the device. The table (whole) and the indices are
      the operands and the kernel copies the rows; every run streams the entire table.

    The record's dims say which (``[1]`` for the DMA gather, where the tensor table's input 0 is
    the gathered rows and the indices are absent; ``[]`` for the row copy).
    """

    op_type = "Gather"
    kernel_id = 910

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = _specs(self, node, (2, 2))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        table, idx = cfg.inputs
        assert table is not None and idx is not None
        if 0 not in cfg.consts:
            return Decline(f"{label}: data is not a constant table")
        if 1 in cfg.consts:
            return Decline(f"{label}: constant indices (fold the lookup instead)")
        if int(attr_value(node, "axis", 0)) % max(1, len(table.shape)) != 0:
            return Decline(f"{label}: only axis 0 is supported")
        if idx.dtype not in INT_DTYPES:
            return Decline(f"{label}: indices dtype {idx.dtype} (int32/int64 expected)")
        if table.dtype not in FLOAT_DTYPES and table.dtype not in INT_DTYPES:
            return Decline(f"{label}: table dtype {table.dtype} not supported")
        out = cfg.outputs[0]
        want = idx.shape + table.shape[1:]
        if out.logical_shape != want:
            return Decline(f"{label}: output shape {out.logical_shape} is not {want}")
        if (out.dtype in FLOAT_DTYPES) != (table.dtype in FLOAT_DTYPES):
            return Decline(f"{label}: output dtype {out.dtype} does not match table {table.dtype}")
        return cfg

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Indices and table exact; the output may be padded (rows are zero-extended)."""
        return ShapeConstraints((None, None), ((1,) * len(cfg.outputs[0].shape),))

    # ---- the DMA gather path ----------------------------------------------------------------
    def bind_host_inputs(self, cfg: OpConfig, host_inputs: frozenset[int]) -> None:
        table, idx = cfg.inputs
        assert table is not None and idx is not None
        row_bytes = self._row_bytes(cfg)
        count = math.prod(idx.shape)
        cfg.extra["dma_gather"] = (
            1 in host_inputs and row_bytes > 0 and row_bytes % 4 == 0 and 1 <= count <= MAX_ROWS
        )

    @staticmethod
    def _row_bytes(cfg: OpConfig) -> int:
        table = cfg.inputs[0]
        assert table is not None
        return math.prod(table.shape[1:]) * np.dtype(table.dtype).itemsize

    def _rows_spec(self, cfg: OpConfig) -> TensorSpec:
        table, idx = cfg.inputs
        assert table is not None and idx is not None
        return TensorSpec(tuple(idx.shape) + tuple(table.shape[1:]), table.dtype)

    def io_buffers(self, cfg: OpConfig) -> list[ArgSpec]:
        """DMA gather: the const region (table) and the output; the indices are no operand."""
        if not cfg.extra.get("dma_gather"):
            return super().io_buffers(cfg)
        out = cfg.outputs[0]
        return [
            ArgSpec(ArgKind.CONST, 0, 0, self.const_region_bytes(cfg)),
            ArgSpec(ArgKind.OUTPUT, 1, 0, round_up(out.nbytes), 0, out.shape, out.dtype),
        ]

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [1] if cfg.extra.get("dma_gather") else []

    def params_record(self, cfg: OpConfig) -> ParamsRecord:
        if not cfg.extra.get("dma_gather"):
            return super().params_record(cfg)
        rows = self._rows_spec(cfg)
        record = self.build_record(
            cfg,
            operand_bytes=[round_up(rows.nbytes)],
            output_bytes=[round_up(cfg.outputs[0].nbytes)],
        )
        record.payload = records.encode_table(
            [(rows, records.SRC_OPERAND), None], cfg.outputs
        ) + records.encode_floats(self.op_floats(cfg))
        return record

    def _launch(self, cfg: OpConfig, num_cols: int):
        params = self.buffers_of(cfg, ArgKind.PARAMS)[0]
        out = self.buffers_of(cfg, ArgKind.OUTPUT)[0]
        idx = cfg.inputs[1]
        assert idx is not None
        return gather_launch(
            params=dma.Stream(params.local_argidx, params.offset, params.nbytes),
            outputs=[dma.Stream(out.local_argidx, out.offset, out.nbytes)],
            table_arg=0,
            table_offset=0,
            row_bytes=self._row_bytes(cfg),
            count=math.prod(idx.shape),
            num_cols=num_cols,
        )

    def transaction(self, cfg: OpConfig, num_cols: int = 4):
        if not cfg.extra.get("dma_gather"):
            return super().transaction(cfg, num_cols)
        return self._launch(cfg, num_cols).txn

    def runtime_patches(self, cfg: OpConfig, num_cols: int = 4) -> list[RuntimePatch]:
        if not cfg.extra.get("dma_gather"):
            return []
        table = cfg.inputs[0]
        assert table is not None
        row_bytes, rows = self._row_bytes(cfg), table.shape[0]
        return [
            RuntimePatch(k, 1, element, row_bytes, rows)
            for k, element in enumerate(self._launch(cfg, num_cols).patch_elements)
            if element is not None
        ]

    # ---- both paths -------------------------------------------------------------------------
    def _lookup(self, table: np.ndarray, idx: np.ndarray) -> np.ndarray:
        ids = np.asarray(idx, np.int64)
        n = table.shape[0]
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise ValueError(f"Gather index out of range for a table of {n} rows: {ids.tolist()}")
        return table[np.where(ids < 0, ids + n, ids)]

    def compute(self, inputs, outputs, dims, floats):
        # DMA gather: the operand already is the selected rows
        rows = inputs[0] if dims and dims[0] == 1 else self._lookup(inputs[0], inputs[1])
        spec = outputs[0]
        pad = [(0, p - r) for p, r in zip(spec.shape, rows.shape)]
        rows = np.pad(rows, pad) if any(w for _, w in pad) else rows
        return [rows.astype(spec.dtype)]  # a row copy: no compute rounding

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [self._lookup(np.asarray(inputs[0]), inputs[1]).astype(cfg.outputs[0].dtype)]


class _IntOp(Operator):
    """Exact integer ops: int32/int64 inputs and outputs, shapes kept."""

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        return _exact(cfg)

    def check_ints(self, cfg: OpConfig, label: str, data_inputs: tuple[int, ...]) -> Decline | None:
        for i in data_inputs:
            spec = cfg.inputs[i] if i < len(cfg.inputs) else None
            if spec is None or spec.dtype not in INT_DTYPES:
                return Decline(f"{label}: input {i} dtype {spec and spec.dtype} is not int32/int64")
        if any(s.dtype not in INT_DTYPES for s in cfg.outputs):
            return Decline(f"{label}: output dtype {cfg.outputs[0].dtype} is not int32/int64")
        return None

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.compute(inputs, cfg.outputs, self.op_dims(cfg), [])


class IntReduceSum(_IntOp):
    """ReduceSum of an int32/int64 tensor over constant axes (e.g. a mask's valid length)."""

    op_type = "ReduceSum"
    kernel_id = 920

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = _specs(self, node, (1, 2))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        if (bad := self.check_ints(cfg, label, (0,))) is not None:
            return bad
        rank = len(cfg.inputs[0].shape)  # type: ignore[union-attr]
        if len(cfg.inputs) > 1 and cfg.inputs[1] is not None:
            if 1 not in cfg.consts:
                return Decline(f"{label}: axes must be a constant")
            axes = [int(a) for a in np.asarray(cfg.consts[1]).reshape(-1)]
        else:
            axes = list(attr_value(node, "axes", []) or [])
        if not axes:
            if int(attr_value(node, "noop_with_empty_axes", 0)):
                return Decline(f"{label}: noop_with_empty_axes=1 is an identity")
            axes = list(range(rank))
        if any(not -rank <= a < rank for a in axes):
            return Decline(f"{label}: axes {axes} out of range for rank {rank}")
        cfg.extra["axes"] = sorted({a % rank for a in axes})
        cfg.extra["keepdims"] = int(attr_value(node, "keepdims", 1))
        # the axes travel in the record's dims, not as a tensor
        cfg.inputs = cfg.inputs[:1]
        cfg.consts.pop(1, None)
        return cfg

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [cfg.extra["keepdims"], *cfg.extra["axes"]]

    def compute(self, inputs, outputs, dims, floats):
        keep, axes = bool(dims[0]), tuple(dims[1:])
        total = np.sum(np.asarray(inputs[0], np.int64), axis=axes, keepdims=keep)
        return [np.asarray(total).astype(outputs[0].dtype).reshape(outputs[0].shape)]


class _IntBinary(_IntOp):
    """Broadcasting integer Add/Sub (ONNX wrap-around semantics in the input dtype)."""

    func: ClassVar[np.ufunc]

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = _specs(self, node, (2, 2))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        if (bad := self.check_ints(cfg, label, (0, 1))) is not None:
            return bad
        a, b = cfg.inputs
        if a.dtype != b.dtype or cfg.outputs[0].dtype != a.dtype:  # type: ignore[union-attr]
            return Decline(f"{label}: mixed integer dtypes")
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)  # type: ignore[union-attr]
        except ValueError:
            return Decline(f"{label}: shapes {a.shape} and {b.shape} do not broadcast")  # type: ignore[union-attr]
        if shape != cfg.outputs[0].shape:
            return Decline(f"{label}: output shape {cfg.outputs[0].shape} is not {shape}")
        return cfg

    def compute(self, inputs, outputs, dims, floats):
        a, b = (np.asarray(x) for x in inputs)
        return [self.func(a, b, dtype=outputs[0].dtype)]


class IntAdd(_IntBinary):
    """ONNX Add on int32/int64."""

    op_type = "Add"
    kernel_id = 921
    func = np.add


class IntSub(_IntBinary):
    """ONNX Sub on int32/int64."""

    op_type = "Sub"
    kernel_id = 922
    func = np.subtract


class IntCast(_IntOp):
    """ONNX Cast between int32 and int64 (int64 → int32 wraps like a C cast, as ONNX does)."""

    op_type = "Cast"
    kernel_id = 923

    def match(self, node: ir.Node) -> OpConfig | Decline:
        cfg = _specs(self, node, (1, 1))
        if isinstance(cfg, Decline):
            return cfg
        label = op_label(node)
        if (bad := self.check_ints(cfg, label, (0,))) is not None:
            return bad
        to = attr_value(node, "to", None)
        if not isinstance(to, int) or np_dtype(ir.DataType(int(to))) not in INT_DTYPES:
            return Decline(f"{label}: target type {to} is not INT32/INT64")
        if cfg.outputs[0].shape != cfg.inputs[0].shape:  # type: ignore[union-attr]
            return Decline(f"{label}: output shape differs from input")
        return cfg

    def compute(self, inputs, outputs, dims, floats):
        return [np.asarray(inputs[0]).astype(outputs[0].dtype)]


__all__ = ["GatherTable", "IntAdd", "IntCast", "IntReduceSum", "IntSub"]
