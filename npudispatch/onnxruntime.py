"""A drop-in for onnxruntime: run an existing onnxruntime application on the NPU.

:class:`InferenceSession` has onnxruntime's constructor and the methods applications call; it runs
the model with :class:`npudispatch.Session` (NPU partitions on the emulator by default, the rest on
onnxruntime's CPU provider). :func:`patch` makes ``onnxruntime.InferenceSession`` in the running
process create these sessions, so an unmodified application moves with one line::

    import npudispatch.onnxruntime
    npudispatch.onnxruntime.patch()          # or: with npudispatch.onnxruntime.patch(): ...
    import my_app; my_app.main()             # its onnxruntime sessions now run on the NPU

npudispatch options go in the provider options of :data:`NPU_PROVIDER`
(``providers=[("NpuDispatchExecutionProvider", {"backend": "xrt", "xclbin": ...})]``) or in
``patch(**options)``: any :class:`npudispatch.Session` keyword (``backend``, ``cache``, ``bucket``,
``max_specialisations``, ``pad``, ``bf16``, ``precision``, ``fallback``, backend options).
``SessionOptions.add_free_dimension_override_by_name`` binds dims like ``dims=``. Options without a
meaning here (thread counts, memory arenas, optimisation levels, other providers) are accepted and
ignored with one debug log line per session.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as _ort

from npudispatch.dispatch.session import NodeArg, Session
from npudispatch.errors import ModelError, OptionError

__all__ = [
    "CPU_PROVIDER",
    "NPU_PROVIDER",
    "InferenceSession",
    "InvalidArgument",
    "ModelMetadata",
    "NodeArg",
    "SessionOptions",
    "get_available_providers",
    "get_device",
    "patch",
]

log = logging.getLogger(__name__)

NPU_PROVIDER = "NpuDispatchExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_ORIGINAL_SESSION = _ort.InferenceSession
_ORIGINAL_PROVIDERS = _ort.get_available_providers
# Attributes of onnxruntime's SessionOptions and their defaults: a changed one is reported as
# ignored (npudispatch schedules and places memory itself).
_IGNORED_OPTIONS = (
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "enable_mem_reuse",
    "enable_profiling",
    "execution_mode",
    "execution_order",
    "graph_optimization_level",
    "inter_op_num_threads",
    "intra_op_num_threads",
    "log_severity_level",
    "log_verbosity_level",
    "logid",
    "optimized_model_filepath",
    "use_deterministic_compute",
)


class InvalidArgument(ModelError, _ort.capi.onnxruntime_pybind11_state.InvalidArgument):
    """A bad feed or output name: an npudispatch :class:`ModelError` that handlers written for
    onnxruntime's ``InvalidArgument`` also catch."""


def get_available_providers() -> list[str]:
    """The providers a session can use: the NPU first, then onnxruntime's CPU provider."""
    return [NPU_PROVIDER, CPU_PROVIDER]


def get_device() -> str:
    """onnxruntime's device string for this build."""
    return "NPU"


class SessionOptions(_ort.SessionOptions):
    """onnxruntime's ``SessionOptions``; free-dimension overrides by name become ``dims=``."""

    def __init__(self) -> None:
        super().__init__()
        self.free_dimension_overrides: dict[str, int] = {}

    def add_free_dimension_override_by_name(self, dim_name: str, dim_value: int) -> None:
        super().add_free_dimension_override_by_name(dim_name, dim_value)
        self.free_dimension_overrides[dim_name] = int(dim_value)


@dataclass(frozen=True)
class ModelMetadata:
    """What ``get_modelmeta()`` returns, with onnxruntime's attribute names."""

    producer_name: str = ""
    graph_name: str = ""
    domain: str = ""
    description: str = ""
    graph_description: str = ""
    version: int = 0
    custom_metadata_map: dict[str, str] = field(default_factory=dict)


def _provider_entries(
    providers: Sequence[Any] | None, provider_options: Sequence[Mapping[str, Any]] | None
) -> list[tuple[str, dict[str, Any]]]:
    """onnxruntime's provider forms (names, ``(name, options)`` pairs, parallel option list)."""
    entries = []
    for i, p in enumerate(providers or []):
        name, opts = (p[0], dict(p[1])) if isinstance(p, tuple | list) else (p, {})
        if provider_options is not None and i < len(provider_options):
            opts.update(provider_options[i])
        entries.append((str(name), opts))
    return entries


