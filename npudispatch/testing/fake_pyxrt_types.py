"""The data types of the fake ``pyxrt`` (:mod:`npudispatch.testing.fake_pyxrt`): pybind11-style
enums, the overload-error message, the fake xclbin file format with its ``uuid``/``xclbin``
classes, the machine configuration (:class:`FakeSystem`) and what an executor receives
(:class:`KernelCall`). Split out so the fake binding's module stays readable; fake_pyxrt re-exports every name.
"""

from __future__ import annotations

import enum
import hashlib
import json
import threading
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from npudispatch.testing.fake_pyxrt_device import bo, hw_context


# --------------------------------------------------------------------------------------- enums


class _PybindIntEnum(enum.IntEnum):
    """A pybind11 ``enum_`` over a C enum: equal to ints, pybind-style ``str``/``repr``."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self._value_}>"

    @enum.property
    def name(self) -> str:
        return self._name_ or "???"


class _PybindEnum(enum.Enum):
    """A pybind11 ``enum_`` over a C++ enum class: convertible with ``int()``, never equal to ints."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self._name_}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._name_}: {self._value_}>"

    def __int__(self) -> int:
        return self._value_

    __index__ = __int__

    def __hash__(self) -> int:
        return hash(self._value_)


class ert_cmd_state(_PybindIntEnum):
    """Command states; RUNNING (3) is not bound, so it shows up as an unnamed value."""

    ERT_CMD_STATE_NEW = 1
    ERT_CMD_STATE_QUEUED = 2
    ERT_CMD_STATE_COMPLETED = 4
    ERT_CMD_STATE_ERROR = 5
    ERT_CMD_STATE_ABORT = 6
    ERT_CMD_STATE_SUBMITTED = 7
    ERT_CMD_STATE_TIMEOUT = 8
    ERT_CMD_STATE_NORESPONSE = 9
    ERT_CMD_STATE_SKERROR = 10
    ERT_CMD_STATE_SKCRASHED = 11

    @classmethod
    def _missing_(cls, value: object) -> ert_cmd_state | None:
        if isinstance(value, int) and 0 <= value < 1 << 32:
            member = int.__new__(cls, value)
            member._name_ = None
            member._value_ = value
            return member
        return None


_RUNNING = ert_cmd_state(3)
_TERMINAL = {
    ert_cmd_state.ERT_CMD_STATE_COMPLETED,
    ert_cmd_state.ERT_CMD_STATE_ERROR,
    ert_cmd_state.ERT_CMD_STATE_ABORT,
    ert_cmd_state.ERT_CMD_STATE_TIMEOUT,
    ert_cmd_state.ERT_CMD_STATE_NORESPONSE,
    ert_cmd_state.ERT_CMD_STATE_SKERROR,
    ert_cmd_state.ERT_CMD_STATE_SKCRASHED,
}


class xclBOSyncDirection(_PybindIntEnum):
    XCL_BO_SYNC_BO_TO_DEVICE = 0
    XCL_BO_SYNC_BO_FROM_DEVICE = 1
    XCL_BO_SYNC_BO_GMIO_TO_AIE = 2
    XCL_BO_SYNC_BO_AIE_TO_GMIO = 3


class xrt_info_device(_PybindEnum):
    bdf = 0
    interface_uuid = 1
    kdma = 2
    max_clock_frequency_mhz = 3
    m2m = 4
    name = 5
    nodma = 6
    offline = 7
    electrical = 8
    thermal = 9
    mechanical = 10
    memory = 11
    platform = 12
    pcie_info = 13
    host = 14
    dynamic_regions = 17
    vmr = 18


class xrt_msg_level(_PybindEnum):
    emergency = 0
    alert = 1
    critical = 2
    error = 3
    warning = 4
    notice = 5
    info = 6
    debug = 7


emergency, alert, critical, error = (
    xrt_msg_level.emergency,
    xrt_msg_level.alert,
    xrt_msg_level.critical,
    xrt_msg_level.error,
)
warning, notice, info, debug = (
    xrt_msg_level.warning,
    xrt_msg_level.notice,
    xrt_msg_level.info,
    xrt_msg_level.debug,
)

