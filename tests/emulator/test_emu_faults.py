"""Every way a program can hang or fault raises a located DeviceHang / DeviceFault."""

from __future__ import annotations

import numpy as np
import pytest
from emu_progs import MM2S, S2MM, Bd, Prog, add_one, chan, identity, params_image

from npudispatch.emulator import EmulatorFault, EmulatorHang, KernelRegistry, VirtualNpu
from npudispatch.errors import DeviceFault, DeviceHang
from npudispatch.overlay_abi import PARAMS_CHANNEL, ParamsRecord
from npudispatch.txn.ops import (
    BlockWrite,
    CustomOp,
    DdrPatch,
    MaskPoll,
    MergeSync,
    Noop,
    Preempt,
    ReadRegs,
    RecordTimer,
    Tct,
    Write,
)
from npudispatch.txn.registers import shim_bd_addr, tile_addr
from npudispatch.txn.shim import ShimBd

KERNELS = KernelRegistry({1: add_one, 3: identity})
N = 1024


def setup(record: ParamsRecord | None = None, out: int = N, **kw) -> tuple[VirtualNpu, int, int]:
    params, [(roff, rlen)] = params_image(record or ParamsRecord(1, [N], [N]))
    inp = np.arange(N, dtype=np.uint8)
    return VirtualNpu([inp, out, 0, 0, params], kernels=KERNELS, **kw), roff, rlen


def launch(prog: Prog, roff: int, rlen: int, operand_bytes: int = N, output_bytes: int = N) -> None:
    prog.launch(
        roff,
        rlen,
        [(chan(0, MM2S, 1), Bd(0, 0, operand_bytes))],
        [(chan(0, S2MM, 0), Bd(1, 0, output_bytes))],
    )


def test_missing_operand_bytes_hang() -> None:
    npu, roff, rlen = setup()
    prog = Prog()
    launch(prog, roff, rlen, operand_bytes=N - 64)
    with pytest.raises(DeviceHang, match="missing operand bytes") as info:
        npu.run(prog.ops)
    assert isinstance(info.value, EmulatorHang)
    assert info.value.op_index is not None and "col 0 MM2S1: 960 B" in str(info.value)


def test_surplus_operand_bytes_hang() -> None:
    npu, roff, rlen = setup(ParamsRecord(1, [N - 64], [N - 64]))
    prog = Prog()
    launch(prog, roff, rlen, output_bytes=N - 64)
    with pytest.raises(DeviceHang, match="surplus operand bytes"):
        npu.run(prog.ops)


def test_short_output_hang_names_channel() -> None:
    npu, roff, rlen = setup(ParamsRecord(1, [N], [N]), out=2 * N)
    prog = Prog()
    launch(prog, roff, rlen, output_bytes=2 * N)
    with pytest.raises(DeviceHang, match="short output") as info:
        npu.run(prog.ops)
    assert info.value.channel == chan(0, S2MM, 0)


