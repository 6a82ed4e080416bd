"""Re-basing, fusion, wrapping and explain on built transactions (no corpus needed)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from npudispatch.errors import TxnFormatError
from npudispatch.txn import (
    ArgRange,
    Transaction,
    TxnBuilder,
    explain,
    fuse,
    fuse_rebased,
    patches,
    rebase,
    rebase_tiling,
    to_opt,
    unwrap,
    wrap,
)
from npudispatch.txn import ops as o
from npudispatch.txn.registers import Direction, shim_bd_addr
from npudispatch.txn.shim import ShimBd


def _patched(*pairs: tuple[int, int], cols: int = 4) -> Transaction:
    b = TxnBuilder(num_cols=cols)
    for k, (argidx, argplus) in enumerate(pairs):
        b.shim_bd(0, k % 16, ShimBd(length_words=4), argidx=argidx, argplus=argplus)
    return b.build()


MAP = [
    ArgRange(0, 0x100, 0x100, 2, 0x1000),
    ArgRange(0, 0, 0x100, 1, 0),
    ArgRange(1, 0, 0x40, 3, 0x8000),
    ArgRange(1, 0x40, 0, 4, 0),  # empty range: matches nothing
]


def test_rebase_maps_each_patch():
    txn = _patched((0, 0), (0, 0xFC), (0, 0x100), (0, 0x1FC), (1, 0x3C))
    out = rebase(txn, MAP)
    assert [p[2:] for p in patches(out)] == [
        (1, 0),
        (1, 0xFC),
        (2, 0x1000),
        (2, 0x10FC),
        (3, 0x803C),
    ]
    assert [p[2:] for p in patches(txn)][1] == (0, 0xFC)  # input unchanged
    # Nothing but argidx/argplus changed.
    a, b = txn.to_bytes(), out.to_bytes()
    diff = {i for i in range(len(a)) if a[i] != b[i]}
    allowed = {off + k for _, off, _, _ in patches(txn) for k in range(32, 48)}
    assert diff and diff <= allowed


@pytest.mark.parametrize(("argidx", "argplus"), [(0, 0x200), (1, 0x40), (2, 0), (1, 0x44)])
def test_rebase_uncovered_patch_is_an_error(argidx, argplus):
    txn = _patched((0, 0), (argidx, argplus))
    with pytest.raises(TxnFormatError) as info:
        rebase(txn, MAP)
    msg = str(info.value)
    assert "op 3 DDR_PATCH" in msg and f"argidx {argidx}" in msg and f"{argplus:#x}" in msg
    assert f"byte offset {patches(txn)[1][1]}" in msg


def test_rebase_opt_variants():
    txn = _patched((0, 0x10), (1, 0x20))
    mapping = [ArgRange(0, 0, 0x100, 2, 0x500), ArgRange(1, 0, 0x100, 300, 0)]
    for size in (48, 24):
        opt = to_opt(txn, patch_size=size)
        if size == 24:
            with pytest.raises(TxnFormatError, match="does not fit the u8"):
                rebase(opt, mapping)
            mapping[1] = ArgRange(1, 0, 0x100, 4, 0)
        got = Transaction.from_bytes(rebase(opt, mapping).to_bytes())
        want = [(2, 0x510), (300 if size == 48 else 4, 0x20)]
        assert [(p.argidx, p.argplus) for p in got.ops if isinstance(p, o.DdrPatch)] == want


def test_rebase_tiling_adds_offsets():
    txn = _patched((0, 0x10), (1, 0x20), (0, 0x30))
    out = rebase_tiling(txn, {0: 0x1000})
    assert [p[2:] for p in patches(out)] == [(0, 0x1010), (1, 0x20), (0, 0x1030)]


def test_rebase_after_editing_ops():
    txn = _patched((0, 0x10))
    next(op for op in txn.ops if isinstance(op, o.DdrPatch)).argplus = 0x120
    assert patches(rebase(txn, MAP))[0][2:] == (2, 0x1020)


def test_fuse_sums_and_checks():
    a, b = _patched((0, 0), cols=2), _patched((1, 4), (2, 8), cols=8)
    fused = fuse([a, b])
    data = fused.to_bytes()
    assert struct.unpack_from("<II", data, 8) == (len(a) + len(b), a.nbytes + b.nbytes - 16)
    assert data[4] == 8  # NumCols = max
    assert Transaction.from_bytes(data).ops == a.ops + b.ops
    assert data[16 : a.nbytes] == a.to_bytes()[16:]
    opt = to_opt(a)
    with pytest.raises(TxnFormatError, match="plain"):
        fuse([a, opt])
    with pytest.raises(TxnFormatError, match="DevGen 3"):
        fuse([a, TxnBuilder(dev_gen=3).build()])
    with pytest.raises(TxnFormatError, match="NumRows 5"):
        fuse([a, TxnBuilder(num_rows=5).build()])
    with pytest.raises(TxnFormatError):
        fuse([])
    assert fuse([opt, opt]).is_opt


def test_wrap_frame():
    txn = _patched((0, 0))
    image = wrap(txn)
    assert struct.unpack_from("<II", image) == (0, txn.nbytes + 8)
    assert image[8:] == txn.to_bytes()
    assert unwrap(image).to_bytes() == txn.to_bytes()
    with pytest.raises(TxnFormatError, match="frame"):
        unwrap(image[:-4])


def test_builder_shim_patterns_and_explain():
    b = TxnBuilder()
    bd = ShimBd(
        length_words=64,
        d0_wrap=8,
        d0_step=1,
        d1_wrap=8,
        d1_step=16,
        iteration_wrap=3,
        iteration_step=128,
        iteration_current=1,
    )
    b.shim_bd(1, 3, bd, argidx=2, argplus=0x400)
    b.push_task(1, Direction.MM2S, 0, 3, repeat_count=4)
    b.wait_channel_idle(1, Direction.MM2S, 0)
    txn = b.build()
    ops = txn.ops
    assert ops[0] == o.BlockWrite(
        shim_bd_addr(1, 3), ShimBd(**{**_fields(bd), "address": 0x400}).encode()
    )
    assert ops[1] == o.DdrPatch(shim_bd_addr(1, 3) + 4, 2, 0x400)
    assert ops[2] == o.Write((1 << 25) | 0x1D214, 3 | 4 << 16)
    assert ops[3] == o.MaskPoll((1 << 25) | 0x1D228, 0, 0x0078003C)
    movement = explain(txn)
    (task,) = movement.tasks
    assert (task.col, task.direction, task.channel, task.start_bd) == (1, Direction.MM2S, 0, 3)
    assert (task.repeat_count, task.op_index, task.waits) == (4, 2, [3])
    offsets = [t.offset for t in movement.transfers()]
    # iteration index (1 + r) % 3 for r = 0..4, step 128 words
    assert offsets == [0x400 + i * 128 * 4 for i in (1, 2, 0, 1, 2)]
    assert movement.totals() == {(1, Direction.MM2S, 0, 2): 5 * 256}
    assert "col 1 MM2S0 BD3: arg 2 + 0x400, 256 B, d0 8x1 d1 8x16 d2 step 1 iter 3x128" in str(
        movement
    )


def _fields(bd: ShimBd) -> dict:
    return {name: getattr(bd, name) for name in bd.__dataclass_fields__}


def test_explain_chain_loop_and_unpatched_rewrite():
    b = TxnBuilder()
    b.shim_bd(0, 0, ShimBd(length_words=2, use_next_bd=True, next_bd=1), argidx=0, argplus=8)
    b.shim_bd(0, 1, ShimBd(length_words=3, use_next_bd=True, next_bd=0), argidx=1, argplus=16)
    b.push_task(0, Direction.S2MM, 1, 0, issue_token=True)
    b.tct(0, 0, Direction.S2MM, 1)
    # Re-programming BD1's address without a patch voids its patch: raw address from then on.
    b.shim_bd(0, 1, ShimBd(length_words=3, address=0x7000))
    b.push_task(0, Direction.S2MM, 1, 1)
    movement = explain(b.build())
    first, second = movement.tasks
    assert [(x.bd_id, x.argidx, x.offset, x.length_bytes) for x in first.bds] == [
        (0, 0, 8, 8),
        (1, 1, 16, 12),
    ]
    assert first.issue_token and first.waits == [5]
    assert [(x.bd_id, x.argidx, x.offset) for x in second.bds] == [(1, None, 0x7000)]
    assert second.waits == []


@pytest.mark.parametrize("patch_size", [None, 48, 24])
def test_fuse_rebased_equals_fuse_of_rebased(patch_size):
    """The single-copy path gives the very bytes of rebase-then-fuse, in every patch format."""
    parts = [_patched((0, 0x10), (1, 0x20), (0, 0x180)), _patched((1, 0x4), cols=2), _patched()]
    if patch_size is not None:
        parts = [to_opt(t, patch_size=patch_size) for t in parts]
    maps = [
        [ArgRange(0, 0, 0x200, 2, 0x1000), ArgRange(1, 0, 0x40, 3, 0x40)],
        [ArgRange(1, 0, 0x40, 4, 0x100)],
        [],
    ]
    want = fuse([rebase(t, m) for t, m in zip(parts, maps)]).to_bytes()
    got = fuse_rebased(list(zip(parts, maps)))
    assert isinstance(got.buffer, memoryview) and got.buffer.readonly  # the image, not a copy
    assert got.buffer == want
    assert got.to_bytes() == want and isinstance(got.to_bytes(), bytes)
    assert Transaction.from_bytes(got.to_bytes()).to_bytes() == want
    assert [p[2:] for p in patches(got)] == [(2, 0x1010), (3, 0x60), (2, 0x1180), (4, 0x104)]
    with pytest.raises(TxnFormatError, match="lies in no ArgRange"):
        fuse_rebased([(parts[0], maps[1])])


@pytest.mark.parametrize("start", [0, 4, 3])
def test_put_u64_writes_little_endian_words_at_any_alignment(start):
    """Patch fields go through 8-byte, 4-byte or byte stores depending on their alignment."""
    from npudispatch.txn.fuse import _put_u64

    out = np.zeros(96, np.uint8)
    pos = np.array([start, start + 16, start + 40])
    values = np.array([0x0102030405060708, 2**64 - 1, 5], dtype=np.uint64)
    _put_u64(out, pos, values)
    want = bytearray(96)
    for p, v in zip(pos.tolist(), values.tolist()):
        struct.pack_into("<Q", want, p, v)
    assert out.tobytes() == bytes(want)


@pytest.mark.parametrize("start", [0, 4, 3])
def test_pair_stores_write_both_fields_at_any_alignment(start):
    from npudispatch.txn.fuse import _PairStores

    out = np.full(96, 0xAA, np.uint8)
    pos = np.array([start, start + 20, start + 56])
    first = np.array([0x0102030405060708, 2**64 - 1, 5], dtype=np.uint64)
    second = np.array([7, 0x1122334455667788, 2**63], dtype=np.uint64)
    _PairStores(out, pos, first, second, np.zeros(len(pos), dtype=np.int64)).apply(0, len(pos))
    want = bytearray(b"\xaa" * 96)
    for p, a, b in zip(pos.tolist(), first.tolist(), second.tolist()):
        struct.pack_into("<QQ", want, p, a, b)
    assert out.tobytes() == bytes(want)


def test_fuse_rebased_moves_patches_down_to_lower_offsets():
    """fused_offset below offset: the new argplus is fused_offset + (argplus - offset)."""
    parts = [_patched((0, 0x180), (0, 0x10)), _patched((1, 0x44))]
    maps = [
        [ArgRange(0, 0x100, 0x100, 2, 0x8), ArgRange(0, 0, 0x100, 1, 0)],
        [ArgRange(1, 0x40, 0x10, 5, 0)],
    ]
    want = fuse([rebase(t, m) for t, m in zip(parts, maps)]).to_bytes()
    got = fuse_rebased(list(zip(parts, maps)))
    assert got.to_bytes() == want
    assert [p[2:] for p in patches(got)] == [(2, 0x88), (1, 0x10), (5, 0x4)]


def test_fuse_rebased_refuses_a_negative_range_field():
    part = _patched((0, 0x10))
    with pytest.raises(ValueError, match="negative field"):
        fuse_rebased([(part, [ArgRange(0, 0x10, -8, 2, 0)])])
