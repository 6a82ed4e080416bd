"""Backends that run fused programs: the emulator (default) and real NPUs through pyxrt.

``get_backend("emulator")`` or ``get_backend("xrt", xclbin=..., kernel_name=..., convention=...,
timeout_ms=...)``; both implement :class:`Backend` (``prepare`` once, ``execute`` per run). Backends
are looked up by name in :mod:`~npudispatch.dispatch.backends.registry`, where each declares and
validates its own options; add one with :func:`register_backend`.
"""

from __future__ import annotations

from npudispatch.dispatch.backends.base import Backend, Prepared, ProgramImage, RunStats
from npudispatch.dispatch.backends.registry import (
    BackendSpec,
    backend_names,
    backend_spec,
    get_backend,
    register_backend,
)

BACKENDS = backend_names()  # the built-in names (kept for callers that import the tuple)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendSpec",
    "Prepared",
    "ProgramImage",
    "RunStats",
    "backend_names",
    "backend_spec",
    "get_backend",
    "register_backend",
]
