"""The real AMD corpus: byte-exact round trips, explain worked checks, llama2-MLP fusion, fuzzing."""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest
from corpus_util import CORPUS_DIR

from npudispatch.errors import TxnFormatError
from npudispatch.txn import (
    INDEX_CACHE,
    ArgRange,
    Transaction,
    explain,
    fuse,
    fuse_rebased,
    patches,
    rebase,
    stats,
    to_opt,
    to_plain,
)
from npudispatch.txn import ops as o
from npudispatch.txn.registers import Direction


def _manifest() -> list[tuple[str, int, str]]:
    path = CORPUS_DIR / "MANIFEST.tsv"
    if not path.exists():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(r[0], int(r[1]), r[2]) for r in rows]


MANIFEST = _manifest()
pytestmark = pytest.mark.corpus
SILU = "silu/silu_v1_a16_1_11008.bin"
GATE_UP = "mladfmatmulbias/mladf_2x4x4_v1_a16fw4acc16f_1_4096_11008_128.bin"
DOWN = "mladfmatmulbias/mladf_2x4x4_v1_a16fw4acc16f_1_11008_4096_128.bin"
ELWMUL = "elwmul/elwmul_v1_a16a16_1_11008.bin"


def _load(corpus_dir: Path, name: str) -> bytes:
    return (corpus_dir / name).read_bytes()


@pytest.mark.parametrize(("name", "size", "sha"), MANIFEST, ids=[m[0] for m in MANIFEST])
def test_corpus_round_trip(corpus_dir, name, size, sha):
    data = _load(corpus_dir, name)
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha
    txn = Transaction.from_bytes(data)
    assert txn.to_bytes() == data
    assert txn.header.num_ops == struct.unpack_from("<I", data, 8)[0] == len(txn)
    assert txn.nbytes == size
    # Re-encoding every decoded op from its raw bytes is byte-exact too.
    txn.ops  # noqa: B018 - switches the transaction to op-list mode
    assert txn.to_bytes() == data
    # Stats come from the index, the op list must agree.
    info = stats(Transaction.from_bytes(data))
    assert sum(info["opcodes"].values()) == len(txn.ops)
    assert info["ddr_patches"] == sum(isinstance(op, o.DdrPatch) for op in txn.ops)


def test_corpus_opt_conversion_round_trip(corpus_dir):
    for name, *_ in MANIFEST[:12]:
        plain = Transaction.from_bytes(_load(corpus_dir, name))
        for patch_size in (48, 24):
            opt = Transaction.from_bytes(to_opt(plain, patch_size).to_bytes())
            assert opt.is_opt and len(opt) == len(plain)
            assert opt.ops == plain.ops
            assert [p[2:] for p in patches(opt)] == [p[2:] for p in patches(plain)]
            assert to_plain(opt).ops == plain.ops


def test_explain_silu(corpus_dir):
    movement = explain(Transaction.from_bytes(_load(corpus_dir, SILU)))
    totals = movement.totals()
    assert totals == {
        **{(c, Direction.MM2S, 0, 0): 2752 for c in range(8)},
        **{(c, Direction.S2MM, 0, 1): 2752 for c in range(8)},
    }
    reads = sorted(t.offset for t in movement.transfers() if t.direction == Direction.MM2S)
    assert reads == [c * 2752 for c in range(8)]
    assert sum(n for (_, d, _, _), n in totals.items() if d == Direction.S2MM) == 22016
    assert all(task.waits for task in movement.tasks if task.direction == Direction.S2MM)


def test_explain_mladf_weight_stream(corpus_dir):
    movement = explain(Transaction.from_bytes(_load(corpus_dir, GATE_UP)))
    weights = [
        b for t in movement.tasks if (t.direction, t.channel) == (Direction.MM2S, 1) for b in t.bds
    ]
    assert len(weights) == 8
    for b in weights:
        assert b.argidx == 1
        assert b.bd.length_words == 789_888
        assert (b.bd.d0_wrap, b.bd.d0_step, b.bd.d1_wrap, b.bd.d1_step) == (816, 1, 44, 816)
        assert b.bd.d2_step == 71_808
        assert b.bd.access_pattern() == "d0 816x1 d1 44x816 d2 step 71808"
    acts = {
        b.length_bytes for t in movement.tasks if (t.direction, t.channel) == (1, 0) for b in t.bds
    }
    assert acts == {2048 * 4}
    text = movement.render()
    assert "MM2S1 BD0: arg 1 + 0x0, 3159552 B, d0 816x1 d1 44x816 d2 step 71808" in text


