"""A pure-Python stand-in for XRT's ``pyxrt`` binding (docs/architecture.md §7).

It mirrors the real API surface and, above all, the real *behaviour* that bites on hardware:
positional-only calls, pybind11 enums (``str()``, C enums == ints, enum classes are not), BO flag
whitelist, per-context ``group_id`` slots, sub-buffers, and BOs with **separate host and device
memory**: the device only sees what was synced TO_DEVICE and the host only sees what was synced
FROM_DEVICE, so a missing sync gives stale data exactly as on an NPU. Commands are executed by a
pluggable *executor* (see :class:`KernelCall`); :func:`npudispatch.testing.emulator_executor` runs
the instruction buffer on the functional emulator, :func:`noop_executor` does nothing (host-overhead
benchmarks).

Configuration lives in a :class:`FakeSystem` (device count and name, XRT version profile, context
limit, cacheable heap budget, executor, command latency) installed by
:func:`npudispatch.testing.install_fake_pyxrt`. Deliberate differences from the real binding: a BO
past the declared argument count raises ``RuntimeError`` (the real one segfaults); ``write`` of a
non-contiguous buffer copies it in logical order (the real one copies raw memory from its start
pointer); executor failures are logged on the ``pyxrt.fake`` logger (the real cause ends up in dmesg);
``elf``/``module``/``ext``/``runlist`` are not modelled.

This module holds the commands (``kernel``, ``run``); the device side (the installed
:class:`FakeSystem`, ``device``, ``hw_context``, ``bo``) is in :mod:`.fake_pyxrt_device` and the
data types in :mod:`.fake_pyxrt_types`. Every name of both is re-exported here, so
``npudispatch.testing.fake_pyxrt`` stays the one import for the whole fake binding.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from npudispatch.testing.fake_pyxrt_device import (  # noqa: F401  (part of the fake's API)
    PAGE,
    XCL_BO_FLAGS_NONE,
    _alloc_address,
    _set_system,
    bo,
    current_system,
    device,
    enumerate_devices,
    hw_context,
    log,
    log_message,
)
from npudispatch.testing.fake_pyxrt_types import (  # noqa: F401  (part of the fake's API)
    _FROM_DEVICE,
    _RUNNING,
    _TERMINAL,
    _TO_DEVICE,
    DEFAULT_MEMS,
    MLIR_AIE_ARGS,
    BoArg,
    CommandError,
    FakeSystem,
    KernelCall,
    _Arg,
    _DeviceState,
    _incompatible,
    _PybindEnum,
    _PybindIntEnum,
    alert,
    critical,
    debug,
    emergency,
    error,
    ert_cmd_state,
    info,
    noop_executor,
    notice,
    uuid,
    warning,
    write_fake_xclbin,
    xclbin,
    xclBOSyncDirection,
    xrt_info_device,
    xrt_msg_level,
)

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


class _since:
    """Descriptor that exists only from a given XRT version of the installed profile on."""

    def __init__(self, version: tuple[int, int], func: Callable) -> None:
        self.version, self.func = version, func

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        version = current_system().version
        if version < self.version:
            raise AttributeError(
                f"type object {owner.__name__!r} has no attribute {self.name!r} "
                f"(fake XRT profile {version}, needs {self.version})"
            )
        return self.func if obj is None else self.func.__get__(obj, owner)


# --------------------------------------------------------------------------------- kernel


class kernel:
    """A compute unit in a hardware context; calling it starts a run."""

    class cu_access_mode(_PybindEnum):
        exclusive = 0
        shared = 1
        none = 2

    def __init__(self, *args: object) -> None:
        sigs = [
            "(self: pyxrt.kernel, arg0: pyxrt.hw_context, arg1: str)",
            "(self: pyxrt.kernel, arg0: pyxrt.device, arg1: pyxrt.uuid, arg2: str, arg3: pyxrt.kernel.cu_access_mode = ...)",
        ]
        if len(args) == 2 and isinstance(args[0], hw_context) and isinstance(args[1], str):
            ctx, name = args
        elif (
            len(args) in (3, 4)
            and isinstance(args[0], device)
            and isinstance(args[1], uuid)
            and isinstance(args[2], str)
            and (len(args) == 3 or isinstance(args[3], kernel.cu_access_mode))
        ):
            # Legacy form: a hidden private context per kernel (burns a slot).
            ctx, name = hw_context(args[0], args[1]), args[2]
        else:
            raise _incompatible("__init__", sigs, args)
        base = name.split(":", 1)[0]
        spec = ctx._xclbin._kernels.get(base)
        if spec is None:
            raise RuntimeError(f"No such kernel '{name}': Invalid argument")
        self._ctx, self._name, self._args = ctx, base, spec

    def group_id(self, argno: int, /) -> int:
        """Memory group of argument ``argno``: ``bank | (context slot << 16)``; scalars 0xFFFF."""
        if not isinstance(argno, int):
            raise _incompatible("group_id", ["(self: pyxrt.kernel, arg0: int)"], (argno,))
        last_global = max((i for i, a in enumerate(self._args) if a.kind == "global"), default=-1)
        if not 0 <= argno <= last_global:
            raise IndexError(f"No argument at index {argno} with memory connectivity")
        arg = self._args[argno]
        bank = 0xFFFF if arg.kind == "scalar" else arg.bank
        return bank | (self._ctx._slot << 16)

    def __call__(self, *args: object) -> run:
        """Set args positionally (failures swallowed, slot stays 0) and start a run."""
        r = run(self)
        for i, a in enumerate(args):
            if isinstance(a, bo) and i >= len(self._args):
                raise RuntimeError(
                    f"fake pyxrt: bo passed at argument {i} but kernel '{self._name}' declares only "
                    f"{len(self._args)} args (the real binding segfaults here)"
                )
            # The real __call__ swallows per-argument failures: the slot stays 0.
            with contextlib.suppress(TypeError, IndexError, RuntimeError, ValueError):
                r.set_arg(i, a)
        r.start()
        return r


# ------------------------------------------------------------------------------------ run


class run:
    """One command of a kernel: NEW -> SUBMITTED/running -> terminal state."""

    def __init__(self, k: kernel, /) -> None:
        if not isinstance(k, kernel):
            raise _incompatible("__init__", ["(self: pyxrt.run, arg0: pyxrt.kernel)"], (k,))
        self._kernel = k
        self._args: list[bo | int | None] = [None] * len(k._args)
        self._call: KernelCall | None = None  # the last snapshot, while no argument changes
        self._state = ert_cmd_state.ERT_CMD_STATE_NEW
        self._done = threading.Event()
        self._done.set()

    def set_arg(self, index: int, value: bo | int, /) -> None:
        sigs = [
            "(self: pyxrt.run, arg0: int, arg1: pyxrt.bo)",
            "(self: pyxrt.run, arg0: int, arg1: int)",
        ]
        if not isinstance(index, int) or not isinstance(value, bo | int) or isinstance(value, bool):
            raise _incompatible("set_arg", sigs, (index, value))
        if isinstance(value, int) and not INT32_MIN <= value <= INT32_MAX:
            raise _incompatible("set_arg", sigs, (index, value))
        if not 0 <= index < len(self._args):
            raise IndexError("Bad argument index")
        if not self._done.is_set():
            raise RuntimeError("xrt::run::set_arg called while command is still in progress")
        spec = self._kernel._args[index]
        if isinstance(value, bo) != (spec.kind == "global"):
            raise RuntimeError("Bad argument size")
        # Ints are written as 4 bytes, the rest of a u64 slot stays zero.
        self._args[index] = value if isinstance(value, bo) else value & 0xFFFFFFFF
        self._call = None

    def start(self) -> None:
        if not self._done.is_set():
            raise RuntimeError("bad command state, can't launch")
        call = self._call or self._snapshot()
        self._state = ert_cmd_state.ERT_CMD_STATE_SUBMITTED
        self._done.clear()
        system = self._kernel._ctx._device._system
        if system.latency_s > 0:
            threading.Thread(target=self._execute, args=(call, system), daemon=True).start()
        else:
            self._execute(call, system)

    def _snapshot(self) -> KernelCall:
        k = self._kernel
        args: list[BoArg | int | None] = []
        for i, (spec, value) in enumerate(zip(k._args, self._args)):
            if not isinstance(value, bo):
                args.append(value)
                continue
            bank, slot = value._group & 0xFFFF, value._group >> 16
            if bank != spec.bank or slot not in (0, k._ctx._slot):
                log.warning(
                    "Kernel %s has no compute units with connectivity required for global argument "
                    "at index %d. The argument is allocated in bank %d (slot %d), the compute unit "
                    "is connected to bank %s (slot %d). Allocating local copy of argument buffer in "
                    "connected bank.",
                    k._name,
                    i,
                    bank,
                    slot,
                    spec.bank,
                    k._ctx._slot,
                )
                clone = memoryview(bytearray(value._device_view()))
                args.append(BoArg(value, clone, cloned=True))
            else:
                args.append(BoArg(value, value._device_view(), cloned=False))
        call = KernelCall(k._name, tuple(args), k._ctx)
        # A restarted run with unchanged arguments sends the same command (the views alias the
        # BOs' device memory); a cloned argument copies device memory, so it is redone per start.
        if not any(isinstance(a, BoArg) and a.cloned for a in args):
            self._call = call
        return call

    def _execute(self, call: KernelCall, system: FakeSystem) -> None:
        if system.latency_s > 0:
            self._state = _RUNNING
            time.sleep(system.latency_s)
        ctx = call.context
        if ctx._poisoned:
            state = ert_cmd_state.ERT_CMD_STATE_ABORT
        else:
            try:
                result = (system.executor or noop_executor)(call)
                state = ert_cmd_state.ERT_CMD_STATE_COMPLETED if result is None else result
            except CommandError as exc:
                log.error("command on kernel %s failed: %s", call.kernel_name, exc)
                state = exc.state
            except Exception as exc:  # a device never raises into the host: it reports a state
                log.error(
                    "command on kernel %s failed: %s: %s", call.kernel_name, type(exc).__name__, exc
                )
                state = ert_cmd_state.ERT_CMD_STATE_ERROR
            if state == ert_cmd_state.ERT_CMD_STATE_TIMEOUT:
                ctx._poisoned = True  # TDR: later commands on this context abort
        self._state = state
        self._done.set()

    def wait(self, timeout_ms: int = 0, /) -> ert_cmd_state:
        """Block (``0`` = forever) and return the state; TIMEOUT if still running. Never raises."""
        if not isinstance(timeout_ms, int):
            raise _incompatible("wait", ["(self: pyxrt.run, arg0: int)"], (timeout_ms,))
        finished = self._done.wait(None if timeout_ms <= 0 else timeout_ms / 1000)
        return self._state if finished else ert_cmd_state.ERT_CMD_STATE_TIMEOUT

    def _wait2(self) -> None:
        state = self.wait()
        if state != ert_cmd_state.ERT_CMD_STATE_COMPLETED:
            raise RuntimeError(f"Command failed to complete successfully ({state.name})")

    wait2 = _since((2, 20), _wait2)

    def state(self) -> ert_cmd_state:
        return self._state
