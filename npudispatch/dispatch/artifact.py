"""A whole compiled model as files: every NPU program and CPU segment, runnable without the model.

:class:`CompiledArtifact` is what a :class:`~npudispatch.dispatch.session.Session` runs. It is made
from a :class:`~npudispatch.dispatch.compile.CompiledModel` (:meth:`CompiledArtifact.from_compiled`)
or read from a program folder (:meth:`CompiledArtifact.load`). Folder layout, written by
``npudispatch compile MODEL -o DIR`` and :meth:`CompiledArtifact.save` alike:

================================  ===============================================================
``compiled.json``                 format, npudispatch version, the model's inputs and outputs
                                  (logical shapes), the segments in run order with the sha256 of
                                  every CPU-segment file, unsupported nodes, compile options
``report.json``                   the partition report (see ``npudispatch compile``)
``npuN/``                         a :class:`~npudispatch.dispatch.emit.FusedProgram` (+ meta.json)
``cpuN/model.onnx`` (+ ``.data``)  the CPU segment as a standalone ONNX model, weights included
``constants.pb``                  graph outputs that are constants (an ONNX GraphProto), if any
================================  ===============================================================

``compiled.json`` is written last and removed first, so a folder whose save was interrupted is
never taken for a complete program; saving over an earlier program removes its segment folders.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from npudispatch import graph, opset
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.errors import ModelError, NpuDispatchError
from npudispatch.graph.value_types import (
    has_map_types,
    restore_map_types,
    value_type_text,
)

if TYPE_CHECKING:
    from npudispatch.dispatch.compile import CompiledModel

__all__ = [
    "ARTIFACT_FILE",
    "CompiledArtifact",
    "CpuSegmentModel",
    "TensorSpec",
    "is_program_dir",
    "model_metadata",
]

ARTIFACT_FILE = "compiled.json"
ARTIFACT_FORMAT = 1
_CONSTANTS_FILE = "constants.pb"
_CPU_MODEL = "model.onnx"
_SEGMENT_DIR = re.compile(r"(npu|cpu)\d+")
_UNSET_VERSION = 2**63 - 1  # what onnxruntime reports when a model has no model_version


def _version() -> str:
    from npudispatch import __version__

    return __version__


def is_program_dir(path: Any) -> bool:
    """True for a folder holding a compiled model (``compiled.json``) or one FusedProgram."""
    try:
        p = Path(path)
    except TypeError:
        return False
    return p.is_dir() and ((p / ARTIFACT_FILE).is_file() or (p / "program.json").is_file())


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the user sees it: name, ONNX element type, logical shape.

    ``type``: onnxruntime's type text of a sequence, map or optional (``seq(tensor(float))``;
    ``dtype`` is then UNDEFINED and ``shape`` empty), None for a tensor.
    """

    name: str
    dtype: ir.DataType
    shape: tuple[int, ...]
    type: str | None = None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype.numpy())

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}
        return d if self.type is None else {**d, "type": self.type}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        kind = str(d["type"]) if d.get("type") is not None else None
        return cls(str(d["name"]), ir.DataType[d["dtype"]], tuple(int(s) for s in d["shape"]), kind)


@dataclass
class CpuSegmentModel:
    """A CPU segment: a standalone ONNX model in memory (``model``) or on disk (``path``)."""

    name: str
    inputs: list[str]
    outputs: list[str]
    model: ir.Model | None = None
    path: Path | None = None

    def node_labels(self) -> list[str]:
        """``name (domain.op_type)`` of each node, for error messages."""
        if self.model is not None:
            nodes = [(n.name, n.domain, n.op_type) for n in self.model.graph]
        else:
            assert self.path is not None
            proto = onnx.load(str(self.path), load_external_data=False)
            nodes = [(n.name, n.domain, n.op_type) for n in proto.graph.node]
        return [f"{name} ({domain or 'ai.onnx'}.{op})" for name, domain, op in nodes]


def model_metadata(model: ir.Model | onnx.ModelProto) -> dict[str, Any]:
    """What onnxruntime's ``get_modelmeta()`` reports for ``model``."""
    if isinstance(model, onnx.ModelProto):
        custom = {e.key: e.value for e in model.metadata_props}
        version = model.model_version if model.HasField("model_version") else None
    else:
        custom = dict(model.metadata_props)
        version = model.model_version
    return {
        "producer_name": model.producer_name or "",
        "graph_name": model.graph.name or "",
        "domain": model.domain or "",
        "description": model.doc_string or "",
        "graph_description": model.graph.doc_string or "",
        "version": _UNSET_VERSION if version is None else int(version),
        "custom_metadata_map": custom,
    }


