"""Every benchmark in one run, side by side: a table of ratios (or one JSON object with ``--json``).

Run: ``python -m benchmarks [--json] [--quick]`` (or ``python benchmarks/run.py``). Each row
calls one per-area benchmark module and turns its numbers into a ratio measured in this same run:

============================  ==========================================================
``compile``                   compile_model / onnxruntime InferenceSession creation (compile_bench)
``plan_llama2_mlp``           plan intermediates / lower bound; DD no-reuse in the values (mlp_bench)
``plan_synthetic``            best packing / lower bound on plan_bench's network trace
``txn``                       parse + re-base + fuse (warm cache) / memcpy (txn_bench)
``session``                   Session.run on fake-pyxrt no-op device / onnxruntime run (session_bench)
``weights_q4_KxN``            4-bit weight formatting / memcpy of the output bytes (weights_bench)
``emulator_llama2_mlp``       emulator Session.run / onnxruntime run, M=1 (mlp_bench)
``emulator_ppocr_det``        emulator Session.run / onnxruntime run, PP-OCRv4 detector (cnn_bench)
``external_data_rss``         peak RSS growth of Session + run / size of the external data file
                              (328 MB, read by a CPU segment; external_data_bench)
``memory_llama2_mlp``         largest peak RSS growth of compile / load / run (fresh processes)
                              / size of the 72 MB model file, onnxruntime beside (memory_bench)
``generate_decode_step``      emulator decode step / onnxruntime-genai decode step, Qwen2 int4
                              folder, plus bytes copied per decode step (generate_bench)
``start_llama2_mlp``          warm-cache Session()+first run / cold one, no-op device (start_bench)
``start_ppocr_cls``           the same for PP-OCR's classifier (../shared/models; not --quick)
``cli_start``                 slower of ``npudispatch --help`` / ``txn stats FILE`` (fresh
                              processes) / ``python -c "import numpy"`` (cli_start_bench)
============================  ==========================================================

``--quick`` uses tiny sizes and single repeats (for tests); the numbers are then not meaningful.
A benchmark that fails is reported in its row (``error``) and makes the exit status 1; one that
cannot run here (no corpus) is reported as ``skipped``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import (
    cli_start_bench,
    cnn_bench,
    compile_bench,
    external_data_bench,
    generate_bench,
    memory_bench,
    mlp_bench,
    plan_bench,
    session_bench,
    start_bench,
    txn_bench,
    weights_bench,
)
from npudispatch.dispatch.allocate import (
    allocate,
    dd_style_no_reuse_size,
    lower_bound,
)
from npudispatch.progress import progress

__all__ = ["Row", "collect", "machine", "main", "to_json", "to_table"]


@dataclass
class Row:
    """One benchmark: measured values, a ratio and what the ratio divides, a one-line summary."""

    key: str
    ratio: float | None
    ratio_of: str
    summary: str
    measured: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measured": self.measured, "ratio": self.ratio}
        out["ratio_of"] = self.ratio_of
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error:
            out["error"] = self.error
        return out


def _quiet(fn: Callable[..., dict], **kwargs: Any) -> dict:
    """Call a module's ``run(json=True, ...)`` without letting its own printout through."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(json=True, **kwargs)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _compile(quick: bool) -> list[Row]:
    r = _quiet(compile_bench.run, quick=quick)
    return [
        Row(
            "compile",
            r["ratio_to_onnxruntime"],
            "compile_model / onnxruntime InferenceSession()",
            f"{r['model']} ({r['model_mb']:.1f} MB): compile {_ms(r['compile_s'])}, "
            f"onnxruntime session {_ms(r['onnxruntime_session_s'])}",
            r,
        )
    ]


def _mlp(quick: bool) -> list[Row]:
    r = _quiet(mlp_bench.run, quick=quick)
    p, e = r["plan"], r["emulator"]
    return [
        Row(
            "plan_llama2_mlp",
            p["ratio_to_lower_bound"],
            "plan intermediates / lower bound",
            f"scratch {p['scratch_bytes']:,} B, bound {p['lower_bound_bytes']:,} B, DD no-reuse "
            f"{p['dd_no_reuse_bytes']:,} B ({p['dd_no_reuse_over_plan']:.2f}x plan)",
            p,
        ),
        Row(
            "emulator_llama2_mlp",
            e["ratio_to_onnxruntime"],
            "emulator Session.run / onnxruntime run",
            f"{e['model']} M=1: emulator {_ms(e['emulator_run_s'])}, onnxruntime "
            f"{_ms(e['onnxruntime_run_s'])}, max|diff| {e['max_abs_diff']:.3g}; CPU time "
            f"{_ms(e['emulator_cpu_s'])} vs {_ms(e['onnxruntime_cpu_s'])} "
            f"({e['emulator_cpu_s'] / max(e['onnxruntime_cpu_s'], 1e-9):.1f}x)",
            e,
        ),
    ]


