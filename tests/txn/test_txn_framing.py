"""Framing (txn/framing.py): the fast paths frame exactly like the op-by-op reference, on the AMD
corpus and on transactions built to mislead them (op look-alikes inside BLOCKWRITE payloads, ops
without Size fields); malformed bytes raise the reference's precise error, op and byte offset."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from corpus_util import CORPUS_DIR, corpus_files
from hypothesis import given, settings
from hypothesis import strategies as st
from txn_strategies import op_strategy

from npudispatch.errors import TxnFormatError
from npudispatch.txn import CustomOp, Transaction, TxnBuilder, TxnHeader, to_opt
from npudispatch.txn import ops as o
from npudispatch.txn.framing import OpIndex, _scan_runs, _scan_steps, scan, scan_scalar

CORPUS = corpus_files()
SMALL_FOR_OPT = 64 << 10  # opt conversion decodes every op: only for the smaller corpus files


def _same(index: OpIndex, reference: OpIndex) -> None:
    assert index.offsets.dtype == np.int64 and index.sizes.dtype == np.int64
    assert index.opcodes.dtype == np.uint8
    assert np.array_equal(index.offsets, reference.offsets)
    assert np.array_equal(index.opcodes, reference.opcodes)
    assert np.array_equal(index.sizes, reference.sizes)
    assert index.end == reference.end
    assert np.array_equal(index.patch_ops, reference.patch_ops)


def _framings(data: bytes) -> tuple[OpIndex, OpIndex]:
    h = TxnHeader.parse(data)
    return scan(data, h.num_ops, h.is_opt), scan_scalar(data, h.num_ops, h.is_opt)


def _outcome(fn, data: bytes, num_ops: int, opt: bool) -> OpIndex | str:
    try:
        return fn(data, num_ops, opt)
    except TxnFormatError as exc:
        return f"TxnFormatError: {exc}"


def _bytes(ops: list[o.Op]) -> bytes:
    b = TxnBuilder()
    for op in ops:
        b.append(op)
    return b.build().to_bytes()


def _body_words(ops: list[o.Op]) -> np.ndarray:
    """The op stream of ``ops`` as u32 words: a BLOCKWRITE payload full of exact look-alikes."""
    return np.frombuffer(_bytes(ops)[16:], dtype="<u4").copy()


# -- the AMD corpus ------------------------------------------------------------------------------
@pytest.mark.corpus
@pytest.mark.parametrize(
    "path", CORPUS or [None], ids=[str(p.relative_to(CORPUS_DIR)) for p in CORPUS] or ["absent"]
)
def test_corpus_framing_matches_the_reference_walk(corpus_dir, path: Path | None):
    data = path.read_bytes()
    h = TxnHeader.parse(data)
    reference = scan_scalar(data, h.num_ops, h.is_opt)
    # The reference boundaries are a chain: first op after the header, each op where the previous
    # ends, the last ending at TxnSize, one per NumOps.
    assert len(reference) == h.num_ops and reference.offsets[0] == 16
    assert np.array_equal(reference.offsets[1:], reference.offsets[:-1] + reference.sizes[:-1])
    assert reference.end == len(data)
    runs = _scan_runs(data, h.num_ops, 16)
    assert runs is not None, "the plain fast path must frame every corpus transaction itself"
    _same(runs, reference)
    _same(scan(data, h.num_ops, h.is_opt), reference)
    steps = _scan_steps(data, h.num_ops, False, 16)
    assert steps is not None
    _same(steps, reference)
    if len(data) <= SMALL_FOR_OPT:
        opt = to_opt(Transaction.from_bytes(data)).to_bytes()
        h = TxnHeader.parse(opt)
        opt_steps = _scan_steps(opt, h.num_ops, True, 16)
        assert opt_steps is not None
        _same(opt_steps, scan_scalar(opt, h.num_ops, True))


# -- built to mislead the candidate search ---------------------------------------------------------
DECOYS = [
    o.Write(0x1D214, 24),
    o.MaskPoll(0x1D22C, 0, 0x78003C),
    o.DdrPatch(0x1D004, 1, 0x40),
    o.Tct(1, 2),
    o.RecordTimer(9),
    o.MergeSync(3, 4),
    o.BlockWrite(0x1D000, [16, 24, 32, 48]),
]


WITHOUT_SIZE_FIELD = [
    o.Noop(),
    o.Preempt(2),
    o.LoadPdi(1, 2, 3),
    o.LoadPmStart(5, 6),
    CustomOp(0x90, struct.pack("<II", 24, 32)),
    o.ReadRegs((1, 2)),
    o.UpdateReg(1, 2, 3, 4),
    o.CreateScratchpad(1, 2, 3),
    o.UpdateStateTable(1, 2, 3),
    o.UpdateScratch(),
]


def test_look_alikes_in_payloads_and_ops_without_size_fields():
    decoy = _body_words(DECOYS)
    ops: list[o.Op] = []
    for k in range(40):
        ops += [o.Write(0x1D214 + k, k), o.BlockWrite(0x1D000, decoy), o.MaskPoll(k, 0, 1)]
        ops += [o.BlockWrite(0x1D100, decoy[k % 7 :])]  # look-alikes at every alignment
        ops += [WITHOUT_SIZE_FIELD[k % len(WITHOUT_SIZE_FIELD)]]  # framed alone, between runs
        ops += [o.DdrPatch(0x1D004, 0, 8 * k), o.RecordTimer(k), o.Write(k, 0), o.Write(k, 1)]
    data = _bytes(ops)
    h = TxnHeader.parse(data)
    reference = scan_scalar(data, h.num_ops, False)
    runs = _scan_runs(data, h.num_ops, 16)
    assert runs is not None
    _same(runs, reference)
    assert Transaction.from_bytes(data).to_bytes() == data


def test_mostly_ops_without_size_fields_take_the_step_walk():
    ops = [o.Write(1, 2)] + WITHOUT_SIZE_FIELD * 30 + [o.Write(3, 4)]
    data = _bytes(ops)
    assert _scan_runs(data, len(ops), 16) is None  # framing 300 ops alone would be slow
    fast, reference = _framings(data)
    _same(fast, reference)


def test_look_alike_that_tiles_into_the_true_chain():
    # The payload ends with a WRITE look-alike whose 24 bytes end exactly where the next true op
    # starts: its run joins the true chain, yet it must not be taken as an op.
    ops = [o.Write(1, 2), o.BlockWrite(0x1D000, _body_words([o.Write(7, 24)])), o.Write(3, 4)]
    data = _bytes(ops)
    index = _scan_runs(data, 3, 16)
    assert index is not None
    _same(index, scan_scalar(data, 3, False))
    assert index.offsets.tolist() == [16, 40, 40 + 16 + 24]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(op_strategy(), st.sampled_from(DECOYS)).map(lambda op: [op])
        | st.lists(st.sampled_from(DECOYS), min_size=1, max_size=4).map(
            lambda inner: [o.BlockWrite(0x1D000, _body_words(inner))]
        ),
        max_size=25,
    ).map(lambda groups: [op for group in groups for op in group]),
    st.lists(
        st.tuples(
            st.integers(0, 1 << 16),
            st.sampled_from([0, 1, 3, 4, 12, 16, 24, 32, 48, 0x81, 0x40, 0xFFFFFFFF]),
        ),
        max_size=3,
    ),
)
def test_fast_framing_equals_reference_on_any_bytes(ops, overwrites):
    """Valid or not: scan gives what scan_scalar gives, the same index or the same error."""
    data = bytearray(_bytes(ops))
    for at, value in overwrites:  # corrupt whole words of the op stream (header kept)
        if len(data) > 16:
            struct.pack_into("<I", data, 16 + 4 * (at % ((len(data) - 16) // 4)), value)
    data = bytes(data)
    for opt, blob in ((False, data), (True, None)):
        if opt:
            try:
                blob = to_opt(Transaction.from_bytes(data)).to_bytes()
            except TxnFormatError:
                continue
        h = TxnHeader.parse(blob)
        fast = _outcome(scan, blob, h.num_ops, opt)
        reference = _outcome(scan_scalar, blob, h.num_ops, opt)
        if isinstance(reference, str):
            assert fast == reference
        else:
            _same(fast, reference)


# -- malformed input: the precise error, op index and byte offset ----------------------------------
def _long_transaction() -> tuple[bytes, OpIndex]:
    decoy = _body_words(DECOYS)
    ops: list[o.Op] = []
    for k in range(100):
        ops += [
            o.Write(k, k),
            o.BlockWrite(0x1D000, decoy),
            o.MaskPoll(k, 0, 1),
            o.DdrPatch(k, 0, k),
        ]
    data = _bytes(ops)
    return data, scan_scalar(data, len(ops), False)


def _put(data: bytes, off: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<I", out, off, value)
    return bytes(out)


def _expect_error(data: bytes, *words: str) -> str:
    h = TxnHeader.parse(data)
    with pytest.raises(TxnFormatError) as fast:
        Transaction.from_bytes(data)
    with pytest.raises(TxnFormatError) as reference:
        scan_scalar(data, h.num_ops, h.is_opt)
    assert str(fast.value) == str(reference.value)
    for word in words:
        assert word in str(fast.value)
    return str(fast.value)


def test_malformed_deep_inside_a_long_transaction():
    data, index = _long_transaction()
    off = index.offsets.tolist()
    # a WRITE's Size field (op 200) and a MASKPOLL's (op 302)
    _expect_error(_put(data, off[200] + 20, 25), "op 200 WRITE", f"byte offset {off[200]}", "25")
    _expect_error(_put(data, off[302] + 24, 24), "op 302 MASKPOLL", f"byte offset {off[302]}")
    # a DDR_PATCH's Size field, a garbled opcode, a BLOCKWRITE Size that is not 16 + 4*n
    _expect_error(_put(data, off[123] + 4, 40), "op 123 DDR_PATCH", f"byte offset {off[123]}")
    _expect_error(_put(data, off[260], 0x40), "op 260", "unknown", f"byte offset {off[260]}")
    _expect_error(_put(data, off[161] + 12, 18), "op 161 BLOCKWRITE", "16 + 4*n")
    # a BLOCKWRITE Size that is valid but wrong misframes what follows: still the reference's error
    _expect_error(_put(data, off[101] + 12, index.sizes[101] + 4), "op 102")
    # a BLOCKWRITE Size past the end of the buffer
    _expect_error(_put(data, off[397] + 12, 1 << 20), "op 397 BLOCKWRITE", "truncated")


def test_malformed_counts_and_truncation_of_a_long_transaction():
    data, index = _long_transaction()
    n = len(index)
    _expect_error(_put(data, 8, n + 1), "NumOps", str(n + 1), "overruns")
    _expect_error(_put(data, 8, n - 1), "remain after the last op", f"op {n - 2}")
    cut = data[: len(data) - 8]
    _expect_error(_put(cut, 12, len(cut)), f"op {n - 1} DDR_PATCH", "truncated")
    padded = data + b"\0" * 8
    _expect_error(_put(padded, 12, len(padded)), "8 bytes remain")
    # < 4 trailing pad bytes are legitimate (aie-rt rounds TxnSize up to a multiple of 4)
    padded = data + b"\0" * 3
    fast, reference = _framings(_put(padded, 12, len(padded)))
    _same(fast, reference)
    assert fast.end == len(data)
