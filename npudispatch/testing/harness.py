"""Run one operator alone on the emulator (development and test tool).

:func:`prepare` matches the node, places every :class:`~.base.ArgSpec` in the fused buffer of its
kind (0 input, 1 output, 2 scratch, 3 const, 4 params) at 64-byte aligned offsets, writes inputs,
formatted consts and the params record, and re-bases the op's own transaction onto the five buffers
with ``txn.rebase``. :func:`execute` runs it on :class:`~npudispatch.emulator.VirtualNpu` with the
registered operator kernels and reads the outputs back. :func:`run_single` does both. Tests may
tamper with the :class:`Prepared` program in between to prove a wrong record or offset is caught.

This module is the one place in ``operators`` that touches the emulator; it imports it lazily so
the operator library itself stays independent of it (ARCHITECTURE layering).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from npudispatch.errors import ModelError, UnsupportedOpError
from npudispatch.operators import registry
from npudispatch.operators.base import ArgKind, ArgSpec, Decline, OpConfig, round_up
from npudispatch.txn.rebase import ArgRange, rebase
from npudispatch.txn.transaction import Transaction

ALIGN = 64
NUM_BUFFERS = 5


@dataclass
class Prepared:
    """One operator launch ready to run: buffers, fused transaction and where every arg lives."""

    node: ir.Node
    cfg: OpConfig
    args: list[ArgSpec]
    placement: dict[int, int]  # position in args -> byte offset in its fused buffer
    buffers: list[bytearray]
    transaction: Transaction
    num_cols: int


@dataclass
class RunResult:
    """Outputs by name (cropped to real shapes), emulator stats and the program that ran."""

    outputs: dict[str, np.ndarray]
    stats: Any
    prepared: Prepared = field(repr=False)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def single_node(node_or_model: ir.Node | ir.Model | onnx.ModelProto | str | Path) -> ir.Node:
    """The node to run: a Node as is, or the only node of a model (ModelError otherwise)."""
    if isinstance(node_or_model, ir.Node):
        return node_or_model
    if isinstance(node_or_model, str | Path):
        node_or_model = ir.load(node_or_model)
    model = (
        ir.from_proto(node_or_model)
        if isinstance(node_or_model, onnx.ModelProto)
        else node_or_model
    )
    nodes = list(model.graph)
    if len(nodes) != 1:
        raise ModelError(
            f"run_single needs a model with exactly one node, got {len(nodes)} "
            f"({', '.join(n.op_type for n in nodes[:5])}); pass the node itself"
        )
    return nodes[0]


def _fit(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    """``array`` in ``dtype``, zero-padded up to ``shape`` (terminal padding done by hand)."""
    a = np.asarray(array).astype(dtype)
    if a.shape == shape:
        return a
    if a.ndim != len(shape) or any(s > t for s, t in zip(a.shape, shape)):
        raise ModelError(f"input '{name}' has shape {a.shape}, the operator expects {shape}")
    return np.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


def prepare(
    node_or_model: ir.Node | ir.Model | onnx.ModelProto | str | Path,
    inputs: dict[str, np.ndarray],
    *,
    num_cols: int = 4,
) -> Prepared:
    """Match, place, fill the five buffers and re-base the op's transaction."""
    node = single_node(node_or_model)
    cfg = registry.match(node)
    if isinstance(cfg, Decline):
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): {cfg.reason}")
    op = cfg.operator
    args = op.buffers(cfg)
    sizes = [0] * NUM_BUFFERS
    placement: dict[int, int] = {}
    for k, a in enumerate(args):
        placement[k] = sizes[a.kind]
        sizes[a.kind] = round_up(sizes[a.kind] + a.nbytes, ALIGN)
    buffers = [bytearray(n) for n in sizes]

    def put(k: int, data: bytes) -> None:
        a = args[k]
        if len(data) > a.nbytes:
            raise ModelError(f"{a.kind.name} arg {k} holds {a.nbytes} B, got {len(data)} B")
        start = placement[k] + a.offset
        buffers[a.kind][start : start + len(data)] = data

    for k, a in enumerate(args):
        if a.kind == ArgKind.INPUT:
            assert a.index is not None
            value = node.inputs[a.index]
            spec = cfg.inputs[a.index]
            assert value is not None and spec is not None
            if value.name not in inputs:
                raise ModelError(f"no value given for input '{value.name}' of node '{node.name}'")
            put(k, _fit(inputs[value.name], spec.shape, spec.dtype, value.name).tobytes())
        elif a.kind == ArgKind.CONST:
            put(k, op.format_consts(cfg))
        elif a.kind == ArgKind.PARAMS:
            put(k, op.params(cfg))
    ranges = [
        ArgRange(a.local_argidx, a.offset, a.nbytes, int(a.kind), placement[k] + a.offset)
        for k, a in enumerate(args)
    ]
    txn = rebase(op.transaction(cfg, num_cols), ranges)
    return Prepared(node, cfg, args, placement, buffers, txn, num_cols)


def execute(prepared: Prepared) -> RunResult:
    """Run a prepared launch on the emulator; outputs are cropped to their real shapes."""
    from npudispatch.emulator import KernelRegistry, VirtualNpu

    npu = VirtualNpu(
        [bytes(b) for b in prepared.buffers],
        num_cols=prepared.num_cols,
        kernels=KernelRegistry(registry.kernels()),
    )
    stats = npu.run(prepared.transaction)
    out_buf = npu.buffers[ArgKind.OUTPUT]
    outputs: dict[str, np.ndarray] = {}
    for k, a in enumerate(prepared.args):
        if a.kind != ArgKind.OUTPUT:
            continue
        assert a.index is not None
        spec = prepared.cfg.outputs[a.index]
        start = prepared.placement[k] + a.offset
        raw = out_buf[start : start + spec.nbytes].copy()
        y = raw.view(spec.dtype).reshape(spec.shape)
        y = y[tuple(slice(0, r) for r in spec.logical_shape)]
        name = prepared.node.outputs[a.index].name or f"output{a.index}"
        outputs[name] = y
    return RunResult(outputs, stats, prepared)


def run_single(
    node_or_model: ir.Node | ir.Model | onnx.ModelProto | str | Path,
    inputs: dict[str, np.ndarray],
    *,
    num_cols: int = 4,
) -> RunResult:
    """Run one operator alone on the emulator; ``result.outputs`` maps output names to arrays."""
    return execute(prepare(node_or_model, inputs, num_cols=num_cols))
