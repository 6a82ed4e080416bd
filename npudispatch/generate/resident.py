"""Programs resident on one device context, sharing their weights and a KV cache.

For each NPU partition of the decoder, the prefill and the decode program live on **one** device
context — a :class:`~npudispatch.emulator.VirtualNpu`, or five XRT buffer objects in the xrt
backend's hardware context with one instruction buffer per program: one const buffer holding the
single weight image both programs use, one input buffer whose first bytes are the resident KV
cache (at the same offsets in both plans, see :mod:`.programs`), one scratch and output buffer
sized for the larger program, and one params buffer holding both params images (the decode
transaction is re-based onto its half). Running a phase copies (and on XRT syncs) only its
non-resident inputs (token ids, attention mask) in and the graph outputs (logits) out: the bytes
moved per step do not depend on how long the context is.

CPU segments (if a node had to stay on the CPU) run on onnxruntime between the kernel calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch import graph, opset
from npudispatch.dispatch.artifact import CpuSegmentModel
from npudispatch.dispatch.backends.emulator import kernel_registry, name_kernel_error
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.dispatch.patch_sites import PatchTable, patch_ops
from npudispatch.dispatch.segments import CpuSegment
from npudispatch.emulator import VirtualNpu
from npudispatch.emulator.errors import KernelError
from npudispatch.errors import DeviceError, ModelError
from npudispatch.generate.programs import CompiledPhase
from npudispatch.txn import Transaction
from npudispatch.txn.rebase import rebase_tiling

__all__ = ["PhaseStats", "ResidentDevice"]

ALIGN = 64
INPUT, OUTPUT, SCRATCH, CONST, PARAMS = range(5)


@dataclass
class PhaseStats:
    """One run of a phase: kernel calls, bytes copied each way, seconds per stage."""

    kernel_calls: int = 0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    cpu_segments: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_copied(self) -> int:
        return self.bytes_to_device + self.bytes_from_device

    def add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


class _EmulatorMemory:
    """The slot's buffers on one virtual NPU: host views are device memory (no sync)."""

    def __init__(self, buffers: list[np.ndarray], num_cols: int, kernels: dict) -> None:
        self.npu = VirtualNpu(buffers, num_cols=num_cols, kernels=kernel_registry(kernels))

    def host(self, idx: int) -> np.ndarray:
        return self.npu.buffers[idx]

    def to_device(self, idx: int, offset: int, nbytes: int) -> None:
        pass

    def from_device(self, idx: int, offset: int, nbytes: int) -> None:
        pass

    def launch(self, txn: Any) -> None:
        self.npu.run(txn)

    def patcher(self, txn: Any, table: PatchTable) -> Callable[[np.ndarray], None]:
        """Applies new argplus values to the phase's decoded DDR_PATCH ops (what the emulator runs)."""
        ops = [txn.ops[i] for i in table.op_indices(txn)]
        return lambda values: patch_ops(ops, values)