def test_surplus_output_hang() -> None:
    npu, roff, rlen = setup()
    prog = Prog()
    launch(prog, roff, rlen, output_bytes=N // 2)
    with pytest.raises(DeviceHang, match="surplus output"):
        npu.run(prog.ops)


def test_invalid_bd_hang() -> None:
    npu, *_ = setup()
    prog = Prog()
    bd = ShimBd(length_words=4, valid=False)
    prog.ops.append(BlockWrite(shim_bd_addr(1, 5), bd.encode()))
    prog.push(chan(1, MM2S, 0), 5)
    with pytest.raises(DeviceHang, match="Valid_BD = 0") as info:
        npu.run(prog.ops)
    assert (info.value.op_index, info.value.bd, info.value.channel) == (1, 5, chan(1, MM2S, 0))


def test_never_written_bd_and_looping_chain_hang() -> None:
    npu, *_ = setup()
    prog = Prog()
    prog.push(chan(0, MM2S, 1), 9)
    with pytest.raises(DeviceHang, match="BD 9 has Valid_BD = 0"):
        npu.run(prog.ops)
    loop = ShimBd(length_words=4, address=0, use_next_bd=True, next_bd=2)
    ops = [BlockWrite(shim_bd_addr(0, 2), loop.encode()), Write(0x1D21C, 2)]
    with pytest.raises(DeviceHang, match="loops back to BD 2"):
        npu.run(ops)


def test_queue_overflow_hang() -> None:
    npu, roff, rlen = setup(ParamsRecord(1, [N], [N]), out=8 * N)
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    # no operands queued: the kernel cannot fire, so S2MM tasks pile up
    for k in range(5):
        prog.task(chan(0, S2MM, 0), [Bd(1, k * 64, 64)])
    with pytest.raises(DeviceHang, match="task queue overflow") as info:
        npu.run(prog.ops)
    assert info.value.channel == chan(0, S2MM, 0)


def test_deep_queues_drain_when_progress_is_possible() -> None:
    """Eight S2MM tasks on one channel work: the kernel fires to make room (as on hardware)."""
    npu, roff, rlen = setup()
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    prog.task(chan(0, MM2S, 1), [Bd(0, 0, N)])
    for k in range(8):
        prog.task(chan(0, S2MM, 0), [Bd(1, k * (N // 8), N // 8)])
    prog.wait(chan(0, S2MM, 0))
    npu.run(prog.ops)
    np.testing.assert_array_equal(npu.buffers[1], np.arange(1, N + 1, dtype=np.uint8))


def test_unknown_kernel_hang() -> None:
    npu, roff, rlen = setup(ParamsRecord(77, [N], [N]))
    prog = Prog()
    launch(prog, roff, rlen)
    with pytest.raises(DeviceHang, match="kernel id 77, which no operator registered"):
        npu.run(prog.ops)


def test_corrupt_record_hang() -> None:
    npu, roff, rlen = setup()
    npu.buffers[4][:4] = 0  # destroy the magic
    prog = Prog()
    launch(prog, roff, rlen)
    with pytest.raises(DeviceHang, match="magic"):
        npu.run(prog.ops)


def test_output_with_no_launch_hangs() -> None:
    npu, *_ = setup()
    prog = Prog()
    prog.task(chan(0, S2MM, 0), [Bd(1, 0, 64)])
    prog.wait(chan(0, S2MM, 0))
    with pytest.raises(DeviceHang, match="no params record arrived"):
        npu.run(prog.ops)


def test_out_of_buffer_fault_names_everything() -> None:
    npu, roff, rlen = setup()
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    prog.task(chan(0, MM2S, 1), [Bd(0, 512, N)])  # runs 512 B past the 1 KiB input
    prog.wait(chan(0, MM2S, 1))
    with pytest.raises(DeviceFault, match=r"runs past the end of arg 0 \(input\)") as info:
        npu.run(prog.ops)
    err = info.value
    assert isinstance(err, EmulatorFault)
    assert (err.channel, err.bd, err.address) == (chan(0, MM2S, 1), 1, (1 << 40) + 512)
    assert err.op_index == len(prog.ops) - 1


def test_unpatched_address_is_outside_every_buffer() -> None:
    npu, *_ = setup()
    prog = Prog()
    prog.task(chan(0, MM2S, 1), [Bd(0, 0x100, 64)], patch=False)
    prog.wait(chan(0, MM2S, 1))
    with pytest.raises(DeviceFault, match="outside every argument buffer"):
        npu.run(prog.ops)


def test_ddr_patch_argidx_above_4_faults() -> None:
    npu, *_ = setup()
    ops = [BlockWrite(shim_bd_addr(0, 0), ShimBd(length_words=4).encode()), DdrPatch(0x1D004, 5, 0)]
    with pytest.raises(DeviceFault, match="argidx 5") as info:
        npu.run(ops)
    assert info.value.op_index == 1


def test_misaligned_ddr_patch_faults() -> None:
    """A BD address keeps only bits 31:2: an unaligned patch would read from the wrong byte."""
    npu, *_ = setup()
    ops = [
        BlockWrite(shim_bd_addr(0, 0), ShimBd(length_words=4).encode()),
        DdrPatch(0x1D004, 0, 258),
    ]
    with pytest.raises(DeviceFault, match="not 4-byte aligned") as info:
        npu.run(ops)
    assert info.value.op_index == 1


def test_register_outside_partition_faults() -> None:
    npu, *_ = setup(num_cols=2)
    with pytest.raises(DeviceFault, match="outside the 2-column"):
        npu.run([Write(tile_addr(3, 0, 0x14000), 1)])


def test_poll_that_can_never_hold_hangs_but_lock_requests_succeed() -> None:
    npu, *_ = setup()
    lock_acquire = tile_addr(0, 2, 0x43BFC)
    npu.run([MaskPoll(lock_acquire, 1, 1), MaskPoll(tile_addr(0, 1, 0xA0660), 0, 0x0078003C)])
    npu.run([Write(tile_addr(0, 2, 0x4800), 7), MaskPoll(tile_addr(0, 2, 0x4800), 7, 0xFF)])
    with pytest.raises(DeviceHang, match="nothing in the program will change it"):
        npu.run([MaskPoll(tile_addr(0, 2, 0x4800), 8, 0xFF)])


def test_unfinished_work_at_end_of_program_hangs() -> None:
    npu, roff, rlen = setup()
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    prog.task(chan(0, MM2S, 1), [Bd(0, 0, N)])
    prog.task(chan(0, S2MM, 0), [Bd(1, 0, N)])  # never waited on
    with pytest.raises(DeviceHang, match="no wait covers"):
        npu.run(prog.ops)


def test_tct_consumes_tokens_of_token_issuing_tasks_only() -> None:
    npu, roff, rlen = setup()
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    prog.task(chan(0, MM2S, 1), [Bd(0, 0, N)])
    prog.task(chan(0, S2MM, 0), [Bd(1, 0, N)], token=True)
    prog.ops.append(Tct.make(col=0, row=0, direction=0, channel=0))
    prog.ops.append(Tct.make(col=0, row=0, direction=1, channel=0))  # params task: no token
    with pytest.raises(
        DeviceHang, match="TCT waits for a task-complete token from col 0 row 0 MM2S0"
    ):
        npu.run(prog.ops)
    np.testing.assert_array_equal(npu.buffers[1], np.arange(1, N + 1, dtype=np.uint8))


def test_merge_sync_counts_tokens_across_columns() -> None:
    npu, roff, rlen = setup(ParamsRecord(1, [N], [N]))
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)], token=True)
    prog.task(chan(0, MM2S, 1), [Bd(0, 0, N)], token=True)
    prog.task(chan(0, S2MM, 0), [Bd(1, 0, N // 2)], token=True)
    prog.task(chan(1, S2MM, 0), [Bd(1, N // 2, N // 2)], token=True)
    prog.ops.append(MergeSync.make(num_tokens=4, num_cols=2))
    stats = npu.run(prog.ops)
    assert stats.tokens == 4 and stats.kernel_launches == 1
    with pytest.raises(DeviceHang, match="MERGE_SYNC waits for 1 tokens"):
        npu.run([MergeSync.make(num_tokens=1, num_cols=4)])


def test_inert_ops_are_accepted_and_counted() -> None:
    npu, *_ = setup()
    ops = [Noop(), Preempt(1), RecordTimer(3), ReadRegs((0x1D000,)), CustomOp(0x86, b"\0" * 4)]
    stats = npu.run(ops)
    assert stats.ops == {
        "NOOP": 1,
        "PREEMPT": 1,
        "RECORD_TIMER": 1,
        "READ_REGS": 1,
        "CUSTOM_0x86": 1,
    }