_BOOL_OPTIONS = ("pad", "bf16")
# Session's and the backends' integer options (emulator num_cols; xrt timeout_ms, device_index)
_INT_OPTIONS = ("max_specialisations", "num_cols", "timeout_ms", "device_index")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _typed_options(options: dict[str, Any]) -> dict[str, Any]:
    """Provider options arrive as strings in onnxruntime's convention (``{"bf16": "0"}``): the
    boolean and integer ones become what :class:`npudispatch.Session` and the backends take,
    ``cache`` "0"/"1" (...) a switch and any other string a folder, ``precision`` any case; a
    string that reads as neither raises ``InvalidArgument`` naming the option (``"False"`` must
    not read as true)."""
    typed = dict(options)
    for key, value in options.items():
        if not isinstance(value, str):
            continue
        word = value.strip().lower()
        if key == "precision":
            typed[key] = word
        elif key in ("cache", *_BOOL_OPTIONS) and word in _TRUE + _FALSE:
            typed[key] = word in _TRUE
        elif key in _INT_OPTIONS and word.isdigit():
            typed[key] = int(word)
        elif key in _BOOL_OPTIONS or key in _INT_OPTIONS:
            kind = "1/0/true/false" if key in _BOOL_OPTIONS else "a non-negative integer"
            raise InvalidArgument(f"provider option {key}={value!r}: expected {kind}")
    return typed


def _ignored_session_options(options: Any) -> list[str]:
    if options is None:
        return []
    default = _ort.SessionOptions()
    changed = [
        f"{a}={getattr(options, a)!r}"
        for a in _IGNORED_OPTIONS
        if hasattr(options, a) and getattr(options, a) != getattr(default, a)
    ]
    return changed


