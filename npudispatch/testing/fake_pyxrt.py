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
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

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

log = logging.getLogger("pyxrt.fake")

PAGE = 4096
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
XCL_BO_FLAGS_NONE = 0


class _since:
    """Descriptor that exists only from a given XRT version of the installed profile on."""

    def __init__(self, version: tuple[int, int], func: Callable) -> None:
        self.version, self.func = version, func

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if _system.version < self.version:
            raise AttributeError(
                f"type object {owner.__name__!r} has no attribute {self.name!r} "
                f"(fake XRT profile {_system.version}, needs {self.version})"
            )
        return self.func if obj is None else self.func.__get__(obj, owner)


# ----------------------------------------------------------------------------------- system


_system = FakeSystem()


def _set_system(system: FakeSystem) -> FakeSystem:
    """Install ``system`` as the current fake machine; returns the previous one."""
    global _system
    previous, _system = _system, system
    return previous


def current_system() -> FakeSystem:
    """The fake machine that new ``device`` objects attach to."""
    return _system


def enumerate_devices() -> int:
    """Number of (fake) NPU devices."""
    return _system.num_devices


def log_message(level: xrt_msg_level, tag: str, msg: str, /) -> None:
    """Forward an XRT log message to the ``pyxrt.fake`` logger."""
    if not isinstance(level, xrt_msg_level):
        raise _incompatible(
            "log_message", ["(arg0: pyxrt.xrt_msg_level, arg1: str, arg2: str)"], (level, tag, msg)
        )
    log.log(logging.ERROR if int(level) <= 3 else logging.INFO, "[%s] %s", tag, msg)


# --------------------------------------------------------------------------------- device


class device:
    """An NPU device handle (keep one per process)."""

    def __init__(self, which: int | str, /) -> None:
        system = _system
        if isinstance(which, bool) or not isinstance(which, int | str):
            raise _incompatible(
                "__init__",
                ["(self: pyxrt.device, arg0: int)", "(self: pyxrt.device, arg0: str)"],
                (which,),
            )
        if isinstance(which, str):
            parts = which.replace(".", ":").split(":")
            if len(parts) != 4 or not all(
                p and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
            ):
                raise RuntimeError(f"Invalid device string '{which}'")
            if which != system.bdf:
                raise RuntimeError(f"No such device '{which}'")
            index = 0
        else:
            index = which
            if not 0 <= index < system.num_devices:
                raise RuntimeError(f" No such device with index '{index}'")
        self._system = system
        self._state = system.device_state(index)

    def register_xclbin(self, xb: xclbin, /) -> uuid:
        """Register an xclbin with the device (idempotent; allocates nothing)."""
        if not isinstance(xb, xclbin):
            raise _incompatible(
                "register_xclbin", ["(self: pyxrt.device, arg0: pyxrt.xclbin)"], (xb,)
            )
        with self._state.lock:
            self._state.registered[xb._uuid_text] = xb
        return xb.get_uuid()

    def load_xclbin(self, xb: object, /) -> uuid:
        """Unsupported on NPUs (use register_xclbin + hw_context)."""
        if self._system.version >= (2, 23):
            warnings.warn("load_xclbin is deprecated", DeprecationWarning, stacklevel=2)
            raise RuntimeError("xrtDeviceLoadXclbin failed in load_xclbin compatibility shim")
        raise RuntimeError("load_axlf: Operation not supported")

    def get_info(self, key: xrt_info_device, /) -> str:
        if not isinstance(key, xrt_info_device):
            raise _incompatible(
                "get_info", ["(self: pyxrt.device, arg0: pyxrt.xrt_info_device)"], (key,)
            )
        if key is xrt_info_device.name:
            return self._system.device_name
        if key is xrt_info_device.bdf:
            return self._system.bdf
        if key is xrt_info_device.offline:
            return "false"
        return "{}"

    def get_xclbin_uuid(self) -> uuid:
        with self._state.lock:
            last = next(reversed(self._state.registered), "00000000-0000-0000-0000-000000000000")
        return uuid(last)


# ------------------------------------------------------------------------------ hw_context


