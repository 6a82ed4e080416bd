"""The one exception hierarchy of npudispatch.

Every error the framework raises on purpose derives from :class:`NpuDispatchError`, so callers can
catch one type. Messages name the node, tensor, op index or byte offset involved and say what to do.
"""

from __future__ import annotations


class NpuDispatchError(Exception):
    """Base class of every error raised by npudispatch."""


class ModelError(NpuDispatchError, ValueError):
    """The ONNX model is malformed or cannot be used as given (cycle, dangling input, unbound dim...)."""


class OptionError(NpuDispatchError, ValueError):
    """An argument or option value is not one the call accepts; the message lists the valid ones."""


class ProgramFormatError(ModelError):
    """A saved program folder is corrupt or inconsistent; the message names the field or file."""


class UnsupportedOpError(NpuDispatchError):
    """An ONNX node cannot run on the NPU and no CPU fallback was allowed."""


class CpuSegmentError(NpuDispatchError, RuntimeError):
    """A CPU segment failed on its engine (onnxruntime or onnx.reference) while running; the
    message names the segment, its nodes and what the engine reported."""


class NoReferenceError(NpuDispatchError, RuntimeError):
    """``--check`` needs onnxruntime to run the model as its reference, and onnxruntime cannot
    (an op variant its CPU kernels refuse); the message says what onnxruntime reported."""


class TxnFormatError(NpuDispatchError, ValueError):
    """A transaction binary is malformed; the message names the byte offset, op index and opcode."""


class PlanError(NpuDispatchError):
    """A buffer plan is inconsistent (overlap of live tensors, out-of-bounds placement...)."""


class RewriteError(NpuDispatchError):
    """A rewrite pass failed or broke one of its pre/postconditions."""


class DeviceError(NpuDispatchError):
    """A backend (emulator or real NPU) failed to run a program."""


class DeviceHang(DeviceError):
    """A wait in the transaction can never complete (the firmware would hang here)."""


class DeviceFault(DeviceError):
    """A DMA touched an address outside every argument buffer (the hardware would fault here)."""


class BackendUnavailableError(DeviceError):
    """The requested backend cannot be used on this machine (e.g. pyxrt is not installed)."""


__all__ = [
    "BackendUnavailableError",
    "CpuSegmentError",
    "DeviceError",
    "DeviceFault",
    "DeviceHang",
    "ModelError",
    "NoReferenceError",
    "NpuDispatchError",
    "PlanError",
    "ProgramFormatError",
    "RewriteError",
    "TxnFormatError",
    "UnsupportedOpError",
]
