"""The two kinds of segment a :class:`~npudispatch.dispatch.session.Session` runs in order:
:class:`CpuSegment` (a sub-model on onnxruntime or onnx.reference) and :class:`NpuSegment` (a
fused program prepared on a backend: copy-in, one kernel call, copy-out).
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from npudispatch import opset
from npudispatch.dispatch.artifact import CpuSegmentModel
from npudispatch.dispatch.backends import Backend
from npudispatch.dispatch.backends.base import Prepared
from npudispatch.dispatch.emit import FusedProgram, TensorBinding
from npudispatch.dispatch.ort_session import onnxruntime_session
from npudispatch.errors import CpuSegmentError, ModelError, UnsupportedOpError
from npudispatch.graph.value_types import restore_map_types

if TYPE_CHECKING:
    from npudispatch.dispatch.session_types import SessionRunStats

__all__ = ["CpuSegment", "Fallback", "NpuSegment", "default_engine", "first_line"]

Fallback = Literal["onnxruntime", "reference"] | None


class CpuSegment:
    """A CPU partition as a runnable sub-model (onnxruntime or onnx.reference)."""

    def __init__(self, segment: CpuSegmentModel, engine: str) -> None:
        label = segment.name
        self.inputs = list(segment.inputs)
        self.outputs = list(segment.outputs)
        self.engine = engine
        self._lock = threading.Lock()
        try:
            if engine == "onnxruntime":
                from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

                # A saved segment is opened by path (its weights sit next to it); one in memory
                # shares its external weights with onnxruntime from any working directory.
                self._sess = (
                    InferenceSession(str(segment.path), providers=["CPUExecutionProvider"])
                    if segment.model is None
                    else onnxruntime_session(segment.model)
                )
            else:
                from onnx.reference import ReferenceEvaluator

                if segment.model is None:
                    proto = onnx.load(str(segment.path))
                else:
                    proto = ir.serde.serialize_model(segment.model)
                    restore_map_types(proto.graph, segment.model.graph)
                self._sess = ReferenceEvaluator(proto, new_ops=opset.reference_ops())
        except Exception as exc:  # ORT raises its own pybind types; keep ours on top
            # Say what the engine reported: the cause may be a type or attribute it does not
            # implement, a malformed node or a missing kernel, not necessarily a non-standard op.
            raise UnsupportedOpError(
                f"CPU segment {label} [{', '.join(segment.node_labels())}] could not be loaded by "
                f"{engine}, which reported: {first_line(exc)}. These nodes have no NPU operator "
                "(the partition report says why) and must run on the CPU"
            ) from exc
        self.label = label
        self._segment = segment

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        """The segment's outputs: arrays, and sequences (lists), maps (dicts) and optionals
        (None when empty) as the engine returns them."""
        # np.ascontiguousarray would turn a rank-0 feed into shape [1]
        feeds = {
            name: np.require(env[name], requirements="C")
            if isinstance(env[name], np.ndarray)
            else env[name]
            for name in self.inputs
        }
        try:
            if self.engine == "onnxruntime":
                outs = self._sess.run(self.outputs, feeds)  # InferenceSession.run is thread-safe
            else:
                with self._lock:  # the reference evaluator keeps per-run state
                    outs = self._sess.run(self.outputs, feeds)
        except Exception as exc:  # the engines' own exception types; ours on top
            raise self._run_error(exc, feeds) from exc
        return dict(zip(self.outputs, outs))

    def _run_error(self, exc: Exception, feeds: Mapping[str, Any]) -> CpuSegmentError:
        labels = self._segment.node_labels()
        reported = first_line(exc)
        # onnxruntime names the failing node ("... node. Name:'Gather_3' ...")
        named = re.search(r"Name:\s*'([^']+)'", str(exc))
        culprit = next((s for s in labels if named and s.startswith(named.group(1) + " (")), None)
        where = f"node {culprit}" if culprit else f"one of its nodes [{', '.join(labels)}]"
        shapes = ", ".join(
            f"{n} {list(a.shape) if isinstance(a, np.ndarray) else type(a).__name__}"
            for n, a in feeds.items()
        )
        return CpuSegmentError(
            f"CPU segment {self.label} failed on {self.engine} at {where} (inputs: {shapes}); "
            f"{self.engine} reported: {reported}"
        )


def first_line(exc: BaseException) -> str:
    """The engine's message without onnxruntime's multi-line stack dumps."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NpuSegment:
    """An NPU partition prepared on a backend.

    Everything per model is worked out here, once: each input's placement in the input image
    (dtype, padded shape, logical corner) and each output's view recipe. ``run`` then does one
    copy per input into a per-thread input image, the kernel call, and one view per output.
    """

    def __init__(self, program: FusedProgram, backend: Backend) -> None:
        self.program = program
        self.backend = backend
        self.prepared: Prepared = backend.prepare(program.to_program_image())
        plan = program.plan
        self._input_bytes = int(plan.input_bytes)
        self._output_bytes = int(plan.output_bytes)
        self._input_names = [b.name for b in program.inputs]
        self._outputs = [_ViewRecipe.of(b) for b in program.outputs]
        # Per thread: a zeroed input image and the inputs' views into it. Only the logical
        # corner of each input is ever written, so padding lanes and gaps stay zero across runs
        # (the backends copy the image into their own buffer: they never write it).
        self._images = threading.local()

    def _input_image(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """This thread's input image and the inputs' views into it."""
        local = self._images
        try:
            return local.image_views  # type: ignore[no-any-return]
        except AttributeError:
            image = np.zeros(self._input_bytes, dtype=np.uint8)  # zero = padding lanes
            local.image_views = (image, [b.view(image) for b in self.program.inputs])
            return local.image_views  # type: ignore[no-any-return]

    def run(self, env: Mapping[str, np.ndarray], stats: SessionRunStats) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        image, views = self._input_image()
        for name, view in zip(self._input_names, views):
            view[...] = env[name]
        out = np.empty(self._output_bytes, dtype=np.uint8)
        t1 = time.perf_counter()
        run = self.backend.execute(self.prepared, image, out)
        t2 = time.perf_counter()
        results = {r.name: r.view(out) for r in self._outputs}
        seconds = stats.stage_seconds
        seconds["copy_in"] = seconds.get("copy_in", 0.0) + (t1 - t0)
        seconds["npu"] = seconds.get("npu", 0.0) + (t2 - t1)
        seconds["copy_out"] = seconds.get("copy_out", 0.0) + (time.perf_counter() - t2)
        stats.kernel_calls += run.kernel_calls
        stats.bytes_to_device += run.bytes_to_device
        stats.bytes_from_device += run.bytes_from_device
        stats.device.append({"program": self.program.name, **run.stage_seconds})
        return results


@dataclass(frozen=True)
class _ViewRecipe:
    """How to cut one output out of the output image: :meth:`TensorBinding.view` precomputed."""

    name: str
    dtype: np.dtype
    offset: int
    padded_shape: tuple[int, ...]
    crop: tuple[slice, ...] | None  # None: not padded

    @classmethod
    def of(cls, b: TensorBinding) -> _ViewRecipe:
        crop = tuple(slice(0, s) for s in b.shape) if b.is_padded else None
        return cls(b.name, b.np_dtype, int(b.offset), tuple(b.padded_shape), crop)

    def view(self, buffer: np.ndarray) -> np.ndarray:
        arr = np.ndarray(self.padded_shape, self.dtype, buffer, self.offset)
        return arr if self.crop is None else arr[self.crop]


def default_engine(fallback: Fallback) -> str | None:
    if fallback is None:
        return None
    if fallback not in ("onnxruntime", "reference"):
        raise ModelError(f"fallback must be 'onnxruntime', 'reference' or None, got {fallback!r}")
    if fallback == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        # Documented: onnx.reference computes the same ONNX semantics when onnxruntime is absent.
        warnings.warn(
            "onnxruntime is not installed: CPU segments run on onnx.reference "
            "(slower; pip install onnxruntime)",
            RuntimeWarning,
            stacklevel=3,
        )
        return "reference"
    return fallback
