"""Model -> :class:`CompiledModel`: load, rewrite, partition, and per NPU partition plan + emit.

The stages (docs/architecture.md §1): ``graph.load``, the rewrite pipeline, partitioning with the
one NPU support query (views that cannot be zero-copy are sent back to the CPU until the partition
report is stable), then per NPU partition
:func:`~npudispatch.dispatch.partition_plan.plan_partition` (a typed
:class:`~npudispatch.dispatch.partition_plan.PartitionPlan`) and
:func:`~npudispatch.dispatch.emit.emit`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from npudispatch import graph
from npudispatch.dispatch import limits
from npudispatch.dispatch.emit import FusedProgram, emit
from npudispatch.dispatch.heap import release_freed_heap
from npudispatch.dispatch.partition_plan import (
    PartitionIO,
    PartitionPlan,
    partition_io,
    plan_partition,
    unplaceable_views,
)
from npudispatch.display import rich_html
from npudispatch.errors import PlanError
from npudispatch.graph import Partition, PartitionReport
from npudispatch.graph.support import Supported
from npudispatch.precision import Precision, resolve_precision
from npudispatch.progress import progress
from npudispatch.rewrites import MarkViewsPass, default_pipeline
from npudispatch.rewrites.support import support_query

__all__ = [
    "CompiledModel",
    "PartitionIO",
    "PartitionPlan",
    "compile_model",
    "partition_io",
    "plan_partition",
]

#: Widest partition of an AIE2P (Strix) array (partitions are 1-8 columns wide).
MAX_PARTITION_COLS = 8


@dataclass
class CompiledModel:
    """A model compiled for the NPU.

    ``model`` is the rewritten ``onnx_ir.Model``; ``partitions`` run in order; ``programs`` maps
    the index of each NPU partition in ``partitions`` to its :class:`FusedProgram`; ``report``
    is the partition report (unsupported nodes with reasons); ``timings`` are seconds per stage.
    """

    model: ir.Model
    report: PartitionReport
    programs: dict[int, FusedProgram]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def partitions(self) -> list[Partition]:
        return self.report.partitions

    def __repr__(self) -> str:
        """One screen: node share on the NPU, partitions, kernel calls, a line per program."""
        total = sum(len(p.nodes) for p in self.partitions)
        npu = sum(len(p.nodes) for p in self.partitions if p.kind == "npu")
        labels = " ".join(self.labels)
        if len(labels) > 60:
            labels = labels[:57] + "..."
        lines = [
            f"CompiledModel({self.model.graph.name or 'model'!r}: {npu}/{total} nodes on the NPU "
            f"({self.npu_node_fraction:.0%}), {len(self.partitions)} partitions [{labels}], "
            f"{self.kernel_calls_per_run} kernel calls per run, "
            f"{len(self.report.unsupported)} nodes kept on the CPU"
        ]
        shown = list(self.programs.items())[:8]
        for i, program in shown:
            lines.append(
                f"  {self.labels[i]}: {len(program.ops)} ops, txn {program.txn.nbytes:,} B, "
                f"scratch {program.plan.scratch_bytes:,} B"
            )
        if len(self.programs) > len(shown):
            lines.append(f"  ... {len(self.programs) - len(shown)} more NPU programs")
        return "\n".join(lines) + ")"

    @property
    def labels(self) -> list[str]:
        """``npu0``, ``cpu0``, ``npu1``... per partition."""
        return graph.partition_names(self.partitions)

    @property
    def kernel_calls_per_run(self) -> int:
        """One kernel call per NPU partition."""
        return len(self.programs)

    @property
    def npu_node_fraction(self) -> float:
        """Share of the graph's nodes that run on the NPU (views included)."""
        total = sum(len(p.nodes) for p in self.partitions)
        npu = sum(len(p.nodes) for p in self.partitions if p.kind == "npu")
        return npu / total if total else 0.0

    # Notebook view (partitions, why nodes stay on the CPU, each program): npudispatch.viz.
    _repr_html_ = rich_html

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the whole compiled model (NPU programs, CPU segments with their weights,
        ``report.json``) as ``npudispatch compile -o`` does; ``Session(directory)`` and
        ``npudispatch run directory`` run it without the model file."""
        from npudispatch.dispatch.artifact import CompiledArtifact

        return CompiledArtifact.from_compiled(self).save(directory)

    def to_report(self) -> dict[str, Any]:
        """The ``report.json`` document of ``npudispatch compile`` (see the CLI docs)."""
        parts = []
        for i, (label, part) in enumerate(zip(self.labels, self.partitions)):
            entry: dict[str, Any] = {"name": label, **_partition_dict(part)}
            if i in self.programs:
                entry.update(self.programs[i].summary())
            parts.append(entry)
        return {
            "partitions": parts,
            "npu_node_fraction": self.npu_node_fraction,
            "kernel_calls_per_run": self.kernel_calls_per_run,
            "unsupported": [u.to_dict() for u in self.report.unsupported],
            "timings": dict(self.timings),
        }


def _partition_dict(part: Partition) -> dict[str, Any]:
    io = partition_io(part)
    return {
        "kind": part.kind,
        "nodes": [n.name for n in part.nodes],
        "inputs": [v.name for v in io.inputs],
        "outputs": [v.name for v in io.outputs],
    }


def compile_model(
    model_or_path: graph.ModelLike,
    *,
    dims: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rewrite: bool = True,
    supported: Supported | None = None,
    num_cols: int = 4,
    pad: bool = True,
    bf16: bool = True,
    precision: Precision | None = None,
) -> CompiledModel:
    """Compile a model: one :class:`FusedProgram` per NPU partition.

    ``dims`` binds symbolic dimensions by name and ``input_shapes`` whole input shapes by input
    name (see :func:`npudispatch.graph.load`); ``rewrite=False`` skips the rewrite pipeline (views are
    still marked so they stay zero-copy); ``supported`` narrows what may run on the NPU;
    ``num_cols`` is the number of AIE columns the transactions use. ``pad`` pads NPU tensors to
    the operators' granularity (copy-in zero-pads, copy-out crops: graph inputs and outputs keep
    the user's shapes, see :mod:`npudispatch.rewrites.padding`); ``bf16`` stores float32
    intermediates in bf16 with casts at NPU-partition borders (:mod:`~npudispatch.rewrites.precision`);
    ``bf16=False`` keeps float32 storage and makes every NPU launch compute in float32 (float32
    operands and weight images; ``docs/numerics.md``). ``precision`` names the mode instead of
    ``bf16`` (:data:`~npudispatch.precision.Precision`): ``"bf16"`` (default), ``"fp32"``
    (= ``bf16=False``) or ``"mixed"``: float32 storage, bf16 operands for multiply-accumulate
    kernels only, bf16 weight images (``docs/numerics.md`` §1.5). Padding and the bf16 storage
    are rewrite passes, so ``rewrite=False`` turns them off too. An ``ir.Model`` argument is
    rewritten in place. Raises :class:`ModelError` / :class:`PlanError` naming the culprit.
    """
    mode = resolve_precision(precision, bf16)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = graph.load(model_or_path, dims=dims, input_shapes=input_shapes)
    release_freed_heap()  # the parsed file's protobuf buffers, freed once weights are decoded
    limits.check_model_sizes(model)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if rewrite:
        # graph.load already bound ``dims`` everywhere. Padding and precision must see the same
        # NPU set as the partitioning below, or CPU segments would get padded / bf16 tensors.
        narrowed = support_query(supported) if supported is not None else None
        default_pipeline(pad=pad, bf16=mode == "bf16", support=narrowed)(model)
    else:
        MarkViewsPass()(model)
    limits.check_model_sizes(model, stage="rewritten")  # padding grows tensors
    timings["rewrite"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    query = support_query(supported)
    demoted: dict[ir.Node, str] = {}
    while True:  # converges: the set of demoted views only grows
        rep = graph.report(model, lambda n: demoted.get(n) or query(n))
        new = {n: r for part in rep.npu_partitions for n, r in unplaceable_views(part).items()}
        if not new:
            break
        demoted.update(new)
    timings["partition"] = time.perf_counter() - t0

    programs: dict[int, FusedProgram] = {}
    labels = graph.partition_names(rep.partitions)
    t_plan = t_emit = 0.0
    npu_parts = [(i, p) for i, p in enumerate(rep.partitions) if p.kind == "npu"]
    if not 1 <= num_cols <= MAX_PARTITION_COLS:
        raise PlanError(
            f"num_cols={num_cols}: an AIE2P partition is 1 to {MAX_PARTITION_COLS} columns wide"
        )
    for i, part in progress(npu_parts, desc="compile NPU partitions"):
        t0 = time.perf_counter()
        planned = plan_partition(part, num_cols=num_cols, precision=mode)
        # before images are allocated
        limits.check_program_size(labels[i], planned.plan.buffer_sizes)
        t1 = time.perf_counter()
        programs[i] = emit(labels[i], planned, num_cols=num_cols)
        t_plan += t1 - t0
        t_emit += time.perf_counter() - t1
    timings["plan"] = t_plan
    timings["emit"] = t_emit
    return CompiledModel(model, rep, programs, timings)
