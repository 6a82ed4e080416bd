"""Emit one NPU partition as a :class:`FusedProgram`: re-based op transactions fused into one.

Re-basing (docs/txn_format.md §6) maps each op's own buffers (``ArgSpec``,
op-local argidx) onto the five fused buffers with :func:`npudispatch.txn.rebase`:

==========  ==========================================================================
ArgSpec     fused buffer + offset
==========  ==========================================================================
INPUT       the tensor's placement (input, output or scratch buffer; aliases resolved)
OUTPUT      the tensor's placement
CONST       3, the op's const region (several CONST specs: consecutive parts of it)
PARAMS      4, the op's params region
SCRATCH     2, the shared op scratch pad (several specs: consecutive parts of it)
==========  ==========================================================================

A constant an operator streams as an activation gets its own const region named
``CONST_TENSOR_PREFIX + tensor``. The fused transaction is ``txn.fuse_rebased`` of the op transactions (one copy);
:attr:`FusedProgram.instructions` is the wrapped instruction buffer (docs/txn_format.md §7).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from npudispatch.dispatch.backends.base import ProgramImage
from npudispatch.dispatch.patch_sites import PatchSite, PatchTable, gather_paths, patch_sites_of
from npudispatch.dispatch.plan import BufferPlan
from npudispatch.display import rich_html
from npudispatch.errors import ModelError, PlanError, ProgramFormatError, TxnFormatError
from npudispatch.operators import registry
from npudispatch.operators.base import ArgSpec, OpConfig
from npudispatch.overlay_abi import FLAG_MIXED_COMPUTE, ParamsRecord
from npudispatch.txn import ArgRange, Transaction, fuse_rebased, rebase, wrap

if TYPE_CHECKING:
    from npudispatch.dispatch.estimate import Device, ProgramEstimate
    from npudispatch.dispatch.partition_plan import PartitionPlan

__all__ = [
    "CONST_TENSOR_PREFIX",
    "FusedProgram",
    "Launch",
    "OpEntry",
    "TensorBinding",
    "emit",
    "numpy_dtype",
    "value_nbytes",
]

CONST_TENSOR_PREFIX = "const:"
# 2: the params records of the QDQ MatMul/Gemm/Conv/ConvTranspose ops (and chains starting with
# one) end with the weight's [axis, block]; a format-1 folder holds the shorter record.
# 3: records may carry FLAG_MIXED_COMPUTE. Only programs that do are written as format 3, so
# bf16 and fp32 programs stay readable by format-2 readers, which would run a mixed record in bf16.
PROGRAM_FORMAT = 3
READABLE_FORMATS = (2, 3)
FILES = ("program.json", "txn.bin", "const.bin", "params.bin")


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype from its name (``bfloat16`` and other ml_dtypes included)."""
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, name))


def value_nbytes(value: ir.Value) -> int:
    """Bytes of a statically shaped value (0 when its dtype or shape is unknown)."""
    if value.dtype is None or value.shape is None or not value.shape.is_static():
        return 0
    count = int(np.prod([int(d) for d in value.shape], dtype=np.int64))
    return (count * value.dtype.bitwidth + 7) // 8


@dataclass
class Launch:
    """One op of a partition: its node, config, buffers, formatted consts and params record."""

    node: ir.Node
    cfg: OpConfig
    args: list[ArgSpec]
    consts: bytes
    params: bytes


