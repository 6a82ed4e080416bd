"""What every backend runs and returns: :class:`ProgramImage`, :class:`Backend`, :class:`RunStats`.

A backend runs one fused program (docs/architecture.md §3): a plain transaction whose DDR_PATCH ``argidx``
0..4 select the five buffers input, output, scratch, const, params. ``prepare`` does the one-time
work (instructions, const and params images, buffer allocation); ``execute`` runs it once per call
and is thread-safe (one lock per prepared program). Several prepared programs may share a backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from npudispatch.errors import DeviceError
from npudispatch.overlay_abi import BUFFER_NAMES, BufferKind

if TYPE_CHECKING:
    from npudispatch.dispatch.patch_sites import PatchTable

INPUT, OUTPUT, SCRATCH, CONST, PARAMS = BufferKind


@dataclass(frozen=True, eq=False)
class ProgramImage:
    """Everything a backend needs to run one fused program.

    ``buffer_sizes`` are the byte sizes of the five kernel buffers in DDR_PATCH argidx order
    (input, output, scratch, const, params); ``const_image``/``params_image`` fill the start of
    buffers 3 and 4; ``kernels`` maps overlay kernel ids to the callables the emulator's overlay
    invokes (ignored by real hardware, whose cores run the xclbin's kernels); ``patches``: the
    DDR_PATCH fields of ``txn`` every ``execute`` rewrites from the input image first.
    """

    txn: bytes
    buffer_sizes: tuple[int, int, int, int, int]
    const_image: bytes = b""
    params_image: bytes = b""
    kernels: Mapping[int, Callable[..., Any]] = field(default_factory=dict)
    name: str = "program"
    # Runtime patch sites (DMA gathers): DDR_PATCH offsets in ``txn`` a backend rewrites from the
    # input image before every run (npudispatch.dispatch.patch_sites); None = nothing to patch.
    patches: PatchTable | None = None
    # "name (op_type)" of each kernel launch in run order, so a failing launch names its node
    launch_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.buffer_sizes)
        if len(sizes) != 5 or any(s < 0 for s in sizes):
            raise ValueError(
                f"program {self.name!r}: buffer_sizes must be 5 non-negative byte counts "
                f"(input, output, scratch, const, params), got {self.buffer_sizes!r}"
            )
        object.__setattr__(self, "buffer_sizes", sizes)
        for idx, image in ((CONST, self.const_image), (PARAMS, self.params_image)):
            if len(image) > sizes[idx]:
                raise ValueError(
                    f"program {self.name!r}: {BUFFER_NAMES[idx]} image has {len(image)} bytes but "
                    f"the {BUFFER_NAMES[idx]} buffer is {sizes[idx]} bytes; re-plan the buffers"
                )
        if len(self.txn) < 16:
            raise ValueError(
                f"program {self.name!r}: transaction of {len(self.txn)} bytes is empty"
            )

    def initial_buffer(self, idx: int) -> np.ndarray:
        """A fresh uint8 buffer ``idx`` (const/params pre-filled with their images, rest zero)."""
        buf = np.zeros(self.buffer_sizes[idx], dtype=np.uint8)
        image = {CONST: self.const_image, PARAMS: self.params_image}.get(idx, b"")
        buf[: len(image)] = np.frombuffer(image, dtype=np.uint8)
        return buf


@dataclass
class RunStats:
    """What one ``execute`` cost: wall time per stage, bytes moved, kernel calls, device statistics."""

    stage_seconds: dict[str, float] = field(default_factory=dict)
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    kernel_calls: int = 0
    device: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        """Sum of all stage times."""
        return sum(self.stage_seconds.values())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (accumulates when a stage name repeats)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass(eq=False)
class Prepared:
    """A program made ready on a backend; ``lock`` serializes its executions."""

    program: ProgramImage
    backend_name: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@runtime_checkable
class Backend(Protocol):
    """A place to run fused programs (the emulator or a real NPU)."""

    name: str

    def prepare(self, program: ProgramImage) -> Prepared:
        """One-time setup of ``program``: upload instructions and images, allocate buffers."""
        ...

    def execute(
        self, prepared: Prepared, input_image: bytes | np.ndarray, output: np.ndarray
    ) -> RunStats:
        """Run once: copy ``input_image`` in, run, read the output buffer into ``output``."""
        ...


def check_io(prepared: Prepared, input_image: bytes | np.ndarray, output: np.ndarray) -> np.ndarray:
    """Validate an ``execute`` call's buffers; returns the input image as a flat uint8 array."""
    program = prepared.program
    n_in, n_out = program.buffer_sizes[INPUT], program.buffer_sizes[OUTPUT]
    if (
        type(input_image) is np.ndarray
        and input_image.dtype == np.uint8
        and input_image.ndim == 1
        and input_image.flags.c_contiguous
    ):
        data = input_image  # the common case (a session's input image): nothing to convert
    elif isinstance(input_image, bytes | bytearray | memoryview):
        data = np.frombuffer(input_image, dtype=np.uint8)
    else:
        arr = np.ascontiguousarray(input_image)
        data = arr.reshape(-1).view(np.uint8)
    if data.size != n_in:
        raise DeviceError(
            f"program {program.name!r}: input image has {data.size} bytes, the input buffer is "
            f"{n_in} bytes; pack the inputs with the program's buffer plan"
        )
    if not (
        isinstance(output, np.ndarray)
        and output.dtype == np.uint8
        and output.flags.c_contiguous
        and output.flags.writeable
        and output.size == n_out
    ):
        raise DeviceError(
            f"program {program.name!r}: output must be a writable contiguous uint8 array of "
            f"{n_out} bytes (the output buffer size), got "
            f"{getattr(output, 'dtype', type(output).__name__)} of size {getattr(output, 'size', '?')}"
        )
    return data
