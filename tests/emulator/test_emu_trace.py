"""Trace (DMA-only) mode on hand-built programs and on AMD's real llama2-MLP transactions."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from corpus_util import CORPUS_DIR, corpus_files
from emu_progs import MM2S, S2MM, Bd, Prog, chan

from npudispatch import cli
from npudispatch import txn as txn_mod
from npudispatch.emulator import VirtualNpu, trace_transaction
from npudispatch.txn.ops import MaskPoll, MergeSync, Write
from npudispatch.txn.registers import Direction, task_queue_addr, tile_addr

LLAMA2_MLP = [
    "mladfmatmulbias/mladf_2x4x4_v1_a16fw4acc16f_1_4096_11008_128.bin",
    "mladfmatmulbias/mladf_2x4x4_v1_a16fw4acc16f_1_11008_4096_128.bin",
    "silu/silu_v1_a16_1_11008.bin",
    "elwmul/elwmul_v1_a16a16_1_11008.bin",
]


def test_trace_expands_repeats_iterations_and_chains_without_kernels() -> None:
    prog = Prog()
    it = {"iteration_wrap": 2, "iteration_step": 16}
    prog.task(chan(1, MM2S, 0), [Bd(3, 0x100, 256, it), Bd(0, 0x40, 32)], repeat=2)
    prog.task(chan(0, S2MM, 1), [Bd(1, 0x80, 64)], token=True)
    prog.ops.append(MergeSync.make(num_tokens=1, num_cols=1))
    result = trace_transaction(prog.ops, num_cols=2)
    keys = [t.key() for t in result.transfers]
    assert keys == [
        (1, MM2S, 0, 3, 0x100, 256),
        (1, MM2S, 0, 0, 0x40, 32),
        (1, MM2S, 0, 3, 0x140, 256),
        (1, MM2S, 0, 0, 0x40, 32),
        (1, MM2S, 0, 3, 0x100, 256),
        (1, MM2S, 0, 0, 0x40, 32),
        (0, S2MM, 1, 1, 0x80, 64),
    ]
    assert result.totals() == Counter({(3, MM2S): 768, (0, MM2S): 96, (1, S2MM): 64})
    assert result.stats.tasks == 2 and result.stats.tokens == 1
    assert result.stats.bytes_by_channel[chan(1, MM2S, 0)] == 864


def test_trace_records_unresolvable_bds_instead_of_failing() -> None:
    """Unpatched addresses and BDs programmed out of band (control packets) get argidx None."""
    prog = Prog()
    prog.task(chan(0, MM2S, 0), [Bd(None, 0x2000, 64)])
    prog.push(chan(0, MM2S, 1), 7)  # BD 7 never written by this transaction
    result = trace_transaction(prog.ops)
    assert [t.key() for t in result.transfers] == [
        (0, MM2S, 0, None, 0x2000, 64),
        (0, MM2S, 1, None, 0, 0),
    ]
    assert result.stats.unresolved == 2


def test_trace_uses_caller_argv_and_needs_no_waits() -> None:
    argv = [0x8000_0000 + 0x100_0000 * i for i in range(5)]
    prog = Prog()
    prog.task(chan(0, S2MM, 0), [Bd(2, 0x30, 16)])
    ops = [*prog.ops, MaskPoll(tile_addr(0, 1, 0xD0200), 1, 1)]
    result = trace_transaction(ops, argv=argv)
    assert [t.key() for t in result.transfers] == [(0, S2MM, 0, 2, 0x30, 16)]


def test_trace_mode_takes_no_buffers() -> None:
    with pytest.raises(ValueError, match="trace mode"):
        VirtualNpu([0] * 5, trace=True)
    npu = VirtualNpu(trace=True)
    npu.run([Write(task_queue_addr(0, Direction.S2MM, 0), 0)])  # BD 0 unwritten: recorded, no hang
    assert npu.stats.unresolved == 1 and npu.buffers == []


def _load(corpus_dir, name):
    return txn_mod, txn_mod.Transaction.from_bytes((corpus_dir / name).read_bytes())


@pytest.mark.corpus
def test_silu_reads_and_writes_2752_bytes_per_column(corpus_dir) -> None:
    _, txn = _load(corpus_dir, "silu/silu_v1_a16_1_11008.bin")
    result = trace_transaction(txn)
    assert result.num_cols == 8
    per_col = Counter((t.col, t.direction, t.argidx) for t in result.transfers)
    nbytes = Counter()
    for t in result.transfers:
        nbytes[(t.col, t.direction, t.argidx)] += t.nbytes
    for col in range(8):
        assert nbytes[(col, Direction.MM2S, 0)] == 2752
        assert nbytes[(col, Direction.S2MM, 1)] == 2752
    assert set(per_col) == {(c, d, a) for c in range(8) for d, a in ((MM2S, 0), (S2MM, 1))}
    assert result.totals() == Counter({(0, MM2S): 22016, (1, S2MM): 22016})
    inputs = sorted(t.offset for t in result.transfers if t.direction == MM2S)
    assert inputs == [2752 * c for c in range(8)]


# Every corpus file when the corpus is there (else the llama2 names, skipped by the fixture).
ALL_CORPUS = [p.relative_to(CORPUS_DIR).as_posix() for p in corpus_files()] or LLAMA2_MLP


@pytest.mark.corpus
@pytest.mark.parametrize("name", ALL_CORPUS)
def test_trace_matches_explain_on_the_corpus(corpus_dir, name) -> None:
    _, txn = _load(corpus_dir, name)
    result = trace_transaction(txn)
    expected = txn_mod.explain(txn).transfers()
    ref = Counter((t.col, t.direction, t.channel, t.argidx, t.offset, t.nbytes) for t in expected)
    assert Counter(t.key() for t in result.transfers) == ref
    # BDs programmed by control packets (not by the transaction) resolve to no buffer in both.
    assert result.stats.unresolved == sum(1 for t in expected if t.argidx is None)
    ref_totals = Counter()
    for t in expected:
        ref_totals[(t.argidx, t.direction)] += t.nbytes
    assert result.totals() == ref_totals


@pytest.mark.corpus
def test_mladf_weight_stream_totals(corpus_dir) -> None:
    """Worked check: weights 789,888 words per column on MM2S1 from argidx 1."""
    _, txn = _load(corpus_dir, LLAMA2_MLP[0])
    result = trace_transaction(txn)
    weights = [t for t in result.transfers if t.argidx == 1 and t.direction == MM2S]
    assert weights and all(t.nbytes == 789_888 * 4 and t.channel == 1 for t in weights)


@pytest.mark.corpus
def test_cli_trace_json(corpus_dir, capsys) -> None:
    code = cli.main(["txn", "trace", str(corpus_dir / LLAMA2_MLP[2]), "--json"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 16
    assert set(records[0]) == {"col", "direction", "channel", "argidx", "offset", "bytes"}
    assert sum(r["bytes"] for r in records if r["direction"] == "S2MM") == 22016
    code = cli.main(["txn", "trace", str(corpus_dir / LLAMA2_MLP[2])])
    out = capsys.readouterr().out
    assert code == 0 and "arg 1 S2MM: 22016 B" in out
