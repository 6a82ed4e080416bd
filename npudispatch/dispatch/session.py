"""``npudispatch.Session``: run a whole model like an onnxruntime ``InferenceSession``.

NPU partitions run as fused programs (one kernel call each) on a backend; CPU segments run on
onnxruntime (extracted sub-models, ``npudispatch`` ops given ONNX function bodies) or on
``onnx.reference`` (``fallback="reference"``, or automatically when onnxruntime is absent).

A session runs a model file / proto / ``onnx_ir.Model``, a :class:`CompiledModel`, or a program
folder written by ``npudispatch compile -o`` (no model needed). A model whose inputs have free dims
is compiled on the first ``run`` with each new set of input shapes (:mod:`.dynamic`); compiled
specialisations are kept in memory (least recently used evicted) and on disk (:mod:`.cache`).

Copy-in writes each feed straight into its (padded) placement of a per-thread input image, zeroed
once (padding lanes are never written, so they stay zero); copy-out returns views cropped out of a
fresh output image: one copy each way, no staging arrays. A run with the same input shapes as the
previous one takes a fast path (:meth:`Session._run_hot`) whose checks are O(inputs) against specs
worked out once; anything unusual takes the full path, which raises onnxruntime's errors.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from npudispatch import graph
from npudispatch.dispatch import dynamic
from npudispatch.dispatch.artifact import (
    CompiledArtifact,
    TensorSpec,
    is_program_dir,
)
from npudispatch.dispatch.backends import Backend, get_backend
from npudispatch.dispatch.cache import CompileCache, resolve_cache
from npudispatch.dispatch.compile import CompiledModel, compile_model
from npudispatch.dispatch.dynamic import ModelSource, Shapes, Signature
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.dispatch.segments import (
    CpuSegment,
    Fallback,
    NpuSegment,
    default_engine,
)
from npudispatch.dispatch.session_types import CompileEvent, NodeArg, SessionRunStats
from npudispatch.errors import (
    BackendUnavailableError,
    ModelError,
    UnsupportedOpError,
)
from npudispatch.precision import Precision, resolve_precision

__all__ = ["CompileEvent", "NodeArg", "Session", "SessionRunStats"]

#: Compiled specialisations a session keeps in memory by default (least recently used evicted).
DEFAULT_MAX_SPECIALISATIONS = 8


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


class _Variant:
    """One compiled specialisation, its segments prepared on the backend."""

    def __init__(
        self,
        artifact: CompiledArtifact,
        compiled: CompiledModel | None,
        backend: Backend,
        engine: str | None,
    ) -> None:
        if engine is None and artifact.unsupported:
            lines = [
                f"  {u['node']} ({u['domain']}.{u['op_type']}): {u['reason']}"
                for u in artifact.unsupported
            ]
            raise UnsupportedOpError(
                f"{len(lines)} node(s) cannot run on the NPU and fallback=None:\n"
                + "\n".join(lines)
                + "\nrun them on the CPU with fallback='onnxruntime' (or 'reference'); on the "
                "command line: --fallback onnxruntime"
            )
        self.artifact = artifact
        self.compiled = compiled
        self.segments: list[CpuSegment | NpuSegment] = []
        for seg in artifact.segments:
            if isinstance(seg, FusedProgram):
                self.segments.append(NpuSegment(seg, backend))
            else:
                assert engine is not None
                self.segments.append(CpuSegment(seg, engine))

    def run(self, env: dict[str, Any], stats: SessionRunStats) -> None:
        for seg in self.segments:
            if isinstance(seg, NpuSegment):
                env.update(seg.run(env, stats))
            else:
                t0 = time.perf_counter()
                env.update(seg.run(env))
                stats.add("cpu", time.perf_counter() - t0)
                stats.cpu_segments += 1


def _key(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((k, tuple(int(d) for d in v)) for k, v in shapes.items()))


def _signature(specs: Sequence[TensorSpec]) -> list[Signature]:
    return [Signature(s.name, s.dtype, tuple(s.shape), s.type) for s in specs]


def _pad_to(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if tuple(arr.shape) == tuple(shape):
        return arr
    out = np.zeros(shape, dtype=arr.dtype)
    out[tuple(slice(0, s) for s in arr.shape)] = arr
    return out


class Session:
    """Run an ONNX model with NPU partitions on ``backend`` and CPU segments on ``fallback``.

    ``model_or_path``: an ONNX file, ``ModelProto`` or ``onnx_ir.Model``; a :class:`CompiledModel`
    or :class:`FusedProgram`; or a program folder (``npudispatch compile MODEL -o DIR``,
    :meth:`CompiledModel.save`), which runs without the model. ``backend`` is a backend name (``"emulator"``, ``"xrt"``;
    ``backend_options`` are passed to :func:`~npudispatch.dispatch.backends.get_backend`) or a
    backend object, which several sessions may share. ``fallback=None`` refuses models with
    unsupported nodes (:class:`UnsupportedOpError` listing each node and why).

    Shapes: ``dims`` binds symbolic dims by name, ``input_shapes`` whole input shapes
    (``{"x": (1, 3, 320, 320)}``). Dims left free are bound from the feeds: the first ``run`` with
    new input shapes compiles for them (see :attr:`compile_log`, ``last_run_stats.compile``),
    :meth:`warmup` does it ahead of time, and up to ``max_specialisations`` programs stay in memory
    (least recently used evicted). ``bucket`` (off by default) rounds free dims up to a multiple,
    ``{"height": 32}`` or ``{"x:2": 32}``: feeds are zero-padded on copy-in and outputs cropped,
    so use it only where zero padding does not change the unpadded results.

    ``cache``: the persistent compile cache (:mod:`npudispatch.dispatch.cache`); None uses the
    user's cache folder unless ``NPUDISPATCH_CACHE=0``, False turns it off, a path or
    :class:`~npudispatch.dispatch.cache.CompileCache` picks the folder. ``pad`` / ``bf16`` /
    ``precision`` are the compilation options of :func:`compile_model`. Inputs and outputs always have the user's shapes
    and dtypes: padding happens in the copy-in / copy-out. Sequence, map and optional inputs and
    outputs are taken and returned as onnxruntime does (lists, dicts, None); the nodes using them
    run in CPU segments.
    """

    def __init__(
        self,
        model_or_path: graph.ModelLike | CompiledModel | CompiledArtifact | FusedProgram,
        backend: str | Backend = "emulator",
        fallback: Fallback = "onnxruntime",
        dims: Mapping[str, int] | None = None,
        *,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        pad: bool = True,
        bf16: bool = True,
        precision: Precision | None = None,
        cache: CompileCache | str | os.PathLike[str] | bool | None = None,
        max_specialisations: int = DEFAULT_MAX_SPECIALISATIONS,
        bucket: Mapping[str, int] | None = None,
        **backend_options: Any,
    ) -> None:
        engine = default_engine(fallback)
        if not isinstance(max_specialisations, int) or max_specialisations < 1:
            raise ModelError(
                f"max_specialisations must be an int >= 1, got {max_specialisations!r}"
            )
        if not isinstance(backend, str) and backend_options:
            raise ModelError("backend_options are only used with a backend name, not an object")
        prebuilt = isinstance(
            model_or_path, CompiledModel | CompiledArtifact | FusedProgram
        ) or is_program_dir(model_or_path)
        mode = resolve_precision(precision, bf16)
        if prebuilt and (dims or input_shapes or bucket or not pad or mode != "bf16"):
            raise ModelError(
                "dims / input_shapes / bucket / pad / bf16 / precision cannot be applied to an "
                "already compiled model; pass them to compile_model or give Session the model"
            )
        self.fallback = engine
        self._engine = engine
        self._max = max_specialisations
        self._options: dict[str, Any] = {"pad": pad, "precision": mode, "dims": dict(dims or {})}
        self._lock = threading.RLock()
        self._stats_lock = threading.Lock()
        self._variants: OrderedDict[Any, _Variant] = OrderedDict()
        self._current: _Variant | None = None
        self._run_counter = itertools.count(1)  # run numbers (next() is atomic)
        self._output_shapes: dict[Any, Shapes] = {}
        self.compile_log: list[CompileEvent] = []
        self.last_run_stats: SessionRunStats | None = None
        self._source: ModelSource | None = None
        self._cache: CompileCache | None = None
        self._digest: str | None = None
        self._bucket = dict(bucket or {})
        # (input shapes in signature order, variant) of the last run: run's fast path
        self._hot: tuple[tuple[tuple[int, ...], ...], _Variant] | None = None
        if prebuilt:
            t0 = time.perf_counter()
            compiled = model_or_path if isinstance(model_or_path, CompiledModel) else None
            if compiled is not None:
                artifact = CompiledArtifact.from_compiled(compiled)
            elif isinstance(model_or_path, CompiledArtifact):
                artifact = model_or_path
            elif isinstance(model_or_path, FusedProgram):
                artifact = CompiledArtifact.from_program(model_or_path)
            else:
                artifact = CompiledArtifact.load(model_or_path)  # type: ignore[arg-type]
            self.backend = self._make(backend, backend_options)
            self._inputs = _signature(artifact.inputs)
            self._outputs = _signature(artifact.outputs)
            self._metadata = dict(artifact.metadata)
            shapes = {s.name: tuple(s.shape) for s in artifact.inputs if s.type is None}
            self._prepare_feed_specs()
            variant = _Variant(artifact, compiled, self.backend, engine)
            self._remember(shapes, variant)
            source = "compiled" if compiled is not None else "program"
            self.compile_log.append(CompileEvent(shapes, source, time.perf_counter() - t0, None))
            return
        self._source = ModelSource(model_or_path)  # type: ignore[arg-type]
        self._cache = resolve_cache(cache)
        self._digest = self._cache.digest(self._source) if self._cache is not None else None
        summary = (
            self._cache.summary(self._source, self._digest)
            if self._cache is not None and self._digest is not None
            else self._source.summary()
        )
        declared_in = dynamic.decode_signature(summary["inputs"])
        declared_out = dynamic.decode_signature(summary["outputs"])
        unknown_dims = sorted(set(dims or {}) - set(summary["dim_names"]))
        if unknown_dims:
            raise ModelError(
                f"dims names {unknown_dims} do not appear in the model's inputs/outputs; its "
                f"symbolic dims are {summary['dim_names'] or 'none'} "
                "(check the spelling of dims=/--dims)"
            )
        self._inputs = dynamic.pin(declared_in, dims, input_shapes)
        self._outputs = dynamic.pin(declared_out, dims, None)
        self._pinned = bool(input_shapes)
        self._declared_inputs = declared_in
        self._metadata = dict(summary["metadata"])
        if self._bucket:
            dynamic.check_bucket(self._inputs, self._bucket)
        self.backend = self._make(backend, backend_options)
        self._prepare_feed_specs()
        if all(s.is_static for s in self._inputs):
            static = {
                s.name: tuple(int(d) for d in s.dims)  # type: ignore[arg-type]
                for s in self._inputs
                if s.is_tensor
            }
            self._specialisation(static, run=None)

    def _prepare_feed_specs(self) -> None:
        """What ``run``'s fast path checks each feed against, worked out once per session."""
        self._input_names = [s.name for s in self._inputs]
        # non-tensor inputs (sequences, maps, optionals) always take the full path
        self._tensor_inputs_only = all(s.is_tensor for s in self._inputs)
        self._input_dtypes = [s.np_dtype if s.is_tensor else None for s in self._inputs]
        self._output_names = [s.name for s in self._outputs]
        self._output_name_set = frozenset(self._output_names)

    @staticmethod
    def _make(backend: str | Backend, options: Mapping[str, Any]) -> Backend:
        return _make_backend(backend, options) if isinstance(backend, str) else backend

    # --- specialisations -----------------------------------------------------------------------

    def _remember(self, shapes: Shapes, variant: _Variant) -> None:
        self._variants[_key(shapes)] = variant
        self._variants.move_to_end(_key(shapes))
        while len(self._variants) > self._max:
            self._variants.popitem(last=False)
        self._current = variant
        self._make_hot(shapes, variant)

    def _make_hot(self, shapes: Shapes, variant: _Variant) -> None:
        """Remember ``variant`` (the newest in the LRU order) for ``run``'s fast path."""
        if (
            not self._bucket
            and self._tensor_inputs_only
            and all(n in shapes for n in self._input_names)
        ):
            self._hot = (tuple(shapes[n] for n in self._input_names), variant)

    def _specialisation(
        self, shapes: Shapes, run: int | None
    ) -> tuple[_Variant, CompileEvent | None]:
        """The program for ``shapes``: in memory, else from the disk cache, else compiled."""
        key = _key(shapes)
        with self._lock:
            variant = self._variants.get(key)
            if variant is not None:
                self._variants.move_to_end(key)
                self._make_hot(shapes, variant)
                return variant, None
            if self._source is None:
                have = [dict(k) for k in self._variants]
                raise ModelError(
                    f"this session runs a compiled program for input shapes {have}, not "
                    f"{dict(shapes)}; compile the model for these shapes"
                )
            t0 = time.perf_counter()
            material = None
            artifact = None
            compiled = None
            if self._cache is not None:
                options = {k: v for k, v in self._options.items()}
                assert self._digest is not None
                material = self._cache.key_material(self._digest, shapes, options)
                artifact = self._cache.load(material)
            how: Literal["compiled", "disk cache"] = "disk cache"
            if artifact is None:
                how = "compiled"
                compiled = self._compile(shapes)
                artifact = CompiledArtifact.from_compiled(compiled, self._options)
                artifact.metadata = dict(self._metadata)
                if self._cache is not None and material is not None:
                    self._cache.store(material, artifact)
            variant = _Variant(artifact, compiled, self.backend, self._engine)
            self._remember(shapes, variant)
            event = CompileEvent(dict(shapes), how, time.perf_counter() - t0, run)
            self.compile_log.append(event)
            return variant, event

    def _compile(self, shapes: Shapes) -> CompiledModel:
        assert self._source is not None
        opts = {"pad": self._options["pad"], "precision": self._options["precision"]}
        user_dims = self._options["dims"]
        declared = self._declared_inputs
        if not self._pinned and all(
            s.is_static or all(isinstance(d, int) or d in user_dims for d in s.dims)
            for s in declared
        ):
            # dims= alone binds every input: compile the user's model as given (first time)
            return compile_model(self._source.take_original(), dims=user_dims or None, **opts)
        return compile_model(self._source.fresh(), input_shapes=shapes, **opts)

    def warmup(
        self, shapes: Mapping[str, Sequence[int]] | Sequence[Mapping[str, Sequence[int]]]
    ) -> list[CompileEvent]:
        """Compile ahead of time for one set of input shapes (``{"x": (1, 3, 640, 640)}``) or a
        list of them; returns what each took (empty events for shapes already in memory)."""
        sets = [shapes] if isinstance(shapes, Mapping) else list(shapes)
        events = []
        for s in sets:
            tensors = [sig for sig in self._inputs if sig.is_tensor]
            feeds = {
                sig.name: np.broadcast_to(np.zeros((), sig.np_dtype), tuple(s.get(sig.name, ())))
                for sig in tensors
            }
            missing = [sig.name for sig in tensors if sig.name not in s]
            if missing:
                raise ModelError(f"warmup shapes lack input(s) {missing}; give every input's shape")
            bound = dynamic.bind_shapes(self._inputs, feeds)
            if self._bucket:
                bound = dynamic.bucket_shapes(self._inputs, bound, self._bucket)
            _, event = self._specialisation(bound, run=None)
            if event is not None:
                events.append(event)
        return events

    # --- onnxruntime-like API ------------------------------------------------------------------

    def get_inputs(self) -> list[NodeArg]:
        """The model inputs (logical shapes; free dims by name, or None when unnamed)."""
        return [NodeArg(s.name, s.ort_shape(), s.ort_type) for s in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        """The model outputs (logical shapes; free dims by name, or None when unnamed)."""
        return [NodeArg(s.name, s.ort_shape(), s.ort_type) for s in self._outputs]

    def get_modelmeta(self) -> dict[str, Any]:
        """The model's metadata (producer, graph name, ``custom_metadata_map``...)."""
        return dict(self._metadata)

    @property
    def compiled(self) -> CompiledModel | None:
        """The :class:`CompiledModel` of the most recently used specialisation (None for a loaded
        program folder; re-compiled on access when it came from the disk cache)."""
        variant = self._current
        if variant is None:
            return None
        if variant.compiled is None and self._source is not None:
            shapes = {s.name: tuple(s.shape) for s in variant.artifact.inputs if s.type is None}
            variant.compiled = self._compile(shapes)
        return variant.compiled

    @property
    def artifact(self) -> CompiledArtifact | None:
        """The most recently used specialisation as a saveable :class:`CompiledArtifact`."""
        return self._current.artifact if self._current is not None else None

    @property
    def programs(self) -> list[FusedProgram]:
        """The fused programs of the most recently used specialisation, in run order."""
        return [s.program for s in self._segments if isinstance(s, NpuSegment)]

    @property
    def _segments(self) -> list[CpuSegment | NpuSegment]:
        return self._current.segments if self._current is not None else []

    def _validate(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        expected = [s.name for s in self._inputs]
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
            ort = (
                f"Required inputs ({missing}) are missing from input feed ({list(feeds)})"
                if missing
                else f"Invalid input name: {unknown[0]}"
            )
            raise ModelError(
                f"{ort}: {' and '.join(problems)}; the model's inputs are {expected}: feed each "
                "of them exactly once"
            )
        return {
            s.name: np.asarray(feeds[s.name])
            if s.is_tensor
            else dynamic.check_non_tensor_feed(s, feeds[s.name])
            for s in self._inputs
        }

    def check_feeds(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]
    ) -> tuple[list[str], dict[str, Any], Shapes]:
        """What :meth:`run` checks before it compiles or runs anything: the output names, the
        feeds' names, dtypes, ranks and fixed dims (a sequence / map / optional input: its
        type). Returns the output names, the feeds as arrays (lists, dicts, None for those) and
        the tensor inputs' shapes; raises :class:`ModelError` in onnxruntime's words."""
        all_outputs = [s.name for s in self._outputs]
        if isinstance(output_names, str | bytes):
            raise ModelError(
                f"output_names must be a list of names or None, got the string {output_names!r}; "
                f"use [{output_names!r}]"
            )
        names = all_outputs if output_names is None else list(output_names)
        bad = [n for n in names if n not in all_outputs]
        if bad:
            raise ModelError(
                f"Invalid output name:{bad[0]}: unknown output name(s) {bad}; the model's "
                f"outputs are {all_outputs}"
            )
        env = self._validate(feeds)
        return names, env, dynamic.bind_shapes(self._inputs, env)

    def run(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], run_options: Any = None
    ) -> list[Any]:
        """Run the model; returns the requested outputs (all when ``output_names`` is None):
        arrays, and for sequence / map / optional outputs what onnxruntime returns (a list, a
        dict, a list of dicts, None for an empty optional).

        New input shapes compile first (see the class docstring). Thread-safe: each backend
        program serializes its own executions, CPU segments are re-entrant, and every call works
        on its own images. ``last_run_stats`` is set at the end.
        """
        t_start = time.perf_counter()
        fast = self._run_hot(output_names, feeds, t_start)
        if fast is not None:
            return fast
        stats = SessionRunStats()
        names, env, shapes = self.check_feeds(output_names, feeds)
        program_shapes = (
            dynamic.bucket_shapes(self._inputs, shapes, self._bucket) if self._bucket else shapes
        )
        stats.input_shapes, stats.program_shapes = shapes, program_shapes
        stats.add("validate", time.perf_counter() - t_start)
        run_index = next(self._run_counter)
        variant, event = self._specialisation(program_shapes, run=run_index)
        stats.compile = event
        if event is not None:
            stats.add("compile", event.seconds)
        if program_shapes != shapes:
            env = {k: _pad_to(v, program_shapes[k]) if k in shapes else v for k, v in env.items()}
        variant.run(env, stats)
        crop = self._crop_shapes(shapes) if program_shapes != shapes else {}
        results = []
        for n in names:
            if n in env:
                value = env[n]
            elif n in variant.artifact.constants:
                value = variant.artifact.constants[n]
            else:
                raise ModelError(f"output {n!r} was produced by no partition (internal error)")
            if n in crop and tuple(value.shape) != crop[n]:
                value = value[tuple(slice(0, s) for s in crop[n])]
            results.append(value)
        stats.add("total", time.perf_counter() - t_start)
        with self._stats_lock:
            self.last_run_stats = stats
        return results

    def _run_hot(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], t_start: float
    ) -> list[np.ndarray] | None:
        """``run`` for the common case, in O(inputs): a dict feeding exactly the model's inputs,
        each with the model's dtype and the same shapes as the last run (so its ranks and fixed
        dims were checked then), known output names, no bucketing. None: take the full path,
        which checks everything and raises onnxruntime's errors."""
        hot = self._hot
        if hot is None or type(feeds) is not dict or len(feeds) != len(self._input_names):
            return None
        if output_names is None:
            names = self._output_names
        elif isinstance(output_names, list | tuple) and self._output_name_set.issuperset(
            output_names
        ):
            names = output_names  # type: ignore[assignment]
        else:
            return None
        shapes_key, variant = hot
        env: dict[str, np.ndarray] = {}
        for name, dtype, shape in zip(self._input_names, self._input_dtypes, shapes_key):
            arr = feeds.get(name)
            if type(arr) is not np.ndarray:
                if arr is None:
                    return None
                arr = np.asarray(arr)
            if (arr.dtype is not dtype and arr.dtype != dtype) or arr.shape != shape:
                return None
            env[name] = arr
        stats = SessionRunStats()
        stats.input_shapes = stats.program_shapes = dict(zip(self._input_names, shapes_key))
        stats.stage_seconds["validate"] = time.perf_counter() - t_start
        next(self._run_counter)
        variant.run(env, stats)
        constants = variant.artifact.constants
        results = []
        for n in names:
            value = env.get(n)
            if value is None:
                value = constants.get(n)
                if value is None:
                    raise ModelError(f"output {n!r} was produced by no partition (internal error)")
            results.append(value)
        stats.stage_seconds["total"] = time.perf_counter() - t_start
        with self._stats_lock:
            self.last_run_stats = stats
        return results

    def _crop_shapes(self, shapes: Shapes) -> Shapes:
        """Output shapes for the real (unbucketed) input shapes, inferred once per shape set."""
        key = _key(shapes)
        if key not in self._output_shapes:
            assert self._source is not None
            if len(self._output_shapes) >= 4 * self._max:
                self._output_shapes.clear()
            self._output_shapes[key] = dynamic.infer_output_shapes(self._source.proto, shapes)
        return self._output_shapes[key]

    def __repr__(self) -> str:
        kinds = "".join("N" if isinstance(s, NpuSegment) else "C" for s in self._segments)
        return (
            f"Session({len(self._segments)} segments [{kinds}], {len(self._variants)} "
            f"specialisation(s), backend {self.backend.name!r}, fallback {self.fallback!r})"
        )