class hw_context:
    """A hardware context on a registered xclbin (consumes one of the device's context slots)."""

    class access_mode(_PybindEnum):
        exclusive = 0
        shared = 1

    def __init__(self, *args: object) -> None:
        sigs = ["(self: pyxrt.hw_context, arg0: pyxrt.device, arg1: pyxrt.uuid)"]
        system_version = _system.version
        if system_version >= (2, 23):
            sigs.append(
                "(self: pyxrt.hw_context, device: pyxrt.device, xclbin: pyxrt.uuid | pyxrt.xclbin | str, "
                "mode: pyxrt.hw_context.access_mode | dict = ...)"
            )
        if len(args) not in (2, 3) or not isinstance(args[0], device):
            raise _incompatible("__init__", sigs, args)
        dev, what = args[0], args[1]
        if len(args) == 3 and (
            system_version < (2, 23) or not isinstance(args[2], hw_context.access_mode | dict)
        ):
            raise _incompatible("__init__", sigs, args)
        if isinstance(what, uuid):
            key = what.to_string()
        elif system_version >= (2, 23) and isinstance(what, xclbin | str):
            xb = what if isinstance(what, xclbin) else xclbin(what)
            key = dev.register_xclbin(xb).to_string()
        else:
            raise _incompatible("__init__", sigs, args)
        state = dev._state
        with state.lock:
            xb = state.registered.get(key)
            if xb is None:
                raise RuntimeError(f"No xclbin with uuid '{key}': Invalid argument")
            if state.live_contexts >= dev._system.context_limit:
                raise RuntimeError(
                    "DRM_IOCTL_AMDXDNA_CREATE_HWCTX IOCTL failed (err=-2): No such file or directory"
                )
            state.live_contexts += 1
            self._slot = state.next_slot
            state.next_slot += 1
        self._device, self._xclbin, self._poisoned = dev, xb, False
        weakref.finalize(self, state.release_context)

    def get_xclbin_uuid(self) -> uuid:
        return self._xclbin.get_uuid()


# ------------------------------------------------------------------------------------- bo


_addr_lock = threading.Lock()
_next_addr = {"heap": 0x0000_0001_0000_0000, "host": 0x0000_7F00_0000_0000}