@dataclass(frozen=True)
class TensorBinding:
    """A host-visible tensor of a program: where the host writes (inputs) or reads (outputs) it.

    ``shape`` is the logical (ONNX) shape, ``padded_shape`` the shape laid out in the buffer;
    the tensor is the leading ``shape`` corner of the ``padded_shape`` array at ``offset``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    padded_shape: tuple[int, ...]
    buffer: int
    offset: int
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def is_padded(self) -> bool:
        return self.shape != self.padded_shape

    def view(self, buffer: np.ndarray) -> np.ndarray:
        """The logical tensor as a view into the uint8 ``buffer`` (no copy)."""
        dt = self.np_dtype
        count = int(np.prod(self.padded_shape, dtype=np.int64))
        arr = buffer[self.offset : self.offset + count * dt.itemsize].view(dt)
        arr = arr.reshape(self.padded_shape)
        if self.is_padded:
            arr = arr[tuple(slice(0, s) for s in self.shape)]
        return arr

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["padded_shape"] = list(self.shape), list(self.padded_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorBinding:
        return cls(
            d["name"],
            d["dtype"],
            tuple(d["shape"]),
            tuple(d["padded_shape"]),
            int(d["buffer"]),
            int(d["offset"]),
            int(d["nbytes"]),
        )


@dataclass
class OpEntry:
    """One op of a fused program (DD ``op_list`` entry plus the kernel id and txn op count)."""

    name: str
    op_type: str
    domain: str
    kernel_id: int
    in_args: list[str]
    const_args: list[str]
    out_args: list[str]
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    txn_ops: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dd_attrs(node: ir.Node) -> dict[str, dict[str, Any]]:
    """Node attributes in DD's ``{name: {type, value: [str...]}}`` form (docs/architecture.md §6)."""
    out: dict[str, dict[str, Any]] = {}
    for name, attr in node.attributes.items():
        value = attr.value
        values = list(value) if isinstance(value, list | tuple) else [value]
        if all(isinstance(v, bool | int | np.integer) for v in values):
            kind = "int"
        elif all(isinstance(v, float | int) for v in values):
            kind = "float"
        elif all(isinstance(v, str) for v in values):
            kind = "str"
        else:
            continue  # tensors/graphs have no DD attribute form
        out[name] = {"type": kind, "value": [str(v) for v in values]}
    return out


def _op_entry(launch: Launch, txn_ops: int) -> OpEntry:
    node = launch.node
    ins = [v for v in node.inputs if v is not None]
    return OpEntry(
        name=node.name,
        op_type=node.op_type,
        domain=node.domain,
        kernel_id=int(launch.cfg.operator.kernel_id),
        in_args=[v.name for v in ins if not v.is_initializer()],
        const_args=[v.name for v in ins if v.is_initializer()],
        out_args=[v.name for v in node.outputs],
        attrs=_dd_attrs(node),
        txn_ops=txn_ops,
    )


def _const_tensor_bytes(value: ir.Value, size: int) -> bytes:
    """Raw bytes of a constant streamed as an activation (ONNX layout, zero-filled to ``size``)."""
    assert value.const_value is not None
    data = np.ascontiguousarray(value.const_value.numpy()).tobytes()
    if len(data) > size:
        raise PlanError(f"constant {value.name!r} has {len(data)} B, its region {size} B")
    return data


def _image(size: int, writes: list[tuple[int, bytes]]) -> bytes:
    """``size`` zero bytes with every ``(offset, data)`` written in. Disjoint writes inside the
    image (the planner's regions) are joined with their zero gaps in one copy: a weight image is
    tens of MB, and a zeroed buffer filled then copied to ``bytes`` cost two more passes."""
    pieces: list[bytes] = []
    end = 0
    for off, data in sorted(writes, key=lambda w: w[0]):
        if off < end:
            break
        pieces += [bytes(off - end), data]
        end = off + len(data)
    else:
        if end <= size:
            pieces.append(bytes(size - end))
            return b"".join(pieces)
    image = bytearray(size)
    for off, data in writes:
        image[off : off + len(data)] = data
    return bytes(image)


def _binding(value: ir.Value, plan: BufferPlan) -> TensorBinding:
    pl = plan.placements[value.name]
    return TensorBinding(
        name=value.name,
        dtype=pl.dtype,
        shape=tuple(pl.shape),
        padded_shape=tuple(pl.padded_shape) if pl.padded_shape is not None else tuple(pl.shape),
        buffer=int(pl.buffer),
        offset=pl.offset,
        nbytes=pl.nbytes,
    )


def _fuse_rebased(
    name: str, launches: Sequence[Any], items: list[tuple[Transaction, list[ArgRange]]]
) -> Transaction:
    """Re-base and fuse in one copy; on a bad patch, name the op whose argument map misses it."""
    try:
        return fuse_rebased(items)
    except TxnFormatError:
        for launch, (txn, ranges) in zip(launches, items):
            try:
                rebase(txn, ranges)
            except TxnFormatError as exc:
                raise ModelError(
                    f"program {name!r}, op {launch.node.name!r}: re-basing failed: {exc}"
                ) from exc
        raise