def _restore_map_types(path: Path, model: ir.Model) -> None:
    """Rewrite the saved segment ``path`` with the map types onnx_ir could not write (its
    weights stay in the external data file beside it)."""
    if not has_map_types(model.graph):
        return
    proto = onnx.load(str(path), load_external_data=False)
    restore_map_types(proto.graph, model.graph)
    onnx.save(proto, str(path))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class CompiledArtifact:
    """A compiled model without its source: the segments in run order and the model's IO.

    ``segments`` holds a :class:`FusedProgram` per NPU partition and a :class:`CpuSegmentModel`
    per CPU segment; ``constants`` are graph outputs that are initializers; ``unsupported`` lists
    the nodes kept on the CPU (``node``, ``op_type``, ``domain``, ``reason``); ``report`` is the
    ``report.json`` document; ``options`` the compile options; ``metadata`` the model's (as
    onnxruntime's ``get_modelmeta`` shows it: producer, graph name, ``custom_metadata_map``...).
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    segments: list[FusedProgram | CpuSegmentModel]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    unsupported: list[dict[str, str]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def programs(self) -> list[FusedProgram]:
        return [s for s in self.segments if isinstance(s, FusedProgram)]

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_compiled(
        cls, compiled: CompiledModel, options: dict[str, Any] | None = None
    ) -> CompiledArtifact:
        """The segments of ``compiled``: its programs, and each CPU partition extracted."""
        from npudispatch.rewrites.padding import host_shape

        model = compiled.model
        segments: list[FusedProgram | CpuSegmentModel] = []
        for i, (label, part) in enumerate(zip(compiled.labels, compiled.partitions)):
            if part.kind == "npu":
                segments.append(compiled.programs[i])
                continue
            sub = graph.extract(model, part, name=f"{model.graph.name or 'main'}_{label}")
            opset.attach_functions(sub)
            segments.append(
                CpuSegmentModel(
                    label, [v.name for v in part.inputs], [v.name for v in part.outputs], sub
                )
            )

        def spec(v: ir.Value) -> TensorSpec:
            if (kind := value_type_text(v)) is not None:  # a sequence / map / optional
                return TensorSpec(v.name or "", ir.DataType.UNDEFINED, (), kind)
            shape = host_shape(v)
            if shape is None and v.shape is not None and v.is_graph_output():
                # A CPU-segment output whose shape follows from run-time data: -1 where open.
                shape = [d if isinstance(d, int) else -1 for d in v.shape]
            if v.dtype is None or shape is None:
                raise ModelError(
                    f"graph input/output {v.name!r} has no known element type or rank (its shape "
                    "follows from run-time data and the model declares none); declare them in the "
                    "model's graph outputs, e.g. onnx.helper.make_tensor_value_info("
                    f"{v.name!r}, TensorProto.FLOAT, [None, 3])"
                )
            return TensorSpec(v.name, v.dtype, tuple(shape))

        constants = {
            v.name: v.const_value.numpy()
            for v in model.graph.outputs
            if v.is_initializer() and v.const_value is not None
        }
        return cls(
            inputs=[spec(v) for v in model.graph.inputs],
            outputs=[spec(v) for v in model.graph.outputs],
            segments=segments,
            constants=constants,
            unsupported=[u.to_dict() for u in compiled.report.unsupported],
            report=compiled.to_report(),
            options=dict(options or {}),
            metadata=model_metadata(model),
        )

    @classmethod
    def from_program(cls, program: FusedProgram) -> CompiledArtifact:
        """A model made of one NPU program (a folder written by :meth:`FusedProgram.save`)."""

        def spec(b: Any) -> TensorSpec:
            return TensorSpec(b.name, ir.DataType.from_numpy(b.np_dtype), tuple(b.shape))

        return cls(
            inputs=[spec(b) for b in program.inputs],
            outputs=[spec(b) for b in program.outputs],
            segments=[program],
            report={"partitions": [{"name": program.name, "kind": "npu", **program.summary()}]},
        )

    # --- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the folder (see the module docstring); earlier segment folders are removed."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / ARTIFACT_FILE).unlink(missing_ok=True)  # incomplete until written again
        for old in d.iterdir():
            if old.is_dir() and _SEGMENT_DIR.fullmatch(old.name):
                shutil.rmtree(old)
        (d / _CONSTANTS_FILE).unlink(missing_ok=True)
        entries: list[dict[str, Any]] = []
        for seg in self.segments:
            if isinstance(seg, FusedProgram):
                seg.save(d / seg.name)
                entries.append({"name": seg.name, "kind": "npu"})
                continue
            seg_dir = d / seg.name
            seg_dir.mkdir()
            target = seg_dir / _CPU_MODEL
            if seg.model is not None:
                # External data of the source model is copied in: the folder stands alone.
                ir.save(seg.model, target, external_data=_CPU_MODEL + ".data")
                _restore_map_types(target, seg.model)
            else:
                assert seg.path is not None
                for f in seg.path.parent.iterdir():
                    shutil.copy2(f, seg_dir / f.name)
            files = {f.name: _sha256(f) for f in sorted(seg_dir.iterdir())}
            entries.append(
                {
                    "name": seg.name,
                    "kind": "cpu",
                    "inputs": seg.inputs,
                    "outputs": seg.outputs,
                    "files": files,
                }
            )
        doc: dict[str, Any] = {
            "format": ARTIFACT_FORMAT,
            "npudispatch": _version(),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "segments": entries,
            "unsupported": self.unsupported,
            "options": self.options,
            "metadata": self.metadata,
        }
        if self.constants:
            tensors = [
                ir.serde.serialize_tensor(ir.tensor(a, name=n)) for n, a in self.constants.items()
            ]
            data = onnx.GraphProto(name="constants", initializer=tensors).SerializeToString()
            (d / _CONSTANTS_FILE).write_bytes(data)
            doc["constants_sha256"] = hashlib.sha256(data).hexdigest()
        for part in self.report.get("partitions", []):
            if part.get("kind") == "npu":
                part["program"] = part["name"]
        (d / "report.json").write_text(json.dumps(self.report, indent=2))
        (d / ARTIFACT_FILE).write_text(json.dumps(doc, indent=1))
        return d

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        trusted: bool = False,
        contents: Mapping[str, bytes] | None = None,
    ) -> CompiledArtifact:
        """Read a folder written by :meth:`save` (or one :meth:`FusedProgram.save` folder).

        Every file is checked against its sha256; a missing, corrupt or foreign file raises
        :class:`ModelError` naming it, before anything runs. ``trusted=True``: the caller has
        verified every file of the folder against digests of its own (the compile cache's
        manifest), so per-file digests and the programs' deep checks are not repeated (see
        :meth:`FusedProgram.load`); format and version are still checked. ``contents``: bytes of
        files the caller has already read (by POSIX path relative to ``directory``), not read
        again.
        """
        d = Path(directory)
        doc_path = d / ARTIFACT_FILE
        if not doc_path.is_file():
            if (d / "program.json").is_file():
                return cls.from_program(FusedProgram.load(d))
            raise ModelError(
                f"{str(d)!r} is not a compiled program folder (no {ARTIFACT_FILE}); write one "
                "with `npudispatch compile MODEL -o DIR` or CompiledModel.save(DIR)"
            )
        try:
            doc = json.loads(doc_path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
                fmt = doc.get("format") if isinstance(doc, dict) else None
                raise ModelError(
                    f"{doc_path}: format {fmt!r}, expected {ARTIFACT_FORMAT}; re-compile the "
                    "model with this npudispatch version"
                )
            if doc.get("npudispatch") != _version():
                raise ModelError(
                    f"{doc_path} was written by npudispatch {doc.get('npudispatch')!r}, this is "
                    f"{_version()}; re-compile the model"
                )
            return cls._from_doc(d, doc, trusted=trusted, contents=contents or {})
        except NpuDispatchError:
            raise
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelError(
                f"{str(d)!r} holds an incomplete or corrupt compiled program "
                f"({type(exc).__name__}: {exc}); re-compile it"
            ) from exc

    @classmethod
    def _from_doc(
        cls,
        d: Path,
        doc: dict[str, Any],
        trusted: bool = False,
        contents: Mapping[str, bytes] | None = None,
    ) -> CompiledArtifact:
        contents = contents or {}
        segments: list[FusedProgram | CpuSegmentModel] = []
        for entry in doc["segments"]:
            name = str(entry["name"])
            if not _SEGMENT_DIR.fullmatch(name):
                raise ModelError(f"{d / ARTIFACT_FILE}: bad segment name {name!r}")
            if entry["kind"] == "npu":
                prefix = f"{name}/"
                mine = {k[len(prefix) :]: v for k, v in contents.items() if k.startswith(prefix)}
                segments.append(FusedProgram.load(d / name, trusted=trusted, contents=mine))
                continue
            seg_dir = d / name
            for fname, digest in entry["files"].items():
                f = seg_dir / Path(fname).name
                if not f.is_file():
                    raise ModelError(f"{f} is missing; re-compile the model")
                if not trusted and _sha256(f) != digest:
                    raise ModelError(
                        f"{f} does not match the sha256 in {ARTIFACT_FILE} (corrupted?); "
                        "re-compile the model"
                    )
            segments.append(
                CpuSegmentModel(
                    name,
                    [str(x) for x in entry["inputs"]],
                    [str(x) for x in entry["outputs"]],
                    path=seg_dir / _CPU_MODEL,
                )
            )
        constants: dict[str, np.ndarray] = {}
        if "constants_sha256" in doc:
            data = (d / _CONSTANTS_FILE).read_bytes()
            if not trusted and hashlib.sha256(data).hexdigest() != doc["constants_sha256"]:
                raise ModelError(f"{d / _CONSTANTS_FILE} does not match its sha256 (corrupted?)")
            for t in onnx.GraphProto.FromString(data).initializer:
                constants[t.name] = ir.serde.deserialize_tensor(t).numpy()
        report_path = d / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return cls(
            inputs=[TensorSpec.from_dict(s) for s in doc["inputs"]],
            outputs=[TensorSpec.from_dict(s) for s in doc["outputs"]],
            segments=segments,
            constants=constants,
            unsupported=list(doc.get("unsupported", [])),
            report=report,
            options=dict(doc.get("options", {})),
            metadata=dict(doc.get("metadata", {})),
        )