_TO_DEVICE = xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
_FROM_DEVICE = xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE


def _incompatible(fname: str, supported: list[str], args: tuple) -> TypeError:
    """The pybind11 overload-resolution failure message."""
    lines = "\n".join(f"    {i}. {s}" for i, s in enumerate(supported, 1))
    invoked = ", ".join(repr(a) for a in args)
    return TypeError(
        f"{fname}(): incompatible function arguments. The following argument types are "
        f"supported:\n{lines}\n\nInvoked with: {invoked}"
    )


# --------------------------------------------------------------------------------- xclbin


@dataclass(frozen=True)
class _Arg:
    name: str
    kind: str  # "scalar" | "global"
    type: str
    offset: int
    bank: int | None  # memory bank index for globals


# The MLIR_AIE kernel of mlir-aie xclbins.
MLIR_AIE_ARGS = (
    _Arg("opcode", "scalar", "uint64_t", 0x00, None),
    _Arg("instr", "global", "char*", 0x08, 1),
    _Arg("ninstr", "scalar", "uint32_t", 0x10, None),
    *(_Arg(f"bo{i}", "global", "void*", 0x14 + 8 * i, 0) for i in range(5)),
)
DEFAULT_MEMS = (
    {"tag": "HOST", "base_address": 0x4000000, "size_kb": 1 << 20},
    {"tag": "SRAM", "base_address": 0x4000000, "size_kb": 64 << 10},
)


def write_fake_xclbin(path: str | Path, kernels: dict[str, list[dict]] | None = None) -> Path:
    """Write a fake ``.xclbin`` plus its JSON sidecar (``<path>.json``) describing the kernels.

    ``kernels`` maps kernel name -> list of args ``{"name", "kind", "type", "offset", "bank"}``;
    default: one ``MLIR_AIE`` kernel with mlir-aie's argument table.
    """
    path = Path(path)
    if kernels is None:
        kernels = {"MLIR_AIE": [a.__dict__ for a in MLIR_AIE_ARGS]}
    meta = {"xsa_name": "fake_npu", "kernels": kernels, "mems": list(DEFAULT_MEMS)}
    path.write_bytes(
        b"xclbin2\0" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).digest()
    )
    Path(f"{path}.json").write_text(json.dumps(meta, indent=1))
    return path


class uuid:
    """An xclbin uuid; handles compare by identity, compare ``to_string()`` values."""

    def __init__(self, text: str, /) -> None:
        if not isinstance(text, str):
            raise _incompatible("__init__", ["(self: pyxrt.uuid, arg0: str)"], (text,))
        self._text = str(_uuid.UUID(text))

    def to_string(self) -> str:
        return self._text


class xclbin:
    """An xclbin file; metadata from its JSON sidecar, else the default MLIR_AIE kernel."""

    class xclbinkernel:
        def __init__(self, name: str, args: tuple[_Arg, ...]) -> None:
            self._name, self._args = name, args

        def get_name(self) -> str:
            return self._name

        def get_num_args(self) -> int:
            return len(self._args)

    class xclbinmem:
        def __init__(self, index: int, spec: dict) -> None:
            self._index, self._spec = index, spec

        def get_tag(self) -> str:
            return self._spec["tag"]

        def get_base_address(self) -> int:
            return self._spec["base_address"]

        def get_size_kb(self) -> int:
            return self._spec["size_kb"]

        def get_used(self) -> bool:
            return True

        def get_index(self) -> int:
            return self._index

    def __init__(self, path: str, /) -> None:
        if not isinstance(path, str):
            raise _incompatible("__init__", ["(self: pyxrt.xclbin, arg0: str)"], (path,))
        if not path:
            raise RuntimeError("No xclbin specified")
        try:
            blob = Path(path).read_bytes()
        except OSError:
            raise RuntimeError(f"Failed to open file '{path}' for reading") from None
        if not blob.startswith(b"xclbin2\0"):
            raise RuntimeError("Invalid xclbin")
        sidecar = Path(f"{path}.json")
        meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        kernels = meta.get("kernels") or {"MLIR_AIE": [a.__dict__ for a in MLIR_AIE_ARGS]}
        self._kernels = {name: tuple(_Arg(**a) for a in args) for name, args in kernels.items()}
        self._mems = tuple(meta.get("mems") or DEFAULT_MEMS)
        self._xsa = meta.get("xsa_name", "fake_npu")
        digest = hashlib.sha256(blob + json.dumps(kernels, sort_keys=True).encode()).digest()
        self._uuid_text = str(_uuid.UUID(bytes=digest[:16]))

    def get_kernels(self) -> list[xclbin.xclbinkernel]:
        return [xclbin.xclbinkernel(n, a) for n, a in self._kernels.items()]

    def get_uuid(self) -> uuid:
        return uuid(self._uuid_text)

    def get_xsa_name(self) -> str:
        return self._xsa

    def get_mems(self) -> list[xclbin.xclbinmem]:
        return [xclbin.xclbinmem(i, m) for i, m in enumerate(self._mems)]


