"""Whole-program validation of a saved :class:`~npudispatch.dispatch.emit.FusedProgram` folder.

``FusedProgram.load`` calls :func:`check_document` on ``program.json`` before building anything and
:func:`check_program` on the result, so a folder that is corrupt or edited by hand (even with its
sha256 digests recomputed) is refused at load with a :class:`~npudispatch.errors.ProgramFormatError`
naming the field (``outputs[0].dtype``, ``params.bin: op 2 'mul' record at 192``...) instead of
running into kernels with garbage. What is checked, and against what:

* schema: every key present with its JSON type; names are strings, sizes and offsets
  non-negative integers, dtypes ones that kernels can receive;
* sizes: the five buffers within :func:`~npudispatch.dispatch.limits.max_program_bytes`
  (checked before a backend allocates them);
* images: ``const.bin`` / ``params.bin`` are exactly the plan's const / params buffer sizes;
  the transaction parses and its header fits ``num_cols``;
* bindings: each input/output binding equals the plan's placement of that tensor (buffer,
  offset, bytes, dtype, shapes), ``nbytes`` holds ``padded_shape`` of ``dtype`` and lies inside
  its buffer; inputs live in the input buffer, outputs in the output buffer;
* ops: every op has a params region; each record decodes (header, tensor table), names the op's
  kernel id, stays inside its region, and describes tensors no larger than the program's
  memory; each output binding matches the dtype and shape its producing op's record declares;
* the transaction: every shim BD it programs lies inside its buffer, and every output binding
  is written by some S2MM transfer (a transaction with no ops, or one that never writes an output,
  would otherwise return zeros);
* runtime patch sites (DMA gathers): each points at the argplus field of a DDR_PATCH of the
  const buffer (no field twice), reads an element of an int32/int64 program input, and every
  row it can select (``base + rows * row_bytes``) lies inside the const buffer.

It costs one static walk of the transaction (``txn.explain``) and one decode per params record.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from npudispatch.dispatch import limits
from npudispatch.dispatch.patch_sites import SITE_KEYS, argplus_fields
from npudispatch.emulator.addrgen import extent_words
from npudispatch.errors import DeviceError, NpuDispatchError, PlanError, ProgramFormatError
from npudispatch.operators import records
from npudispatch.operators.dtypes import dtype_code
from npudispatch.overlay_abi import BufferKind, ParamsRecord
from npudispatch.txn.explain import explain
from npudispatch.txn.registers import Direction

if TYPE_CHECKING:
    from npudispatch.dispatch.emit import FusedProgram, TensorBinding

__all__ = ["check_document", "check_program"]

MAX_COLS = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")


class _Doc:
    """Typed access to ``program.json`` that names the field on every failure."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> ProgramFormatError:
        return ProgramFormatError(
            f"{self.where} is incomplete or inconsistent: field '{field}' {problem}; "
            "re-compile or re-save the program"
        )

    def get(self, obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], field: str):
        if key not in obj:
            raise self.fail(field, "is missing")
        value = obj[key]
        is_int = kind is int or (isinstance(kind, tuple) and int in kind)
        if is_int and isinstance(value, bool):
            raise self.fail(field, f"is {value!r}, not an integer")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(field, f"is {type(value).__name__} {_short(value)}, expected {names}")
        return value

    def count(self, obj: Mapping[str, Any], key: str, field: str) -> int:
        value = self.get(obj, key, int, field)
        if value < 0:
            raise self.fail(field, f"is {value}, must be >= 0")
        return value

    def shape(self, obj: Mapping[str, Any], key: str, field: str) -> list[int]:
        dims = self.get(obj, key, list, field)
        for i, d in enumerate(dims):
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                raise self.fail(f"{field}[{i}]", f"is {_short(d)}, not a non-negative integer")
        return dims

    def strings(self, obj: Mapping[str, Any], key: str, field: str) -> list[str]:
        items = self.get(obj, key, list, field)
        for i, s in enumerate(items):
            if not isinstance(s, str):
                raise self.fail(f"{field}[{i}]", f"is {_short(s)}, not a string")
        return items

    def dtype(self, obj: Mapping[str, Any], key: str, field: str) -> np.dtype:
        from npudispatch.dispatch.emit import numpy_dtype

        name = self.get(obj, key, str, field)
        try:
            dt = numpy_dtype(name)
            dtype_code(dt)
        except (TypeError, ValueError, AttributeError):
            raise self.fail(field, f"is {name!r}, not a dtype kernels can receive") from None
        return dt


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_document(where: Path, doc: Mapping[str, Any]) -> None:
    """Schema of ``program.json`` (everything ``FusedProgram._from_doc`` reads, with types)."""
    j = _Doc(where)
    j.get(doc, "name", str, "name")
    cols = j.get(doc, "num_cols", int, "num_cols")
    if not 1 <= cols <= MAX_COLS:
        raise j.fail("num_cols", f"is {cols}, expected 1..{MAX_COLS}")
    ops = j.get(doc, "ops", list, "ops")
    if not ops:
        raise j.fail("ops", "is empty: a program runs at least one op")
    for i, op in enumerate(ops):
        f = f"ops[{i}]"
        if not isinstance(op, dict):
            raise j.fail(f, f"is {type(op).__name__}, expected an object")
        for key in ("name", "op_type", "domain"):
            j.get(op, key, str, f"{f}.{key}")
        j.count(op, "kernel_id", f"{f}.kernel_id")  # unknown ids: FusedProgram.kernels()
        for key in ("in_args", "const_args", "out_args"):
            j.strings(op, key, f"{f}.{key}")
        j.get(op, "attrs", dict, f"{f}.attrs")
        j.count(op, "txn_ops", f"{f}.txn_ops")
        unknown = set(op) - {
            "name",
            "op_type",
            "domain",
            "kernel_id",
            "in_args",
            "const_args",
            "out_args",
            "attrs",
            "txn_ops",
        }
        if unknown:
            raise j.fail(f, f"has unknown keys {sorted(unknown)}")
    for kind in ("inputs", "outputs"):
        for i, b in enumerate(j.get(doc, kind, list, kind)):
            f = f"{kind}[{i}]"
            if not isinstance(b, dict):
                raise j.fail(f, f"is {type(b).__name__}, expected an object")
            j.get(b, "name", str, f"{f}.name")
            dt = j.dtype(b, "dtype", f"{f}.dtype")
            shape = j.shape(b, "shape", f"{f}.shape")
            padded = j.shape(b, "padded_shape", f"{f}.padded_shape")
            if len(padded) != len(shape) or any(p < s for p, s in zip(padded, shape)):
                raise j.fail(f"{f}.padded_shape", f"{padded} does not hold shape {shape}")
            buffer = j.count(b, "buffer", f"{f}.buffer")
            if buffer > 4:
                raise j.fail(f"{f}.buffer", f"is {buffer}, buffers are 0..4")
            j.count(b, "offset", f"{f}.offset")
            nbytes = j.count(b, "nbytes", f"{f}.nbytes")
            need = math.prod(padded) * dt.itemsize
            if nbytes < need:
                raise j.fail(
                    f"{f}.nbytes",
                    f"is {nbytes} but padded_shape {padded} of {dt.name} needs {need} B",
                )
    j.get(doc, "const_tensors", dict, "const_tensors")
    sites = doc.get("patch_sites", [])  # absent: a program without any
    if not isinstance(sites, list):
        raise j.fail("patch_sites", f"is {type(sites).__name__}, expected a list")
    for i, site in enumerate(sites):
        f = f"patch_sites[{i}]"
        if not isinstance(site, dict):
            raise j.fail(f, f"is {type(site).__name__}, expected an object")
        for key in ("node", "input"):
            j.get(site, key, str, f"{f}.{key}")
        for key in ("field", "element", "base", "row_bytes", "rows"):
            j.count(site, key, f"{f}.{key}")
        unknown = set(site) - set(SITE_KEYS)
        if unknown:
            raise j.fail(f, f"has unknown keys {sorted(unknown)}")
    j.get(doc, "plan", dict, "plan")
    digests = j.get(doc, "sha256", dict, "sha256")
    for f in ("txn.bin", "const.bin", "params.bin"):
        digest = j.get(digests, f, str, f"sha256[{f!r}]")
        if not _HEX64.fullmatch(digest):
            raise j.fail(f"sha256[{f!r}]", f"is {_short(digest)}, not a sha256 hex digest")


