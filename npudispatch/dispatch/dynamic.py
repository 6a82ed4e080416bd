"""Dynamic input shapes: the declared signature, binding it from feeds, specialising, bucketing.

A model's inputs may have free dims (named ``batch`` or unnamed). :class:`Session` compiles one
specialisation per set of input shapes it is fed: :func:`bind_shapes` checks each feed against
the declared signature (rank, fixed dims, dtype, in onnxruntime's words) and returns the concrete
shapes, which :func:`~npudispatch.dispatch.compile.compile_model` binds (``input_shapes=``) in a
fresh copy of the model (:class:`ModelSource`).

Bucketing (opt-in, for models where zero padding does not change the unpadded results): chosen
dims are rounded up to a multiple (:func:`bucket_shapes`), so nearby sizes share one program;
copy-in zero-pads, and every output is cropped to the shape that loading the model with the real
input shapes gives (:func:`infer_output_shapes`).

Inputs and outputs may also be sequences, maps or optionals (:attr:`Signature.type`): they have no
shape to bind, run in CPU segments only, and a feed is checked against its type by
:func:`check_non_tensor_feed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from npudispatch import graph
from npudispatch.errors import ModelError
from npudispatch.graph.load import proto_to_ir
from npudispatch.graph.value_types import element_text, is_non_tensor, parse_type_text, type_text

__all__ = [
    "Dim",
    "ModelSource",
    "Signature",
    "bind_shapes",
    "bucket_shapes",
    "check_non_tensor_feed",
    "decode_signature",
    "infer_output_shapes",
    "pin",
    "read_signature",
    "type_string",
]

#: A declared dim: a size, a symbolic name, or None (unnamed, free).
Dim = int | str | None
Shapes = dict[str, tuple[int, ...]]


def type_string(dtype: ir.DataType | None) -> str:
    """onnxruntime's type string: ``tensor(float)``, ``tensor(int64)``, ``tensor(bfloat16)``..."""
    return "tensor(unknown)" if dtype is None else f"tensor({element_text(dtype)})"


@dataclass(frozen=True)
class Signature:
    """A declared model input or output: name, element type and dims (see :data:`Dim`).

    ``type`` is onnxruntime's type text of a sequence, map or optional (``seq(tensor(float))``,
    ``seq(map(int64,tensor(float)))``; ``dtype`` is then UNDEFINED and ``dims`` empty); None for
    a tensor.
    """

    name: str
    dtype: ir.DataType
    dims: tuple[Dim, ...]
    type: str | None = None

    @property
    def is_tensor(self) -> bool:
        """True for a tensor; False for a sequence, map or optional (``type`` is set)."""
        return self.type is None

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)

    @property
    def ort_type(self) -> str:
        """onnxruntime's ``NodeArg.type``: ``tensor(float)``, ``seq(tensor(int64))``..."""
        return self.type if self.type is not None else type_string(self.dtype)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype.numpy())

    def ort_shape(self) -> list[int | str | None]:
        """The shape as onnxruntime's ``NodeArg.shape`` shows it (names as str, None unknown)."""
        return list(self.dims)


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return ()
    out: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def read_signature(proto: onnx.ModelProto) -> tuple[list[Signature], list[Signature]]:
    """Declared inputs (initializers listed as inputs left out: they are constants) and outputs."""
    consts = {t.name for t in proto.graph.initializer}

    def sig(v: onnx.ValueInfoProto) -> Signature:
        kind = v.type.WhichOneof("value")
        if kind and kind != "tensor_type":  # a sequence, map or optional: no dims to bind
            return Signature(v.name, ir.DataType.UNDEFINED, (), type_text(v.type))
        elem = v.type.tensor_type.elem_type
        if not elem:
            raise ModelError(
                f"graph input/output {v.name!r} declares no tensor element type; declare it "
                "in the model (onnx.helper.make_tensor_value_info)"
            )
        return Signature(v.name, ir.DataType(elem), _dims(v))

    inputs = [sig(v) for v in proto.graph.input if v.name not in consts]
    return inputs, [sig(v) for v in proto.graph.output]


def dim_names(proto: onnx.ModelProto) -> set[str]:
    """Every symbolic dim name in the main graph's inputs, outputs and value_info."""
    g = proto.graph
    return {
        d.dim_param
        for v in (*g.input, *g.output, *g.value_info)
        for d in v.type.tensor_type.shape.dim
        if d.dim_param
    }


