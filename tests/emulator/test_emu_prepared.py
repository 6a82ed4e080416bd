"""Prepared programs (VirtualNpu.prepare): decoded once, run many times, same effects as the ops."""

from __future__ import annotations

import numpy as np
import pytest
from emu_progs import (
    MM2S,
    S2MM,
    Bd,
    Prog,
    add_one,
    chan,
    identity,
    params_image,
    reference_offsets,
)

from npudispatch.emulator import KernelRegistry, VirtualNpu
from npudispatch.errors import DeviceError, DeviceFault, DeviceHang
from npudispatch.overlay_abi import PARAMS_CHANNEL, ParamsRecord
from npudispatch.txn.ops import DdrPatch, MaskPoll, Noop, Write
from npudispatch.txn.registers import tile_addr
from npudispatch.txn.shim import ShimBd

KERNELS = KernelRegistry({1: add_one, 3: identity})


def two_launches() -> tuple[list[np.ndarray | int], list]:
    """An add-one launch with a 3-d gather, then an identity launch striped over two columns."""
    inp = np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8)
    params, [(r1, n1), (r2, n2)] = params_image(
        ParamsRecord(1, [1024], [1024]), ParamsRecord(3, [2048, 2048], [2048, 2048])
    )
    gather = {"d0_wrap": 8, "d0_step": 2, "d1_wrap": 4, "d1_step": 40, "d2_step": 200}
    prog = Prog()
    prog.launch(
        r1, n1, [(chan(0, MM2S, 1), Bd(0, 64, 1024, gather))], [(chan(0, S2MM, 0), Bd(1, 0, 1024))]
    )
    prog.ops.append(Noop())
    prog.launch(
        r2,
        n2,
        [(chan(0, MM2S, 1), Bd(0, 0, 2048)), (chan(1, MM2S, 0), Bd(0, 4096, 2048))],
        [(chan(0, S2MM, 0), Bd(1, 1024, 2048)), (chan(1, S2MM, 0), Bd(2, 0, 2048))],
    )
    return [inp, 1024 + 2048, 2048, 0, params], prog.ops


def test_prepared_runs_match_running_the_ops() -> None:
    buffers, ops = two_launches()
    plain = VirtualNpu(buffers, kernels=KERNELS)
    fast = VirtualNpu(buffers, kernels=KERNELS)
    prepared = fast.prepare(ops)
    assert len(prepared) == len(ops)
    for _ in range(3):  # registers and caches persist across runs
        want, got = plain.run(ops), fast.run(prepared)
        assert got == want
        assert fast.transfers == plain.transfers
        for a, b in zip(fast.buffers, plain.buffers):
            np.testing.assert_array_equal(a, b)
    assert fast.regs == plain.regs
    # Against the address rule element by element, not against another emulator run.
    inp = buffers[0]
    assert isinstance(inp, np.ndarray)
    bd = ShimBd(length_words=256, d0_wrap=8, d0_step=2, d1_wrap=4, d1_step=40, d2_step=200)
    words = inp[64:].view("<u4")[reference_offsets(bd)]
    np.testing.assert_array_equal(fast.buffers[1][:1024], words.view(np.uint8) + 1)
    np.testing.assert_array_equal(fast.buffers[1][1024:], inp[:2048])
    np.testing.assert_array_equal(fast.buffers[2], inp[4096:6144])
    assert (
        got.kernel_launches == 2
        and got.ops["NOOP"] == 1
        and got.bytes_moved == sum(t.nbytes for t in fast.transfers)
    )


def test_ddr_patch_reads_argplus_when_it_runs() -> None:
    """Runtime patch sites rewrite a DDR_PATCH op's argplus between runs of one prepared program."""
    buffers, ops = two_launches()
    npu = VirtualNpu(buffers, kernels=KERNELS)
    prepared = npu.prepare(ops)
    patch = next(op for op in ops if isinstance(op, DdrPatch) and op.argidx == 2)
    npu.run(prepared)
    patch.argplus += 4  # the second identity output lands 4 bytes later (and now overruns)
    with pytest.raises(DeviceFault, match="runs past the end of"):
        npu.run(prepared)


def test_static_failures_still_raise_at_their_op() -> None:
    """A register outside the partition or a poll that can never succeed keeps its located error,
    raised when the program reaches the op (earlier ops have run and are counted)."""
    outside = Write(tile_addr(7, 0, 0x1D000), 1)  # column 7 of a 4-column partition
    npu = VirtualNpu([0, 0, 0, 0, 0])
    with pytest.raises(DeviceFault) as info:
        npu.run([Noop(), Noop(), outside])
    assert "op #2 (WRITE)" in str(info.value) and npu.stats.ops["NOOP"] == 2
    stuck = MaskPoll(tile_addr(0, 1, 0xA0660), 1, 1)  # memtile status reads idle (0) forever
    with pytest.raises(DeviceHang, match=r"op #1 \(MASKPOLL\)"):
        npu.run([Noop(), stuck])


def test_a_program_prepared_elsewhere_is_refused() -> None:
    buffers, ops = two_launches()
    other = VirtualNpu(buffers, kernels=KERNELS).prepare(ops)
    with pytest.raises(DeviceError, match="another VirtualNpu"):
        VirtualNpu(buffers, kernels=KERNELS).run(other)


def test_params_channel_is_the_overlays_own_object() -> None:
    """The overlay and the DMA queues share one channel object per channel (identity lookups)."""
    npu = VirtualNpu([0, 0, 0, 0, 0])
    assert npu.overlay.inputs[0] == PARAMS_CHANNEL
    assert npu.overlay.inputs[0] is npu.channel(0, MM2S, 0)
    assert all(ch is npu.channel(ch.col, ch.direction, ch.channel) for ch in npu.overlay.outputs)
