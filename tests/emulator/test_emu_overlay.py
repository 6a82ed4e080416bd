"""Execution mode: copies, striping, n-d gathers and scatters, fused launches, stats."""

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
    float_add,
    identity,
    params_image,
    reference_offsets,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

from npudispatch.emulator import KernelRegistry, VirtualNpu
from npudispatch.errors import DeviceFault
from npudispatch.overlay_abi import PARAMS_CHANNEL, ParamsRecord

KERNELS = KernelRegistry({1: add_one, 2: float_add, 3: identity})


def make_npu(inp: np.ndarray, out_nbytes: int, records: list[ParamsRecord], **kw):
    params, spans = params_image(*records)
    bufs = [inp, out_nbytes, kw.pop("scratch", 0), kw.pop("const", 0), params]
    return VirtualNpu(bufs, kernels=KERNELS, **kw), spans


def rng_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_linear_copy_through_identity_kernel() -> None:
    inp = rng_bytes(8192)
    npu, [(roff, rlen)] = make_npu(inp, 4096, [ParamsRecord(3, [4096], [4096])])
    prog = Prog()
    prog.launch(
        roff, rlen, [(chan(0, MM2S, 1), Bd(0, 256, 4096))], [(chan(0, S2MM, 0), Bd(1, 0, 4096))]
    )
    stats = npu.run(prog.ops)
    np.testing.assert_array_equal(npu.buffers[1], inp[256 : 256 + 4096])
    assert stats.kernel_launches == 1
    assert stats.bytes_by_channel[chan(0, MM2S, 1)] == 4096
    assert stats.bytes_by_channel[chan(0, S2MM, 0)] == 4096
    assert stats.bytes_by_channel[PARAMS_CHANNEL] == rlen
    assert stats.tasks == 3
    assert (
        stats.ops["BLOCKWRITE"] == 3 and stats.ops["DDR_PATCH"] == 3 and stats.ops["MASKPOLL"] == 3
    )


def test_stripes_follow_abi_channel_order_not_push_order() -> None:
    """An operand striped over 3 channels/2 columns; outputs dealt over 4 columns' S2MM0."""
    n = 6144
    inp = rng_bytes(n, 1)
    npu, [(roff, rlen)] = make_npu(inp, n, [ParamsRecord(1, [n], [n])])
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    # stream order is col0 MM2S1, col1 MM2S0, col1 MM2S1; push them out of order on purpose
    prog.task(chan(1, MM2S, 1), [Bd(0, 4096, 2048)])
    prog.task(chan(0, MM2S, 1), [Bd(0, 0, 2048)])
    prog.task(chan(1, MM2S, 0), [Bd(0, 2048, 2048)])
    for col in (3, 1, 0, 2):  # output order col0 S2MM0, col1 S2MM0, ...
        prog.task(chan(col, S2MM, 0), [Bd(1, col * 1536, 1536)])
    for col in range(4):
        prog.wait(chan(col, S2MM, 0))
    npu.run(prog.ops)
    np.testing.assert_array_equal(npu.buffers[1], (inp + 1).astype(np.uint8))


def test_nd_gather_with_iteration_repeat_and_chain() -> None:
    """MM2S: a 3-d BD repeated 3x with an iteration stride, chained to a 2-d BD."""
    words = np.random.default_rng(2).integers(0, 1 << 32, 40_000, dtype=np.uint32)
    const = words.astype("<u4").view(np.uint8)
    g3 = {"d0_wrap": 6, "d0_step": 2, "d1_wrap": 5, "d1_step": 20, "d2_step": 150}
    g3.update(iteration_wrap=3, iteration_step=1000)
    len3 = 6 * 5 * 4  # four d2 blocks
    g2 = {"d0_wrap": 7, "d0_step": 1, "d1_step": 11}
    len2 = 7 * 9
    reps = 3
    total = reps * (len3 + len2) * 4
    npu, [(roff, rlen)] = make_npu(
        np.zeros(0, np.uint8), total, [ParamsRecord(3, [total], [total])], const=const
    )
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    prog.task(
        chan(0, MM2S, 1),
        [Bd(3, 400, len3 * 4, g3), Bd(3, 20_000, len2 * 4, g2)],
        repeat=reps - 1,
    )
    prog.task(chan(0, S2MM, 0), [Bd(1, 0, total)])
    prog.wait(chan(0, S2MM, 0))
    npu.run(prog.ops)

    def strided(base_word: int, shape: tuple[int, ...], steps: tuple[int, ...]) -> np.ndarray:
        return as_strided(words[base_word:], shape=shape, strides=[4 * s for s in steps]).ravel()

    expected = []
    for rep in range(reps):
        expected.append(strided(100 + rep * 1000, (4, 5, 6), (150, 20, 2)))
        expected.append(strided(5000, (9, 7), (11, 1)))
    np.testing.assert_array_equal(npu.buffers[1].view("<u4"), np.concatenate(expected))
    bd_runs = [(t.bd, t.offset) for t in npu.transfers if t.direction == MM2S and t.argidx == 3]
    assert [o for _, o in bd_runs] == [400, 20_000, 4400, 20_000, 8400, 20_000]


