"""Run the overlay's kernels with a bounded number of BLAS threads.

The kernels are numpy code on tile-sized matrices. A multi-threaded OpenBLAS spends far more time
synchronising its threads than computing on such matrices, and on a loaded machine (more runnable
threads than cores) its spinning workers get preempted and a launch can take 5-10x longer. The
virtual NPU therefore limits OpenBLAS to :data:`KERNEL_BLAS_THREADS` while it runs a program and
restores the previous count afterwards; no environment variable is read or changed.

Only OpenBLAS (the BLAS numpy wheels ship, ``scipy_openblas`` or a system ``libopenblas``) is
controlled; with any other BLAS :func:`limited_blas_threads` does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

KERNEL_BLAS_THREADS = 1
"""OpenBLAS threads while a program runs on the virtual NPU."""

# (get, set) symbol pairs: numpy's bundled scipy_openblas64, its 32-bit-int build, plain OpenBLAS.
_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


@functools.cache
def _openblas() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:  # type: ignore[name-defined]
    """``(get_num_threads, set_num_threads)`` of the OpenBLAS numpy uses, or None."""
    import numpy  # noqa: F401  (loads numpy's BLAS into the process)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:  # not Linux: no control
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                return get, set_
    return None


@contextmanager
def limited_blas_threads(threads: int = KERNEL_BLAS_THREADS) -> Iterator[None]:
    """Limit OpenBLAS to at most ``threads`` threads inside the block (no-op without OpenBLAS)."""
    funcs = _openblas()
    if funcs is None:
        yield
        return
    get, set_ = funcs
    before = get()
    if before <= threads:
        yield
        return
    set_(threads)
    try:
        yield
    finally:
        set_(before)
