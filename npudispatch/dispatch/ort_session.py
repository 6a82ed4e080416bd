"""onnxruntime sessions for IR models whose weights live in external data files.

onnxruntime resolves external-data locations of a model given as bytes against the process's
working directory, and refuses paths that leave it; our CPU segments and reference sessions are
built from bytes. So the session is told the folder the locations are relative to (the session
option ``session.model_external_initializers_file_folder_path``): onnxruntime then memory-maps the
data file itself, exactly as when it opens the model by path, and nothing is copied. Tensors from
a second folder (a model assembled from two) and large tensors held in memory (rewritten weights,
e.g. ``run --check``'s dequantized references) are handed over as memory instead
(``add_external_initializers``), not serialized into the model bytes. Small external tensors are inlined:
onnxruntime's graph checks read shape constants and refuse external ones. The model's own
safe-loading rules (no location outside the model folder) were applied at load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from npudispatch.graph.value_types import restore_map_types

__all__ = ["float_io", "onnxruntime_session"]

# External tensors up to this size are inlined into the model bytes instead of shared.
_INLINE_BYTES = 64 * 1024
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# Location written for in-memory initializers handed over with add_external_initializers
# (never read: onnxruntime takes the supplied memory instead).
_MEMORY_LOCATION = "npudispatch-in-memory-initializer"


def onnxruntime_session(
    model: ir.Model, *, optimize: bool = True, options: Any = None
) -> Any:  # onnxruntime.InferenceSession (imported lazily)
    """An onnxruntime CPU session for ``model``, from any working directory.

    ``optimize=False`` disables graph optimizations (the reference then executes the graph
    literally). Weights stored externally are memory-mapped by onnxruntime, not copied.
    """
    import onnxruntime as ort

    # The class itself, not ``onnxruntime.InferenceSession``, which npudispatch.onnxruntime.patch()
    # may have pointed back at us.
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    options = options or ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    in_memory = _large_in_memory_initializers(model)
    originals = {name: model.graph.initializers[name].const_value for name in in_memory}
    try:  # serialize without copying their bytes into the proto (placeholders, restored below)
        for name, array in in_memory.items():
            value = model.graph.initializers[name]
            value.const_value = ir.ExternalTensor(
                _MEMORY_LOCATION, 0, array.nbytes, value.dtype, shape=value.shape, name=name
            )
        proto = ir.serde.serialize_model(model)
    finally:
        for name, tensor in originals.items():
            model.graph.initializers[name].const_value = tensor
    restore_map_types(proto.graph, model.graph)  # a map input needs its declared type
    keep_alive = _move_external_initializers(model, proto, options, in_memory)
    session = InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    # add_external_initializers does not own the buffers: they must outlive the session.
    session._npudispatch_external_buffers = keep_alive  # type: ignore[attr-defined]
    return session


def float_io(model: ir.Model) -> list[str]:
    """bf16 graph inputs and outputs become float32, in place: onnxruntime's numpy bridge can
    neither take nor return bf16 tensors, which a *reference* run feeds and compares as float32
    anyway. An input is cast to bf16 where nodes read it (exact for bf16 values; feed float32),
    an output gets an exact trailing ``Cast``. Returns the model's output names in order, to label
    the session's outputs with (a computed output keeps its name). Not for CPU segments, whose
    inputs and outputs keep the dtypes the partitions around them use."""
    g = model.graph
    names = [out.name or "" for out in g.outputs]
    for value in g.inputs:
        if value.dtype != ir.DataType.BFLOAT16:
            continue
        users = list(value.uses())
        value.type = ir.TensorType(ir.DataType.FLOAT)
        cast = ir.node("Cast", [value], {"to": ir.DataType.BFLOAT16}, name=f"{value.name}__bf16")
        narrow = cast.outputs[0]
        narrow.name, narrow.shape = f"{value.name}__bf16", value.shape
        narrow.type = ir.TensorType(ir.DataType.BFLOAT16)
        if len(g):
            g.insert_before(next(iter(g)), cast)
        else:
            g.append(cast)
        for node, slot in users:
            node.replace_input_with(slot, narrow)
    for i, out in enumerate(list(g.outputs)):
        if out.dtype != ir.DataType.BFLOAT16:
            continue
        name = out.name or ""
        cast = ir.node("Cast", [out], {"to": ir.DataType.FLOAT}, name=f"{name}__as_float32")
        wide = cast.outputs[0]
        wide.type, wide.shape = ir.TensorType(ir.DataType.FLOAT), out.shape
        g.append(cast)
        if out.producer() is None:  # a graph input or initializer: its name is its feed's
            wide.name = f"{name}__as_float32"
        else:
            out.name, wide.name = f"{name}__bf16", name
        g.outputs[i] = wide
    return names


def _large_in_memory_initializers(model: ir.Model) -> dict[str, np.ndarray]:
    """Big initializers held in memory (not external) in a dtype onnxruntime can wrap: they are
    handed over as memory rather than serialized into the model bytes (two copies fewer)."""
    found: dict[str, np.ndarray] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if (
            tensor is None
            or isinstance(tensor, ir.ExternalTensor)
            or tensor.nbytes <= _INLINE_BYTES
        ):
            continue
        array = tensor.numpy()
        if _ort_can_wrap(array):
            found[name] = np.ascontiguousarray(array)
    return found


def _move_external_initializers(
    model: ir.Model,
    proto: onnx.ModelProto,
    options: Any,
    in_memory: dict[str, np.ndarray] | None = None,
) -> list:
    """Point onnxruntime at the external data; inline small tensors; hand ``in_memory`` arrays
    (serialized as placeholders) over as memory. Returns the buffers onnxruntime reads from our
    memory, which the caller must keep alive."""
    import onnxruntime as ort

    in_memory = in_memory or {}
    externals = {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor) and name not in in_memory
    }
    folders = [str(Path(t.base_dir).resolve()) for t in externals.values() if t.base_dir]
    folder = max(set(folders), key=folders.count) if folders else None
    if folder is not None:
        options.add_session_config_entry(_FOLDER_KEY, folder)
    names: list[str] = []
    values: list[Any] = []
    kept: list[np.ndarray] = []
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if tensor.name in in_memory:
            array = in_memory[tensor.name]
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            kept.append(array)
            continue
        source = externals.get(tensor.name)
        if source is None:
            raise ValueError(f"external initializer {tensor.name!r} has no IR tensor")
        in_folder = source.base_dir and str(Path(source.base_dir).resolve()) == folder
        if source.nbytes > _INLINE_BYTES and in_folder:
            continue  # onnxruntime maps it from the file itself
        array = source.numpy()  # memory-mapped
        if source.nbytes > _INLINE_BYTES and _ort_can_wrap(array):
            names.append(tensor.name)
            array = np.ascontiguousarray(array)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            kept.append(array)
        else:
            # Small tensors (onnxruntime's graph checks read shape constants and refuse external
            # ones) and dtypes its numpy bridge lacks (bfloat16, 4-bit): inline the bytes.
            inline = ir.serde.serialize_tensor(ir.Tensor(array, dtype=source.dtype))
            inline.name = tensor.name
            proto.graph.initializer[i].CopyFrom(inline)
    if names:
        options.add_external_initializers(names, values)
    return [kept, values]


def _ort_can_wrap(array: np.ndarray) -> bool:
    return (
        array.dtype.kind in "biuf"
        and array.dtype.itemsize in (1, 2, 4, 8)
        and (array.dtype.kind != "f" or array.dtype in (np.float16, np.float32, np.float64))
    )