def _cnn(quick: bool) -> list[Row]:
    r = _quiet(cnn_bench.run, quick=quick)
    what = "emulator Session.run / onnxruntime run"
    if "skipped" in r:
        return [Row("emulator_ppocr_det", None, what, r["skipped"], {}, r["skipped"])]
    return [
        Row(
            "emulator_ppocr_det",
            r["ratio_to_onnxruntime"],
            what,
            f"PP-OCRv4 det {'x'.join(map(str, r['input_shape']))}: emulator "
            f"{_ms(r['emulator_run_s'])}, onnxruntime {_ms(r['onnxruntime_run_s'])}, "
            f"{r['kernel_calls']} kernel call(s), mean|diff| {r['mean_abs_diff']:.2g}",
            r,
        )
    ]


def _plan_synthetic(quick: bool) -> list[Row]:
    n = 1_000 if quick else 10_000
    intervals = plan_bench.network_trace(n, np.random.default_rng(0))
    t0 = time.perf_counter()
    alloc = allocate(intervals, 64)
    seconds = time.perf_counter() - t0
    bound = lower_bound(intervals, 64)
    dd = dd_style_no_reuse_size(intervals)
    measured = {
        "tensors": n,
        "packed_bytes": alloc.size,
        "lower_bound_bytes": bound,
        "dd_no_reuse_bytes": dd,
        "strategy": alloc.strategy,
        "allocate_s": seconds,
        "dd_no_reuse_over_packed": dd / alloc.size,
    }
    return [
        Row(
            "plan_synthetic",
            alloc.size / bound,
            "packed / lower bound",
            f"{n:,} tensors: packed {alloc.size:,} B ({alloc.strategy}, {_ms(seconds)}), "
            f"DD no-reuse {dd / alloc.size:.0f}x packed",
            measured,
        )
    ]


def _txn(quick: bool) -> list[Row]:
    sizes = {"target_bytes": 2 << 20, "repeats": 1} if quick else {}
    r = _quiet(txn_bench.run, **sizes)
    if "skipped" in r:
        return [Row("txn", None, "parse+rebase+fuse / memcpy", r["skipped"], {}, r["skipped"])]
    return [
        Row(
            "txn",
            r["warm_ratio_to_memcpy"],
            "parse+rebase+fuse (warm) / preallocated memcpy",
            f"{r['total_mb']:.1f} MB, {r['transactions']} txns: warm {_ms(r['warm_s'])}, cold "
            f"{_ms(r['cold_s'])} ({r['cold_ratio_to_memcpy']:.2f}x), memcpy {_ms(r['memcpy_s'])}; "
            f"allocating join {_ms(r['join_s'])} ({r['warm_s'] / r['join_s']:.2f}x)",
            r,
        )
    ]


def _session(quick: bool) -> list[Row]:
    r = _quiet(session_bench.run, quick=quick)
    return [
        Row(
            "session",
            r["ratio_to_onnxruntime"],
            "Session.run (xrt, no-op device) / onnxruntime run",
            f"tiny graph {r['shape']}: {r['session_run_us']:.1f} us vs "
            f"{r['onnxruntime_run_us']:.1f} us per run",
            r,
        )
    ]


def _start(quick: bool) -> list[Row]:
    r = _quiet(start_bench.run, quick=quick)
    rows = []
    for name, entry in r.items():
        key = "start_llama2_mlp" if name.startswith("llama2-mlp") else f"start_{name}"
        noop, emu = entry["noop_device"], entry["emulator"]
        rows.append(
            Row(
                key,
                entry["ratio_warm_to_cold"],
                "warm-cache start / cold start (no-op device)",
                f"{name} ({entry['model_mb']:.1f} MB), Session()+first run: cold "
                f"{_ms(noop['cold_s'])}, warm {_ms(noop['warm_s'])}; on the emulator "
                f"{_ms(emu['cold_s'])} vs {_ms(emu['warm_s'])} ({emu['ratio']:.2f}x)",
                {"model": name, **entry},
            )
        )
    return rows


def _cli_start(quick: bool) -> list[Row]:
    r = _quiet(cli_start_bench.run, quick=quick)
    met = "met" if r["target_met"] else "NOT met"
    return [
        Row(
            "cli_start",
            r["ratio_to_numpy_start"],
            "slower of `npudispatch --help` / `txn stats FILE` / `python -c 'import numpy'`",
            f"--help {_ms(r['help_s'])}, txn stats ({r['txn_bytes']:,} B) "
            f"{_ms(r['txn_stats_s'])} vs {_ms(r['numpy_start_s'])}; target "
            f"{r['target_s']} s each {met}",
            r,
        )
    ]


