"""The llama2 MLP at M=1 (4-bit 4096x11008): its buffer plan and its run on the emulator.

* plan: scratch bytes of the compiled plan vs the lower bound (peak of live bytes) vs DD-style
  packing without reuse (every intermediate in its own slot), summed over the NPU partitions;
* emulator: ``Session.run`` on the emulator backend (the whole fused program, kernels included)
  vs onnxruntime ``run`` on the same model, best of ``repeat`` after a warm-up run, with the
  largest absolute difference of the outputs. The ratio is of wall times; the CPU times of the
  process (``time.process_time``: every thread, onnxruntime's pool included) are reported too,
  since on a loaded shared VM the wall time of the longer run grows most. Each timed run starts
  after a 50 ms pause: onnxruntime's pool threads spin on both cores for a while after a run
  returns, which slowed the emulator run that followed by ~10 ms.

Run: ``python -m benchmarks.mlp_bench [--json] [--quick]`` (quick: the small MLP at m=1).
"""

from __future__ import annotations

import json as jsonlib
import sys
import time

import numpy as np
import onnxruntime as ort

from npudispatch.dispatch import Session, compile_model
from npudispatch.examples import build_example
from npudispatch.progress import progress

_SETTLE_S = 0.05  # pause before each timed run


def plan_figures(compiled) -> dict:
    """Scratch, lower-bound and DD-without-reuse bytes summed over the compiled programs."""
    plans = [p.plan for p in compiled.programs.values()]
    if not plans:
        raise RuntimeError(f"no NPU partition to plan (partitions {compiled.labels})")
    scratch = sum(p.scratch_bytes for p in plans)
    intermediates = sum(p.scratch_intermediate_bytes for p in plans)
    bound = sum(p.scratch_lower_bound_bytes for p in plans)
    dd = sum(p.dd_no_reuse_bytes for p in plans)
    return {
        "programs": len(plans),
        "scratch_bytes": scratch,
        "intermediate_bytes": intermediates,
        "lower_bound_bytes": bound,
        "dd_no_reuse_bytes": dd,
        "strategies": [p.strategy for p in plans],
        "ratio_to_lower_bound": intermediates / bound if bound else 1.0,
        "dd_no_reuse_over_plan": dd / intermediates if intermediates else 1.0,
    }


def run(json: bool = False, quick: bool = False, repeat: int | None = None) -> dict:
    """Compile, plan and run the MLP; print a summary (or one JSON object); return the numbers."""
    name = "llama2-mlp-small" if quick else "llama2-mlp"
    repeat = repeat or (1 if quick else 3)
    model = build_example(name, m=1)
    compiled = compile_model(model)
    plan = plan_figures(compiled)
    sess = Session(compiled, backend="emulator")
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden = sess.get_inputs()[0].shape
    x = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    (y,), (y_ref,) = sess.run(None, {"X": x}), ref.run(None, {"X": x})  # warm-up + check
    best_npu = best_ort = cpu_npu = cpu_ort = float("inf")
    for _ in progress(range(repeat), desc="emulator vs onnxruntime", leave=False):
        # each run starts on idle cores: onnxruntime's pool threads spin for a while after its
        # run returns and would otherwise take both cores (and CPU time) from the next run
        time.sleep(_SETTLE_S)
        c0, t0 = time.process_time(), time.perf_counter()
        sess.run(None, {"X": x})
        c_npu, t_npu = time.process_time() - c0, time.perf_counter() - t0
        time.sleep(_SETTLE_S)
        c1, t1 = time.process_time(), time.perf_counter()
        ref.run(None, {"X": x})
        c2, t2 = time.process_time(), time.perf_counter()
        best_npu, best_ort = min(best_npu, t_npu), min(best_ort, t2 - t1)
        cpu_npu, cpu_ort = min(cpu_npu, c_npu), min(cpu_ort, c2 - c1)
    stats = sess.last_run_stats
    emulator = {
        "model": name,
        "input_shape": hidden,
        "partitions": compiled.labels,
        "kernel_calls": stats.kernel_calls if stats else 0,
        "emulator_run_s": best_npu,
        "onnxruntime_run_s": best_ort,
        "emulator_cpu_s": cpu_npu,
        "onnxruntime_cpu_s": cpu_ort,
        "max_abs_diff": float(np.max(np.abs(y - y_ref))),
        "max_abs_ref": float(np.max(np.abs(y_ref))),
        "ratio_to_onnxruntime": best_npu / best_ort,
    }
    result = {"plan": plan, "emulator": emulator}
    if json:
        print(jsonlib.dumps(result))
    else:
        print(
            f"{name} at M=1, partitions {compiled.labels}\n"
            f"  plan: scratch {plan['scratch_bytes']:,} B, intermediates "
            f"{plan['intermediate_bytes']:,} B, lower bound {plan['lower_bound_bytes']:,} B "
            f"({plan['ratio_to_lower_bound']:.3f}x), DD without reuse "
            f"{plan['dd_no_reuse_bytes']:,} B ({plan['dd_no_reuse_over_plan']:.2f}x the plan)\n"
            f"  emulator run {best_npu * 1e3:8.1f} ms vs onnxruntime {best_ort * 1e3:8.2f} ms "
            f"= {best_npu / best_ort:.1f}x (max |diff| {emulator['max_abs_diff']:.3g} of "
            f"{emulator['max_abs_ref']:.3g}); CPU time {cpu_npu * 1e3:.1f} ms vs "
            f"{cpu_ort * 1e3:.2f} ms = {cpu_npu / max(cpu_ort, 1e-9):.1f}x"
        )
    return result


if __name__ == "__main__":
    run(json="--json" in sys.argv[1:], quick="--quick" in sys.argv[1:])