def check_program(where: Path, program: FusedProgram) -> None:
    """Consistency of a built program: images, bindings, params records, transaction coverage."""
    j = _Doc(where)
    plan = program.plan
    sizes = list(plan.buffer_sizes)
    try:  # before a backend allocates the input, output and scratch buffers
        limits.check_program_size(program.name, sizes)
    except PlanError as exc:
        raise ProgramFormatError(f"{where}: field 'plan': {exc}") from None
    for f, image, kind in (
        ("const.bin", program.const_image, 3),
        ("params.bin", program.params_image, 4),
    ):
        if len(image) != sizes[kind]:
            raise ProgramFormatError(
                f"{where / f} has {len(image)} B but the plan's buffer {kind} is {sizes[kind]} B; "
                "re-compile or re-save the program"
            )
    cols = program.txn.header.num_cols
    if cols > program.num_cols:
        raise j.fail("num_cols", f"is {program.num_cols} but txn.bin's header uses {cols} columns")
    for kind, bindings, home in (("inputs", program.inputs, 0), ("outputs", program.outputs, 1)):
        for i, b in enumerate(bindings):
            _check_binding(j, f"{kind}[{i}]", b, home, sizes, plan)
    produced = _check_records(where, program, sizes)
    for i, b in enumerate(program.outputs):
        spec = produced.get(b.name)
        if spec is None:
            continue  # an input passed straight through (a view of an input)
        if np.dtype(spec.dtype) != b.np_dtype or tuple(spec.shape) != tuple(b.padded_shape):
            raise j.fail(
                f"outputs[{i}].dtype",
                f"/ padded_shape say {b.dtype} {list(b.padded_shape)} but the op writing "
                f"{b.name!r} produces {np.dtype(spec.dtype).name} {list(spec.shape)}",
            )
    _check_transaction(where, program, sizes)
    _check_patch_sites(j, program, sizes)


