"""``npudispatch.Session``: run a whole model like an onnxruntime ``InferenceSession``.

NPU partitions run as fused programs (one kernel call each) on a backend; CPU segments run on
onnxruntime (extracted sub-models, ``npudispatch`` ops given ONNX function bodies) or on
``onnx.reference`` (``fallback="reference"``, or automatically when onnxruntime is absent).

Copy-in writes each feed straight into its (padded) placement of a zeroed input image; copy-out
returns views cropped out of the output image: one copy each way, no staging arrays.
"""

from __future__ import annotations

import importlib.util
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from npudispatch import graph, opset
from npudispatch.dispatch.backends import Backend, get_backend
from npudispatch.dispatch.backends.base import Prepared
from npudispatch.dispatch.compile import CompiledModel, compile_model
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.errors import BackendUnavailableError, ModelError, UnsupportedOpError
from npudispatch.graph import Partition
from npudispatch.rewrites.padding import host_shape

__all__ = ["NodeArg", "Session", "SessionRunStats"]

Fallback = Literal["onnxruntime", "reference"] | None


@dataclass(frozen=True)
class NodeArg:
    """A model input or output as onnxruntime describes it: ``name``, ``shape``, ``type``."""

    name: str
    shape: list[int]
    type: str  # "tensor(float)", "tensor(bfloat16)", ...


