"""onnxruntime sessions for IR models whose weights live in external data files.

onnxruntime resolves external-data locations of a model given as bytes against the process's
working directory, and refuses paths that leave it; our CPU segments and reference sessions are
built from bytes. So external initializers are handed over as memory instead: each one is mapped
from its file (``ir.ExternalTensor`` memory-maps it) and passed with
``SessionOptions.add_external_initializers``, which wraps the mapped pages without copying them.
The model's own safe-loading rules (no location outside the model folder) were applied at load.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["onnxruntime_session"]


def onnxruntime_session(
    model: ir.Model, *, optimize: bool = True, options: Any = None
) -> Any:  # onnxruntime.InferenceSession (imported lazily)
    """An onnxruntime CPU session for ``model``, from any working directory.

    ``optimize=False`` disables graph optimizations (the reference then executes the graph
    literally). Weights stored externally are shared with onnxruntime, not copied.
    """
    import onnxruntime as ort

    # The class itself, not ``onnxruntime.InferenceSession``, which npudispatch.onnxruntime.patch()
    # may have pointed back at us.
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    options = options or ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model)
    keep_alive = _move_external_initializers(model, proto, options)
    session = InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    # add_external_initializers does not own the buffers: they must outlive the session.
    session._npudispatch_external_buffers = keep_alive  # type: ignore[attr-defined]
    return session


def _move_external_initializers(model: ir.Model, proto: onnx.ModelProto, options: Any) -> list:
    import onnxruntime as ort

    names: list[str] = []
    values: list[Any] = []
    kept: list[np.ndarray] = []
    externals = {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    inline: list[onnx.TensorProto] = []
    remaining = []
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            remaining.append(tensor)
            continue
        source = externals.get(tensor.name)
        array = source.numpy() if source is not None else None
        if array is not None and _ort_can_wrap(array):
            array = np.ascontiguousarray(array)
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            kept.append(array)
        else:
            # dtypes onnxruntime's numpy bridge lacks (bfloat16, 4-bit): inline the bytes.
            ir_tensor = source if source is not None else None
            if ir_tensor is None:
                raise ValueError(f"external initializer {tensor.name!r} has no IR tensor")
            copy = ir.serde.serialize_tensor(ir.Tensor(ir_tensor.numpy(), dtype=ir_tensor.dtype))
            copy.name = tensor.name
            inline.append(copy)
    if names or inline:
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(remaining + inline)
    if names:
        options.add_external_initializers(names, values)
    return [kept, values]


def _ort_can_wrap(array: np.ndarray) -> bool:
    return (
        array.dtype.kind in "biuf"
        and array.dtype.itemsize in (1, 2, 4, 8)
        and (array.dtype.kind != "f" or array.dtype in (np.float16, np.float32, np.float64))
    )