def emit(name: str, planned: PartitionPlan, *, num_cols: int = 4) -> FusedProgram:
    """Re-base every op transaction with the ranges of ``planned`` (computed once by
    :func:`~npudispatch.dispatch.partition_plan.plan_partition`), fuse, and build the const and
    params images and the IO bindings."""
    launches, plan, io = planned.launches, planned.plan, planned.io
    txns: list[tuple[Transaction, list[ArgRange]]] = []
    ops: list[OpEntry] = []
    const_writes: list[tuple[int, bytes]] = []
    params_writes: list[tuple[int, bytes]] = []
    const_tensors: dict[str, dict[str, Any]] = {}
    for launch, ranges in zip(launches, planned.ranges, strict=True):
        node = launch.node
        op = launch.cfg.operator
        txn = op.transaction(launch.cfg, num_cols)
        txns.append((txn, ranges))
        ops.append(_op_entry(launch, txn.num_ops))
        if launch.consts:
            const_writes.append((plan.const_regions[node.name][0], launch.consts))
        if launch.params:
            params_writes.append((plan.params_regions[node.name][0], launch.params))
        for v in node.inputs:
            if v is None or not v.is_initializer() or v.name in const_tensors:
                continue
            region = plan.const_regions.get(CONST_TENSOR_PREFIX + v.name)
            owner = CONST_TENSOR_PREFIX + v.name if region else node.name
            off = (region or plan.const_regions.get(node.name, (0, 0)))[0]
            if region:
                const_writes.append((off, _const_tensor_bytes(v, region[1])))
            const_tensors[v.name] = {
                "dtype": np.dtype(v.dtype.numpy()).name if v.dtype else "unknown",
                "shape": [int(d) for d in v.shape] if v.shape is not None else [],
                "size_in_bytes": value_nbytes(v),
                "region": owner,
                "offset": off,
            }
    fused = _fuse_rebased(name, launches, txns)
    return FusedProgram(
        name=name,
        txn=fused,
        plan=plan,
        const_image=_image(plan.const_bytes, const_writes),
        params_image=_image(plan.params_bytes, params_writes),
        ops=ops,
        inputs=[_binding(v, plan) for v in io.inputs],
        outputs=[_binding(v, plan) for v in io.outputs],
        const_tensors=const_tensors,
        num_cols=num_cols,
        patch_sites=patch_sites_of(planned, [t for t, _ in txns], fused, num_cols),
    )