def _alloc_address(kind: str, size: int) -> int:
    with _addr_lock:
        addr = _next_addr[kind]
        _next_addr[kind] += -(-size // PAGE) * PAGE + PAGE  # guard page between BOs
    return addr


class bo:
    """A buffer object with separate host and device memory (``sync`` copies between them)."""

    class flags(_PybindEnum):
        normal = 0
        cacheable = 1 << 24
        svm = 1 << 27
        device_only = 1 << 28
        host_only = 1 << 29
        p2p = 1 << 30

    def __init__(self, *args: object) -> None:
        sigs = [
            "(self: pyxrt.bo, arg0: pyxrt.device, arg1: int, arg2: pyxrt.bo.flags, arg3: int)",
            "(self: pyxrt.bo, arg0: pyxrt.bo, arg1: int, arg2: int)",
        ]
        v223 = _system.version >= (2, 23)
        if v223:
            sigs += [
                "(self: pyxrt.bo, arg0: pyxrt.hw_context, arg1: int, arg2: pyxrt.bo.flags, arg3: int)",
                "(self: pyxrt.bo, arg0: pyxrt.hw_context, arg1: int, arg2: int)",
            ]

        def is_uint(x: object, bits: int = 64) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << bits

        owner = args[0] if args else None
        if len(args) == 3 and isinstance(owner, bo) and is_uint(args[1]) and is_uint(args[2]):
            self._init_sub(owner, args[1], args[2])
            return
        ctx = None
        if (
            len(args) == 4
            and isinstance(owner, device | hw_context)
            and (isinstance(owner, device) or v223)
        ):
            size, flg, group = args[1:]
        elif len(args) == 3 and v223 and isinstance(owner, hw_context):
            size, flg, group = args[1], bo.flags.normal, args[2]
        else:
            raise _incompatible("__init__", sigs, args)
        if not (is_uint(size) and isinstance(flg, bo.flags) and is_uint(group, 32)):
            raise _incompatible("__init__", sigs, args)
        if isinstance(owner, hw_context):
            ctx, dev = owner, owner._device
        else:
            dev = owner
        self._init_root(dev, ctx, size, flg, group)

    def _init_root(
        self, dev: device, ctx: hw_context | None, size: int, flg: bo.flags, group: int
    ) -> None:
        if size == 0:
            raise RuntimeError(
                "DRM_IOCTL_AMDXDNA_CREATE_BO IOCTL failed (err=-22): Invalid argument"
            )
        if flg is bo.flags.normal:
            raise RuntimeError("User ptr BO (err=95): Operation not supported")
        if flg not in (bo.flags.host_only, bo.flags.cacheable):
            raise RuntimeError(f"Bad BO type {flg} (err=95): Operation not supported")
        state = dev._state
        if flg is bo.flags.cacheable:
            with state.lock:
                if state.heap_used + size > dev._system.heap_bytes:
                    raise RuntimeError(
                        f"Heap at max size {dev._system.heap_bytes}, can't expand further "
                        "(err=28): No space left on device"
                    )
                state.heap_used += size
            weakref.finalize(self, state.release_heap, size)
        self._device, self._ctx, self._flags, self._group = dev, ctx, flg, group
        # Zeroed like the driver's shmem-backed BOs, and like them zeroed lazily (calloc'd
        # pages): a bytearray would touch every page of a large weights BO twice at allocation.
        self._host, self._dev = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
        self._root, self._offset, self._size = self, 0, size
        self._address = _alloc_address("heap" if flg is bo.flags.cacheable else "host", size)

    def _init_sub(self, parent: bo, size: int, offset: int) -> None:
        # Real XRT composes nested offsets wrongly: derive sub-buffers from the root only.
        if parent._root is not parent:
            raise RuntimeError(
                "sub-buffer of a sub-buffer is not supported: derive it from the root bo"
            )
        if size == 0 or offset + size > parent._size:
            raise RuntimeError(
                f"Invalid sub-buffer: offset {offset} + size {size} exceeds parent size "
                f"{parent._size} (err=22): Invalid argument"
            )
        self._device, self._ctx, self._flags, self._group = (
            parent._device,
            parent._ctx,
            parent._flags,
            parent._group,
        )
        self._host, self._dev = parent._host, parent._dev
        self._root, self._offset, self._size = parent, offset, size
        self._address = parent._address + offset

    # -- host side
    def size(self) -> int:
        return self._size

    def address(self) -> int:
        return self._address

    def write(self, buf: object, seek: int, /) -> None:
        """Copy ``buf`` (buffer protocol) into host memory at ``seek``; does NOT sync."""
        try:
            view = memoryview(buf)  # type: ignore[arg-type]
        except TypeError:
            raise _incompatible(
                "write", ["(self: pyxrt.bo, arg0: buffer, arg1: int)"], (buf, seek)
            ) from None
        if not isinstance(seek, int) or seek < 0:
            raise _incompatible("write", ["(self: pyxrt.bo, arg0: buffer, arg1: int)"], (buf, seek))
        data = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        if seek + data.nbytes > self._size:
            raise RuntimeError("attempting to write past buffer size: Invalid argument")
        start = self._offset + seek
        self._host[start : start + data.nbytes] = data

    def read(self, size: int, skip: int, /) -> np.ndarray:
        """A new int8 array with ``size`` bytes of host memory from ``skip``; does NOT sync."""
        if not (isinstance(size, int) and isinstance(skip, int)) or size < 0 or skip < 0:
            raise _incompatible("read", ["(self: pyxrt.bo, arg0: int, arg1: int)"], (size, skip))
        if skip + size > self._size:
            raise RuntimeError("attempting to read past buffer size: Invalid argument")
        start = self._offset + skip
        return np.frombuffer(bytes(self._host[start : start + size]), dtype=np.int8).copy()

    def map(self) -> memoryview:
        """Writable byte view aliasing host memory."""
        return memoryview(self._host)[self._offset : self._offset + self._size]

    def sync(self, direction: xclBOSyncDirection, *rest: int) -> None:
        """``sync(dir)`` or ``sync(dir, size, offset)``: copy host <-> device memory."""
        sigs = [
            "(self: pyxrt.bo, arg0: pyxrt.xclBOSyncDirection)",
            "(self: pyxrt.bo, arg0: pyxrt.xclBOSyncDirection, arg1: int, arg2: int)",
        ]
        if not isinstance(direction, xclBOSyncDirection) or len(rest) not in (0, 2):
            raise _incompatible("sync", sigs, (direction, *rest))
        if any(not isinstance(x, int) or x < 0 for x in rest):
            raise _incompatible("sync", sigs, (direction, *rest))
        size, offset = rest if rest else (self._size, 0)
        if offset + size > self._size:
            if self._root is not self:
                raise RuntimeError("Invalid offset and size when syncing sub buffer")
            raise RuntimeError(
                f"Invalid BO offset and size for sync'ing: {offset}, {size} (err=22): Invalid argument"
            )
        lo, hi = self._offset + offset, self._offset + offset + size
        if direction == _TO_DEVICE:
            self._dev[lo:hi] = self._host[lo:hi]
        elif direction == _FROM_DEVICE:
            self._host[lo:hi] = self._dev[lo:hi]
        else:
            raise RuntimeError(f"Unsupported sync direction {direction} (err=22): Invalid argument")

    # -- fake-only inspection (what the device sees)
    def _device_view(self) -> memoryview:
        return memoryview(self._dev)[self._offset : self._offset + self._size]


for _flag in bo.flags:
    setattr(bo, _flag.name, _flag)  # exported to the parent scope, as pybind11 .export_values()


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
