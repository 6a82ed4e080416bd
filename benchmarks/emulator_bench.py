"""Emulator timings: a 24 MiB strided weight gather, a full overlay launch, corpus traces.

Run: ``.venv/bin/python benchmarks/emulator_bench.py [--repeat N]``. Prints one line per case
(best of N). The target for the 24 MiB gather is well under a second.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from npudispatch.emulator import HostMemory, KernelRegistry, VirtualNpu, pattern, trace_transaction
from npudispatch.overlay_abi import PARAMS_CHANNEL, ParamsRecord
from npudispatch.txn.ops import BlockWrite, DdrPatch, MaskPoll, Write
from npudispatch.txn.registers import (
    CHANNEL_IDLE_MASK,
    Direction,
    shim_bd_addr,
    status_addr,
    task_queue_addr,
)
from npudispatch.txn.shim import ShimBd

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "dd_stx_txn"
N0, N1, S1, S2, BLOCKS = 768, 32, 1024, 33_024, 256  # 6,291,456 words = 24 MiB


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def weight_bd(address: int) -> ShimBd:
    length = N0 * N1 * BLOCKS
    return ShimBd(
        length_words=length, address=address, d0_wrap=N0, d1_wrap=N1, d1_step=S1, d2_step=S2
    )


def gather_only(mem: HostMemory) -> np.ndarray:
    pat = pattern(weight_bd(mem.argv[3]), 0)
    loc = mem.locate(pat.base_word * 4, pat.span_words * 4)
    return mem.read(loc, pat)


def launch_ops(rec_len: int, nbytes: int) -> list:
    def task(col, direction, ch, bd_id, bd, argidx):
        return [
            BlockWrite(shim_bd_addr(col, bd_id), bd.encode()),
            DdrPatch(shim_bd_addr(col, bd_id) + 4, argidx, bd.address),
            Write(task_queue_addr(col, direction, ch), bd_id),
        ]

    return [
        *task(0, Direction.MM2S, 0, 0, ShimBd(length_words=rec_len // 4), 4),
        *task(0, Direction.MM2S, 1, 1, weight_bd(0), 3),
        *task(0, Direction.S2MM, 0, 2, ShimBd(length_words=nbytes // 4), 1),
        MaskPoll(status_addr(0, Direction.S2MM, 0), 0, CHANNEL_IDLE_MASK),
        MaskPoll(status_addr(0, PARAMS_CHANNEL.direction, 0), 0, CHANNEL_IDLE_MASK),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    nbytes = N0 * N1 * BLOCKS * 4
    weights = np.random.default_rng(0).integers(0, 256, BLOCKS * S2 * 4, dtype=np.uint8)
    mem = HostMemory([0, 0, 0, weights, 0])
    t = best(lambda: gather_only(mem), args.repeat)
    print(f"gather 24 MiB strided BD (addrgen + bounds + gather): {t * 1e3:8.1f} ms")

    rec = ParamsRecord(1, [nbytes], [nbytes]).encode()
    kernels = KernelRegistry({1: lambda r, ops: [ops[0]]})
    ops = launch_ops(len(rec), nbytes)

    def full() -> None:
        npu = VirtualNpu([0, nbytes, 0, weights, np.frombuffer(rec, np.uint8)], kernels=kernels)
        npu.run(ops)

    t = best(full, args.repeat)
    print(f"full launch: 24 MiB weights MM2S -> identity kernel -> 24 MiB S2MM: {t * 1e3:8.1f} ms")

    if (CORPUS / "MANIFEST.tsv").exists():
        from npudispatch.txn import Transaction

        for line in (CORPUS / "MANIFEST.tsv").read_text().splitlines()[1:]:
            name = line.split("\t")[0]
            if "xcomconv2d_au16" in name or "conv2d_a16bfw16bfpacc16bf_512" in name:
                program = Transaction.from_bytes((CORPUS / name).read_bytes())
                t = best(lambda p=program: trace_transaction(p), args.repeat)
                print(f"trace {name} ({len(program.ops)} ops): {t * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
