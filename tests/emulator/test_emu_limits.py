"""Corrupt BDs are refused from their extents before any address array is allocated."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from emu_progs import MM2S, S2MM, Bd, Prog, chan, identity, params_image

from npudispatch.cli import main
from npudispatch.emulator import KernelRegistry, VirtualNpu
from npudispatch.emulator.addrgen import extent_words, word_offsets
from npudispatch.emulator.errors import EmulatorLimitError
from npudispatch.errors import DeviceError, DeviceFault
from npudispatch.overlay_abi import ParamsRecord
from npudispatch.txn import Transaction
from npudispatch.txn.header import TxnHeader
from npudispatch.txn.shim import ShimBd

N = 1024


def _npu(in_bytes: int = N) -> tuple[VirtualNpu, int, int]:
    params, [(roff, rlen)] = params_image(ParamsRecord(3, [N], [N]))
    inp = np.arange(in_bytes, dtype=np.uint32).astype(np.uint8)
    return VirtualNpu([inp, N, 0, 0, params], kernels=KernelRegistry({3: identity})), roff, rlen


@pytest.mark.parametrize(
    "fields",
    [
        {"d0_wrap": 2, "d0_step": 1, "d1_step": 2},  # 2-d: 2^27 rows of 2 words
        {"d0_wrap": 4, "d0_step": 1, "d1_wrap": 4, "d1_step": 4, "d2_step": 16},  # 3-d
    ],
)
def test_huge_strided_bd_faults_without_allocating(fields):
    """A 2^28-word strided BD (1 GiB of words, 2 GiB of int64 offsets) on a 1 KiB buffer."""
    npu, roff, rlen = _npu()
    prog = Prog()
    prog.launch(
        roff,
        rlen,
        [(chan(0, MM2S, 1), Bd(0, 0, 4 << 28, fields))],
        [(chan(0, S2MM, 0), Bd(1, 0, N))],
    )
    tracemalloc.start()
    try:
        with pytest.raises(DeviceFault, match="op #"):
            npu.run(prog.ops)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB before the fault"


def test_overlapping_bd_longer_than_device_memory_faults():
    """512x512 overlapping rows revisit ~1k words: 64 MiB moved from an 8 KiB buffer."""
    npu, roff, rlen = _npu(8192)
    prog = Prog()
    fields = {"d0_wrap": 512, "d0_step": 1, "d1_wrap": 512, "d1_step": 1, "d2_step": 1}
    prog.launch(
        roff,
        rlen,
        [(chan(0, MM2S, 1), Bd(0, 0, 4 << 24, fields))],
        [(chan(0, S2MM, 0), Bd(1, 0, N))],
    )
    with pytest.raises(DeviceFault, match="more than all"):
        npu.run(prog.ops)


def test_extent_words_matches_the_expanded_pattern():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n0 = int(rng.integers(0, 5))
        n1 = int(rng.integers(0, 5)) if n0 else 0
        bd = ShimBd(
            length_words=int(rng.integers(0, 60)),
            d0_wrap=n0,
            d1_wrap=n1,
            d0_step=int(rng.integers(1, 9)),
            d1_step=int(rng.integers(1, 30)),
            d2_step=int(rng.integers(1, 90)),
        )
        offsets = word_offsets(bd)
        assert extent_words(bd) == (int(offsets.max()) + 1 if offsets.size else 0)


@pytest.mark.parametrize("trace", [False, True])
def test_task_repeating_past_the_transfer_limit_is_refused_before_it_runs(trace):
    """A task repeating its BD 201 times against a limit of 100 recorded executions."""
    prog = Prog()
    prog.task(chan(0, MM2S, 1), [Bd(0, 0, 64)], repeat=200)
    prog.wait(chan(0, MM2S, 1))
    if trace:
        npu = VirtualNpu(num_cols=4, trace=True, max_transfers=100)
    else:
        npu = VirtualNpu([np.zeros(N, np.uint8), N, 0, 0, 0], max_transfers=100)
    with pytest.raises(DeviceError, match="limit of 100 BD executions") as info:
        npu.run(prog.ops)
    assert isinstance(info.value, EmulatorLimitError) and info.value.op_index is not None


def test_txn_trace_refuses_a_header_with_33_columns(tmp_path, capsys):
    path = tmp_path / "c33.bin"
    path.write_bytes(Transaction(TxnHeader(num_cols=33), []).to_bytes())
    assert main(["txn", "trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert "num_cols is 33" in err and "Traceback" not in err