@dataclass
class FusedProgram:
    """One NPU partition compiled: fused transaction, plan, const/params images, ops, IO bindings.

    Runs without the model: :meth:`save` / :meth:`load` keep everything (kernels are resolved
    from the operator registry by kernel id when the program is turned into a
    :class:`~npudispatch.dispatch.backends.ProgramImage`).
    """

    name: str
    txn: Transaction
    plan: BufferPlan
    const_image: bytes
    params_image: bytes
    ops: list[OpEntry]
    inputs: list[TensorBinding]
    outputs: list[TensorBinding]
    const_tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_cols: int = 4
    # DDR_PATCH offsets the host rewrites from input values before every run (DMA gathers)
    patch_sites: list[PatchSite] = field(default_factory=list)

    @property
    def instructions(self) -> bytes:
        """The instruction-buffer image: ``{u32 0, u32 size}`` + fused transaction (docs/txn_format.md §7)."""
        return wrap(self.txn)

    @property
    def kernel_ids(self) -> list[int]:
        """Distinct kernel ids used, in first-use order."""
        return list(dict.fromkeys(op.kernel_id for op in self.ops))

    def kernels(self) -> dict[int, Any]:
        """``kernel id -> kernel`` resolved from the operator registry (ModelError if unknown)."""
        out = {}
        for kid in self.kernel_ids:
            try:
                out[kid] = registry.operator_for_kernel(kid).kernel
            except KeyError:
                raise ModelError(
                    f"program {self.name!r} uses kernel id {kid}, which no registered operator "
                    "has; load it with the npudispatch version that compiled it"
                ) from None
        return out

    def to_program_image(self) -> ProgramImage:
        """What a backend runs (raw fused transaction, five buffer sizes, images, kernels)."""
        return ProgramImage(
            txn=self.txn.to_bytes(),
            buffer_sizes=self.plan.buffer_sizes,
            const_image=self.const_image,
            params_image=self.params_image,
            kernels=self.kernels(),
            name=self.name,
            patches=self.patch_table(),
            launch_labels=self.launch_labels(),
        )

    def launch_labels(self) -> tuple[str, ...]:
        """``node 'name' (OpType)`` of each kernel launch, in run order (for error messages)."""
        return tuple(f"node {op.name!r} ({op.op_type})" for op in self.ops)

    def patch_table(self) -> PatchTable | None:
        """The runtime patch sites ready to apply (None when the program has none)."""
        return PatchTable(self.name, self.patch_sites, self.inputs) if self.patch_sites else None

    def gathers(self) -> dict[str, str]:
        """Which path each constant-table Gather took (``"dma: ..."`` or ``"row copy: ..."``,
        see :func:`~npudispatch.dispatch.patch_sites.gather_paths`)."""
        return gather_paths(self.patch_sites, self.ops)

    def summary(self) -> dict[str, Any]:
        """``plan`` and ``txn`` figures of ``report.json``."""
        p = self.plan
        return {
            "plan": {
                "scratch_bytes": p.scratch_bytes,
                "scratch_lower_bound_bytes": p.scratch_lower_bound_bytes,
                "input_bytes": p.input_bytes,
                "output_bytes": p.output_bytes,
                "const_bytes": p.const_bytes,
                "params_bytes": p.params_bytes,
            },
            "txn": {"num_ops": self.txn.num_ops, "bytes": self.txn.nbytes},
            **({"gathers": gathers} if (gathers := self.gathers()) else {}),
        }

    def estimate(self, device: str | Device = "strix") -> ProgramEstimate:
        """The cost model's estimate of this program on ``device`` (``"strix"``, ``"phoenix"`` or
        a :class:`~npudispatch.dispatch.estimate.Device`): a model estimate, not a measurement
        (see :mod:`npudispatch.dispatch.estimate`)."""
        from npudispatch.dispatch.estimate import estimate_program

        return estimate_program(self, device)

    # --- persistence ---------------------------------------------------------------------------

    def _has_mixed_records(self) -> bool:
        """Whether a launch of this program computes in mixed precision (its record's flag)."""
        regions = self.plan.params_regions.values()
        return any(
            ParamsRecord.decode(self.params_image[off : off + size]).flags & FLAG_MIXED_COMPUTE
            for off, size in regions
        )

    def to_json(self) -> dict[str, Any]:
        """The ``program.json`` document (with sha256 of the three binary files)."""
        return {
            "format": PROGRAM_FORMAT if self._has_mixed_records() else 2,
            "name": self.name,
            "num_cols": self.num_cols,
            "ops": [op.to_dict() for op in self.ops],
            "inputs": [b.to_dict() for b in self.inputs],
            "outputs": [b.to_dict() for b in self.outputs],
            "const_tensors": self.const_tensors,
            "patch_sites": [site.to_dict() for site in self.patch_sites],
            "plan": self.plan.to_dict(),
            "sha256": {
                "txn.bin": hashlib.sha256(self.txn.buffer).hexdigest(),
                "const.bin": hashlib.sha256(self.const_image).hexdigest(),
                "params.bin": hashlib.sha256(self.params_image).hexdigest(),
            },
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``program.json``, ``txn.bin`` (raw fused TXN), ``const.bin``, ``params.bin`` and
        ``meta.json`` (DD's meta JSON, for DD tooling; :meth:`load` does not need it): the same
        files as a partition folder of ``npudispatch compile -o``."""
        from npudispatch.dispatch.meta import to_dd_meta

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "txn.bin").write_bytes(self.txn.buffer)
        (d / "const.bin").write_bytes(self.const_image)
        (d / "params.bin").write_bytes(self.params_image)
        (d / "meta.json").write_text(json.dumps(to_dd_meta(self), indent=1))
        (d / "program.json").write_text(json.dumps(self.to_json(), indent=1))
        return d

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        trusted: bool = False,
        contents: Mapping[str, bytes] | None = None,
    ) -> FusedProgram:
        """Read a program written by :meth:`save`, validated as a whole.

        Raises :class:`~npudispatch.errors.ProgramFormatError` naming the file or field when
        anything is missing, corrupt or inconsistent (see :mod:`.program_check`).
        ``trusted=True`` is for a caller that has itself verified every byte of the folder
        against digests written together with it by this same npudispatch code (the compile
        cache's manifest): the per-file sha256, the eager parse of every op and the whole-program
        check are then skipped, since they would re-verify bytes already known to be the ones
        the compiler saved. ``contents``: bytes of some of the folder's files (by file name)
        that the caller has already read, used instead of reading them again.
        """
        from npudispatch.dispatch import program_check

        d = Path(directory)
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            raise ProgramFormatError(
                f"{d} is not a saved FusedProgram: missing {', '.join(missing)}"
            )
        try:
            doc = json.loads((d / "program.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProgramFormatError(
                f"{d / 'program.json'} is corrupt ({exc}); re-compile or re-save the program"
            ) from exc
        if not isinstance(doc, dict) or doc.get("format") not in READABLE_FORMATS:
            doc = doc if isinstance(doc, dict) else {}
            raise ProgramFormatError(
                f"{d / 'program.json'}: format {doc.get('format')!r}, expected one of "
                f"{list(READABLE_FORMATS)}; "
                "re-compile the model with this npudispatch version"
            )
        program_check.check_document(d / "program.json", doc)
        try:
            program = cls._from_doc(d, doc, trusted=trusted, contents=contents)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProgramFormatError):
                raise
            raise ProgramFormatError(
                f"{d / 'program.json'} is incomplete or inconsistent ({type(exc).__name__}: "
                f"{exc}); re-compile or re-save the program"
            ) from exc
        except PlanError as exc:
            raise ProgramFormatError(f"{d / 'program.json'}: field plan: {exc}") from exc
        if not trusted:
            program_check.check_program(d, program)
        return program

    @classmethod
    def _from_doc(
        cls,
        d: Path,
        doc: dict[str, Any],
        *,
        trusted: bool = False,
        contents: Mapping[str, bytes] | None = None,
    ) -> FusedProgram:
        known = contents or {}
        blobs = {f: known[f] if f in known else (d / f).read_bytes() for f in FILES[1:]}
        for f, data in blobs.items():
            if not trusted and hashlib.sha256(data).hexdigest() != doc["sha256"][f]:
                raise ProgramFormatError(
                    f"{d / f} does not match sha256[{f!r}] in program.json (corrupted?)"
                )
        try:
            txn = Transaction.from_bytes(blobs["txn.bin"])
            if not trusted:
                # Decode every op now, not at the first run; iter_ops keeps the parsed bytes,
                # so to_program_image hands them to the backend without re-encoding.
                for _ in txn.iter_ops():
                    pass
        except TxnFormatError as exc:
            raise ProgramFormatError(f"{d / 'txn.bin'} is not a valid transaction: {exc}") from exc
        program = cls(
            name=doc["name"],
            txn=txn,
            plan=BufferPlan.from_dict(doc["plan"]),
            const_image=blobs["const.bin"],
            params_image=blobs["params.bin"],
            ops=[OpEntry(**op) for op in doc["ops"]],
            inputs=[TensorBinding.from_dict(b) for b in doc["inputs"]],
            outputs=[TensorBinding.from_dict(b) for b in doc["outputs"]],
            const_tensors=doc.get("const_tensors", {}),
            num_cols=int(doc["num_cols"]),
            patch_sites=[PatchSite.from_dict(s) for s in doc.get("patch_sites", [])],
        )
        try:
            program.kernels()  # fail now, not at the first run, when a kernel id is unknown
        except ModelError as exc:
            raise ProgramFormatError(str(exc)) from exc
        return program

    # --- views ---------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"FusedProgram({self.name!r}, {len(self.ops)} ops, txn {self.txn.nbytes} B / "
            f"{self.txn.num_ops} ops, buffers {self.plan.buffer_sizes})"
        )

    # Notebook view (op list, IO bindings, buffer plan): npudispatch.viz.program_html.
    _repr_html_ = rich_html
