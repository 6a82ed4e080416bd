"""Fusion, instruction-buffer wrapping and format conversion (TXN_FORMAT.md §5, §7.1, §8.4)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import replace

from npudispatch.errors import TxnFormatError
from npudispatch.txn.codec import PATCH_SIZE_PLAIN, PATCH_SIZES_OPT, OpIndex, encode_op
from npudispatch.txn.header import HEADER_SIZE, OPT_VERSION, PLAIN_VERSION
from npudispatch.txn.rebase import ArgRange, mapped_fields, patch_fields_of, patched_parts
from npudispatch.txn.transaction import Framing, Transaction

TRANSACTION_OP = 0  # aie_controller op-list type of a wrapped transaction (§7.1)
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


def _assemble(
    txns: Sequence[Transaction], bodies: list[tuple[list[bytes | memoryview], OpIndex]]
) -> Transaction:
    """One header + every body (given as parts to join), NumOps/TxnSize summed, NumCols max."""
    parts: list[bytes | memoryview] = [b""]  # slot for the header, filled below
    shifts: list[tuple[OpIndex, int]] = []
    pos = HEADER_SIZE
    for body, index in bodies:
        parts += body
        shifts.append((index, pos - HEADER_SIZE))
        pos += index.end - HEADER_SIZE
    header = replace(
        txns[0]._header,
        num_cols=max(t._header.num_cols for t in txns),
        num_ops=sum(len(index) for _, index in bodies),
        txn_size=pos,
    )
    parts[0] = header.pack()
    data = b"".join(parts)  # a single copy of every op stream

    def make_index() -> OpIndex:
        return OpIndex.concat([index.shifted(delta) for index, delta in shifts])

    return Transaction._from_parts(header, data, Framing(None, make=make_index, end=pos))


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
    """``fuse([rebase(t, m) for t, m in items])`` with every byte copied exactly once.

    The emitter's path: each op transaction is re-based through its argument map (rules of
    :func:`~npudispatch.txn.rebase.rebase`) while the fused image is assembled, instead of
    materializing every re-based transaction first and copying it again.
    """
    txns = [t for t, _ in items]
    _check_fusable(txns)
    bodies = []
    for t, mapping in items:
        data, index = t.framed()
        _, _, pf = patch_fields_of(t)
        argidx, argplus = mapped_fields(pf, mapping)
        bodies.append((patched_parts(data, pf, argidx, argplus, HEADER_SIZE, index.end), index))
    return _assemble(txns, bodies)


def wrap(txn: Transaction) -> bytes:
    """The instruction-buffer image ``{u32 0, u32 TxnSize + 8}`` + transaction (§7.1)."""
    data = txn.to_bytes()
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
