"""Run fused programs on a real NPU through XRT's ``pyxrt`` (docs/architecture.md §7).

Flow: one ``pyxrt.device`` per process; ``register_xclbin`` + ONE ``hw_context`` per
(device, xclbin), shared by every backend and program that uses that xclbin (contexts are a scarce
resource: 6 on npu1, 16 resident on npu4); ``kernel(ctx, name)``. Per program (``prepare``): the
instruction BO (cacheable, ``group_id(1)``) is written and synced once, the five data BOs are
host_only in ``group_id(3 + i)``, const and params images are written and synced once. Per run
(``execute``): write + sync the input BO TO_DEVICE, call the kernel, ``wait(timeout_ms)``, require
``ERT_CMD_STATE_COMPLETED``, sync the output BO FROM_DEVICE and copy it out.

Call conventions (``convention=``):

* ``"mlir-aie"`` (default): ``kernel(3, instr_bo, n_words, in, out, scratch, const, params)`` with the
  raw transaction in the instruction BO — the mlir-aie ``MLIR_AIE`` kernel.
* ``"dynamic-dispatch"``: opcode 2 with the 8-byte-wrapped transaction (docs/txn_format.md §7). DD's C++
  runtime passes the five buffers as u64 scalars ``bo.address() + 0x80000000``; **pyxrt cannot pass
  64-bit scalars** (they are silently dropped by ``kernel.__call__``), so this preset passes the BOs
  positionally like mlir-aie does. That only works with an xclbin whose args 3..7 are declared as
  global buffers; DD's own "DPU" xclbins declare them as scalars and cannot be driven from pyxrt.
"""

from __future__ import annotations

import importlib
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npudispatch.dispatch.backends.base import (
    BUFFER_NAMES,
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
from npudispatch.errors import BackendUnavailableError, DeviceError, DeviceHang

CONVENTIONS = {"mlir-aie": 3, "dynamic-dispatch": 2}
DEFAULT_KERNEL = "MLIR_AIE"
DEFAULT_TIMEOUT_MS = 10_000
MIN_BO_BYTES = 4096  # XRT rejects size-0 BOs; unused buffers still get a page
FIRST_DATA_ARG = 3


def import_pyxrt() -> Any:
    """Import ``pyxrt`` or raise :class:`BackendUnavailableError` saying how to get it."""
    try:
        return importlib.import_module("pyxrt")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the 'xrt' backend needs XRT's Python binding 'pyxrt' ({exc}). It ships with XRT, not "
            "on PyPI: install XRT and the amdxdna driver, then `source /opt/xilinx/xrt/setup.sh` "
            "(it puts $XILINX_XRT/python on PYTHONPATH) and use the Python version XRT was built "
            "for. Without an NPU use the default 'emulator' backend."
        ) from exc


@dataclass(eq=False)
class _Context:
    """A registered xclbin's hardware context and kernel, shared by every user of that xclbin."""

    xclbin: Any
    hw_context: Any
    kernel: Any


