"""Fusion, instruction-buffer wrapping and format conversion (docs/txn_format.md §3, §6, §7)."""

from __future__ import annotations

import itertools
import struct
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from npudispatch.errors import TxnFormatError
from npudispatch.txn.codec import PATCH_SIZE_PLAIN, PATCH_SIZES_OPT, encode_op
from npudispatch.txn.framing import OpIndex
from npudispatch.txn.header import HEADER_SIZE, OPT_VERSION, PLAIN_VERSION, TxnHeader
from npudispatch.txn.rebase import ArgRange, mapped_fields, patch_fields_of
from npudispatch.txn.transaction import Framing, Transaction

_BATCH_BYTES = 2 << 20  # copied then patched while in cache
TRANSACTION_OP = 0  # aie_controller op-list type of a wrapped transaction (docs/txn_format.md §7)
WRAP_HEADER_SIZE = 8


def _check_fusable(txns: Sequence[Transaction]) -> None:
    if not txns:
        raise TxnFormatError("fuse() needs at least one transaction")
    first = txns[0]._header
    for i, t in enumerate(txns[1:], start=1):
        h = t._header
        if h.is_opt != first.is_opt:
            raise TxnFormatError(
                f"cannot fuse transaction {i} ({'opt' if h.is_opt else 'plain'}) with transaction "
                f"0 ({'opt' if first.is_opt else 'plain'}): convert them to one format first"
            )
        if (h.dev_gen, h.num_rows) != (first.dev_gen, first.num_rows):
            raise TxnFormatError(
                f"cannot fuse transaction {i} (DevGen {h.dev_gen}, NumRows {h.num_rows}) with "
                f"transaction 0 (DevGen {first.dev_gen}, NumRows {first.num_rows}): they target "
                "different devices"
            )


def _fused_header(txns: Sequence[Transaction], bodies: list[tuple[list, OpIndex]]) -> TxnHeader:
    """First header with NumOps/TxnSize summed over ``bodies`` and NumCols the maximum."""
    return replace(
        txns[0]._header,
        num_cols=max(t._header.num_cols for t in txns),
        num_ops=sum(len(index) for _, index in bodies),
        txn_size=HEADER_SIZE + sum(index.end - HEADER_SIZE for _, index in bodies),
    )


def _wrap_fused(
    header: TxnHeader, data: bytes | memoryview, bodies: list[tuple[list, OpIndex]]
) -> Transaction:
    """The fused Transaction; its OpIndex is the shifted concatenation, built only on demand."""
    shifts, pos = [], 0
    for _, index in bodies:
        shifts.append((index, pos))
        pos += index.end - HEADER_SIZE

    def make_index() -> OpIndex:
        return OpIndex.concat([index.shifted(delta) for index, delta in shifts])

    return Transaction._from_parts(header, data, Framing(None, make=make_index, end=len(data)))


def _assemble(
    txns: Sequence[Transaction], bodies: list[tuple[list[bytes | memoryview], OpIndex]]
) -> Transaction:
    """One header + every body (given as parts to join), NumOps/TxnSize summed, NumCols max."""
    header = _fused_header(txns, bodies)
    data = b"".join([header.pack(), *(p for body, _ in bodies for p in body)])  # one copy
    return _wrap_fused(header, data, bodies)


def fuse(txns: Sequence[Transaction]) -> Transaction:
    """Concatenate transactions like DD's ``fuse_txns``: first header, then every op stream.

    NumOps and TxnSize are the sums; NumCols is the maximum. Refuses mixed formats and mismatched
    DevGen or NumRows. Trailing pad bytes of the inputs are dropped (they would otherwise land
    between ops); the corpus has none.
    """
    _check_fusable(txns)
    bodies = []
    for t in txns:
        data, index = t.framed()
        bodies.append(([memoryview(data)[HEADER_SIZE : index.end]], index))
    return _assemble(txns, bodies)