def _memcpy_seconds(nbytes: int, repeat: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def _weights(quick: bool) -> list[Row]:
    repeat = 1 if quick else 5
    r = _quiet(weights_bench.run, repeat=repeat)
    rows = []
    for name, case in r.items():
        if not name.startswith("q4_"):
            continue
        memcpy = _memcpy_seconds(case["output_bytes"], max(repeat, 3))
        measured = {
            **case,
            "memcpy_s": memcpy,
            "memcpy_gb_per_s": case["output_bytes"] / memcpy / 1e9,
        }
        rows.append(
            Row(
                f"weights_{name}",
                case["seconds"] / memcpy,
                "4-bit formatting / memcpy of the output",
                f"{case['output_bytes'] / 1e6:.1f} MB: {case['gb_per_s']:.2f} GB/s "
                f"({_ms(case['seconds'])}), memcpy {measured['memcpy_gb_per_s']:.1f} GB/s",
                measured,
            )
        )
    return rows


#: Benchmark groups in run order: (name shown on failure, function returning its rows).
def _external_data(quick: bool) -> list[Row]:
    r = _quiet(external_data_bench.run, quick=quick)
    return [
        Row(
            "external_data_rss",
            r["growth_over_data"],
            "peak RSS growth (Session + run) / external data size",
            f"{r['data_bytes'] / 1e6:.0f} MB in model.onnx.data, run from another directory: "
            f"peak RSS grew {r['growth_bytes'] / 1e6:.1f} MB, output "
            f"{'correct' if r['output_correct'] else 'WRONG'}",
            r,
        )
    ]


def _memory(quick: bool) -> list[Row]:
    r = _quiet(memory_bench.run, quick=quick)
    sc, mb = r["scenarios"], 1e6
    parts = ", ".join(
        f"{k} +{v['growth_bytes'] / mb:.0f}" for k, v in sc.items() if k != "onnxruntime"
    )
    run2 = r["run2_transient_bytes"]
    return [
        Row(
            "memory_llama2_mlp",
            r["ratio"],
            "largest peak RSS growth (compile/load/run) / model",
            f"{r['model_bytes'] / mb:.0f} MB model, growth MB: {parts}; onnxruntime "
            f"+{sc['onnxruntime']['growth_bytes'] / mb:.0f}; 2nd run transient "
            f"{'n/a' if run2 is None else f'{run2 / mb:.1f} MB'}",
            r,
        )
    ]


def _generate(quick: bool) -> list[Row]:
    what = "emulator decode step / onnxruntime-genai decode step"
    try:
        r = _quiet(generate_bench.run, quick=quick)
    except generate_bench.Unavailable as exc:
        return [Row("generate_decode_step", None, what, str(exc), {}, str(exc))]
    return [
        Row(
            "generate_decode_step",
            r["ratio_to_genai"],
            what,
            f"{r['model']}: {_ms(r['emulator_decode_step_s'])} vs "
            f"{r['genai_decode_step_s'] * 1e3:.2f} ms, {r['bytes_last_step']:,} B copied per "
            f"step (first step {r['bytes_first_step']:,} B), {r['kernel_calls_per_step']} kernel "
            f"call, one {r['const_bytes_shared']:,} B weight image for prefill and decode",
            r,
        )
    ]


BENCHMARKS: list[tuple[str, Callable[[bool], list[Row]]]] = [
    ("compile", _compile),
    ("plan_llama2_mlp+emulator_llama2_mlp", _mlp),
    ("plan_synthetic", _plan_synthetic),
    ("txn", _txn),
    ("session", _session),
    ("weights", _weights),
    ("emulator_ppocr_det", _cnn),
    ("external_data_rss", _external_data),
    ("memory_llama2_mlp", _memory),
    ("generate_decode_step", _generate),
    ("start", _start),
    ("cli_start", _cli_start),
]


def collect(quick: bool = False) -> list[Row]:
    """Run every benchmark; a failing one becomes a row with ``error`` instead of stopping all."""
    rows: list[Row] = []
    for name, fn in progress(BENCHMARKS, desc="benchmarks"):
        try:
            rows.extend(fn(quick))
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            rows.append(Row(name, None, "", f"FAILED: {detail}", error=detail))
    return rows


def machine() -> dict[str, Any]:
    """Where the numbers were taken: CPU model, cores, OS, Python and key library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def to_json(rows: list[Row], quick: bool) -> dict[str, Any]:
    """One object: a key per benchmark (measured values, ratio, ratio_of) plus ``machine``."""
    out: dict[str, Any] = {row.key: row.to_dict() for row in rows}
    out["machine"] = {**machine(), "quick": quick}
    return out


def to_table(rows: list[Row]) -> str:
    """Fixed-width text table: benchmark, ratio, what the ratio divides, measured summary."""
    lines = [f"{'benchmark':<28} {'ratio':>8}  {'ratio of':<50} measured", "-" * 124]
    for row in rows:
        ratio = "skipped" if row.skipped else "ERROR" if row.error else f"{row.ratio:.2f}x"
        lines.append(f"{row.key:<28} {ratio:>8}  {row.ratio_of:<50} {row.summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 when a benchmark failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (tests)")
    args = parser.parse_args(argv)
    rows = collect(quick=args.quick)
    if args.json:
        print(json.dumps(to_json(rows, args.quick), indent=1))
    else:
        m = machine()
        print(f"# {m['cpu']}, {m['cores']} cores, {m['os']}, Python {m['python']}")
        print(to_table(rows))
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