def pin(
    inputs: Sequence[Signature],
    dims: Mapping[str, int] | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
) -> list[Signature]:
    """The signature with ``dims`` (by dim name) and ``input_shapes`` (whole shapes) applied."""
    by_name = {s.name: s for s in inputs}
    unknown = sorted(set(input_shapes or {}) - set(by_name))
    if unknown:
        raise ModelError(
            f"input_shapes names {unknown}, which are not model inputs; the inputs are "
            f"{list(by_name)}"
        )
    out = []
    for s in inputs:
        if not s.is_tensor:
            if input_shapes and s.name in input_shapes:
                raise ModelError(
                    f"input_shapes names {s.name!r}, a {s.type}: only tensor inputs have shapes"
                )
            out.append(s)
            continue
        new = [dims[d] if isinstance(d, str) and dims and d in dims else d for d in s.dims]
        if input_shapes and s.name in input_shapes:
            shape = [int(x) for x in input_shapes[s.name]]
            if len(shape) != len(new):
                raise ModelError(
                    f"input_shapes[{s.name!r}] has rank {len(shape)}, the model's input has rank "
                    f"{len(new)} {list(s.dims)}; give {len(new)} dims"
                )
            for axis, (want, have) in enumerate(zip(shape, new)):
                if want < 1 or (isinstance(have, int) and have != want):
                    raise ModelError(
                        f"input_shapes[{s.name!r}] = {shape} sets dim {axis} to {want}, but the "
                        f"model fixes it to {have} ({list(s.dims)})"
                        if want >= 1
                        else f"input_shapes[{s.name!r}] = {shape}: every dim must be >= 1"
                    )
            new = shape
        out.append(Signature(s.name, s.dtype, tuple(new)))
    return out


def bind_shapes(inputs: Sequence[Signature], feeds: Mapping[str, np.ndarray]) -> Shapes:
    """The concrete shape of every input, checked against the signature like onnxruntime does.

    Raises :class:`ModelError` with onnxruntime's wording for a wrong dtype, a rank change or a
    fixed dim that differs, followed by what to do.
    """
    shapes: Shapes = {}
    for s in inputs:
        if not s.is_tensor:
            continue  # checked by check_non_tensor_feed; no shape to bind
        arr = feeds[s.name]
        if arr.dtype != s.np_dtype:
            got = type_string(_ir_dtype(arr.dtype))
            raise ModelError(
                f"Unexpected input data type. Actual: ({got}) , expected: "
                f"({type_string(s.dtype)}): input {s.name!r} has dtype {arr.dtype}, the model "
                f"expects {s.np_dtype}; convert it with .astype()"
            )
        if arr.ndim != len(s.dims):
            raise ModelError(
                f"Invalid rank for input: {s.name} Got: {arr.ndim} Expected: {len(s.dims)} "
                f"Please fix either the inputs or the model: input {s.name!r} has shape "
                f"{list(arr.shape)}, the model expects {_show(s.dims)}"
            )
        bad = [
            (i, got, want)
            for i, (got, want) in enumerate(zip(arr.shape, s.dims))
            if isinstance(want, int) and got != want
        ]
        if bad:
            indices = " ".join(f"index: {i} Got: {g} Expected: {w}" for i, g, w in bad)
            raise ModelError(
                f"Got invalid dimensions for input: {s.name} for the following indices {indices}"
                f" Please fix either the inputs or the model: input {s.name!r} has shape "
                f"{list(arr.shape)}, the model expects {_show(s.dims)}; reshape it (or compile "
                "for this shape with input_shapes=/dims=)"
            )
        shapes[s.name] = tuple(int(d) for d in arr.shape)
    return shapes


def _ir_dtype(dtype: np.dtype) -> ir.DataType | None:
    try:
        return ir.DataType.from_numpy(dtype)
    except (TypeError, ValueError):
        return None


