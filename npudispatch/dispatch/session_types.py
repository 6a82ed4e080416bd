"""The values a :class:`~npudispatch.dispatch.session.Session` hands out: model input/output
descriptions (:class:`NodeArg`, onnxruntime's shape), per-run statistics
(:class:`SessionRunStats`) and how each specialisation was made ready (:class:`CompileEvent`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CompileEvent", "NodeArg", "SessionRunStats"]


@dataclass(frozen=True)
class NodeArg:
    """A model input or output as onnxruntime describes it: ``name``, ``shape``, ``type``.

    ``shape`` holds ints, the names of symbolic dims (str) and None for unnamed free dims.
    """

    name: str
    shape: list[Any]
    type: str  # "tensor(float)", "tensor(bfloat16)", ...


@dataclass(frozen=True)
class CompileEvent:
    """One specialisation made ready: its input shapes, how (``"compiled"``, ``"disk cache"``,
    ``"program"`` for a loaded one), the seconds it took, and the run that needed it (None: at
    construction or in :meth:`Session.warmup`)."""

    input_shapes: dict[str, tuple[int, ...]]
    source: Literal["compiled", "disk cache", "program"]
    seconds: float
    run: int | None


@dataclass
class SessionRunStats:
    """One ``run``: kernel calls, bytes copied to/from the device, CPU segments, seconds per stage.

    ``compiled`` is set when this run had to make its input shapes' program ready (``compile``
    says how and how long); ``input_shapes`` are the fed shapes, ``program_shapes`` the shapes
    the program was compiled for (they differ when bucketing pads).
    """

    kernel_calls: int = 0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    cpu_segments: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: list[dict[str, Any]] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    program_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    compile: CompileEvent | None = None

    @property
    def compiled(self) -> bool:
        return self.compile is not None

    @property
    def bytes_copied(self) -> int:
        return self.bytes_to_device + self.bytes_from_device

    def add(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