class _XrtMemory:
    """The slot's buffers as five XRT buffer objects in the backend's hardware context, with one
    instruction BO per phase; only the byte ranges a run touches are synced."""

    def __init__(self, backend: Any, buffers: list[np.ndarray], instructions: dict) -> None:
        from npudispatch.dispatch.backends.xrt import FIRST_DATA_ARG, MIN_BO_BYTES

        self.backend = backend
        x, kern, dev = backend.pyxrt, backend.context.kernel, backend.device
        self.to_dev = x.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
        self.from_dev = x.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE
        self.instr: dict[Any, tuple[Any, int]] = {}
        self.shift: dict[Any, int] = {}
        for key, (image, shift) in instructions.items():
            ib = x.bo(dev, len(image), x.bo.flags.cacheable, kern.group_id(1))
            ib.write(np.frombuffer(image, np.uint8), 0)
            ib.sync(self.to_dev)
            self.instr[key] = (ib, len(image) // 4)
            self.shift[key] = shift
        self.bos = []
        self.views = []
        for i, data in enumerate(buffers):
            b = x.bo(dev, max(data.size, MIN_BO_BYTES), x.bo.flags.host_only,
                     kern.group_id(FIRST_DATA_ARG + i))  # fmt: skip
            b.write(data, 0)
            b.sync(self.to_dev)  # weights and params once, the rest zeroed
            self.bos.append(b)
            self.views.append(np.frombuffer(b.map(), np.uint8)[: data.size])

    def host(self, idx: int) -> np.ndarray:
        return self.views[idx]

    def to_device(self, idx: int, offset: int, nbytes: int) -> None:
        if nbytes:
            self.bos[idx].sync(self.to_dev, nbytes, offset)

    def from_device(self, idx: int, offset: int, nbytes: int) -> None:
        if nbytes:
            self.bos[idx].sync(self.from_dev, nbytes, offset)

    def patcher(self, key: Any, table: PatchTable) -> Callable[[np.ndarray], None]:
        """Writes new argplus values into the phase's instruction BO and syncs what changed."""
        ib, words = self.instr[key]
        view = np.frombuffer(ib.map(), np.uint8)[: 4 * words]
        shift = self.shift[key]

        def apply(values: np.ndarray) -> None:
            lo, hi = table.write(view, values, shift)
            ib.sync(self.to_dev, hi - lo, lo)

        return apply

    def launch(self, key: Any) -> None:
        backend = self.backend
        ib, words = self.instr[key]
        run = backend.context.kernel(backend.opcode, ib, words, *self.bos)
        state = run.wait(backend.timeout_ms)
        if state != backend.pyxrt.ert_cmd_state.ERT_CMD_STATE_COMPLETED:
            raise DeviceError(f"resident program {key!r}: NPU command ended in {state}")


class _Slot:
    """One NPU partition: its programs of every phase on one device context."""

    def __init__(
        self, programs: Mapping[str, FusedProgram], cache: set[str], xrt: Any = None
    ) -> None:
        self.programs = dict(programs)
        self.cache = cache
        first = next(iter(self.programs.values()))
        sizes = [max(p.plan.buffer_sizes[i] for p in self.programs.values()) for i in range(5)]
        self.params_offset: dict[str, int] = {}
        offset = 0
        for phase, prog in self.programs.items():
            self.params_offset[phase] = offset
            offset += -(-len(prog.params_image) // ALIGN) * ALIGN
        sizes[PARAMS] = max(offset, 4)
        params = np.zeros(sizes[PARAMS], np.uint8)
        for phase, prog in self.programs.items():
            at = self.params_offset[phase]
            params[at : at + len(prog.params_image)] = np.frombuffer(prog.params_image, np.uint8)
        const = np.zeros(sizes[CONST], np.uint8)
        const[: len(first.const_image)] = np.frombuffer(first.const_image, np.uint8)
        self.const_bytes = len(first.const_image)
        self.txns = {
            phase: rebase_tiling(prog.txn, {PARAMS: self.params_offset[phase]})
            if self.params_offset[phase]
            else Transaction.from_bytes(prog.txn.to_bytes())  # its own ops: patched per step
            if prog.patch_sites
            else prog.txn
            for phase, prog in self.programs.items()
        }
        kernels: dict[int, Any] = {}
        for prog in self.programs.values():
            kernels.update(prog.kernels())
        buffers = [*(np.zeros(sizes[i], np.uint8) for i in (INPUT, OUTPUT, SCRATCH)), const, params]
        self.sizes = sizes
        if xrt is None:
            self.memory: _EmulatorMemory | _XrtMemory = _EmulatorMemory(
                buffers, first.txn.header.num_cols, kernels
            )
            for txn in self.txns.values():
                txn.ops  # noqa: B018 - decode the typed ops once, not per step
            self.launch_keys: dict[str, Any] = dict(self.txns)
        else:
            images = {phase: _instruction_image(xrt, t) for phase, t in self.txns.items()}
            self.memory = _XrtMemory(xrt, buffers, images)
            self.launch_keys = {phase: phase for phase in self.txns}
        # DMA gathers: per phase, the sites and how to apply them (re-basing the params buffer
        # moves no transaction byte and no const offset, so the sites hold as compiled)
        self.patches: dict[str, tuple[PatchTable, Callable[[np.ndarray], None]]] = {}
        for phase, prog in self.programs.items():
            table = prog.patch_table()
            if table is not None:
                self.patches[phase] = (
                    table,
                    self.memory.patcher(self.launch_keys[phase], table),
                )

    def run(self, phase: str, env: Mapping[str, np.ndarray], stats: PhaseStats) -> dict:
        prog = self.programs[phase]
        mem = self.memory
        t0 = time.perf_counter()
        for b in prog.inputs:
            if b.name in self.cache:
                continue  # resident: written on the device by the previous kernel call
            host = mem.host(b.buffer)
            host[b.offset : b.offset + b.nbytes] = 0  # padding lanes are zero
            b.view(host)[...] = env[b.name]
            mem.to_device(b.buffer, b.offset, b.nbytes)
            stats.bytes_to_device += b.nbytes
        if phase in self.patches:  # row addresses of the DMA gathers from this step's ids
            table, apply = self.patches[phase]
            apply(table.argplus(mem.host(INPUT)))
        t1 = time.perf_counter()
        try:
            mem.launch(self.launch_keys[phase])
        except KernelError as exc:
            named = name_kernel_error(exc, prog.launch_labels())
            if named is exc:
                raise
            raise named from exc
        t2 = time.perf_counter()
        out = {}
        for b in prog.outputs:
            mem.from_device(b.buffer, b.offset, b.nbytes)
            out[b.name] = np.array(b.view(mem.host(b.buffer)))
            stats.bytes_from_device += b.nbytes
        stats.kernel_calls += 1
        stats.add("copy_in", t1 - t0)
        stats.add("npu", t2 - t1)
        stats.add("copy_out", time.perf_counter() - t2)
        return out


def _instruction_image(backend: Any, txn: Any) -> tuple[bytes, int]:
    """The instruction BO contents for the xrt backend's call convention, and how many bytes
    precede the transaction in it."""
    if backend.convention == "dynamic-dispatch":
        from npudispatch.txn import wrap

        image = wrap(txn)
        return image, len(image) - txn.nbytes
    return txn.to_bytes(), 0


def _cpu_segment(model: ir.Model, part: graph.Partition, label: str) -> CpuSegment:
    """A CPU partition on onnxruntime (the Session's segment: external weights, errors)."""
    sub = graph.extract(model, part, name=f"generate_{label}")
    opset.attach_functions(sub)
    spec = CpuSegmentModel(
        label, [v.name for v in part.inputs], [v.name for v in part.outputs], sub
    )
    return CpuSegment(spec, "onnxruntime")


class ResidentDevice:
    """Every phase of a decoder resident on one device context: the emulator, or the hardware
    context of an :class:`~npudispatch.dispatch.backends.xrt.XrtBackend` passed as ``xrt``.

    ``phases`` maps a phase name to its :class:`CompiledPhase`; all phases must partition alike
    (checked by :func:`~npudispatch.generate.programs.check_shared_cache`).
    """

    def __init__(self, phases: Mapping[str, CompiledPhase], xrt: Any = None) -> None:
        self.phases = dict(phases)
        self.name = "emulator" if xrt is None else "xrt"
        any_phase = next(iter(self.phases.values()))
        cache = set(any_phase.cache_names)
        n_programs = len(any_phase.programs)
        self.slots = [
            _Slot({ph: p.programs[k] for ph, p in self.phases.items()}, cache, xrt)
            for k in range(n_programs)
        ]
        self._cpu: dict[str, dict[int, CpuSegment]] = {}
        for ph, p in self.phases.items():
            labels = p.compiled.labels
            self._cpu[ph] = {
                i: _cpu_segment(p.compiled.model, part, labels[i])
                for i, part in enumerate(p.compiled.partitions)
                if part.kind == "cpu"
            }

    @property
    def const_bytes(self) -> int:
        """Bytes of weights on the device: one image per NPU partition, shared by every phase."""
        return sum(s.const_bytes for s in self.slots)

    def run(self, phase: str, feeds: Mapping[str, np.ndarray]) -> tuple[dict, PhaseStats]:
        """Run ``phase`` once on ``feeds`` (non-resident inputs); returns graph outputs, stats."""
        if phase not in self.phases:
            raise ModelError(f"unknown phase {phase!r}; have {sorted(self.phases)}")
        compiled = self.phases[phase].compiled
        stats = PhaseStats()
        env: dict[str, np.ndarray] = dict(feeds)
        npu_index = 0
        for i, part in enumerate(compiled.partitions):
            if part.kind == "npu":
                env.update(self.slots[npu_index].run(phase, env, stats))
                npu_index += 1
            else:
                t0 = time.perf_counter()
                env.update(self._cpu[phase][i].run(env))
                stats.add("cpu", time.perf_counter() - t0)
                stats.cpu_segments += 1
        outputs = {v.name: env[v.name] for v in compiled.model.graph.outputs if v.name in env}
        return outputs, stats
