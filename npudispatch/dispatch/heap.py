"""Give the heap memory a parsed model file leaves behind back to the operating system.

Parsing an ONNX file with inline weights allocates the weights' bytes inside protobuf's buffers.
Once the initializers are decoded into numpy arrays (:func:`npudispatch.graph.load`) those buffers
are freed, but glibc raises its mmap threshold after the first large ``free``, so big blocks of
such a parse live in the ``brk`` heap, which glibc only shrinks from its top: on the 72 MB llama2
MLP about one model's worth of freed memory stayed resident for the whole session.
``malloc_trim(0)`` returns every free page of the heap; it costs a few milliseconds.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

__all__ = ["release_freed_heap"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; absent from musl
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_heap() -> None:
    """Return freed heap pages to the OS where the C library can (glibc); otherwise do nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
