"""Compile time of the llama2 MLP vs onnxruntime ``InferenceSession`` creation on the same model.

Both start from the model in memory: ``compile_model`` from the ``onnx.ModelProto`` (load,
rewrite, partition, plan, weight formatting, emit), onnxruntime from its serialized bytes
(serialized once, outside the timing). Best of ``repeat`` runs each, interleaved.
Run: ``python -m benchmarks.compile_bench [--json] [--quick]`` (quick: the small MLP).
"""

from __future__ import annotations

import json as jsonlib
import sys
import time

import onnxruntime as ort

from npudispatch.dispatch import compile_model
from npudispatch.examples import build_example
from npudispatch.progress import progress


def run(json: bool = False, quick: bool = False, repeat: int | None = None) -> dict:
    """Time both; print a summary (or one JSON object); return the numbers."""
    name = "llama2-mlp-small" if quick else "llama2-mlp"
    repeat = repeat or (1 if quick else 3)
    model = build_example(name)
    data = model.SerializeToString()
    best_compile = best_ort = float("inf")
    compiled = None
    for _ in progress(range(repeat), desc="compile vs onnxruntime", leave=False):
        t0 = time.perf_counter()
        compiled = compile_model(model)
        t1 = time.perf_counter()
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        t2 = time.perf_counter()
        best_compile, best_ort = min(best_compile, t1 - t0), min(best_ort, t2 - t1)
    assert compiled is not None
    result = {
        "model": name,
        "model_mb": len(data) / 1e6,
        "partitions": compiled.labels,
        "compile_s": best_compile,
        "compile_stages_s": dict(compiled.timings),
        "onnxruntime_session_s": best_ort,
        "ratio_to_onnxruntime": best_compile / best_ort,
    }
    if json:
        print(jsonlib.dumps(result))
    else:
        stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in compiled.timings.items())
        print(
            f"compile {name} ({len(data) / 1e6:.1f} MB, partitions {compiled.labels})\n"
            f"  compile_model             {best_compile * 1e3:8.1f} ms  ({stages} ms)\n"
            f"  onnxruntime session init  {best_ort * 1e3:8.1f} ms\n"
            f"  ratio                     {best_compile / best_ort:8.2f}x"
        )
    return result


if __name__ == "__main__":
    run(json="--json" in sys.argv[1:], quick="--quick" in sys.argv[1:])