def _check_patch_sites(j: _Doc, program: FusedProgram, sizes: Sequence[int]) -> None:
    """Every runtime patch site is the argplus field of a DDR_PATCH of the const buffer, reads an
    existing integer element of a program input, and keeps every row inside the const buffer."""
    if not program.patch_sites:
        return
    fields = argplus_fields(program.txn)
    inputs = {b.name: b for b in program.inputs}
    seen: set[int] = set()
    for i, site in enumerate(program.patch_sites):
        f = f"patch_sites[{i}]"
        hit = fields.get(site.field)
        if hit is None:
            raise j.fail(f"{f}.field", f"{site.field} is not the argplus field of a DDR_PATCH")
        if hit[1] != BufferKind.CONST:
            raise j.fail(
                f"{f}.field", f"{site.field} patches buffer {hit[1]}, not the const buffer"
            )
        if site.field in seen:
            raise j.fail(f"{f}.field", f"{site.field} is patched by two sites")
        seen.add(site.field)
        b = inputs.get(site.input)
        if b is None:
            raise j.fail(f"{f}.input", f"{site.input!r} is not an input of the program")
        if b.np_dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise j.fail(f"{f}.input", f"{site.input!r} is {b.dtype}, not int32/int64 indices")
        if site.element >= math.prod(b.shape):
            raise j.fail(
                f"{f}.element", f"{site.element} is past the {math.prod(b.shape)} of {site.input!r}"
            )
        if site.rows < 1 or site.row_bytes < 4 or site.row_bytes % 4 or site.base % 4:
            raise j.fail(
                f, f"rows {site.rows} of {site.row_bytes} B at {site.base}: not whole words"
            )
        end = site.base + site.rows * site.row_bytes
        if end > sizes[BufferKind.CONST]:
            raise j.fail(
                f"{f}.rows",
                f"{site.rows} rows of {site.row_bytes} B from {site.base} end at {end}, past the "
                f"const buffer ({sizes[BufferKind.CONST]} B)",
            )


def _check_binding(
    j: _Doc, f: str, b: TensorBinding, home: int, sizes: Sequence[int], plan: Any
) -> None:
    if b.buffer != home:
        raise j.fail(f"{f}.buffer", f"is {b.buffer}, expected {home}")
    if b.offset + b.nbytes > sizes[b.buffer]:
        raise j.fail(
            f"{f}.offset",
            f"+ nbytes = {b.offset} + {b.nbytes} is past the end of buffer {b.buffer} "
            f"({sizes[b.buffer]} B)",
        )
    pl = plan.placements.get(b.name)
    if pl is None:
        raise j.fail(f"{f}.name", f"{b.name!r} has no placement in the plan")
    padded = tuple(pl.padded_shape) if pl.padded_shape is not None else tuple(pl.shape)
    for key, mine, theirs in (
        ("buffer", b.buffer, int(pl.buffer)),
        ("offset", b.offset, pl.offset),
        ("nbytes", b.nbytes, pl.nbytes),
        ("dtype", b.dtype, pl.dtype),
        ("shape", tuple(b.shape), tuple(pl.shape)),
        ("padded_shape", tuple(b.padded_shape), padded),
    ):
        if mine != theirs:
            raise j.fail(
                f"{f}.{key}", f"is {mine!r} but the plan places {b.name!r} with {key} {theirs!r}"
            )


