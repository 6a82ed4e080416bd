"""npudispatch: compile ONNX subgraphs for AMD Ryzen AI NPUs into one fused transaction binary.

Stages live in sub-packages named after them: ``graph`` (load, order, lifetimes, partition),
``rewrites`` (pass manager and fusions), ``operators`` (operator library), ``txn`` (transaction
binaries), ``dispatch`` (buffer plan, fused program, Session, backends) and ``emulator`` (the
functional virtual NPU that runs fused programs when no NPU is present).
"""

from npudispatch.errors import (
    BackendUnavailableError,
    CpuSegmentError,
    DeviceError,
    DeviceFault,
    DeviceHang,
    ModelError,
    NoReferenceError,
    NpuDispatchError,
    OptionError,
    PlanError,
    RewriteError,
    TxnFormatError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

_LAZY = {"Session": "npudispatch.dispatch.session", "compile_model": "npudispatch.dispatch.compile"}


def __getattr__(name: str):
    """Lazy top-level API: ``npudispatch.Session`` and ``npudispatch.compile_model``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'npudispatch' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "CpuSegmentError",
    "DeviceError",
    "DeviceFault",
    "DeviceHang",
    "ModelError",
    "NoReferenceError",
    "NpuDispatchError",
    "OptionError",
    "PlanError",
    "RewriteError",
    "Session",
    "TxnFormatError",
    "UnsupportedOpError",
    "__version__",
    "compile_model",
]
