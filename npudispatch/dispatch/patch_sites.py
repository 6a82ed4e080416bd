"""Runtime patch sites: DDR_PATCH offsets of a fused transaction the host rewrites before each run.

A DMA gather (an embedding lookup by ``input_ids``, :class:`~npudispatch.operators.lookup.
GatherTable`) reads one table row per index; which row is only known when the inputs are. Its
transaction addresses row 0, and the program records, per index, a :class:`PatchSite`: the byte
position of that DDR_PATCH's ``argplus`` field in the fused transaction, which program input and
element holds the index, the table's base offset in the const buffer, the row size and the row
count. Before every kernel call the host reads the indices from the input image it is about to
send, wraps negative ones, rejects out-of-range ones (like onnxruntime) and writes
``base + index * row_bytes`` into those fields (:class:`PatchTable`): the emulator's decoded
DDR_PATCH ops, or the instruction BO on XRT (synced again). See docs/txn_format.md §6.1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from npudispatch.errors import ModelError, PlanError
from npudispatch.overlay_abi import BufferKind
from npudispatch.txn.rebase import patch_fields_of

if TYPE_CHECKING:
    from npudispatch.dispatch.emit import OpEntry, TensorBinding
    from npudispatch.dispatch.partition_plan import PartitionPlan
    from npudispatch.dispatch.plan import BufferPlan
    from npudispatch.txn import Transaction

__all__ = [
    "SITE_KEYS",
    "PatchSite",
    "PatchTable",
    "argplus_fields",
    "gather_paths",
    "patch_ops",
    "patch_sites_of",
]

SITE_KEYS = ("field", "node", "input", "element", "base", "row_bytes", "rows")


@dataclass(frozen=True)
class PatchSite:
    """One runtime-patched DDR_PATCH of a fused program (an entry of ``program.json``
    ``patch_sites``).

    ``field``: byte position of the patch's u64 ``argplus`` in the fused transaction; ``node``: the
    op it belongs to; ``input``/``element``: the program input binding and flat (C order) element
    holding the index; ``base``: byte offset of the table's row 0 in the const buffer;
    ``row_bytes``/``rows``: row size and count (indices must lie in ``[-rows, rows)``).
    """

    field: int
    node: str
    input: str
    element: int
    base: int
    row_bytes: int
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PatchSite:
        return cls(**{k: d[k] for k in SITE_KEYS})


def argplus_fields(txn: Transaction) -> dict[int, tuple[int, int, int]]:
    """``argplus field position -> (op index, argidx, argplus)`` of every DDR_PATCH of ``txn``."""
    _, _, pf = patch_fields_of(txn)
    at = np.where(pf.short, pf.offsets + 16, pf.offsets + 40)
    return {
        int(f): (int(i), int(a), int(p))
        for f, i, a, p in zip(at.tolist(), pf.op_index.tolist(), pf.argidx, pf.argplus)
    }


def patch_sites_of(
    planned: PartitionPlan, txns: Sequence[Transaction], fused: Transaction, num_cols: int
) -> list[PatchSite]:
    """The runtime patch sites of every op of ``planned`` (``txns``: the op transactions in
    launch order, ``fused``: their re-based concatenation), re-based: each op-local patch becomes
    its field's position in the fused transaction, its re-based argplus (row 0 of the table in
    the const buffer) the site's base, its index input the program input it views."""
    fields: dict[int, tuple[int, int, int]] | None = None
    by_op: dict[int, int] = {}
    inputs = {v.name for v in planned.io.inputs}
    sites: list[PatchSite] = []
    first_op = 0
    for launch, txn in zip(planned.launches, txns, strict=True):
        local = launch.cfg.operator.runtime_patches(launch.cfg, num_cols)
        if local:
            if fields is None:
                fields = argplus_fields(fused)
                by_op = {op: at for at, (op, _, _) in fields.items()}
            local_ops = [op for op, _, _ in argplus_fields(txn).values()]
            node = launch.node
            for p in local:
                at = by_op[first_op + local_ops[p.patch]]
                _, argidx, base = fields[at]
                if argidx != int(BufferKind.CONST):
                    raise PlanError(
                        f"node {node.name!r}: runtime patch {p.patch} addresses buffer {argidx}, "
                        "not the const buffer"
                    )
                value = node.inputs[p.input_index]
                assert value is not None
                sites.append(
                    PatchSite(
                        field=at,
                        node=node.name,
                        input=_index_binding(value.name, planned.plan, inputs, node.name),
                        element=p.element,
                        base=base,
                        row_bytes=p.row_bytes,
                        rows=p.rows,
                    )
                )
        first_op += txn.num_ops
    return sites


def _index_binding(name: str, plan: BufferPlan, inputs: set[str], node: str) -> str:
    """The program input whose bytes tensor ``name`` (an index tensor, maybe a view) is."""
    root, offset = name, 0
    while root in plan.aliases and not offset:
        root, offset = plan.aliases[root]
    if offset or root not in inputs:
        raise PlanError(
            f"node {node!r}: the runtime-patched input {name!r} is not a program input "
            "(internal error: the planner bound it as host-written)"
        )
    return root