def test_fuse_llama2_mlp_with_rebase(corpus_dir):
    """gate, up (mladf 4096x11008), silu, elwmul, down (mladf 11008x4096) fused as DD would."""
    INDEX_CACHE.clear()
    raw = {n: _load(corpus_dir, n) for n in (GATE_UP, SILU, ELWMUL, DOWN)}
    big = 1 << 30  # weight/scratch regions large enough for any argplus in these files
    x, h = 4096 * 2, 11008 * 2
    # Fused buffers: 0 input x, 1 output y, 2 scratch [gate | up | silu | mul | op pad], 3 const.
    gate, up, act, mul, pad = 0, h, 2 * h, 3 * h, 4 * h
    maps = [
        (GATE_UP, [(0, 0, x, 0, 0), (1, 0, big, 3, 0), (2, 0, h, 2, gate), (3, 0, big, 2, pad)]),
        (GATE_UP, [(0, 0, x, 0, 0), (1, 0, big, 3, big), (2, 0, h, 2, up), (3, 0, big, 2, pad)]),
        (SILU, [(0, 0, h, 2, gate), (1, 0, h, 2, act)]),
        (ELWMUL, [(0, 0, h, 2, act), (1, 0, h, 2, up), (2, 0, h, 2, mul)]),
        (DOWN, [(0, 0, h, 2, mul), (1, 0, big, 3, 2 * big), (2, 0, x, 1, 0), (3, 0, big, 2, pad)]),
    ]
    parts, expected = [], []
    for name, ranges in maps:
        txn = Transaction.from_bytes(raw[name])
        mapping = [ArgRange(*r) for r in ranges]
        parts.append(rebase(txn, mapping))
        assert txn.to_bytes() == raw[name]  # input unchanged
        for op in txn.iter_ops():
            if isinstance(op, o.DdrPatch):
                hit = [r for r in mapping if r.local_argidx == op.argidx]
                hit = [r for r in hit if r.offset <= op.argplus < r.offset + r.size]
                assert len(hit) == 1
                r = hit[0]
                expected.append((r.fused_argidx, r.fused_offset + op.argplus - r.offset))
    fused = fuse(parts)
    single_copy = fuse_rebased(
        [(Transaction.from_bytes(raw[n]), [ArgRange(*r) for r in rs]) for n, rs in maps]
    )
    assert single_copy.to_bytes() == fused.to_bytes()
    heads = [struct.unpack_from("<II", raw[name], 8) for name, _ in maps]
    data = fused.to_bytes()
    assert struct.unpack_from("<II", data, 8) == (
        sum(n for n, _ in heads),
        16 + sum(s - 16 for _, s in heads),
    )
    assert len(fused) == sum(n for n, _ in heads) and fused.nbytes == len(data)
    INDEX_CACHE.clear()
    again = Transaction.from_bytes(data)
    got = [(op.argidx, op.argplus) for op in again.iter_ops() if isinstance(op, o.DdrPatch)]
    assert got == expected
    # Only DDR_PATCH argidx/argplus changed: every other op is identical to the sources.
    src = [op for name, _ in maps for op in Transaction.from_bytes(raw[name]).iter_ops()]
    for a, b in zip(again.iter_ops(), src, strict=True):
        if isinstance(a, o.DdrPatch):
            assert (a.regaddr, a.action) == (b.regaddr, b.action)
        else:
            assert a == b and a.raw == b.raw
    # Data movement of the fused program reads x from buffer 0 and writes y to buffer 1.
    totals = explain(again).totals()
    assert sum(n for (_, d, _, a), n in totals.items() if (d, a) == (Direction.S2MM, 1)) == x


def test_rebase_reports_uncovered_patch(corpus_dir):
    txn = Transaction.from_bytes(_load(corpus_dir, SILU))
    with pytest.raises(TxnFormatError, match=r"op \d+ DDR_PATCH at byte offset \d+: argidx 1"):
        rebase(txn, [ArgRange(0, 0, 1 << 20, 0, 0)])


# -- mutation fuzzing -------------------------------------------------------------------------
def _mutations(data: bytes, rng: random.Random, count: int):
    txn = Transaction.from_bytes(data)
    offsets = txn.framed()[1].offsets.tolist()
    size_field = {0: 20, 1: 12, 3: 24, 4: 24, 7: 24}
    for _ in range(count):
        b = bytearray(data)
        kind = rng.randrange(6)
        if kind == 0:
            yield bytes(b[: rng.randrange(len(b))])
            continue
        if kind == 1:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 2:
            off = rng.choice(offsets)
            at = off + size_field.get(b[off], 4)
            value = rng.choice([0, 1, 4, 8, 12, 16, 24, 48, 0xFFFFFFFF, rng.getrandbits(32)])
            struct.pack_into("<I", b, at, value)
        elif kind == 3:
            n = struct.unpack_from("<I", b, 8)[0]
            struct.pack_into("<I", b, 8, rng.choice([0, n - 1, n + 1, 0xFFFFFFFF]))
        elif kind == 4:
            struct.pack_into("<I", b, 12, rng.choice([0, len(b) - 4, len(b) + 4, 0xFFFFFFFF]))
        else:
            b[rng.choice(offsets)] = rng.randrange(256)
            struct.pack_into("<I", b, 12, len(b))
        yield bytes(b)


def test_mutation_fuzzing_only_raises_txn_format_error(corpus_dir):
    rng = random.Random(1234)
    names = [m[0] for m in MANIFEST if m[1] < 40_000][:10]
    outcomes = {"ok": 0, "error": 0}
    for name in names:
        data = _load(corpus_dir, name)
        for mutated in _mutations(data, rng, 40):
            try:
                txn = Transaction.from_bytes(mutated)
                assert txn.to_bytes() == mutated
                for _ in txn.iter_ops():
                    pass
                stats(txn)
                explain(txn)
            except TxnFormatError:
                outcomes["error"] += 1
            else:
                outcomes["ok"] += 1
    assert outcomes["error"] > 50 and outcomes["ok"] > 10, outcomes