class _DeviceCache:
    """Per-pyxrt-module cache: one device per index, one context per (device, xclbin, kernel)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.devices: dict[int, Any] = {}
        self.contexts: dict[tuple[int, str, str], _Context] = {}

    def device(self, pyxrt: Any, index: int) -> Any:
        with self.lock:
            if index not in self.devices:
                try:
                    self.devices[index] = pyxrt.device(index)
                except RuntimeError as exc:
                    raise DeviceError(
                        f"cannot open NPU device {index}: {exc}. Check that the amdxdna driver is "
                        "loaded (`ls /dev/accel`) and that you may open it (group `render`)."
                    ) from exc
            return self.devices[index]

    def context(self, pyxrt: Any, index: int, xclbin_path: Path, kernel_name: str) -> _Context:
        key = (index, str(xclbin_path), kernel_name)
        with self.lock:
            if key not in self.contexts:
                self.contexts[key] = self._open(pyxrt, index, xclbin_path, kernel_name)
            return self.contexts[key]

    def _open(self, pyxrt: Any, index: int, xclbin_path: Path, kernel_name: str) -> _Context:
        dev = self.device(pyxrt, index)
        try:
            xb = pyxrt.xclbin(str(xclbin_path))
        except RuntimeError as exc:
            raise DeviceError(f"cannot load xclbin {xclbin_path}: {exc}") from exc
        wanted = kernel_name.split(":", 1)[0]
        found = {k.get_name(): k.get_num_args() for k in xb.get_kernels()}
        if wanted not in found:
            raise DeviceError(
                f"xclbin {xclbin_path} has no kernel {kernel_name!r}; it has "
                f"{', '.join(map(repr, found)) or 'no kernels'}. Pass kernel_name= one of them."
            )
        if found[wanted] < FIRST_DATA_ARG + len(BUFFER_NAMES):
            raise DeviceError(
                f"kernel {kernel_name!r} in {xclbin_path} declares {found[wanted]} args; a fused "
                "program needs opcode, instr, ninstr and 5 buffers (8 args)"
            )
        uuid = dev.register_xclbin(xb)
        try:
            ctx = pyxrt.hw_context(dev, uuid)
        except RuntimeError as exc:
            raise DeviceError(
                f"cannot create a hardware context for {xclbin_path}: {exc}. The NPU's context "
                "pool may be full (other processes or sessions): close them and retry; "
                "'Timer expired' means the NPU is wedged (reload amdxdna)."
            ) from exc
        return _Context(xb, ctx, pyxrt.kernel(ctx, kernel_name))


# Keyed by the pyxrt module object, so a different module (e.g. a fake) never sees stale handles.
_CACHES: weakref.WeakKeyDictionary[Any, _DeviceCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def device_cache(pyxrt: Any) -> _DeviceCache:
    """The process-wide device/context cache of this ``pyxrt`` module."""
    with _CACHES_LOCK:
        cache = _CACHES.get(pyxrt)
        if cache is None:
            cache = _CACHES[pyxrt] = _DeviceCache()
        return cache


@dataclass(eq=False)
class XrtPrepared(Prepared):
    """A program resident on the NPU: instruction BO and the five data BOs (in argidx order)."""

    context: _Context | None = None
    instr_bo: Any = None
    instr_words: int = 0
    data_bos: list[Any] = field(default_factory=list)
    output_view: np.ndarray | None = None  # host mapping of the output BO
    run: Any = None  # the program's pyxrt.run, arguments set in prepare
    instr_view: np.ndarray | None = None  # host mapping of the instruction BO (patched programs)
    instr_shift: int = 0  # bytes before the transaction in the instruction BO (DD wrapper)


class XrtBackend:
    """Runs programs on a real NPU via ``pyxrt`` (imported only when this backend is created)."""

    name = "xrt"

    def __init__(
        self,
        xclbin: str | Path,
        *,
        kernel_name: str = DEFAULT_KERNEL,
        convention: str = "mlir-aie",
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        device_index: int = 0,
    ) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(
                f"unknown call convention {convention!r}; choose one of {sorted(CONVENTIONS)}"
            )
        self.pyxrt = import_pyxrt()
        self.xclbin_path = Path(xclbin).expanduser().resolve()
        self.kernel_name, self.convention = kernel_name, convention
        self.opcode = CONVENTIONS[convention]
        self.timeout_ms = int(timeout_ms)
        self._completed = self.pyxrt.ert_cmd_state.ERT_CMD_STATE_COMPLETED
        self._completed_text = str(self._completed)
        sync = self.pyxrt.xclBOSyncDirection
        self._to_device, self._from_device = (
            sync.XCL_BO_SYNC_BO_TO_DEVICE,
            sync.XCL_BO_SYNC_BO_FROM_DEVICE,
        )
        cache = device_cache(self.pyxrt)
        self.context = cache.context(self.pyxrt, device_index, self.xclbin_path, kernel_name)
        self.device = cache.device(self.pyxrt, device_index)

    # -- prepare
    def instruction_image(self, program: ProgramImage) -> bytes:
        """The instruction-BO contents for this backend's call convention."""
        if self.convention == "dynamic-dispatch":
            from npudispatch.txn import Transaction, wrap

            return wrap(Transaction.from_bytes(program.txn))
        return bytes(program.txn)

    def prepare(self, program: ProgramImage) -> XrtPrepared:
        """Allocate and upload the instruction BO and the five data BOs of ``program``."""
        x, kern = self.pyxrt, self.context.kernel
        to_dev = x.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
        instr = self.instruction_image(program)
        try:
            ib = x.bo(self.device, len(instr), x.bo.flags.cacheable, kern.group_id(1))
            ib.write(np.frombuffer(instr, dtype=np.uint8), 0)
            ib.sync(to_dev)
            bos = []
            for i, size in enumerate(program.buffer_sizes):
                b = x.bo(
                    self.device,
                    max(size, MIN_BO_BYTES),
                    x.bo.flags.host_only,
                    kern.group_id(FIRST_DATA_ARG + i),
                )
                # Const/params images once (written as they are, no staging copy); every byte
                # past them, and every other buffer, starts zeroed on the device too.
                image = {CONST: program.const_image, PARAMS: program.params_image}.get(i, b"")
                if image:
                    b.write(np.frombuffer(image, dtype=np.uint8), 0)
                if size > len(image):
                    b.write(np.zeros(size - len(image), np.uint8), len(image))
                b.sync(to_dev)
                bos.append(b)
        except RuntimeError as exc:
            raise DeviceError(
                f"program {program.name!r}: allocating NPU buffers failed: {exc}. 'Heap at max "
                "size' = too many programs' instructions resident; 'mmap ... err=11' = raise "
                "`ulimit -l`."
            ) from exc
        out_view = np.frombuffer(bos[OUTPUT].map(), dtype=np.uint8)[: program.buffer_sizes[OUTPUT]]
        run = self._make_run(program, ib, len(instr) // 4, bos)
        instr_view = None
        if program.patches:
            instr_view = np.frombuffer(ib.map(), dtype=np.uint8)[: len(instr)]
        return XrtPrepared(
            instr_view=instr_view,
            instr_shift=len(instr) - len(program.txn),
            run=run,
            program=program,
            backend_name=self.name,
            context=self.context,
            instr_bo=ib,
            instr_words=len(instr) // 4,
            data_bos=bos,
            output_view=out_view,
        )

    def _make_run(self, program: ProgramImage, instr_bo: Any, words: int, bos: list[Any]) -> Any:
        """One ``pyxrt.run`` per program with every argument set once (opcode, instructions,
        the five BOs); each ``execute`` only starts and waits on it."""
        run = self.pyxrt.run(self.context.kernel)
        args = (self.opcode, instr_bo, words, *bos)
        for i, arg in enumerate(args):
            try:
                run.set_arg(i, arg)
            except (TypeError, IndexError, RuntimeError, ValueError) as exc:
                what = "buffer" if i >= 1 and i != 2 else "scalar"
                raise DeviceError(
                    f"program {program.name!r}: kernel {self.kernel_name!r} rejects argument {i} "
                    f"(a {what}): {exc}. The xclbin's kernel must declare opcode, instr, ninstr "
                    "and the five data buffers as global buffers (DD's 'DPU' xclbins declare "
                    "them as scalars and cannot be driven from pyxrt)"
                ) from exc
        return run

    # -- execute
    def sync_output(self, prepared: XrtPrepared) -> None:
        """Bring the device's output buffer into host memory."""
        n = prepared.program.buffer_sizes[OUTPUT]
        if n:
            prepared.data_bos[OUTPUT].sync(self._from_device, n, 0)

    def execute(
        self, prepared: XrtPrepared, input_image: bytes | np.ndarray, output: np.ndarray
    ) -> RunStats:
        """Run ``prepared`` once on the NPU (thread-safe per prepared program)."""
        data = check_io(prepared, input_image, output)
        clock = time.perf_counter
        seconds: dict[str, float] = {}
        patches = prepared.program.patches
        with prepared.lock:
            in_bo = prepared.data_bos[INPUT]
            t0 = clock()
            if patches:
                # DMA gathers: row addresses from this run's indices, written into the
                # instruction BO and synced before the call (what the firmware will read)
                lo, hi = patches.write(
                    prepared.instr_view, patches.argplus(data), prepared.instr_shift
                )
                prepared.instr_bo.sync(self._to_device, hi - lo, lo)
                t1 = clock()
                seconds["patch"], t0 = t1 - t0, t1
            if data.size:
                in_bo.write(data, 0)
                t1 = clock()
                in_bo.sync(self._to_device, data.size, 0)
                t2 = clock()
                seconds["write_input"], seconds["sync_input"] = t1 - t0, t2 - t1
                t0 = t2
            # The run object made in prepare, its arguments already set: the per-call work is
            # start + wait (XRT allows restarting a completed run; the lock serializes them).
            run = prepared.run
            run.start()
            state = run.wait(self.timeout_ms)
            t1 = clock()
            seconds["run"] = t1 - t0
            if state is not self._completed and state != self._completed:
                raise self._failure(prepared, state)
            self.sync_output(prepared)
            t2 = clock()
            output[:] = prepared.output_view
            seconds["sync_output"], seconds["read_output"] = t2 - t1, clock() - t2
        return RunStats(
            stage_seconds=seconds,
            bytes_to_device=data.size,
            bytes_from_device=output.size,
            kernel_calls=1,
            device={"state": self._completed_text},  # the only state that gets here
        )

    def _failure(self, prepared: XrtPrepared, state: Any) -> DeviceError:
        name = prepared.program.name
        text = str(state)
        if state == self.pyxrt.ert_cmd_state.ERT_CMD_STATE_TIMEOUT:
            return DeviceHang(
                f"program {name!r}: the NPU did not finish within {self.timeout_ms} ms ({text}). "
                "The transaction probably waits for data that never comes; run it on the "
                "'emulator' backend to locate the wait. The hardware context may now be unusable: "
                "restart the process."
            )
        hint = {
            "ERT_CMD_STATE_ERROR": "the firmware rejected the instruction buffer (wrong opcode "
            "or call convention for this xclbin, or a malformed transaction)",
            "ERT_CMD_STATE_ABORT": "the command was aborted, usually after another command hung "
            "on this context; restart the process",
        }.get(getattr(state, "name", ""), "see `dmesg` for amdxdna messages")
        return DeviceError(f"program {name!r}: NPU command ended in {text}: {hint}")


def _validate(options: Mapping[str, Any], name: Callable[[str], str]) -> None:
    xclbin = Path(options["xclbin"]).expanduser()
    if not xclbin.is_file():
        raise BackendUnavailableError(
            f"{name('xclbin')} {str(xclbin)!r} is not a file; give the path of the overlay's "
            ".xclbin (without an NPU, use the 'emulator' backend)"
        )
    convention = options.get("convention", "mlir-aie")
    if convention not in CONVENTIONS:
        raise BackendUnavailableError(
            f"{name('convention')} {convention!r}: choose one of {', '.join(CONVENTIONS)}"
        )
    timeout = options.get("timeout_ms", DEFAULT_TIMEOUT_MS)
    if not isinstance(timeout, int) or timeout <= 0:
        raise BackendUnavailableError(f"{name('timeout_ms')} {timeout!r} must be a positive int")


SPEC = BackendSpec(
    name="xrt",
    summary="a real NPU through XRT's pyxrt; needs the overlay's .xclbin",
    create=XrtBackend,
    options=("xclbin", "kernel_name", "convention", "timeout_ms", "device_index"),
    required=("xclbin",),
    validate=_validate,
)
