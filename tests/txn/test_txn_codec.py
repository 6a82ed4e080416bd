"""Builder -> bytes -> parse round trips (hypothesis) and hand-made malformed inputs."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from txn_strategies import op_strategy

from npudispatch.errors import TxnFormatError
from npudispatch.txn import (
    INDEX_CACHE,
    CustomOp,
    Transaction,
    TxnBuilder,
    TxnHeader,
    to_opt,
    to_plain,
)
from npudispatch.txn import ops as o
from npudispatch.txn.framing import scan, scan_scalar


def _build(ops: list[o.Op], **kw) -> Transaction:
    b = TxnBuilder(**kw)
    for op in ops:
        b.append(op)
    return b.build()


@settings(max_examples=150, deadline=None)
@given(st.lists(op_strategy(), max_size=30), st.integers(1, 8))
def test_builder_parse_round_trip(ops, cols):
    txn = _build(ops, num_cols=cols)
    data = txn.to_bytes()
    assert len(data) == txn.nbytes == struct.unpack_from("<I", data, 12)[0]
    back = Transaction.from_bytes(data)
    assert back.num_ops == len(back) == len(ops)
    assert back.header == txn.header
    assert back.header.num_cols == cols
    assert back.ops == ops
    assert [type(x) for x in back.ops] == [type(x) for x in ops]
    # Parsed ops carry raw bytes; re-serializing them is byte-exact.
    assert back.to_bytes() == data
    # The vectorised framing agrees with the reference scalar framing.
    fast, slow = scan(data, len(ops), False), scan_scalar(data, len(ops), False)
    assert np.array_equal(fast.offsets, slow.offsets)
    assert np.array_equal(fast.sizes, slow.sizes)


@settings(max_examples=100, deadline=None)
@given(st.lists(op_strategy(opt_safe=True), max_size=25))
def test_opt48_round_trip(ops):
    txn = _build(ops)
    opt = to_opt(txn)
    data = opt.to_bytes()
    assert data[:2] == b"\x01\x00"
    back = Transaction.from_bytes(data)
    assert back.is_opt and back.ops == ops
    assert back.to_bytes() == data
    assert to_plain(back).to_bytes() == txn.to_bytes()


@settings(max_examples=100, deadline=None)
@given(st.lists(op_strategy(opt_safe=True, patch24=True), max_size=25))
def test_opt24_round_trip(ops):
    txn = _build(ops)
    opt = to_opt(txn, patch_size=24)
    back = Transaction.from_bytes(opt.to_bytes())
    assert back.ops == ops
    n_patch = sum(isinstance(x, o.DdrPatch) for x in ops)
    assert opt.nbytes == to_opt(txn, patch_size=48).nbytes - 24 * n_patch


def test_raw_padding_survives_edit():
    data = bytearray(_build([o.Write(0x1D214, 5), o.MaskPoll(0x1D22C, 0, 0x78003C)]).to_bytes())
    data[16 + 3 : 16 + 8] = b"GARBG"  # WRITE padding
    data[40 + 28 : 40 + 32] = b"\xde\xad\xbe\xef"  # MASKPOLL tail padding
    txn = Transaction.from_bytes(bytes(data))
    assert txn.to_bytes() == bytes(data)
    txn.ops[0].value = 7  # edit a semantic field: padding still carried over
    out = txn.to_bytes()
    assert out[16 + 3 : 16 + 8] == b"GARBG" and out[68:72] == b"\xde\xad\xbe\xef"
    assert Transaction.from_bytes(out).ops[0] == o.Write(0x1D214, 7)
    # A BLOCKWRITE whose length changes cannot reuse its raw bytes: zeros in padding.
    bw = o.BlockWrite(0x1D000, [1, 2], raw=b"\x01\xff\xff\xff\xff\xff\xff\xff" + bytes(20))
    out = _build([bw]).to_bytes()
    assert out[16:24] == b"\x01" + bytes(7)


def test_unknown_custom_ops_are_opaque():
    txn = _build([CustomOp(0x86, struct.pack("<I", 3)), CustomOp(0xC8, b"")])
    back = Transaction.from_bytes(txn.to_bytes())
    assert back.ops == [CustomOp(0x86, b"\x03\0\0\0"), CustomOp(0xC8, b"")]
    assert len(back.ops[0].raw) == 12


def test_builder_shapes():
    b = TxnBuilder()
    b.write(1, 2).block_write(0x1D000, [1, 2, 3]).mask_write(4, 5, 6).mask_poll(7, 8, 9)
    b.ddr_patch(0x1D004, 2, 0x40).record_timer(9)
    data = b.build().to_bytes()
    sizes = [24, 16 + 12, 32, 32, 48, 12]
    assert len(data) == 16 + sum(sizes)
    assert data[:8] == bytes([0, 1, 4, 6, 4, 1, 0, 0])
    assert struct.unpack_from("<II", data, 8) == (6, len(data))


# -- malformed inputs ------------------------------------------------------------------------
def _txn_bytes(*ops: o.Op) -> bytes:
    return _build(list(ops)).to_bytes()


def _set_u32(data: bytes, off: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<I", b, off, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\0\x01\x04", ["truncated", "header"]),
        (_set_u32(_txn_bytes(o.Write(0, 0)), 16 + 20, 25), ["op 0", "WRITE", "offset 16", "25"]),
        (_set_u32(_txn_bytes(o.Write(0, 0)), 16 + 20, 0), ["op 0", "WRITE", "Size"]),
        (
            _set_u32(_txn_bytes(o.Noop(), o.MaskPoll(0, 0, 0)), 20 + 24, 24),
            ["op 1", "MASKPOLL", "offset 20", "32"],
        ),
        (_set_u32(_txn_bytes(o.BlockWrite(0, [1])), 16 + 12, 18), ["BLOCKWRITE", "16 + 4*n"]),
        (_set_u32(_txn_bytes(o.BlockWrite(0, [1])), 16 + 12, 0), ["BLOCKWRITE", "Size"]),
        (_set_u32(_txn_bytes(o.DdrPatch(0, 0, 0)), 16 + 4, 24), ["DDR_PATCH", "48"]),
        (_set_u32(_txn_bytes(CustomOp(0x86, b"")), 16 + 4, 0), ["CUSTOM_0x86", ">= 8"]),
        (_set_u32(_txn_bytes(CustomOp(0x86, b"")), 16 + 4, 1 << 31), ["truncated", "op 0"]),
        (_set_u32(_txn_bytes(o.Noop()), 8, 2), ["NumOps", "2"]),
        (_set_u32(_txn_bytes(o.Noop()), 8, 0xFFFFFFFF), ["NumOps"]),
        (_set_u32(_txn_bytes(o.Noop(), o.Noop()), 8, 1), ["NumOps", "remain"]),
        (_set_u32(_txn_bytes(o.Noop()), 12, 100), ["TxnSize", "100"]),
        (b"\x02\x00" + _txn_bytes(o.Noop())[2:], ["version 2.0"]),
        (_txn_bytes(o.Noop())[:16] + b"\x02\0\0\0", ["op 0", "opcode 0x02", "unknown"]),
        (_txn_bytes(o.Noop())[:16] + b"\x40\0\0\0", ["unknown", "offset 16"]),
        (_txn_bytes(o.Write(0, 0))[:-4], ["TxnSize"]),
    ],
)
def test_malformed_inputs_raise_txn_format_error(data, words):
    if len(data) >= 16:  # keep TxnSize consistent unless the case is about it
        declared = struct.unpack_from("<I", data, 12)[0]
        if "TxnSize" not in words:
            assert declared == len(data)
    with pytest.raises(TxnFormatError) as info:
        Transaction.from_bytes(data)
    for word in words:
        assert word in str(info.value)


def test_opt_size_rules():
    opt = to_opt(_build([o.DdrPatch(0x1D004, 1, 8)]), patch_size=24).to_bytes()
    assert len(opt) == 16 + 24
    with pytest.raises(TxnFormatError, match="48 or 24"):
        Transaction.from_bytes(_set_u32(opt, 16 + 4, 32))
    bw = to_opt(_build([o.BlockWrite(0, [1, 2])])).to_bytes()
    assert struct.unpack_from("<I", bw, 16 + 8)[0] == 12 + 8
    with pytest.raises(TxnFormatError, match=r"12 \+ 4\*n"):
        Transaction.from_bytes(_set_u32(bw, 16 + 8, 16 + 6))


def test_opt_conversion_rejects_wide_registers():
    with pytest.raises(TxnFormatError, match="op 0 WRITE"):
        to_opt(_build([o.Write(1 << 40, 0)]))


def test_index_is_cached_by_content():
    data = _txn_bytes(o.Write(0x1D214, 1), o.DdrPatch(0x1D004, 0, 0))
    INDEX_CACHE.clear()
    a = Transaction.from_bytes(data)
    b = Transaction.from_bytes(bytes(bytearray(data)))  # equal content, other object
    assert a.framed()[1] is b.framed()[1]


def test_header_parse_fields():
    h = TxnHeader.parse(_build([], num_cols=8, dev_gen=3).to_bytes())
    assert (h.major, h.minor, h.dev_gen, h.num_rows, h.num_cols, h.num_mem_tile_rows) == (
        0,
        1,
        3,
        6,
        8,
        1,
    )
    assert (h.num_ops, h.txn_size, h.pad) == (0, 16, 0)
