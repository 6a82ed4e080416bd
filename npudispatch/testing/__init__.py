"""Test doubles: a faithful fake ``pyxrt`` (:mod:`npudispatch.testing.fake_pyxrt`) and its executors.

``install_fake_pyxrt()`` puts the fake into ``sys.modules["pyxrt"]`` so ``import pyxrt`` (and the
``xrt`` backend) use it; as a context manager it restores the previous state on exit::

    with install_fake_pyxrt(executor=emulator_executor(kernels)) as pyxrt:
        ...
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

from npudispatch.testing import fake_pyxrt
from npudispatch.testing.emulator_exec import EmulatorExecutor, emulator_executor
from npudispatch.testing.fake_pyxrt import (
    CommandError,
    FakeSystem,
    KernelCall,
    noop_executor,
    write_fake_xclbin,
)

# Names the real module has in every supported version (the minimum surface the xrt backend uses, docs/architecture.md §7).
_PUBLIC = (
    "XCL_BO_FLAGS_NONE",
    "bo",
    "device",
    "enumerate_devices",
    "ert_cmd_state",
    "hw_context",
    "kernel",
    "log_message",
    "run",
    "uuid",
    "xclBOSyncDirection",
    "xclbin",
    "xrt_info_device",
    "xrt_msg_level",
    "emergency",
    "alert",
    "critical",
    "error",
    "warning",
    "notice",
    "info",
    "debug",
)


class FakePyxrtInstall:
    """Handle returned by :func:`install_fake_pyxrt`; a context manager that uninstalls on exit."""

    def __init__(
        self, module: types.ModuleType, previous: Any, previous_system: FakeSystem
    ) -> None:
        self.module, self._previous, self._previous_system = module, previous, previous_system
        self.system: FakeSystem = module.FAKE_SYSTEM

    def uninstall(self) -> None:
        """Restore whatever ``sys.modules["pyxrt"]`` held before (or remove the fake)."""
        if sys.modules.get("pyxrt") is self.module:
            if self._previous is None:
                del sys.modules["pyxrt"]
            else:
                sys.modules["pyxrt"] = self._previous
        fake_pyxrt._set_system(self._previous_system)

    def __enter__(self) -> types.ModuleType:
        return self.module

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def install_fake_pyxrt(
    executor: Callable[[KernelCall], Any] | None = None,
    *,
    version: tuple[int, int] = (2, 21),
    context_limit: int = 16,
    num_devices: int = 1,
    device_name: str = "RyzenAI-npu4",
    latency_s: float = 0.0,
    heap_bytes: int = 64 << 20,
) -> FakePyxrtInstall:
    """Install the fake as ``sys.modules["pyxrt"]`` with a fresh :class:`FakeSystem`.

    ``executor`` runs each command (default :func:`noop_executor`); ``version`` selects the XRT
    API profile (``run.wait2`` from 2.20, ``hw_context``/``bo`` context overloads from 2.23).
    """
    system = FakeSystem(
        num_devices=num_devices,
        device_name=device_name,
        version=tuple(version),  # type: ignore[arg-type]
        context_limit=context_limit,
        heap_bytes=heap_bytes,
        latency_s=latency_s,
        executor=executor,
    )
    previous_system = fake_pyxrt._set_system(system)
    module = types.ModuleType("pyxrt", "Fake pyxrt (npudispatch.testing.fake_pyxrt)")
    for name in _PUBLIC:
        setattr(module, name, getattr(fake_pyxrt, name))
    module.FAKE_SYSTEM = system  # type: ignore[attr-defined]
    module.FAKE_XRT_VERSION = system.version  # type: ignore[attr-defined]
    previous = sys.modules.get("pyxrt")
    sys.modules["pyxrt"] = module
    return FakePyxrtInstall(module, previous, previous_system)


__all__ = [
    "CommandError",
    "EmulatorExecutor",
    "FakePyxrtInstall",
    "FakeSystem",
    "KernelCall",
    "emulator_executor",
    "install_fake_pyxrt",
    "noop_executor",
    "write_fake_xclbin",
]
