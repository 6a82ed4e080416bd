"""Backends that run fused programs: the emulator (default) and real NPUs through pyxrt.

``get_backend("emulator")`` or ``get_backend("xrt", xclbin=..., kernel_name=..., convention=...,
timeout_ms=...)``; both implement :class:`Backend` (``prepare`` once, ``execute`` per run).
"""

from __future__ import annotations

from typing import Any

from npudispatch.dispatch.backends.base import Backend, Prepared, ProgramImage, RunStats
from npudispatch.errors import BackendUnavailableError

BACKENDS = ("emulator", "xrt")


def get_backend(name: str = "emulator", **options: Any) -> Backend:
    """Create backend ``name`` with its ``options``; ``xrt`` imports pyxrt only here."""
    if name == "emulator":
        from npudispatch.dispatch.backends.emulator import EmulatorBackend

        return EmulatorBackend(**options)
    if name == "xrt":
        from npudispatch.dispatch.backends.xrt import XrtBackend

        if "xclbin" not in options:
            raise BackendUnavailableError(
                "the 'xrt' backend needs xclbin=<path to the overlay/mlir-aie .xclbin>"
            )
        return XrtBackend(**options)
    raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Prepared", "ProgramImage", "RunStats", "get_backend"]