def _show(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def bucket_shapes(inputs: Sequence[Signature], shapes: Shapes, bucket: Mapping[str, int]) -> Shapes:
    """``shapes`` with the chosen dims rounded up to their multiple.

    ``bucket`` maps a symbolic dim name (``"height"``) or ``"input:axis"`` (``"x:2"``, for
    unnamed dims) to a multiple; only free dims can be bucketed.
    """
    out: Shapes = {}
    for s in inputs:
        if not s.is_tensor:
            continue
        shape = list(shapes[s.name])
        for axis, d in enumerate(s.dims):
            multiple = bucket.get(f"{s.name}:{axis}") or (
                bucket.get(d) if isinstance(d, str) else None
            )
            if multiple and not isinstance(d, int):
                shape[axis] = -(-shape[axis] // int(multiple)) * int(multiple)
        out[s.name] = tuple(shape)
    return out


def check_bucket(inputs: Sequence[Signature], bucket: Mapping[str, int]) -> None:
    """Refuse bucket keys that name no free dim, and multiples below 1."""
    free = {f"{s.name}:{i}" for s in inputs for i, d in enumerate(s.dims) if not isinstance(d, int)}
    free |= {d for s in inputs for d in s.dims if isinstance(d, str)}
    for key, multiple in bucket.items():
        if key not in free:
            raise ModelError(
                f"bucket key {key!r} names no free input dim; free dims are {sorted(free)} "
                "(a symbolic dim name, or 'input:axis')"
            )
        if not isinstance(multiple, int) or multiple < 1:
            raise ModelError(f"bucket[{key!r}] must be an int >= 1, got {multiple!r}")


def infer_output_shapes(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> Shapes:
    """Output shapes for the given input shapes: the model loaded with them bound
    (:func:`npudispatch.graph.load`, the one shape resolution every compile uses; weights are
    referenced, not copied)."""
    try:
        model = graph.load(proto, input_shapes=shapes)
    except ModelError as exc:
        raise ModelError(f"bucketing: cannot infer the output shapes to crop to: {exc}") from exc
    out: Shapes = {}
    for o in model.graph.outputs:
        if is_non_tensor(o):
            continue  # a sequence / map / optional is returned whole
        dims = tuple(o.shape) if o.shape is not None else ()
        if o.shape is None or not all(isinstance(d, int) for d in dims):
            shown = _show([d if isinstance(d, int) else None for d in dims])
            raise ModelError(
                f"bucketing: the shape of output {o.name!r} for inputs {dict(shapes)} cannot be "
                f"inferred ({shown if o.shape is not None else 'unknown rank'}), so it cannot be "
                "cropped; run without bucket="
            )
        out[o.name] = tuple(int(d) for d in dims)
    return out


class ModelSource:
    """The model a session compiles from, copied fresh for every specialisation.

    A file is parsed only when needed: a warm compile cache answers the signature and the
    programs without reading the model (:meth:`summary` is what it keeps).
    """

    def __init__(self, model: graph.ModelLike) -> None:
        self.original: graph.ModelLike | None = model
        self.file: Path | None = None
        self.base_dir: Path | None = None
        self._proto: onnx.ModelProto | None = None
        if isinstance(model, onnx.ModelProto):
            self._proto = model
        elif isinstance(model, ir.Model):
            self._proto = ir.to_proto(model)
            self.base_dir = next(
                (
                    Path(v.const_value.base_dir)
                    for v in model.graph.initializers.values()
                    if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.base_dir
                ),
                None,
            )
        else:
            self.file = Path(model)
            self.base_dir = self.file.parent
            if not self.file.is_file() or self.file.stat().st_size == 0:
                graph.load(self.file)  # raises the ModelError that says what is wrong

    @property
    def proto(self) -> onnx.ModelProto:
        """The model without its external data (parsed on first use)."""
        if self._proto is None:
            assert self.file is not None
            try:
                proto = onnx.load(str(self.file), load_external_data=False)
                if not proto.graph.output:
                    raise ValueError("no graph outputs")
            except Exception as exc:
                graph.load(self.file)  # raises the ModelError that says what is wrong
                raise ModelError(f"cannot read model {str(self.file)!r}: {exc}") from exc
            self._proto = proto
        return self._proto

    def external_files(self) -> list[Path]:
        """The external-data files the model references (resolved against its folder)."""
        locations: set[str] = set()
        stack = [self.proto.graph]
        while stack:
            g = stack.pop()
            for t in g.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    locations.update(e.value for e in t.external_data if e.key == "location")
            for node in g.node:
                for attr in node.attribute:
                    if attr.HasField("g"):
                        stack.append(attr.g)
                    stack.extend(attr.graphs)
        return [(self.base_dir or Path()) / loc for loc in sorted(locations)]

    def summary(self) -> dict[str, Any]:
        """Declared inputs and outputs, symbolic dim names and metadata, as JSON."""
        from npudispatch.dispatch.artifact import model_metadata

        inputs, outputs = read_signature(self.proto)

        def enc(sigs: list[Signature]) -> list[list[Any]]:
            return [
                [s.name, s.dtype.name, list(s.dims), *([s.type] if s.type else [])] for s in sigs
            ]

        return {
            "inputs": enc(inputs),
            "outputs": enc(outputs),
            "dim_names": sorted(dim_names(self.proto)),
            "metadata": model_metadata(self.proto),
        }

    def fresh(self) -> ir.Model:
        """A new ``onnx_ir.Model`` of the source (compilation rewrites its model in place)."""
        model = proto_to_ir(self.proto)
        if self.base_dir is not None:
            ir.external_data.set_base_dir(model.graph, self.base_dir)
        return model

    def take_original(self) -> graph.ModelLike:
        """The user's model object or path, once (an ``ir.Model`` is rewritten in place).

        A file source forgets its parsed proto here: compiling parses the file itself, and a copy
        kept beside it would double the model's weights in memory while it compiles and after.
        It is parsed again only if a later specialisation needs it.
        """
        model, self.original = self.original, None
        if model is not None and self.file is not None:
            self._proto = None
        return model if model is not None else self.fresh()


def decode_signature(entries: list[list[Any]]) -> list[Signature]:
    """Signatures from :meth:`ModelSource.summary`'s JSON form."""
    return [
        Signature(str(e[0]), ir.DataType[e[1]], tuple(e[2]), str(e[3]) if len(e) > 3 else None)
        for e in entries
    ]


def _check_typed(value: Any, t: onnx.TypeProto, where: str) -> Any:
    """``value`` checked against ``t`` (tensors inside become arrays); raises :class:`_FeedError`."""
    text = type_text(t)
    got = f"{where} is " + (
        "a numpy array" if isinstance(value, np.ndarray) else _a(type(value).__name__)
    )
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        arr = None if value is None or isinstance(value, list | tuple | dict) else np.asarray(value)
        if arr is not None and text == "tensor(string)" and arr.dtype.kind in "OUS":
            return arr  # onnxruntime takes strings as object (or str) arrays
        if arr is None or arr.dtype == object:
            raise _FeedError(f"{got}, not a {text} (a numpy array)")
        if (have := type_string(_ir_dtype(arr.dtype))) != text:
            raise _FeedError(f"{where} is a {have} array, not a {text}")
        return arr
    if kind == "sequence_type":
        if not isinstance(value, list | tuple):
            raise _FeedError(f"{got}, not a {text} (a list)")
        elem = t.sequence_type.elem_type
        return [_check_typed(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind == "map_type":
        if not isinstance(value, dict):
            raise _FeedError(f"{got}, not a {text} (a dict)")
        key_text = type_text(onnx.helper.make_tensor_type_proto(t.map_type.key_type, None))
        for k, v in value.items():
            _check_scalar(k, key_text, f"key {k!r} of {where}")
            _check_scalar(v, type_text(t.map_type.value_type), f"{where}[{k!r}]")
        return value
    if kind == "optional_type":
        return None if value is None else _check_typed(value, t.optional_type.elem_type, where)
    return value


def _check_scalar(value: Any, text: str, where: str) -> None:
    """A map key or value: a Python / numpy scalar of the element type ``tensor(...)``."""
    is_str = isinstance(value, str)
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    ok = {
        "tensor(string)": is_str,
        "tensor(int64)": is_int,
        "tensor(float)": is_int or isinstance(value, float | np.floating),
        "tensor(double)": is_int or isinstance(value, float | np.floating),
    }.get(text, True)  # other element types: onnxruntime judges
    if not ok:
        raise _FeedError(f"{where} is {_a(type(value).__name__)}, not {_a(text[7:-1])}")


class _FeedError(Exception):
    pass


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def check_non_tensor_feed(sig: Signature, value: Any) -> Any:
    """``value`` checked against a sequence / map / optional input (tensors inside become
    arrays); raises :class:`ModelError` naming the input, its type and what was fed."""
    assert sig.type is not None
    t = parse_type_text(sig.type)
    try:
        return _check_typed(value, t, "the value fed")
    except _FeedError as exc:
        how = {
            "sequence_type": "a list",
            "map_type": "a dict",
            "optional_type": "None (empty) or the value",
        }.get(t.WhichOneof("value") or "", "a value of that type")
        raise ModelError(
            f"input {sig.name!r} has type {sig.type}, but {exc}; feed {how}, as onnxruntime "
            "takes it"
        ) from None