def _check_records(where: Path, program: FusedProgram, sizes: Sequence[int]) -> dict[str, Any]:
    """Decode every params record; returns the output spec each op declares, by tensor name."""
    memory = sum(sizes)
    regions = program.plan.params_regions
    image = program.params_image
    produced: dict[str, Any] = {}
    for i, op in enumerate(program.ops):
        label = f"params.bin: ops[{i}] {op.name!r} ({op.op_type})"
        if op.name not in regions:
            raise ProgramFormatError(f"{where}: {label} has no params region in the plan")
        offset, size = regions[op.name]
        at = f"{label} record at byte {offset}"
        try:
            record = ParamsRecord.decode(image[offset : offset + size])
            table = records.decode_table(record.payload)
        except (DeviceError, ValueError, IndexError, KeyError) as exc:
            raise ProgramFormatError(f"{where}: {at} does not decode: {exc}") from None
        if record.nbytes > size:
            raise ProgramFormatError(
                f"{where}: {at} is {record.nbytes} B, its region only {size} B"
            )
        if record.kernel_id != op.kernel_id:
            raise ProgramFormatError(
                f"{where}: {at} names kernel {record.kernel_id}, program.json ops[{i}] "
                f"kernel_id {op.kernel_id}"
            )
        for what, counts in (("operand", record.operand_bytes), ("output", record.output_bytes)):
            if sum(counts) > memory:
                raise ProgramFormatError(
                    f"{where}: {at} declares {what} streams of {sum(counts)} B, more than the "
                    f"program's {memory} B of memory"
                )
        specs = [s for _, s in table.inputs if s is not None] + list(table.outputs)
        for spec in specs:
            if len(spec.shape) > 8 or any(d < 0 for d in spec.shape):
                raise ProgramFormatError(f"{where}: {at} describes a tensor of shape {spec.shape}")
            real = spec.real_shape
            if real is not None and any(not 0 <= r <= d for r, d in zip(real, spec.shape)):
                raise ProgramFormatError(
                    f"{where}: {at} has real shape {real} outside shape {spec.shape}"
                )
            # The table describes logical tensors; weights are stored formatted (float32 as bf16,
            # 4-bit codes two to a byte), so the bound is on elements: two per byte of memory.
            elements = math.prod(spec.shape)
            if elements > 2 * memory:
                raise ProgramFormatError(
                    f"{where}: {at} describes a {spec.shape} tensor of {elements} elements, more "
                    f"than the program's {memory} B of memory can hold"
                )
        if len(table.outputs) != len(record.output_bytes):
            raise ProgramFormatError(
                f"{where}: {at} lists {len(table.outputs)} outputs for "
                f"{len(record.output_bytes)} output streams"
            )
        for j, (spec, nbytes) in enumerate(zip(table.outputs, record.output_bytes)):
            if spec.nbytes > nbytes:
                raise ProgramFormatError(
                    f"{where}: {at} output {j} is {spec.nbytes} B, its stream {nbytes} B"
                )
        for name, spec in zip(op.out_args, table.outputs):
            produced[name] = spec
    return produced


def _check_transaction(where: Path, program: FusedProgram, sizes: Sequence[int]) -> None:
    """Every BD inside its buffer; every output binding covered by S2MM writes."""
    try:
        movement = explain(program.txn)
    except (NpuDispatchError, ValueError, IndexError, KeyError) as exc:
        raise ProgramFormatError(f"{where / 'txn.bin'} cannot be decoded: {exc}") from None
    written: list[tuple[int, int]] = []
    for task in movement.tasks:
        for rep in range(task.repeat_count + 1):
            for b in task.bds:
                if b.argidx is None:
                    continue  # raw addresses are the device's business (DeviceFault at run)
                it = (b.bd.iteration_current + rep) % max(b.bd.iteration_wrap, 1)
                start = b.offset + 4 * it * b.bd.iteration_step
                end = start + 4 * extent_words(b.bd)
                if not 0 <= b.argidx < len(sizes) or end > sizes[b.argidx] or start < 0:
                    size = sizes[b.argidx] if 0 <= b.argidx < len(sizes) else 0
                    raise ProgramFormatError(
                        f"{where / 'txn.bin'}: op #{task.op_index} queues {task.shim_channel} "
                        f"BD{b.bd_id} over bytes [{start}, {end}) of buffer {b.argidx} "
                        f"({size} B): outside the buffer"
                    )
                if task.direction == Direction.S2MM and b.argidx == 1:
                    written.append((start, end))
    for i, b in enumerate(program.outputs):
        end = b.offset + math.prod(b.padded_shape) * b.np_dtype.itemsize
        if b.buffer == 1 and not _covered(written, b.offset, end):
            raise ProgramFormatError(
                f"{where}: outputs[{i}] {b.name!r} (bytes [{b.offset}, {end}) of "
                "the output buffer) is never fully written by the transaction in txn.bin"
            )


def _covered(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """True when the union of ``spans`` covers ``[lo, hi)``."""
    reach = lo
    for start, end in sorted(spans):
        if start > reach:
            break
        reach = max(reach, end)
        if reach >= hi:
            return True
    return reach >= hi