def fuse_rebased(items: Sequence[tuple[Transaction, Sequence[ArgRange]]]) -> Transaction:
    """``fuse([rebase(t, m) for t, m in items])``, vectorized over every transaction at once.

    The emitter's and big programs' path: op bodies are copied once into the fused image, every
    DDR_PATCH of every item finds its :class:`ArgRange` with one ``searchsorted`` (rules of
    :func:`~npudispatch.txn.rebase.rebase`), and the new fields are scattered with numpy — no
    per-op or per-patch Python work, so a program of thousands of op transactions fuses at a small
    multiple of memcpy speed.
    """
    txns = [t for t, _ in items]
    _check_fusable(txns)
    framed = [t.framed() for t in txns]
    pfs = [patch_fields_of(t)[2] for t in txns]
    lengths = [index.end - HEADER_SIZE for _, index in framed]
    starts = np.cumsum([HEADER_SIZE, *lengths])
    out = np.empty(int(starts[-1]), dtype=np.uint8)
    stores = _PairStores.none(out)
    counts = [len(pf.offsets) for pf in pfs]
    if sum(counts):
        item = np.repeat(np.arange(len(items)), counts)
        argidx = np.concatenate([pf.argidx for pf in pfs])
        argplus = np.concatenate([pf.argplus for pf in pfs])
        new_idx, new_plus = _lookup(items, pfs, item, argidx, argplus)
        where = np.concatenate([pf.offsets for pf in pfs]) + (starts[:-1] - HEADER_SIZE)[item]
        short = np.concatenate([pf.short for pf in pfs])
        if (short & (new_idx > 0xFF)).any():
            k = int(np.flatnonzero(short & (new_idx > 0xFF))[0])
            raise TxnFormatError(
                f"transaction {int(item[k])}: DDR_PATCH at fused byte offset {int(where[k])}: "
                f"new argidx {int(new_idx[k])} does not fit the u8 field of an opt Size-24 patch"
            )
        wide = ~short if short.any() else slice(None)
        # argidx u64 at +32, then argplus u64 at +40
        stores = _PairStores(out, where[wide] + 32, new_idx[wide], new_plus[wide], item[wide])

    bodies_in = [
        np.frombuffer(data, np.uint8, n, HEADER_SIZE) for (data, _), n in zip(framed, lengths)
    ]
    # Every op byte is copied once, a few MB at a time, and patched while still in cache.
    at = starts.tolist()
    first_store = stores.first_of_items(len(items))
    i = 0
    while i < len(items):
        j = min(max(bisect_right(at, at[i] + _BATCH_BYTES) - 1, i + 1), len(items))
        np.concatenate(bodies_in[i:j], out=out[at[i] : at[j]])
        stores.apply(first_store[i], first_store[j])
        i = j
    if sum(counts) and short.any():  # opt Size-24: argidx u8 at +12, argplus u64 at +16
        out[where[short] + 12] = new_idx[short].astype(np.uint8)
        _put_u64(out, where[short] + 16, new_plus[short])

    bodies = [([], index) for _, index in framed]  # bytes already placed; _assemble adds the header
    header = _fused_header(txns, bodies)
    out[:HEADER_SIZE] = np.frombuffer(header.pack(), np.uint8)
    return _wrap_fused(header, memoryview(out).toreadonly(), bodies)  # no second copy


