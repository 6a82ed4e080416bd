"""Throughput of parse + re-base + fuse on >= 100 MB of corpus-derived transactions.

Models a model compile: every layer reuses the same per-op transactions (the 43 AMD corpus files),
each is parsed, re-based into the layer's slice of the fused buffers, and all are fused into one
transaction. The time is reported as a ratio to a memcpy of the same bytes in the same run, into a
preallocated buffer (no page faults: the strictest baseline; the allocating ``b"".join`` is shown
too). "cold" clears the content-keyed OpIndex cache first (each distinct transaction is framed
once); "warm" starts with every op transaction already indexed, as when a model's layers reuse
the same op transaction objects. Medians of interleaved repeats.
Run: ``python -m benchmarks.txn_bench [--json]``.
"""

from __future__ import annotations

import json as _json
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

from npudispatch.txn import INDEX_CACHE, ArgRange, Transaction, fuse_rebased

CORPUS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "dd_stx_txn"
TARGET_BYTES = 100 << 20
LAYER_STRIDE = 1 << 32  # each layer's tensors live in their own 4 GiB window of every buffer
REPEATS = 5


def _corpus() -> list[bytes]:
    manifest = CORPUS_DIR / "MANIFEST.tsv"
    lines = manifest.read_text().splitlines()[1:]
    return [(CORPUS_DIR / line.split("\t")[0]).read_bytes() for line in lines if line.strip()]


def _pipeline(program: list[tuple[bytes, list[ArgRange]]]) -> bytes | memoryview:
    """Parse, re-base and fuse, up to the fused image in memory (``Transaction.buffer``: what
    ``FusedProgram.save`` writes and hashes, without a further copy into a ``bytes`` object)."""
    return fuse_rebased(
        [(Transaction.from_bytes(data), mapping) for data, mapping in program]
    ).buffer


def _measure(program: list[tuple[bytes, list[ArgRange]]], repeats: int) -> tuple[float, ...]:
    """Median (memcpy, join, cold, warm) seconds over ``repeats`` interleaved rounds."""
    every = [d for d, _ in program]
    views = [np.frombuffer(d, np.uint8) for d in every]
    out = np.empty(sum(len(d) for d in every), np.uint8)
    np.concatenate(views, out=out)  # fault the destination pages in once
    rounds: list[tuple[float, ...]] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.concatenate(views, out=out)
        t1 = time.perf_counter()
        b"".join(every)
        t2 = time.perf_counter()
        INDEX_CACHE.clear()
        _pipeline(program)
        t3 = time.perf_counter()
        _pipeline(program)
        t4 = time.perf_counter()
        rounds.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
    return tuple(statistics.median(column) for column in zip(*rounds))


def run(json: bool = False, target_bytes: int | None = None, repeats: int | None = None) -> dict:
    """Run the benchmark, print a summary (or one JSON object), and return the numbers."""
    target_bytes = TARGET_BYTES if target_bytes is None else target_bytes
    repeats = REPEATS if repeats is None else repeats
    if not (CORPUS_DIR / "MANIFEST.tsv").exists():
        result = {"skipped": f"AMD transaction corpus not found at {CORPUS_DIR}"}
        print(_json.dumps(result) if json else f"txn_bench skipped: {result['skipped']}")
        return result
    files = _corpus()
    distinct = sum(map(len, files))
    layers = -(-target_bytes // distinct)
    program = [
        (data, [ArgRange(a, 0, LAYER_STRIDE, a, layer * LAYER_STRIDE) for a in range(5)])
        for layer in range(layers)
        for data in files
    ]
    total = sum(len(d) for d, _ in program)

    memcpy, join, cold, warm = _measure(program, repeats)
    fused = _pipeline(program)
    num_ops = struct.unpack_from("<I", fused, 8)[0]
    if num_ops != sum(len(Transaction.from_bytes(d)) for d in files) * layers:
        raise RuntimeError(f"fused NumOps {num_ops} is not the sum of the parts")

    result = {
        "transactions": len(program),
        "distinct_transactions": len(files),
        "layers": layers,
        "total_mb": total / 1e6,
        "distinct_mb": distinct / 1e6,
        "memcpy_s": memcpy,
        "join_s": join,
        "cold_s": cold,
        "warm_s": warm,
        "cold_ratio_to_memcpy": cold / memcpy,
        "warm_ratio_to_memcpy": warm / memcpy,
        "cold_mb_per_s": total / 1e6 / cold,
        "warm_mb_per_s": total / 1e6 / warm,
    }
    if json:
        print(_json.dumps(result))
    else:
        print(
            f"txn parse+rebase+fuse of {len(program)} transactions ({total / 1e6:.1f} MB, "
            f"{len(files)} distinct, {layers} layers)\n"
            f"  memcpy     {memcpy * 1e3:8.1f} ms  (preallocated; allocating join "
            f"{join * 1e3:.1f} ms)\n"
            f"  cold cache {cold * 1e3:8.1f} ms  = {cold / memcpy:5.2f}x memcpy\n"
            f"  warm cache {warm * 1e3:8.1f} ms  = {warm / memcpy:5.2f}x memcpy"
        )
    return result


if __name__ == "__main__":
    run(json="--json" in sys.argv[1:])