# ----------------------------------------------------------------------------------- system


@dataclass
class FakeSystem:
    """Machine-wide state of the fake: devices, version profile, limits and the executor.

    ``context_limit``: live hardware contexts per device (npu1 6, npu4 16 resident, 32 with
    temporal sharing). ``heap_bytes``: cacheable (instruction) heap per device. ``latency_s``:
    simulated command duration; when > 0 commands run on a worker thread so ``wait(ms)`` can time
    out. ``executor`` runs each command (default: :func:`noop_executor`).
    """

    num_devices: int = 1
    device_name: str = "RyzenAI-npu4"
    bdf: str = "0000:c5:00.1"
    version: tuple[int, int] = (2, 21)
    context_limit: int = 16
    heap_bytes: int = 64 << 20
    latency_s: float = 0.0
    executor: Callable[[KernelCall], ert_cmd_state | None] | None = None
    _devices: dict[int, _DeviceState] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def device_state(self, index: int) -> _DeviceState:
        with self._lock:
            return self._devices.setdefault(index, _DeviceState(index))


@dataclass
class _DeviceState:
    index: int
    registered: dict[str, xclbin] = field(default_factory=dict)
    live_contexts: int = 0
    next_slot: int = 1
    heap_used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def release_context(self) -> None:
        with self.lock:
            self.live_contexts -= 1

    def release_heap(self, nbytes: int) -> None:
        with self.lock:
            self.heap_used -= nbytes


# ------------------------------------------------------------------------- kernel calls


@dataclass(frozen=True)
class BoArg:
    """A buffer argument as the device sees it: the BO and the device memory used."""

    bo: bo
    view: memoryview  # device memory of the BO, or of a hidden clone after a bank mismatch
    cloned: bool


@dataclass(frozen=True)
class KernelCall:
    """One command as the firmware receives it.

    ``args[i]`` is a :class:`BoArg`, an ``int`` (scalar as written: 4 bytes, zero-extended), or
    ``None`` (never set / swallowed by ``kernel.__call__`` -> 0 on the device).
    """

    kernel_name: str
    args: tuple[BoArg | int | None, ...]
    context: hw_context

    def scalar(self, i: int) -> int:
        """Arg ``i`` as the integer the device reads (unset -> 0)."""
        a = self.args[i] if i < len(self.args) else None
        if isinstance(a, BoArg):
            return a.bo.address()
        return 0 if a is None else a

    def buffer(self, i: int) -> BoArg | None:
        """Arg ``i`` if it is a buffer, else None."""
        a = self.args[i] if i < len(self.args) else None
        return a if isinstance(a, BoArg) else None


class CommandError(Exception):
    """Raised by an executor to end a command in a given state (default ERROR) with a reason."""

    def __init__(
        self, reason: str, state: ert_cmd_state = ert_cmd_state.ERT_CMD_STATE_ERROR
    ) -> None:
        super().__init__(reason)
        self.state = state


def noop_executor(call: KernelCall) -> None:
    """A device that completes every command at once and touches no memory."""
    return None
