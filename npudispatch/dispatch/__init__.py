"""Dispatch: buffer plan, fused program emission, Session API and backends (emulator, xrt).

Public API (imported lazily so ``import npudispatch.dispatch.plan`` stays light):
:func:`compile_model` -> :class:`CompiledModel`; :class:`FusedProgram` (save/load, to_program_image);
:func:`to_dd_meta` (DD meta JSON); :class:`Session` (onnxruntime-like run); :func:`build_plan`,
:class:`BufferPlan`; :func:`get_backend`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BufferKind": "npudispatch.dispatch.plan",
    "BufferPlan": "npudispatch.dispatch.plan",
    "TensorRequest": "npudispatch.dispatch.plan",
    "build_plan": "npudispatch.dispatch.plan",
    "CompiledModel": "npudispatch.dispatch.compile",
    "compile_model": "npudispatch.dispatch.compile",
    "npu_support": "npudispatch.rewrites.support",
    "support_query": "npudispatch.rewrites.support",
    "FusedProgram": "npudispatch.dispatch.emit",
    "TensorBinding": "npudispatch.dispatch.emit",
    "to_dd_meta": "npudispatch.dispatch.meta",
    "NodeArg": "npudispatch.dispatch.session",
    "Session": "npudispatch.dispatch.session",
    "SessionRunStats": "npudispatch.dispatch.session",
    "get_backend": "npudispatch.dispatch.backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'npudispatch.dispatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