class InferenceSession:
    """onnxruntime's ``InferenceSession``, running on npudispatch (see the module docstring).

    ``path_or_bytes``: a model path, its serialized bytes, an ``onnx.ModelProto``, or a program
    folder written by ``npudispatch compile -o``. ``npudispatch_session`` is the
    :class:`npudispatch.Session` underneath (run statistics, compile log).
    """

    def __init__(
        self,
        path_or_bytes: str | bytes | Path | onnx.ModelProto,
        sess_options: Any = None,
        providers: Sequence[Any] | None = None,
        provider_options: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_path = path_or_bytes if isinstance(path_or_bytes, str | Path) else None
        self._sess_options = sess_options if sess_options is not None else SessionOptions()
        entries = _provider_entries(providers, provider_options)
        options: dict[str, Any] = dict(kwargs.pop("npudispatch_options", None) or {})
        ignored = [f"{k}={v!r}" for k, v in kwargs.items()]  # e.g. disabled_optimizers
        for name, opts in entries:
            if name == NPU_PROVIDER:
                options.update(opts)
            elif name != CPU_PROVIDER or opts:
                ignored.append(f"provider {name}{' ' + repr(opts) if opts else ''}")
        ignored += _ignored_session_options(sess_options)
        dims = dict(getattr(self._sess_options, "free_dimension_overrides", {}) or {})
        if dims:
            options["dims"] = {**dims, **(options.get("dims") or {})}
        if ignored:
            log.debug("npudispatch InferenceSession: ignoring %s", ", ".join(ignored))
        model: Any = path_or_bytes
        if isinstance(path_or_bytes, bytes | bytearray):
            model = onnx.ModelProto.FromString(bytes(path_or_bytes))
        self._options = options = _typed_options(options)
        try:
            self._session = Session(model, **options)
        except OptionError as exc:  # a bad option value is onnxruntime's InvalidArgument
            raise InvalidArgument(str(exc)) from exc

    @property
    def npudispatch_session(self) -> Session:
        return self._session

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        """Outputs for ``input_feed`` (all when ``output_names`` is None or empty): arrays, and
        lists / dicts / None for sequence, map and optional outputs, as onnxruntime returns."""
        names = list(output_names) if output_names else None
        try:
            self._session.check_feeds(names, input_feed)
        except ModelError as exc:
            raise InvalidArgument(str(exc)) from exc
        outs = self._session.run(names, input_feed, run_options)
        return [v if v is None or isinstance(v, list | dict) else np.asarray(v) for v in outs]

    def run_with_ort_values(
        self,
        output_names: Sequence[str] | None,
        input_dict_ort_values: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        """Like :meth:`run` with ``OrtValue`` feeds and results (CPU memory)."""
        feeds = {k: v.numpy() for k, v in input_dict_ort_values.items()}
        outs = self.run(output_names, feeds, run_options)
        names = list(output_names) if output_names else [o.name for o in self.get_outputs()]
        for name, o in zip(names, outs):
            if not isinstance(o, np.ndarray):
                raise InvalidArgument(
                    f"output {name!r} is not a tensor (a sequence, map or optional): "
                    "npudispatch's run_with_ort_values returns tensors only; use run(), which "
                    "returns it as onnxruntime does"
                )
        return [_ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(o)) for o in outs]

    def get_inputs(self) -> list[NodeArg]:
        return self._session.get_inputs()

    def get_outputs(self) -> list[NodeArg]:
        return self._session.get_outputs()

    def get_overridable_initializers(self) -> list[NodeArg]:
        """None: npudispatch bakes initializers into the program's const buffer."""
        return []

    def get_modelmeta(self) -> ModelMetadata:
        return ModelMetadata(**self._session.get_modelmeta())

    def get_providers(self) -> list[str]:
        return get_available_providers()

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        npu = {k: str(v) for k, v in self._options.items()}
        return {NPU_PROVIDER: npu, CPU_PROVIDER: {}}

    def get_session_options(self) -> Any:
        return self._sess_options

    def set_providers(
        self,
        providers: Sequence[Any] | None = None,
        provider_options: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Accepted for compatibility; the session keeps running on the NPU."""
        log.debug(
            "npudispatch InferenceSession.set_providers(%s) ignored: the session keeps %s",
            _provider_entries(providers, provider_options),
            self.get_providers(),
        )

    def disable_fallback(self) -> None:
        log.debug("npudispatch InferenceSession.disable_fallback() ignored")

    def enable_fallback(self) -> None:
        log.debug("npudispatch InferenceSession.enable_fallback() ignored")

    def end_profiling(self) -> str:
        """The profile file name: none is written (use ``npudispatch_session.last_run_stats``)."""
        return ""

    def get_profiling_start_time_ns(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"npudispatch.onnxruntime.InferenceSession({self._session!r})"


class patch:
    """Point ``onnxruntime.InferenceSession`` (and ``get_available_providers``) of the running
    process at npudispatch, until :meth:`undo` or the end of a ``with`` block.

    Modules that already did ``from onnxruntime import InferenceSession`` are patched too.
    ``options`` are :class:`npudispatch.Session` keywords given to every session created;
    ``sessions`` lists them, for their statistics.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.sessions: list[InferenceSession] = []
        outer = self

        class PatchedInferenceSession(InferenceSession):
            def __init__(self, path_or_bytes: Any, *args: Any, **kwargs: Any) -> None:
                merged = {**outer.options, **(kwargs.pop("npudispatch_options", None) or {})}
                super().__init__(path_or_bytes, *args, npudispatch_options=merged, **kwargs)
                outer.sessions.append(self)

        PatchedInferenceSession.__name__ = "InferenceSession"
        PatchedInferenceSession.__qualname__ = "InferenceSession"
        self.session_class = PatchedInferenceSession
        self._replaced: list[tuple[ModuleType, str, Any]] = []
        swaps = {
            id(_ORIGINAL_SESSION): PatchedInferenceSession,
            id(_ORIGINAL_PROVIDERS): get_available_providers,
        }
        for module in list(sys.modules.values()):
            name = getattr(module, "__name__", "") or ""
            if module is None or (
                name.startswith("onnxruntime.") or name.startswith("npudispatch")
            ):
                continue
            try:
                items = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in items:
                new = swaps.get(id(value))
                if new is not None and value in (_ORIGINAL_SESSION, _ORIGINAL_PROVIDERS):
                    self._replaced.append((module, attr, value))
                    setattr(module, attr, new)
        log.debug("npudispatch.onnxruntime.patch: replaced %d references", len(self._replaced))

    def undo(self) -> None:
        """Put back what :func:`patch` replaced (only where it is still ours)."""
        for module, attr, value in reversed(self._replaced):
            if getattr(module, attr, None) in (self.session_class, get_available_providers):
                setattr(module, attr, value)
        self._replaced.clear()

    def __enter__(self) -> patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()
