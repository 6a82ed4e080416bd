"""DDR_PATCH re-basing (docs/txn_format.md §5-6): rewrite argidx/argplus, nothing else.

Works directly on the bytes with numpy at the patch offsets given by the cached OpIndex, so no op
objects are built: plain and opt Size-48 patches keep argidx/argplus as u64 at +32/+40, opt Size-24
patches as u8 at +12 and u64 at +16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from npudispatch.errors import TxnFormatError
from npudispatch.txn.codec import PATCH_SIZE_OPT24
from npudispatch.txn.framing import OpIndex
from npudispatch.txn.transaction import Framing, Transaction

_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ArgRange:
    """Bytes ``[offset, offset + size)`` of op-local buffer ``local_argidx`` live in fused buffer
    ``fused_argidx`` at ``fused_offset`` (DD's OpArgMap entry, resolved)."""

    local_argidx: int
    offset: int
    size: int
    fused_argidx: int
    fused_offset: int


@dataclass(frozen=True, slots=True)
class PatchFields:
    """Where every DDR_PATCH's fields are: op indices, byte offsets, and current values."""

    op_index: np.ndarray  # int64 op indices
    offsets: np.ndarray  # int64 byte offsets of the ops
    short: np.ndarray  # bool: opt Size-24 layout
    argidx: np.ndarray  # uint64
    argplus: np.ndarray  # uint64

    def with_values(self, argidx: np.ndarray, argplus: np.ndarray) -> PatchFields:
        """Same patch positions, new values."""
        return PatchFields(self.op_index, self.offsets, self.short, argidx, argplus)


def _gather_u64(arr: np.ndarray, at: np.ndarray) -> np.ndarray:
    return arr[at[:, None] + np.arange(8)].view("<u8").reshape(-1)


def patch_fields(data: bytes, index: OpIndex, opt: bool) -> PatchFields:
    """Read argidx/argplus of every DDR_PATCH (vectorised)."""
    ops = index.patch_ops
    offs = index.offsets[ops]
    short = (index.sizes[ops] == PATCH_SIZE_OPT24) if opt else np.zeros(len(ops), dtype=bool)
    arr = np.frombuffer(data, dtype=np.uint8)
    idx_at = np.where(short, offs + 12, offs + 32)
    plus_at = np.where(short, offs + 16, offs + 40)
    argidx = _gather_u64(arr, idx_at)
    argidx[short] &= 0xFF  # Size-24 argidx is one byte
    return PatchFields(ops, offs, short, argidx, _gather_u64(arr, plus_at))


def patch_fields_of(txn: Transaction) -> tuple[bytes, Framing, PatchFields]:
    """Bytes, framing and patch fields of ``txn`` (patch fields cached with the framing)."""
    data, framing = txn.framing()
    pf = framing.patches
    if pf is None:
        pf = framing.patches = patch_fields(data, framing.index, txn.is_opt)
    return data, framing, pf  # type: ignore[return-value]


def _check_fits(pf: PatchFields, argidx: np.ndarray) -> None:
    too_big = pf.short & (argidx > 0xFF)
    if too_big.any():
        k = int(np.flatnonzero(too_big)[0])
        raise TxnFormatError(
            f"op {int(pf.op_index[k])} DDR_PATCH at byte offset {int(pf.offsets[k])}: new argidx "
            f"{int(argidx[k])} does not fit the u8 field of an opt Size-24 patch; convert with "
            "to_opt(..., patch_size=48)"
        )


def patched_parts(
    data: bytes, pf: PatchFields, argidx: np.ndarray, argplus: np.ndarray, start: int, end: int
) -> list[bytes | memoryview]:
    """``data[start:end]`` as slices interleaved with the new patch fields (nothing copied yet).

    Joining the parts yields the re-based bytes in one memcpy pass; :func:`fuse_rebased` joins the
    parts of many transactions at once so every byte is copied exactly once.
    """
    _check_fits(pf, argidx)
    view = memoryview(data)
    fields = np.stack([argidx, argplus], axis=1).astype("<u8").tobytes()
    offs = pf.offsets.tolist()
    parts: list[bytes | memoryview]
    if not pf.short.any():
        cuts = [start, *(o + 48 for o in offs)]
        parts = [None] * (2 * len(offs) + 1)  # type: ignore[list-item]
        parts[0::2] = [view[a : b + 32] for a, b in zip(cuts, offs)] + [view[cuts[-1] : end]]
        parts[1::2] = [fields[16 * k : 16 * k + 16] for k in range(len(offs))]
    else:
        parts, pos = [], start
        for k, (off, short) in enumerate(zip(offs, pf.short.tolist())):
            new = fields[16 * k : 16 * k + 16]
            if short:
                parts += [view[pos : off + 12], new[:1], view[off + 13 : off + 16], new[8:]]
                pos = off + 24
            else:
                parts += [view[pos : off + 32], new]
                pos = off + 48
        parts.append(view[pos:end])
    return parts


def _write(
    txn: Transaction,
    data: bytes,
    framing: Framing,
    pf: PatchFields,
    argidx: np.ndarray,
    argplus: np.ndarray,
) -> Transaction:
    parts = patched_parts(data, pf, argidx, argplus, 0, len(data))
    out = Framing(framing.index, pf.with_values(argidx, argplus))
    return Transaction._from_parts(txn._header, b"".join(parts), out)


def rebase(txn: Transaction, mapping: Sequence[ArgRange]) -> Transaction:
    """Re-base every DDR_PATCH through ``mapping``; returns a new Transaction.

    For a patch ``(a, p)``: among ranges with ``local_argidx == a``, the one with the greatest
    ``offset <= p`` must also satisfy ``p < offset + size``; the patch becomes
    ``(fused_argidx, fused_offset + p - offset)``. A patch no range covers raises
    :class:`TxnFormatError` naming op index, byte offset, argidx and argplus.
    """
    data, framing, pf = patch_fields_of(txn)
    new_idx, new_plus = mapped_fields(pf, mapping)
    return _write(txn, data, framing, pf, new_idx, new_plus)


def mapped_fields(pf: PatchFields, mapping: Sequence[ArgRange]) -> tuple[np.ndarray, np.ndarray]:
    """New (argidx, argplus) of every patch in ``pf`` under ``mapping`` (rules of :func:`rebase`)."""
    by_arg: dict[int, list[ArgRange]] = {}
    for r in mapping:
        if min(r.size, r.offset, r.fused_offset, r.local_argidx, r.fused_argidx) < 0:
            raise ValueError(f"ArgRange with a negative field: {r}")
        if r.fused_offset + r.size > _U64 or r.offset + r.size > _U64:
            raise ValueError(f"ArgRange does not fit 64-bit offsets: {r}")
        by_arg.setdefault(r.local_argidx, []).append(r)
    n = len(pf.op_index)
    new_idx = np.zeros(n, dtype=np.uint64)
    new_plus = np.zeros(n, dtype=np.uint64)
    done = np.zeros(n, dtype=bool)
    for a in np.unique(pf.argidx).tolist():
        ranges = by_arg.get(a)
        if not ranges:
            continue
        sel = np.flatnonzero(pf.argidx == np.uint64(a))
        ranges = sorted(ranges, key=lambda r: r.offset)
        table = np.array(
            [(r.offset, r.offset + r.size, r.fused_argidx, r.fused_offset) for r in ranges],
            dtype=np.uint64,
        )
        p = pf.argplus[sel]
        k = np.searchsorted(table[:, 0], p, side="right") - 1
        ok = k >= 0
        ok[ok] &= p[ok] < table[k[ok], 1]
        sel, p, row = sel[ok], p[ok], table[k[ok]]
        new_idx[sel] = row[:, 2]
        new_plus[sel] = row[:, 3] + (p - row[:, 0])
        done[sel] = True
    if not done.all():
        j = int(np.flatnonzero(~done)[0])
        raise TxnFormatError(
            f"op {int(pf.op_index[j])} DDR_PATCH at byte offset {int(pf.offsets[j])}: "
            f"argidx {int(pf.argidx[j])} + argplus {int(pf.argplus[j]):#x} lies in no ArgRange "
            "of the mapping; add a range covering it (the op's buffer map is incomplete)"
        )
    return new_idx, new_plus


def rebase_tiling(txn: Transaction, offsets: Mapping[int, int]) -> Transaction:
    """DD's tiling overload: ``argplus += offsets[argidx]`` for the argidx values given."""
    data, framing, pf = patch_fields_of(txn)
    plus = pf.argplus.copy()
    for a, delta in offsets.items():
        plus[pf.argidx == np.uint64(a)] += np.uint64(delta)
    return _write(txn, data, framing, pf, pf.argidx.copy(), plus)


def patches(txn: Transaction) -> list[tuple[int, int, int, int]]:
    """``(op_index, byte_offset, argidx, argplus)`` of every DDR_PATCH, without decoding ops."""
    _, _, pf = patch_fields_of(txn)
    return list(
        zip(
            pf.op_index.tolist(),
            pf.offsets.tolist(),
            pf.argidx.tolist(),
            pf.argplus.tolist(),
        )
    )