def _put_u64(out: np.ndarray, pos: np.ndarray, values: np.ndarray) -> None:
    """Write little-endian u64 ``values`` at byte positions ``pos`` of the uint8 array ``out``,
    through the widest word view every position is aligned to (one store per word, not per
    byte: DDR_PATCH fields sit at word boundaries in practice)."""
    words = np.asarray(values, dtype="<u8")
    for width in (8, 4):
        if out.ctypes.data % width == 0 and not (pos % width).any():
            view = out[: len(out) // width * width].view(f"<u{width}")
            parts = words.view(f"<u{width}").reshape(len(words), 8 // width)
            for k in range(8 // width):
                view[pos // width + k] = parts[:, k]
            return
    out[pos[:, None] + np.arange(8)] = words.view(np.uint8).reshape(len(words), 8)


class _PairStores:
    """Little-endian u64 pairs (``first`` at byte ``pos``, ``second`` at ``pos + 8``) to write
    into ``out`` through the widest word view every position is aligned to; ``apply`` writes a
    range of them, so fusion patches each batch of transactions right after copying it."""

    def __init__(
        self,
        out: np.ndarray,
        pos: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        item: np.ndarray,
    ) -> None:
        pairs = np.empty((len(pos), 2), dtype="<u8")
        pairs[:, 0] = first
        pairs[:, 1] = second
        width = next((w for w in (8, 4) if out.ctypes.data % w == 0 and not (pos % w).any()), 1)
        self.view = out[: len(out) // width * width].view(f"<u{width}")
        self.at = pos // width
        self.units = pairs.view(f"<u{width}").reshape(len(pos), 16 // width)
        self.item = item  # sorted: the transaction each pair belongs to

    @classmethod
    def none(cls, out: np.ndarray) -> _PairStores:
        empty = np.zeros(0, dtype=np.int64)
        return cls(out, empty, empty, empty, empty)

    def first_of_items(self, count: int) -> list[int]:
        """Index of the first pair of each of ``count`` transactions, then the total."""
        return np.searchsorted(self.item, np.arange(count + 1)).tolist()

    def apply(self, start: int, stop: int) -> None:
        """Write pairs ``start:stop``."""
        if stop > start:
            at = self.at[start:stop]
            for k in range(self.units.shape[1]):
                self.view[at + k] = self.units[start:stop, k]


def _lookup(
    items: Sequence[tuple[Transaction, Sequence[ArgRange]]],
    pfs: list,
    item: np.ndarray,
    argidx: np.ndarray,
    argplus: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """New (argidx, argplus) of every patch: one sorted table of all items' ranges."""
    rows = [
        (j, r.local_argidx, r.offset, r.offset + r.size, r.fused_argidx, r.fused_offset)
        for j, (_, mapping) in enumerate(items)
        for r in mapping
    ]
    try:
        flat = itertools.chain.from_iterable(rows)
        signed = np.fromiter(flat, np.int64, count=6 * len(rows)).reshape(-1, 6)
    except OverflowError:  # offsets of 2**63 and more: no negative field, only the slow path fits
        signed = None
        table = np.array(rows, dtype=np.uint64).reshape(-1, 6)
    if signed is not None:
        negative = (signed < 0).any(axis=1) | (
            signed[:, 3] < signed[:, 2]
        )  # end < offset: size < 0
        if negative.any():
            bad = [r for _, m in items for r in m][int(np.flatnonzero(negative)[0])]
            raise ValueError(f"ArgRange with a negative field: {bad}")
        table = signed.view(np.uint64)
    # One sort key per range and per patch: (item, argidx) above 40 bits of offset. Keys that do
    # not fit (huge offsets or argidx) fall back to the per-transaction lookup.
    fits = (
        len(items) < 1 << 14
        and (table.size == 0 or (table[:, 1].max() < 256 and table[:, 3].max() < 1 << 40))
        and argidx.max() < 256
        and argplus.max() < 1 << 40
    )
    if not fits:
        parts = [mapped_fields(pf, m) for pf, (_, m) in zip(pfs, items)]
        return np.concatenate([a for a, _ in parts]), np.concatenate([p for _, p in parts])
    table = table[np.lexsort((table[:, 2], table[:, 1], table[:, 0]))]
    shift = np.uint64(40)
    row_group = table[:, 0] << np.uint64(8) | table[:, 1]
    keys = (row_group << shift) | table[:, 2]
    group = item.astype(np.uint64) << np.uint64(8) | argidx
    k = np.searchsorted(keys, (group << shift) | argplus, side="right") - 1
    ok = k >= 0
    k = np.maximum(k, 0)  # one column gather each, not whole rows
    ok &= row_group.take(k) == group
    ok &= argplus < table[:, 3].take(k)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        j = int(item[bad])
        first = bad - int(np.searchsorted(item, j))
        pf = pfs[j]
        raise TxnFormatError(
            f"transaction {j}: op {int(pf.op_index[first])} DDR_PATCH at byte offset "
            f"{int(pf.offsets[first])}: argidx {int(argidx[bad])} + argplus "
            f"{int(argplus[bad]):#x} lies in no ArgRange of the mapping; add a range covering it "
            "(the op's buffer map is incomplete)"
        )
    # fused_offset - offset wraps modulo 2**64 when negative; adding argplus wraps it back
    return table[:, 4].take(k), (table[:, 5] - table[:, 2]).take(k) + argplus


def wrap(txn: Transaction) -> bytes:
    """The instruction-buffer image ``{u32 0, u32 TxnSize + 8}`` + transaction (docs/txn_format.md §7)."""
    data = txn.buffer
    return struct.pack("<II", TRANSACTION_OP, len(data) + WRAP_HEADER_SIZE) + data


def unwrap(buf: bytes) -> Transaction:
    """Inverse of :func:`wrap`: check the 8-byte frame and parse the transaction inside."""
    if len(buf) < WRAP_HEADER_SIZE:
        raise TxnFormatError(f"instruction buffer truncated: {len(buf)} bytes, frame needs 8")
    kind, size = struct.unpack_from("<II", buf)
    if kind != TRANSACTION_OP or size != len(buf):
        raise TxnFormatError(
            f"instruction buffer frame at byte offset 0 is (type {kind}, size {size}); expected "
            f"(0, {len(buf)})"
        )
    return Transaction.from_bytes(buf[WRAP_HEADER_SIZE:])


def to_opt(txn: Transaction, patch_size: int = PATCH_SIZE_PLAIN) -> Transaction:
    """Convert to the optimised 1.0 format, op by op (DD ``convert_to_opt_txn``).

    ``patch_size`` picks the DDR_PATCH layout: 48 (plain ``patch_op_t``) or 24 (``patch_op_opt_t``).
    """
    if patch_size not in PATCH_SIZES_OPT:
        raise ValueError(f"opt DDR_PATCH size must be 48 or 24, got {patch_size}")
    return _convert(txn, True, patch_size)


def to_plain(txn: Transaction) -> Transaction:
    """Convert to the plain 0.1 format (new padding is zero)."""
    return _convert(txn, False, None)


def _convert(txn: Transaction, opt: bool, patch_size: int | None) -> Transaction:
    version = OPT_VERSION if opt else PLAIN_VERSION
    body = b"".join(
        encode_op(op, opt, patch_size=patch_size, use_raw=False, index=i)
        for i, op in enumerate(txn.iter_ops())
    )
    header = replace(
        txn._header,
        major=version[0],
        minor=version[1],
        num_ops=txn.num_ops,
        txn_size=HEADER_SIZE + len(body),
    )
    return Transaction.from_bytes(header.pack() + body)