@dataclass
class SessionRunStats:
    """One ``run``: kernel calls, bytes copied to/from the device, CPU segments, seconds per stage."""

    kernel_calls: int = 0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    cpu_segments: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes_copied(self) -> int:
        return self.bytes_to_device + self.bytes_from_device

    def add(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds


def _type_string(dtype: ir.DataType | None) -> str:
    if dtype is None:
        return "tensor(unknown)"
    name = {ir.DataType.FLOAT: "float", ir.DataType.DOUBLE: "double"}.get(dtype)
    return f"tensor({name or dtype.name.lower()})"


def _logical_shape(value: ir.Value) -> list[int]:
    """The user's shape: the unpadded one of a padded graph input/output (-1: unknown dim)."""
    shape = host_shape(value)
    if shape is not None:
        return list(shape)
    return [int(d) if isinstance(d, int) else -1 for d in (value.shape or [])]


class _CpuSegment:
    """A CPU partition as a runnable sub-model (onnxruntime or onnx.reference)."""

    def __init__(self, model: ir.Model, part: Partition, label: str, engine: str) -> None:
        sub = graph.extract(model, part, name=f"{model.graph.name or 'main'}_{label}")
        opset.attach_functions(sub)
        proto = ir.serde.serialize_model(sub)
        self.inputs = [v.name for v in part.inputs]
        self.outputs = [v.name for v in part.outputs]
        self.engine = engine
        self._lock = threading.Lock()
        try:
            if engine == "onnxruntime":
                import onnxruntime as ort

                self._sess = ort.InferenceSession(
                    proto.SerializeToString(), providers=["CPUExecutionProvider"]
                )
            else:
                from onnx.reference import ReferenceEvaluator

                self._sess = ReferenceEvaluator(proto, new_ops=opset.reference_ops())
        except Exception as exc:  # ORT raises its own pybind types; keep ours on top
            nodes = ", ".join(f"{n.name} ({n.domain or 'ai.onnx'}.{n.op_type})" for n in part.nodes)
            raise UnsupportedOpError(
                f"CPU segment {label} [{nodes}] cannot run on {engine} either: {exc}. These nodes "
                "have no NPU operator (see the partition report) and no CPU implementation; "
                "convert them to standard ONNX ops"
            ) from exc

    def run(self, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(env[name]) for name in self.inputs}
        if self.engine == "onnxruntime":
            outs = self._sess.run(self.outputs, feeds)  # InferenceSession.run is thread-safe
        else:
            with self._lock:  # the reference evaluator keeps per-run state
                outs = self._sess.run(self.outputs, feeds)
        return dict(zip(self.outputs, outs))


class _NpuSegment:
    """An NPU partition prepared on a backend."""

    def __init__(self, program: FusedProgram, backend: Backend) -> None:
        self.program = program
        self.backend = backend
        self.prepared: Prepared = backend.prepare(program.to_program_image())

    def run(self, env: Mapping[str, np.ndarray], stats: SessionRunStats) -> dict[str, np.ndarray]:
        plan = self.program.plan
        t0 = time.perf_counter()
        image = np.zeros(plan.input_bytes, dtype=np.uint8)  # zero = padding lanes
        for b in self.program.inputs:
            b.view(image)[...] = env[b.name]
        out = np.empty(plan.output_bytes, dtype=np.uint8)
        t1 = time.perf_counter()
        run = self.backend.execute(self.prepared, image, out)
        t2 = time.perf_counter()
        results = {b.name: b.view(out) for b in self.program.outputs}
        stats.add("copy_in", t1 - t0)
        stats.add("npu", t2 - t1)
        stats.add("copy_out", time.perf_counter() - t2)
        stats.kernel_calls += run.kernel_calls
        stats.bytes_to_device += run.bytes_to_device
        stats.bytes_from_device += run.bytes_from_device
        stats.device.append({"program": self.program.name, **run.stage_seconds})
        return results


def _default_engine(fallback: Fallback) -> str | None:
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


def _make_backend(name: str, options: Mapping[str, Any]) -> Backend:
    """``get_backend`` with its argument errors (unknown name, missing or unknown option)
    reported as :class:`BackendUnavailableError`."""
    try:
        return get_backend(name, **options)
    except (ValueError, TypeError) as exc:
        # only argument errors; a TypeError raised deeper (e.g. by pyxrt) is not the user's
        if isinstance(exc, ModelError) or (
            isinstance(exc, TypeError) and "unexpected keyword argument" not in str(exc)
        ):
            raise
        raise BackendUnavailableError(f"cannot create backend {name!r}: {exc}") from exc


class Session:
    """Run an ONNX model with NPU partitions on ``backend`` and CPU segments on ``fallback``.

    ``backend`` is a backend name (``"emulator"``, ``"xrt"``; ``backend_options`` are passed to
    :func:`~npudispatch.dispatch.backends.get_backend`) or a backend object, which several sessions
    may share (one device context). ``fallback=None`` refuses models with unsupported nodes
    (:class:`UnsupportedOpError` listing each node and why). ``dims`` binds symbolic dims;
    ``pad`` / ``bf16`` are the compilation options of :func:`compile_model`. Inputs and outputs
    always have the user's shapes and dtypes: padding happens in the copy-in / copy-out.
    """

    def __init__(
        self,
        model_or_path: graph.ModelLike | CompiledModel,
        backend: str | Backend = "emulator",
        fallback: Fallback = "onnxruntime",
        dims: Mapping[str, int] | None = None,
        *,
        pad: bool = True,
        bf16: bool = True,
        **backend_options: Any,
    ) -> None:
        engine = _default_engine(fallback)
        if isinstance(model_or_path, CompiledModel) and (dims or not (pad and bf16)):
            raise ModelError(
                "dims / pad / bf16 cannot be applied to an already compiled model; pass them to "
                "compile_model or give Session the model"
            )
        compiled = (
            model_or_path
            if isinstance(model_or_path, CompiledModel)
            else compile_model(model_or_path, dims=dims, pad=pad, bf16=bf16)
        )
        if engine is None and compiled.report.unsupported:
            lines = [
                f"  {u.name} ({u.domain}.{u.op_type}): {u.reason}"
                for u in compiled.report.unsupported
            ]
            raise UnsupportedOpError(
                f"{len(lines)} node(s) cannot run on the NPU and fallback=None:\n"
                + "\n".join(lines)
                + "\nuse fallback='onnxruntime' (or 'reference') to run them on the CPU"
            )
        self.compiled = compiled
        if not isinstance(backend, str) and backend_options:
            raise ModelError("backend_options are only used with a backend name, not an object")
        self.backend: Backend = (
            _make_backend(backend, backend_options) if isinstance(backend, str) else backend
        )
        model = compiled.model
        self._segments: list[_CpuSegment | _NpuSegment] = []
        for i, (label, part) in enumerate(zip(compiled.labels, compiled.partitions)):
            if part.kind == "npu":
                self._segments.append(_NpuSegment(compiled.programs[i], self.backend))
            else:
                assert engine is not None
                self._segments.append(_CpuSegment(model, part, label, engine))
        self._inputs = [(v.name, v.dtype, _logical_shape(v)) for v in model.graph.inputs]
        self._outputs = [(v.name, v.dtype, _logical_shape(v)) for v in model.graph.outputs]
        self._consts = {
            name: v for name, v in model.graph.initializers.items() if v.const_value is not None
        }
        self.fallback = engine
        self._stats_lock = threading.Lock()
        self.last_run_stats: SessionRunStats | None = None

    # --- onnxruntime-like API ------------------------------------------------------------------

    def get_inputs(self) -> list[NodeArg]:
        """The model inputs (logical shapes)."""
        return [NodeArg(n, list(s), _type_string(d)) for n, d, s in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        """The model outputs (logical shapes)."""
        return [NodeArg(n, list(s), _type_string(d)) for n, d, s in self._outputs]

    @property
    def programs(self) -> list[FusedProgram]:
        """The fused programs, one per NPU partition, in run order."""
        return [s.program for s in self._segments if isinstance(s, _NpuSegment)]

    def _validate(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        expected = [n for n, _, _ in self._inputs]
        if not isinstance(feeds, Mapping):
            raise ModelError(
                f"feeds must be a dict {{input name: array}}, got {type(feeds).__name__}; the "
                f"model's inputs are {expected}"
            )
        unknown = sorted(set(feeds) - set(expected), key=str)
        missing = [n for n in expected if n not in feeds]
        if unknown or missing:
            problems = [f"unknown input name(s) {unknown}"] if unknown else []
            problems += [f"missing input(s) {missing}"] if missing else []
            raise ModelError(
                f"{' and '.join(problems)}; the model's inputs are {expected}: feed each of "
                "them exactly once"
            )
        env: dict[str, np.ndarray] = {}
        for name, dtype, shape in self._inputs:
            arr = np.asarray(feeds[name])
            want = np.dtype(dtype.numpy()) if dtype is not None else arr.dtype
            if arr.dtype != want:
                raise ModelError(
                    f"input {name!r} has dtype {arr.dtype}, the model expects {want} "
                    f"({_type_string(dtype)}); convert it with .astype()"
                )
            if list(arr.shape) != list(shape):
                raise ModelError(
                    f"input {name!r} has shape {list(arr.shape)}, the model expects {shape}; "
                    "reshape it (or compile the model for this shape with dims=)"
                )
            env[name] = arr
        return env

    def run(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], run_options: Any = None
    ) -> list[np.ndarray]:
        """Run the model; returns the requested outputs (all when ``output_names`` is None).

        Thread-safe: each backend program serializes its own executions, CPU segments are
        re-entrant, and every call works on its own images. ``last_run_stats`` is set at the end.
        """
        stats = SessionRunStats()
        t_start = time.perf_counter()
        all_outputs = [n for n, _, _ in self._outputs]
        if isinstance(output_names, str | bytes):
            raise ModelError(
                f"output_names must be a list of names or None, got the string {output_names!r}; "
                f"use [{output_names!r}]"
            )
        names = all_outputs if output_names is None else list(output_names)
        bad = [n for n in names if n not in all_outputs]
        if bad:
            raise ModelError(f"unknown output name(s) {bad}; the model's outputs are {all_outputs}")
        env = self._validate(feeds)
        stats.add("validate", time.perf_counter() - t_start)
        for seg in self._segments:
            if isinstance(seg, _NpuSegment):
                env.update(seg.run(env, stats))
            else:
                t0 = time.perf_counter()
                env.update(seg.run(env))
                stats.add("cpu", time.perf_counter() - t0)
                stats.cpu_segments += 1
        results = []
        for n in names:
            if n in env:
                results.append(env[n])
            elif n in self._consts:
                results.append(self._consts[n].const_value.numpy())
            else:
                raise ModelError(f"output {n!r} was produced by no partition (internal error)")
        stats.add("total", time.perf_counter() - t_start)
        with self._stats_lock:
            self.last_run_stats = stats
        return results

    def __repr__(self) -> str:
        kinds = "".join("N" if isinstance(s, _NpuSegment) else "C" for s in self._segments)
        return (
            f"Session({len(self._segments)} segments [{kinds}], backend {self.backend.name!r}, "
            f"fallback {self.fallback!r})"
        )
