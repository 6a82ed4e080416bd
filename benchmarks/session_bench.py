"""Host overhead of ``Session.run``: the xrt backend on the fake pyxrt with a no-op device.

The device completes every command at once without touching memory, so the time measured is
npudispatch's own per-run work (feed checks, copy-in, buffer syncs, kernel call, copy-out). It is
compared with onnxruntime ``InferenceSession.run`` on the same tiny graph in the same process
(``Y = (X * Sigmoid(X)) * Z``, float32 [1, 8, 64], which runs entirely on the NPU).
Run: ``python -m benchmarks.session_bench [--json] [--quick]``.
"""

from __future__ import annotations

import json as jsonlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from npudispatch.dispatch import Session, compile_model
from npudispatch.progress import progress
from npudispatch.testing import install_fake_pyxrt, noop_executor, write_fake_xclbin

SHAPE = [1, 8, 64]


def tiny_model() -> onnx.ModelProto:
    """``Y = (X * Sigmoid(X)) * Z``: a SiLU-gated product, the smallest all-NPU graph."""
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Sigmoid", ["X"], ["s"], name="sigmoid"),
            helper.make_node("Mul", ["X", "s"], ["a"], name="silu_mul"),
            helper.make_node("Mul", ["a", "Z"], ["Y"], name="gate_mul"),
        ],
        "tiny_gate",
        [helper.make_tensor_value_info(n, f32, SHAPE) for n in ("X", "Z")],
        [helper.make_tensor_value_info("Y", f32, SHAPE)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _mean_seconds(fn: Callable[[], object], iterations: int, desc: str) -> float:
    fn()  # warm-up: first-run allocations and caches
    t0 = time.perf_counter()
    for _ in progress(range(iterations), desc=desc, leave=False):
        fn()
    return (time.perf_counter() - t0) / iterations


def run(json: bool = False, quick: bool = False) -> dict:
    """Time both runtimes; print a summary (or one JSON object); return the numbers."""
    iterations = 50 if quick else 2000
    model = tiny_model()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(SHAPE).astype(np.float32) for n in ("X", "Z")}
    compiled = compile_model(model)
    if len(compiled.programs) != 1 or compiled.report.unsupported:
        raise RuntimeError(
            f"the tiny graph should be one NPU partition, got {compiled.labels} "
            f"(unsupported: {[u.to_dict() for u in compiled.report.unsupported]})"
        )
    with tempfile.TemporaryDirectory() as tmp, install_fake_pyxrt(noop_executor):
        xclbin = write_fake_xclbin(Path(tmp) / "overlay.xclbin")
        sess = Session(compiled, backend="xrt", fallback=None, xclbin=xclbin)
        npu = _mean_seconds(lambda: sess.run(None, feeds), iterations, "Session.run (xrt)")
        kernel_calls = sess.last_run_stats.kernel_calls if sess.last_run_stats else 0
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cpu = _mean_seconds(lambda: ref.run(None, feeds), iterations, "onnxruntime run")
    result = {
        "iterations": iterations,
        "shape": SHAPE,
        "kernel_calls_per_run": kernel_calls,
        "session_run_us": npu * 1e6,
        "onnxruntime_run_us": cpu * 1e6,
        "ratio_to_onnxruntime": npu / cpu,
    }
    if json:
        print(jsonlib.dumps(result))
    else:
        print(
            f"Session.run host overhead (xrt backend, fake pyxrt, no-op device), {iterations} runs\n"
            f"  npudispatch  {npu * 1e6:9.1f} us/run ({kernel_calls} kernel call)\n"
            f"  onnxruntime  {cpu * 1e6:9.1f} us/run\n"
            f"  ratio        {npu / cpu:9.2f}x"
        )
    return result


if __name__ == "__main__":
    run(json="--json" in sys.argv[1:], quick="--quick" in sys.argv[1:])
