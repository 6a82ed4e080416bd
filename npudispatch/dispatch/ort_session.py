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

# External tensors up to this size are inlined into the model bytes instead of shared.
_INLINE_BYTES = 64 * 1024


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
    """Share big external initializers with onnxruntime; inline small ones. Returns the buffers
    onnxruntime reads, which the caller must keep alive."""
    import onnxruntime as ort

    externals = {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    names: list[str] = []
    values: list[Any] = []
    kept: list[np.ndarray] = []
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        source = externals.get(tensor.name)
        if source is None:
            raise ValueError(f"external initializer {tensor.name!r} has no IR tensor")
        array = source.numpy()  # memory-mapped
        if array.nbytes > _INLINE_BYTES and _ort_can_wrap(array):
            # Stays declared as external: onnxruntime takes the data from the options instead
            # of opening the file.
            array = np.ascontiguousarray(array)
            names.append(tensor.name)
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