def gather_paths(sites: Sequence[PatchSite], ops: Sequence[OpEntry]) -> dict[str, str]:
    """Which path each constant-table Gather of a program took: ``"dma: ..."`` (only the selected
    rows are read, their addresses patched from the named input) or ``"row copy: ..."`` (the
    kernel gets the whole table); the compile report's ``gathers``."""
    from npudispatch.operators.lookup import GatherTable

    dma: dict[str, tuple[str, int, int]] = {}
    for s in sites:
        n = dma.get(s.node, (s.input, 0, s.row_bytes))[1]
        dma[s.node] = (s.input, n + 1, s.row_bytes)
    out = {}
    for op in ops:
        if op.kernel_id != GatherTable.kernel_id:
            continue
        if op.name in dma:
            src, n, row = dma[op.name]
            out[op.name] = f"dma: {n} row(s) of {row} B, addresses patched from input {src!r}"
        else:
            out[op.name] = "row copy: indices computed on the device, the whole table is read"
    return out


class PatchTable:
    """The sites of one program, ready to apply: where each index is in the input image, and
    the argplus fields to rewrite.

    Built once per prepared program from its sites and input bindings; :meth:`argplus` is one
    vectorized read of the indices per dtype, the range check and the address arithmetic.
    """

    def __init__(
        self, program: str, sites: Sequence[PatchSite], inputs: Sequence[TensorBinding]
    ) -> None:
        by_name = {b.name: b for b in inputs}
        self.program = program
        self.sites = list(sites)
        self.fields = np.asarray([s.field for s in sites], np.int64)
        self._base = np.asarray([s.base for s in sites], np.int64)
        self._row_bytes = np.asarray([s.row_bytes for s in sites], np.int64)
        self._rows = np.asarray([s.rows for s in sites], np.int64)
        self._shapes = {}
        groups: dict[str, list[int]] = {}
        offsets = np.zeros(len(sites), np.int64)
        for k, s in enumerate(sites):
            b = by_name.get(s.input)
            if b is None:
                raise ModelError(
                    f"program {program!r}: patch site of node {s.node!r} reads input {s.input!r}, "
                    "which the program does not have; re-compile the model"
                )
            element = s.element
            if b.is_padded:  # the element's place in the padded layout the buffer holds
                position = np.unravel_index(element, b.shape)
                element = int(np.ravel_multi_index(position, b.padded_shape))
            offsets[k] = b.offset + element * b.np_dtype.itemsize
            groups.setdefault(b.dtype, []).append(k)
            self._shapes[s.input] = tuple(b.shape)
        self._reads = [
            (np.dtype(dt), np.asarray(ks, np.int64), offsets[ks]) for dt, ks in groups.items()
        ]

    def __len__(self) -> int:
        return len(self.sites)

    def indices(self, input_image: np.ndarray) -> np.ndarray:
        """The raw index values (int64) the sites read from the uint8 input image."""
        values = np.empty(len(self.sites), np.int64)
        for dtype, ks, offsets in self._reads:
            where = offsets[:, None] + np.arange(dtype.itemsize)
            values[ks] = input_image[where].reshape(-1).view(dtype.newbyteorder("<"))
        return values

    def argplus(self, input_image: np.ndarray) -> np.ndarray:
        """The new ``argplus`` of every site (uint64) for the indices in ``input_image``; raises
        :class:`~npudispatch.errors.ModelError` naming the input, position and table size when an
        index is outside ``[-rows, rows)``."""
        raw = self.indices(input_image)
        wrapped = np.where(raw < 0, raw + self._rows, raw)
        bad = (wrapped < 0) | (wrapped >= self._rows)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            s = self.sites[k]
            pos = tuple(int(i) for i in np.unravel_index(s.element, self._shapes[s.input]))
            raise ModelError(
                f"program {self.program!r}, Gather node {s.node!r}: index {int(raw[k])} at "
                f"position {list(pos)} of input {s.input!r} is out of range for a table of "
                f"{s.rows} rows (indices must be in [{-s.rows}, {s.rows - 1}])"
            )
        return (self._base + wrapped * self._row_bytes).astype(np.uint64)

    def op_indices(self, txn: Transaction) -> list[int]:
        """The index in ``txn.ops`` of the DDR_PATCH of every site."""
        fields = argplus_fields(txn)
        return [fields[int(f)][0] for f in self.fields]

    def write(self, buffer: np.ndarray, values: np.ndarray, shift: int = 0) -> tuple[int, int]:
        """Write ``values`` as u64 into the uint8 ``buffer`` at each site's field (+ ``shift``
        bytes, e.g. an instruction-buffer wrapper); returns the byte span written."""
        at = self.fields + shift
        buffer[at[:, None] + np.arange(8)] = values.astype("<u8").view(np.uint8).reshape(-1, 8)
        return int(at.min()), int(at.max()) + 8


def patch_ops(ops: Sequence[Any], values: np.ndarray) -> None:
    """Set ``argplus`` of decoded DDR_PATCH ops (the emulator executes the typed ops)."""
    for op, value in zip(ops, values.tolist()):
        op.argplus = value
