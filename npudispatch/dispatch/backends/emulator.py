"""Run fused programs on the functional emulator (:class:`npudispatch.emulator.VirtualNpu`).

Each prepared program owns one virtual NPU whose five buffers persist across runs like device
memory: const and params images are loaded once in ``prepare``; ``execute`` copies the input image
into buffer 0, runs the transaction (one kernel call) and copies buffer 1 out. Hangs and faults
propagate as the emulator's located :class:`~npudispatch.errors.DeviceHang` /
:class:`~npudispatch.errors.DeviceFault`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npudispatch.dispatch.backends.base import (
    CONST,
    INPUT,
    OUTPUT,
    PARAMS,
    Prepared,
    ProgramImage,
    RunStats,
    check_io,
)
from npudispatch.dispatch.backends.registry import BackendSpec
from npudispatch.dispatch.patch_sites import patch_ops
from npudispatch.emulator import KernelRegistry, VirtualNpu
from npudispatch.emulator.errors import KernelError
from npudispatch.emulator.prepared import PreparedProgram
from npudispatch.errors import BackendUnavailableError, ModelError
from npudispatch.txn import Transaction


def _initial_buffer(program: ProgramImage, idx: int) -> bytes | np.ndarray:
    """Buffer ``idx`` for the virtual NPU: a const/params image that fills its whole buffer is
    handed over as the program's own ``bytes``, which the emulator uses in place (copied only if
    a DMA writes to it), so a weights image is held once rather than twice."""
    image = {CONST: program.const_image, PARAMS: program.params_image}.get(idx)
    if isinstance(image, bytes) and image and len(image) == program.buffer_sizes[idx]:
        return image
    return program.initial_buffer(idx)


def kernel_registry(kernels: Mapping[int, Callable[..., Any]]) -> KernelRegistry:
    """``kernels`` as the emulator's registry (passed through if it already is one)."""
    return kernels if isinstance(kernels, KernelRegistry) else KernelRegistry(dict(kernels))


def run_on_emulator(
    txn: bytes | Transaction,
    buffers: Sequence[np.ndarray],
    kernels: Mapping[int, Callable[..., Any]],
    *,
    argv: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run one kernel call of ``txn`` on a fresh virtual NPU over ``buffers`` (updated in place).

    ``buffers`` are the five uint8 arrays (input, output, scratch, const, params) at ``argv``
    device addresses. Returns the emulator statistics as a JSON-able dict.
    """
    program = txn if isinstance(txn, Transaction) else Transaction.from_bytes(txn)
    npu = VirtualNpu(
        list(buffers), num_cols=program.header.num_cols, argv=argv, kernels=kernel_registry(kernels)
    )
    stats = npu.run(program)
    for dst, src in zip(buffers, npu.buffers):
        dst[...] = src
    return stats.to_json()


@dataclass(eq=False)
class EmulatorPrepared(Prepared):
    """A program loaded on its own virtual NPU (parsed transaction, resident buffers, the
    transaction's ops decoded once for that NPU)."""

    transaction: Transaction | None = None
    npu: VirtualNpu | None = None
    patch_ops: list[Any] | None = None  # the decoded DDR_PATCH ops of the runtime patch sites
    steps: PreparedProgram | None = None


class EmulatorBackend:
    """The default backend: the functional emulator (no NPU needed)."""

    name = "emulator"

    def __init__(self, *, num_cols: int | None = None) -> None:
        self.num_cols = num_cols

    def prepare(self, program: ProgramImage) -> EmulatorPrepared:
        """Parse and decode the transaction once and load const/params into a new virtual NPU."""
        txn = Transaction.from_bytes(program.txn)
        txn.ops  # noqa: B018 - materialize the typed ops once, not on every run
        npu = VirtualNpu(
            [_initial_buffer(program, i) for i in range(5)],
            num_cols=self.num_cols or txn.header.num_cols,
            kernels=kernel_registry(program.kernels),
        )
        patches = program.patches
        patch_ops = [txn.ops[i] for i in patches.op_indices(txn)] if patches else None
        return EmulatorPrepared(
            program=program,
            backend_name=self.name,
            transaction=txn,
            npu=npu,
            patch_ops=patch_ops,
            steps=npu.prepare(txn),
        )

    def execute(
        self, prepared: EmulatorPrepared, input_image: bytes | np.ndarray, output: np.ndarray
    ) -> RunStats:
        """Run once; ``stats.device`` holds the emulator's per-run statistics."""
        data = check_io(prepared, input_image, output)
        stats = RunStats(kernel_calls=1)
        patches = prepared.program.patches
        with prepared.lock:
            buffers = prepared.npu.buffers
            if patches:  # the row addresses of DMA gathers, from this run's indices
                with stats.stage("patch"):
                    patch_ops(prepared.patch_ops, patches.argplus(data))
            with stats.stage("write_input"):
                buffers[INPUT][:] = data
            with stats.stage("run"):
                try:
                    device_stats = prepared.npu.run(prepared.steps)
                except KernelError as exc:
                    named = name_kernel_error(exc, prepared.program.launch_labels)
                    if named is exc:
                        raise
                    raise named from exc
            with stats.stage("read_output"):
                output[:] = buffers[OUTPUT]
        stats.bytes_to_device, stats.bytes_from_device = data.size, output.size
        stats.device = device_stats.to_json()
        return stats


def name_kernel_error(exc: KernelError, labels: Sequence[str]) -> Exception:
    """``exc`` naming the node whose launch failed (``labels``: one per launch, in run order; its
    message gains the node, its cause is kept); a refusal of operand values (the model's inputs)
    becomes a :class:`ModelError`, since nothing is wrong with the program."""
    launch = exc.launch
    where = labels[launch] if launch is not None and 0 <= launch < len(labels) else None
    if exc.operands_refused:
        return ModelError(
            f"{where or 'a kernel'} refused its inputs on the NPU: {exc.__cause__}; check the "
            "values fed to the model"
        )
    if where is not None:
        exc.args = (f"{where}: {exc}",)
    return exc


def _validate(options: Mapping[str, Any], name: Callable[[str], str]) -> None:
    cols = options.get("num_cols")
    if cols is not None and not (isinstance(cols, int) and 1 <= cols <= 8):
        raise BackendUnavailableError(
            f"{name('num_cols')} {cols!r}: the emulated partition is 1 to 8 columns wide"
        )


SPEC = BackendSpec(
    name="emulator",
    summary="the functional NPU emulator, no hardware needed",
    create=EmulatorBackend,
    options=("num_cols",),
    validate=_validate,
)