def test_nd_scatter_on_s2mm() -> None:
    """S2MM writes a 16x8 word tile transposed (d0 walks a column, d1 the next column)."""
    src = np.arange(128, dtype=np.uint32)
    npu, [(roff, rlen)] = make_npu(src.view(np.uint8), 512, [ParamsRecord(3, [512], [512])])
    prog = Prog()
    prog.launch(
        roff,
        rlen,
        [(chan(0, MM2S, 1), Bd(0, 0, 512))],
        [(chan(0, S2MM, 0), Bd(1, 0, 512, {"d0_wrap": 16, "d0_step": 8, "d1_step": 1}))],
    )
    npu.run(prog.ops)
    out = npu.buffers[1].view("<u4").reshape(16, 8)
    np.testing.assert_array_equal(out, src.reshape(8, 16).T)


def test_fused_two_launches_reset_the_overlay() -> None:
    """Launch 1: float add a + b -> scratch; launch 2: add-one over scratch -> output."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal(256).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    n = a.nbytes
    recs = [ParamsRecord(2, [n, n], [n], dims=[256]), ParamsRecord(1, [n], [n])]
    npu, [(r1, l1), (r2, l2)] = make_npu(
        a.view(np.uint8), n, recs, scratch=n, const=b.view(np.uint8)
    )
    prog = Prog()
    prog.launch(
        r1,
        l1,
        [(chan(0, MM2S, 1), Bd(0, 0, n)), (chan(1, MM2S, 0), Bd(3, 0, n))],
        [(chan(0, S2MM, 0), Bd(2, 0, n // 2)), (chan(1, S2MM, 0), Bd(2, n // 2, n // 2))],
    )
    prog.launch(r2, l2, [(chan(0, MM2S, 1), Bd(2, 0, n))], [(chan(0, S2MM, 0), Bd(1, 0, n))])
    stats = npu.run(prog.ops)
    assert stats.kernel_launches == 2
    np.testing.assert_array_equal(npu.buffers[2].view(np.float32), a + b)
    np.testing.assert_array_equal(npu.buffers[1], ((a + b).view(np.uint8) + 1).astype(np.uint8))


def test_dd_style_argv_and_incremental_output_tasks() -> None:
    """Caller-given argv (bo + 0x80000000); S2MM tasks queued and waited one channel at a time."""
    inp = rng_bytes(2048, 7)
    params, [(roff, rlen)] = params_image(ParamsRecord(1, [2048], [2048]))
    argv = [0x8000_0000 + 0x10_0000 * (i + 1) for i in range(5)]
    npu = VirtualNpu([inp, 2048, 0, 0, params], argv=argv, kernels=KERNELS)
    prog = Prog()
    prog.task(PARAMS_CHANNEL, [Bd(4, roff, rlen)])
    prog.task(chan(0, MM2S, 1), [Bd(0, 0, 2048)])
    prog.task(chan(0, S2MM, 0), [Bd(1, 0, 1024)])
    prog.wait(chan(0, S2MM, 0))
    prog.task(chan(1, S2MM, 0), [Bd(1, 1024, 1024)])
    prog.wait(chan(1, S2MM, 0))
    npu.run(prog.ops)
    np.testing.assert_array_equal(npu.buffers[1], (inp + 1).astype(np.uint8))
    assert npu.regs[0x1D004] == argv[4] + roff  # BD 0 word 1 holds the patched address


def test_large_weight_gather_24mb_is_correct() -> None:
    """A 24 MB strided weight stream (d0 768, d1 32 x 1024, d2 step 33,024 words)."""
    n0, n1, s1, s2 = 768, 32, 1024, 33_024
    blocks = 256
    length = n0 * n1 * blocks  # 6,291,456 words = 24 MiB
    words = np.random.default_rng(3).integers(0, 1 << 32, blocks * s2, dtype=np.uint32)
    nbytes = length * 4
    recs = [ParamsRecord(3, [nbytes], [nbytes])]
    npu, [(roff, rlen)] = make_npu(np.zeros(0, np.uint8), nbytes, recs, const=words.view(np.uint8))
    prog = Prog()
    bd = Bd(3, 0, nbytes, {"d0_wrap": n0, "d1_wrap": n1, "d1_step": s1, "d2_step": s2})
    prog.launch(roff, rlen, [(chan(0, MM2S, 1), bd)], [(chan(0, S2MM, 0), Bd(1, 0, nbytes))])
    npu.run(prog.ops)
    expected = words.reshape(blocks, s2)[:, : n1 * s1].reshape(blocks, n1, s1)[:, :, :n0]
    np.testing.assert_array_equal(npu.buffers[1].view("<u4"), expected.ravel())


@pytest.mark.parametrize("bad", [b"\x01", np.zeros(3, np.uint16)])
def test_kernel_output_sizes_are_checked(bad) -> None:
    from npudispatch.emulator import KernelContractError

    kernels = KernelRegistry({9: lambda rec, ops: [bad]})
    params, [(roff, rlen)] = params_image(ParamsRecord(9, [64], [64]))
    npu = VirtualNpu([rng_bytes(64), 64, 0, 0, params], kernels=kernels)
    prog = Prog()
    prog.launch(roff, rlen, [(chan(0, MM2S, 1), Bd(0, 0, 64))], [(chan(0, S2MM, 0), Bd(1, 0, 64))])
    with pytest.raises(KernelContractError, match="kernel 9 returned outputs of"):
        npu.run(prog.ops)


@settings(max_examples=40, deadline=None)
@given(
    n0=st.integers(0, 12),
    s0=st.integers(1, 5),
    n1=st.integers(0, 6),
    s1=st.integers(1, 80),
    s2=st.integers(1, 600),
    length=st.integers(1, 400),
    start=st.integers(0, 64),
)
def test_random_gathers_match_the_reference_model(n0, s0, n1, s1, s2, length, start) -> None:
    """Any d0/d1/d2 MM2S pattern through the overlay equals words[reference offsets]."""
    from npudispatch.txn.shim import ShimBd

    spec = {"d0_wrap": n0, "d0_step": s0, "d1_wrap": n1, "d1_step": s1, "d2_step": s2}
    offs = np.array(reference_offsets(ShimBd(length_words=length, **spec)), dtype=np.int64)
    words = np.random.default_rng(length).integers(
        0, 1 << 32, start + offs.max() + 1, dtype=np.uint32
    )
    nbytes = 4 * length
    npu, [(roff, rlen)] = make_npu(
        np.zeros(0, np.uint8),
        nbytes,
        [ParamsRecord(3, [nbytes], [nbytes])],
        const=words.view(np.uint8),
    )
    prog = Prog()
    bd = Bd(3, 4 * start, nbytes, spec)
    prog.launch(roff, rlen, [(chan(0, MM2S, 1), bd)], [(chan(0, S2MM, 0), Bd(1, 0, nbytes))])
    npu.run(prog.ops)
    np.testing.assert_array_equal(npu.buffers[1].view("<u4"), words[start + offs])
    # one word further would leave the const buffer: the same BD must then fault
    npu2, _ = make_npu(
        np.zeros(0, np.uint8),
        nbytes,
        [ParamsRecord(3, [nbytes], [nbytes])],
        const=words[:-1].view(np.uint8),
    )
    with pytest.raises(DeviceFault, match="arg 3"):
        npu2.run(prog.ops)
