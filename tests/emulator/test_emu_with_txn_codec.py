"""Execution mode on transactions made by TxnBuilder, serialized, parsed back and fused."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from emu_progs import add_one, float_add, params_image

from npudispatch import txn
from npudispatch.emulator import KernelRegistry, VirtualNpu
from npudispatch.errors import DeviceError
from npudispatch.overlay_abi import ParamsRecord, operand_channels, output_channels
from npudispatch.txn.ops import DdrPatch
from npudispatch.txn.registers import Direction
from npudispatch.txn.shim import ShimBd

KERNELS = KernelRegistry({1: add_one, 2: float_add})
MM2S, S2MM = Direction.MM2S, Direction.S2MM


def float_add_program(n_floats: int, rec_off: int, rec_len: int, num_cols: int = 4):
    """a (input) + b (const) -> output; operands striped over every operand channel in 4 pieces,
    output written by two S2MM tasks per column with repeat_count 1 and an iteration stride."""
    b = txn.TxnBuilder(num_cols=num_cols)
    nbytes = 4 * n_floats
    b.shim_bd(0, 0, ShimBd(length_words=rec_len // 4), argidx=4, argplus=rec_off)
    b.push_task(0, MM2S, 0, 0)
    pieces = [
        (0, 0, nbytes // 2),
        (0, nbytes // 2, nbytes // 2),
        (3, 0, nbytes // 2),
        (3, nbytes // 2, nbytes // 2),
    ]
    chans = operand_channels(num_cols)
    for k, ((argidx, off, n), ch) in enumerate(zip(pieces, chans)):
        bd_id = 1 + k
        b.shim_bd(ch.col, bd_id, ShimBd(length_words=n // 4), argidx=argidx, argplus=off)
        b.push_task(ch.col, MM2S, ch.channel, bd_id)
    per_col = nbytes // num_cols
    half = per_col // 2
    for col, ch in enumerate(output_channels(num_cols)[:num_cols]):
        bd = ShimBd(length_words=half // 4, iteration_wrap=2, iteration_step=half // 4)
        b.shim_bd(col, 8, bd, argidx=1, argplus=col * per_col)
        b.push_task(col, S2MM, ch.channel, 8, repeat_count=1)
    for col in range(num_cols):
        b.wait_channel_idle(col, S2MM, 0)
    return b.build()


def test_builder_program_roundtrips_and_runs() -> None:
    rng = np.random.default_rng(11)
    a, c = (rng.standard_normal(512).astype(np.float32) for _ in range(2))
    params, [(roff, rlen)] = params_image(ParamsRecord(2, [a.nbytes, c.nbytes], [a.nbytes]))
    program = txn.Transaction.from_bytes(float_add_program(512, roff, rlen).to_bytes())
    npu = VirtualNpu([a.view(np.uint8), a.nbytes, 0, c.view(np.uint8), params], kernels=KERNELS)
    stats = npu.run(program)
    np.testing.assert_array_equal(npu.buffers[1].view(np.float32), a + c)
    assert stats.kernel_launches == 1 and stats.tasks == 1 + 4 + 4
    # execution-mode transfers follow the same convention as the static decoder
    ref = Counter(
        (t.col, t.direction, t.channel, t.argidx, t.offset, t.nbytes)
        for t in txn.explain(program).transfers()
    )
    assert Counter(t.key() for t in npu.transfers) == ref


def test_fused_builder_programs_run_launch_after_launch() -> None:
    """Two ops fused with txn.fuse: float add into scratch, then add-one from scratch."""
    rng = np.random.default_rng(12)
    a, c = (rng.standard_normal(256).astype(np.float32) for _ in range(2))
    n = a.nbytes
    params, [(r1, l1), (r2, l2)] = params_image(
        ParamsRecord(2, [n, n], [n]), ParamsRecord(1, [n], [n])
    )
    first = float_add_program(256, r1, l1)
    # re-point op 1's output at the scratch buffer (argidx 2): what re-basing does
    ops = [
        replace(op, argidx=2) if isinstance(op, DdrPatch) and op.argidx == 1 else op
        for op in first.ops
    ]
    first = txn.Transaction(first.header, ops)
    b = txn.TxnBuilder(num_cols=4)
    b.shim_bd(0, 0, ShimBd(length_words=l2 // 4), argidx=4, argplus=r2)
    b.push_task(0, MM2S, 0, 0)
    b.shim_bd(1, 1, ShimBd(length_words=n // 4), argidx=2, argplus=0)
    b.push_task(1, MM2S, 0, 1)  # a single-channel operand on col1 MM2S0 is fine
    b.shim_bd(2, 2, ShimBd(length_words=n // 4), argidx=1, argplus=0)
    b.push_task(2, S2MM, 0, 2)
    b.wait_channel_idle(2, S2MM, 0)
    fused = txn.fuse([first, b.build()])
    npu = VirtualNpu([a.view(np.uint8), n, n, c.view(np.uint8), params], kernels=KERNELS)
    stats = npu.run(txn.Transaction.from_bytes(fused.to_bytes()))
    assert stats.kernel_launches == 2
    np.testing.assert_array_equal(npu.buffers[2].view(np.float32), a + c)
    np.testing.assert_array_equal(npu.buffers[1], ((a + c).view(np.uint8) + 1).astype(np.uint8))


def test_header_wider_than_device_is_refused() -> None:
    program = txn.TxnBuilder(num_cols=8).build()
    with pytest.raises(DeviceError, match="VirtualNpu\\(num_cols=8\\)"):
        VirtualNpu(num_cols=4).run(program)


def test_header_of_another_device_generation_is_refused() -> None:
    program = txn.TxnBuilder(num_cols=4, dev_gen=2).build()
    with pytest.raises(DeviceError, match="DevGen 2"):
        VirtualNpu().run(program)
