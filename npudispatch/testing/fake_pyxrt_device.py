"""The device side of the fake ``pyxrt`` (:mod:`npudispatch.testing.fake_pyxrt`): the installed
fake machine (:class:`FakeSystem`), ``device``, ``hw_context`` and ``bo``.

What bites on hardware lives here: context slots limited per device, the BO flag whitelist and the
cacheable heap budget, sub-buffers derived from the root only, and BOs with separate host and device
memory that only ``sync`` copies between. Commands (``kernel``, ``run``) are in fake_pyxrt, which
re-exports every name of this module.
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref

import numpy as np

from npudispatch.testing.fake_pyxrt_types import (
    _FROM_DEVICE,
    _TO_DEVICE,
    FakeSystem,
    _incompatible,
    _PybindEnum,
    uuid,
    xclbin,
    xclBOSyncDirection,
    xrt_info_device,
    xrt_msg_level,
)

log = logging.getLogger("pyxrt.fake")

PAGE = 4096
XCL_BO_FLAGS_NONE = 0


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
