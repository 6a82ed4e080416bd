"""DD-compatible meta JSON of a :class:`FusedProgram` (docs/architecture.md §6, same keys and meanings).

Differences from DD's generator, on purpose: ``op_list`` is in topological (execution) order, each
tensor's ``size_in_bytes``/``offset`` are the planned ones (DD's C++ recomputes them anyway), the
``scratch`` group lists only tensors owning memory (zero-copy views appear in ``tensor_map`` with
their base's placement), and ``const`` entries point at the op's formatted const region in
``const.bin`` instead of a raw ``<k>.const`` dump (``file_name`` names ``const.bin``, ``file_size``
is the tensor's raw size). ``aux_info`` carries ``original_inputs``/``original_outputs``.
"""

from __future__ import annotations

from typing import Any

from npudispatch.dispatch.emit import FusedProgram
from npudispatch.dispatch.plan import BufferKind

__all__ = ["DD_META_MAJOR", "DD_META_MINOR", "dd_dtype", "to_dd_meta"]

DD_META_MAJOR = 1
DD_META_MINOR = 1
_LABELS = {
    BufferKind.INPUT: "in",
    BufferKind.OUTPUT: "out",
    BufferKind.SCRATCH: "scratch",
    BufferKind.CONST: "const",
}


def dd_dtype(numpy_name: str) -> str:
    """DD's lower-case ONNX dtype name (``float32`` -> ``float``, ``float64`` -> ``double``)."""
    return {"float32": "float", "float64": "double"}.get(numpy_name, numpy_name)


def to_dd_meta(program: FusedProgram) -> dict[str, Any]:
    """The meta JSON document (key order as DD writes it)."""
    plan = program.plan
    op_list = [
        {
            "name": op.name,
            "type": op.op_type,  # domain dropped, like DD
            "in_args": list(op.in_args),
            "const_args": list(op.const_args),
            "out_args": list(op.out_args),
            "attrs": op.attrs,
        }
        for op in program.ops
    ]
    packed: dict[BufferKind, list[str]] = {k: [] for k in _LABELS}
    packed[BufferKind.INPUT] = [b.name for b in program.inputs]
    packed[BufferKind.OUTPUT] = [b.name for b in program.outputs]
    packed[BufferKind.SCRATCH] = [
        name
        for name, pl in sorted(plan.placements.items(), key=lambda kv: kv[1].offset)
        if pl.buffer == BufferKind.SCRATCH and pl.alias_of is None
    ]
    packed[BufferKind.CONST] = list(program.const_tensors)
    fused = {
        label: {
            "buffer_size": plan.size(kind),
            "xrt_arg_id": int(kind),
            "packed_tensors": packed[kind],
        }
        for kind, label in _LABELS.items()
    }
    fused["super_instr"] = {
        "buffer_size": plan.params_bytes,
        "xrt_arg_id": int(BufferKind.PARAMS),
        "packed_tensors": [],
    }
    tensor_map: dict[str, dict[str, Any]] = {}
    for name, pl in plan.placements.items():
        tensor_map[name] = {
            "packed_buffer_label": _LABELS[pl.buffer],
            "xrt_arg_id": int(pl.buffer),
            "dtype": dd_dtype(pl.dtype),
            "shape": list(pl.shape),
            "size_in_bytes": pl.nbytes,
            "offset": pl.offset,
        }
    for name, info in program.const_tensors.items():
        tensor_map[name] = {
            "packed_buffer_label": "const",
            "xrt_arg_id": int(BufferKind.CONST),
            "dtype": dd_dtype(info["dtype"]),
            "shape": list(info["shape"]),
            "size_in_bytes": info["size_in_bytes"],
            "offset": info["offset"],
            "file_name": "const.bin",
            "file_size": info["size_in_bytes"],
        }

    def original(bindings) -> dict[str, Any]:
        return {
            b.name: {
                "dtype": dd_dtype(b.dtype),
                "shape": list(b.shape),
                "size_in_bytes": b.np_dtype.itemsize * _count(b.shape),
            }
            for b in bindings
        }

    return {
        "dd_meta_major_version": DD_META_MAJOR,
        "dd_meta_minor_version": DD_META_MINOR,
        "op_list": op_list,
        "fused_tensors": fused,
        "tensor_map": tensor_map,
        "aux_info": {
            "original_inputs": original(program.inputs),
            "original_outputs": original(program.outputs),
        },
    }


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
